"""L4Q fused kernels vs their PyTorch references at 7B and 70B layer shapes (needs a CUDA GPU).

For each linear shape (W0 in bf16, LoRA rank 16, 4-bit, groups of 128, a micro-batch
of --tokens tokens), in one process, side by side:

  fake-quant   Ŵ = Q(W0 + c·BA) in bf16: lowmem.kernels.l4q.fake_quant_cuda vs
               fake_quant_reference
  layer step   L4QLinear forward + backward (∂x, ∂A, ∂B, ∂s, ∂β): kernels on vs
               LOWMEM_KERNELS=0 (the reference path the layer takes without them)

Time is the median of --repeat runs between CUDA events after --warmup runs; memory
is torch.cuda.max_memory_allocated() above what was allocated before the call
(the call's temporaries and outputs). Ratios are reference / kernel.

    python benchmarks/kernels_l4q.py                  # all shapes
    python benchmarks/kernels_l4q.py --shapes 7b      # the 7B/8B shapes only

Without CUDA it compiles the kernels (cold, then from the disk cache), prints those
times and stops: every other figure needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from lowmem.kernels import l4q, runtime

SHAPES = {  # name: (out, in)
    "7b": [("8B q_proj", 4096, 4096), ("8B up_proj", 14336, 4096), ("8B down_proj", 4096, 14336)],
    "70b": [("70B q_proj", 8192, 8192), ("70B up_proj", 28672, 8192), ("70B down_proj", 8192, 28672)],
}
MiB = 2**20


def measure(fn, warmup: int, repeat: int) -> tuple[float, int]:
    """(median milliseconds, peak bytes allocated above the starting point) of fn()."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    peak = 0
    for _ in range(repeat):
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        peak = max(peak, torch.cuda.max_memory_allocated() - base)
    return statistics.median(times), peak


def compile_times() -> None:
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LOWMEM_CACHE"] = cache
        for arch in ("sm_80", "sm_90"):
            t0 = time.perf_counter()
            runtime.compile_source(l4q.SOURCE, arch, "cubin")
            t1 = time.perf_counter()
            runtime.compile_source(l4q.SOURCE, arch, "cubin")
            t2 = time.perf_counter()
            print(f"compile l4q for {arch}: {t1 - t0:.2f} s with NVRTC {'.'.join(map(str, runtime.nvrtc_version()))}, "
                  f"{(t2 - t1) * 1e3:.1f} ms from the disk cache")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", choices=["7b", "70b", "all"], default="all")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    compile_times()
    if not torch.cuda.is_available():
        print("no CUDA device: kernel vs reference timings and memory need a GPU", file=sys.stderr)
        return 2
    from lowmem.kernels.device import device_info
    from lowmem.quant.l4q import L4QLinear

    print(f"device: {device_info(0).describe()}, torch {torch.__version__}")
    print(f"rank {args.rank}, {args.bits}-bit, group {args.group}, {args.tokens} tokens, W0 and compute bf16; "
          f"median of {args.repeat}; memory = peak allocated above the start")
    header = (f"{'layer':<15}{'what':<12}{'kernel ms':>10}{'ref ms':>10}{'speedup':>9}"
              f"{'kernel MiB':>12}{'ref MiB':>10}{'mem ratio':>10}")
    print(header)
    print("-" * len(header))
    shapes = SHAPES["7b"] + SHAPES["70b"] if args.shapes == "all" else SHAPES[args.shapes]
    for name, out_f, in_f in shapes:
        torch.manual_seed(0)
        base = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = L4QLinear(base, args.rank, 2 * args.rank, args.bits, args.group)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.01)               # a trained-looking adapter, not zeros
        w0, a, b = layer.base.weight, layer.lora_A, layer.lora_B
        step, offset = layer.quant_step, layer.quant_offset
        x = torch.randn(1, args.tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)

        def fq_kernel():
            l4q.fake_quant_cuda(w0, a, b, step, offset, layer.scaling, args.bits, args.group, torch.bfloat16)

        def fq_ref():
            l4q.fake_quant_reference(w0, a, b, step, offset, layer.scaling, args.bits, args.group, torch.bfloat16)

        def layer_step(mode):
            def run():
                os.environ["LOWMEM_KERNELS"] = mode
                layer.zero_grad(set_to_none=True)
                x.grad = None
                layer(x).float().sum().backward()
            return run

        with torch.no_grad():
            same = torch.equal(l4q.fake_quant_cuda(w0, a, b, step, offset, layer.scaling, args.bits, args.group,
                                                   torch.bfloat16),
                               l4q.fake_quant_reference(w0, a, b, step, offset, layer.scaling, args.bits,
                                                        args.group, torch.bfloat16))
        rows = [("fake-quant", fq_kernel, fq_ref), ("layer step", layer_step("1"), layer_step("0"))]
        for what, kernel_fn, ref_fn in rows:
            with torch.no_grad() if what == "fake-quant" else torch.enable_grad():
                tk, mk = measure(kernel_fn, args.warmup, args.repeat)
                tr, mr = measure(ref_fn, args.warmup, args.repeat)
            print(f"{name:<15}{what:<12}{tk:>10.3f}{tr:>10.3f}{tr / tk:>8.2f}x"
                  f"{mk / MiB:>12.1f}{mr / MiB:>10.1f}{mr / max(mk, 1):>9.2f}x")
        os.environ.pop("LOWMEM_KERNELS", None)
        print(f"{'':<15}(Ŵ bit-identical to the reference: {same})")
        del layer, base, x
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
