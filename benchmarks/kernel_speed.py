"""lowmem.kernels vs their PyTorch references at 7B/8B and 70B shapes (needs a CUDA GPU).

In one process, side by side, kernels on vs off (the reference each call takes
without them):

l4q (W0 in bf16, LoRA rank 16, 4-bit, groups of 128, --tokens tokens), for the
q/up/down projection shapes:
  fake-quant     Ŵ = Q(W0 + c·BA) in bf16: fake_quant_cuda vs fake_quant_reference
  layer step     L4QLinear forward + backward (∂x, ∂A, ∂B, ∂s, ∂β)

cross-entropy (Llama-3's 128,256-token vocabulary, bf16, --tokens positions):
  ce chunk       one chunk of --chunk positions: loss, then the gradient in place,
                 from logits already computed (the kernels' own work)
  chunked loss   lowmem.loss.causal_lm_loss(chunk_size=--chunk) forward + backward
                 from the final hidden states (matmuls included)
  whole loss     the same with chunk_size=0: the logits kept for backward (kernels)
                 vs F.cross_entropy on fp32 logits (reference)

adam8bit (one optimizer step of a whole tensor, 2^20 values a call, V rounded stochastically):
  8-bit step     an 8B up_proj (14336 x 4096) and the 8B embedding (128256 x 4096), bf16
                 weight and gradient: adam8bit_step_ with kernels on vs off, and
                 bitsandbytes' fused op (rounds to nearest; the speed lowmem gave up
                 when it took the update over) on the same tensor

Time is the median of --repeat runs between CUDA events after --warmup runs; memory
is torch.cuda.max_memory_allocated() above what was allocated before the call (the
call's temporaries and outputs). Ratios are reference / kernel.

    python benchmarks/kernel_speed.py                        # every kernel, every shape
    python benchmarks/kernel_speed.py --kernel l4q --shapes 7b

Without CUDA it compiles the kernels a bf16 run uses (cold, then from the disk
cache), prints those times and stops with status 2: every other figure needs a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

from lowmem.kernels import adam8bit, cross_entropy, l4q, runtime

L4Q_SHAPES = {  # name: (out, in)
    "7b": [("8B q_proj", 4096, 4096), ("8B up_proj", 14336, 4096), ("8B down_proj", 4096, 14336)],
    "70b": [("70B q_proj", 8192, 8192), ("70B up_proj", 28672, 8192), ("70B down_proj", 8192, 28672)],
}
HIDDEN = {"7b": [("8B loss", 4096)], "70b": [("70B loss", 8192)]}   # the final hidden size
VOCAB = 128256                                                     # Llama 3
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
    """What a bf16 run compiles on first use, cold and then from the disk cache (in a scratch cache)."""
    saved = os.environ.get("LOWMEM_CACHE")
    with tempfile.TemporaryDirectory() as cache:
        os.environ["LOWMEM_CACHE"] = cache
        try:
            for source in (l4q.source(torch.bfloat16, torch.bfloat16), cross_entropy.source(torch.bfloat16),
                           adam8bit.source(torch.bfloat16, torch.bfloat16)):
                for arch in ("sm_80", "sm_90"):
                    t0 = time.perf_counter()
                    runtime.compile_source(source, arch, "cubin")
                    t1 = time.perf_counter()
                    runtime.compile_source(source, arch, "cubin")
                    t2 = time.perf_counter()
                    print(f"compile {source.name} for {arch}: {t1 - t0:.2f} s with NVRTC "
                          f"{'.'.join(map(str, runtime.nvrtc_version()))}, {(t2 - t1) * 1e3:.1f} ms from the disk cache")
        except runtime.KernelUnavailable as e:
            print(f"no compile times: {e}", file=sys.stderr)
        finally:
            if saved is None:
                os.environ.pop("LOWMEM_CACHE", None)
            else:
                os.environ["LOWMEM_CACHE"] = saved


HEADER = (f"{'shape':<15}{'what':<14}{'kernel ms':>10}{'ref ms':>10}{'speedup':>9}"
          f"{'kernel MiB':>12}{'ref MiB':>10}{'mem ratio':>10}")


def compare(name: str, what: str, kernel_fn, ref_fn, args) -> None:
    """One row: kernel_fn with kernels on, ref_fn with LOWMEM_KERNELS=0, side by side."""
    def with_kernels(mode, fn):
        def run():
            os.environ["LOWMEM_KERNELS"] = mode
            fn()
        return run

    try:
        tk, mk = measure(with_kernels("1", kernel_fn), args.warmup, args.repeat)
        tr, mr = measure(with_kernels("0", ref_fn), args.warmup, args.repeat)
    finally:
        os.environ.pop("LOWMEM_KERNELS", None)
    print(f"{name:<15}{what:<14}{tk:>10.3f}{tr:>10.3f}{tr / tk:>8.2f}x"
          f"{mk / MiB:>12.1f}{mr / MiB:>10.1f}{mr / max(mk, 1):>9.2f}x")


def bench_l4q(args) -> None:
    from lowmem.quant.l4q import L4QLinear

    print(f"\nl4q: rank {args.rank}, {args.bits}-bit, group {args.group}, {args.tokens} tokens, W0 and compute bf16")
    print(HEADER)
    print("-" * len(HEADER))
    shapes = L4Q_SHAPES["7b"] + L4Q_SHAPES["70b"] if args.shapes == "all" else L4Q_SHAPES[args.shapes]
    for name, out_f, in_f in shapes:
        torch.manual_seed(0)
        base = torch.nn.Linear(in_f, out_f, bias=False, device="cuda", dtype=torch.bfloat16)
        layer = L4QLinear(base, args.rank, 2 * args.rank, args.bits, args.group)
        with torch.no_grad():
            layer.lora_B.normal_(std=0.01)               # a trained-looking adapter, not zeros
        w0, a, b = layer.base.weight, layer.lora_A, layer.lora_B
        step, offset = layer.quant_step, layer.quant_offset
        x = torch.randn(1, args.tokens, in_f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        fq = (w0, a, b, step, offset, layer.scaling, args.bits, args.group, torch.bfloat16)

        def layer_step():
            layer.zero_grad(set_to_none=True)
            x.grad = None
            layer(x).float().sum().backward()

        with torch.no_grad():
            same = torch.equal(l4q.fake_quant_cuda(*fq), l4q.fake_quant_reference(*fq))
            compare(name, "fake-quant", lambda: l4q.fake_quant_cuda(*fq), lambda: l4q.fake_quant_reference(*fq),
                    args)
        compare(name, "layer step", layer_step, layer_step, args)
        print(f"{'':<15}(Ŵ bit-identical to the reference: {same})")
        del layer, base, x
        torch.cuda.empty_cache()


def bench_cross_entropy(args) -> None:
    from lowmem.loss import causal_lm_loss

    print(f"\ncross-entropy: vocabulary {VOCAB}, {args.tokens} positions, chunks of {args.chunk}, bf16")
    print(HEADER)
    print("-" * len(HEADER))
    names = HIDDEN["7b"] + HIDDEN["70b"] if args.shapes == "all" else HIDDEN[args.shapes]
    for name, hidden_size in names:
        torch.manual_seed(0)
        hidden = torch.randn(1, args.tokens, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        weight = torch.randn(VOCAB, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
        labels = torch.randint(0, VOCAB, (1, args.tokens), device="cuda")
        chunk = min(args.chunk, args.tokens)
        targets = labels[0, :chunk]
        logits = (hidden[0, :chunk].detach() @ weight.T).contiguous()
        grad = torch.full((chunk,), 1.0 / chunk, device="cuda")

        # Each side works on its own copy, made outside the timed calls; backward overwrites it
        # with a gradient, which the next repeat takes as logits (timing does not depend on values).
        work_kernel, work_ref = logits.clone(), logits.clone()

        def ce_kernel():
            cross_entropy.cross_entropy_cuda(work_kernel, targets)
            cross_entropy.cross_entropy_backward_cuda(work_kernel, targets, grad)

        def ce_ref():
            cross_entropy.cross_entropy_reference(work_ref, targets)
            cross_entropy.cross_entropy_backward_reference(work_ref, targets, grad)

        def loss_step(chunk_size):
            def run():
                causal_lm_loss(hidden, weight, labels, chunk_size=chunk_size).backward()
                hidden.grad = None          # freed before the next repeat reads its starting point
            return run

        with torch.no_grad():
            compare(name, "ce chunk", ce_kernel, ce_ref, args)
        compare(name, "chunked loss", loss_step(chunk), loss_step(chunk), args)
        compare(name, "whole loss", loss_step(0), loss_step(0), args)
        del hidden, weight, logits, work_kernel, work_ref
        torch.cuda.empty_cache()


ADAM8BIT_SHAPES = {"7b": [("8B up_proj", 14336, 4096), ("8B embed", 128256, 4096)],
                   "70b": [("70B up_proj", 28672, 8192)]}


def bench_adam8bit(args) -> None:
    import math

    import bitsandbytes.functional as bnb_f

    from lowmem.galore import GaLoreAdamW8bit
    from lowmem.rounding import generator

    print("\nadam8bit: one step of a whole bf16 tensor, 2^20 values a call, V rounded stochastically")
    print(HEADER)
    print("-" * len(HEADER))
    shapes = ADAM8BIT_SHAPES["7b"] + ADAM8BIT_SHAPES["70b"] if args.shapes == "all" else ADAM8BIT_SHAPES[args.shapes]
    qmaps = tuple(q.cuda() for q in GaLoreAdamW8bit([("w", torch.nn.Parameter(torch.zeros(1)))], rank=None).qmaps)
    for name, rows, cols in shapes:
        n, chunk = rows * cols, 1 << 20
        weight = (torch.randn(n, device="cuda") * 0.02).to(torch.bfloat16)
        grad = torch.randn(n, device="cuda").to(torch.bfloat16)
        codes = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(2)]
        absmax = [torch.zeros(math.ceil(n / 256), device="cuda") for _ in range(2)]

        def step_all():
            gen = generator(0, 1, 0, weight.device)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                blocks = slice(start // 256, math.ceil(end / 256))
                adam8bit.adam8bit_step_(grad[start:end], weight[start:end], codes[0][start:end], codes[1][start:end],
                                        absmax[0][blocks], absmax[1][blocks], qmaps, 1, 1e-5, (0.9, 0.999), 1e-8,
                                        0.0, gen)

        def bnb_all():   # the fused op lowmem called before (nearest rounding; fp32 moments math)
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                blocks = slice(start // 256, math.ceil(end / 256))
                bnb_f.optimizer_update_8bit_blockwise(
                    "adam", grad[start:end], weight[start:end], codes[0][start:end], codes[1][start:end],
                    0.9, 0.999, 0.0, 0.0, 1e-8, 1, 1e-5, qmaps[0], qmaps[1], absmax[0][blocks], absmax[1][blocks])

        with torch.no_grad():
            compare(name, "8-bit step", step_all, step_all, args)
            tb, mb = measure(bnb_all, args.warmup, args.repeat)
        print(f"{'':<15}(bitsandbytes' fused op, to nearest: {tb:.3f} ms, {mb / MiB:.1f} MiB)")
        del weight, grad, codes, absmax
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernel", choices=["l4q", "cross-entropy", "adam8bit", "all"], default="all")
    ap.add_argument("--shapes", choices=["7b", "70b", "all"], default="all")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=4096, help="positions per micro-batch (default 4096)")
    ap.add_argument("--chunk", type=int, default=1024, help="loss chunk for cross-entropy (default 1024)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=10)
    args = ap.parse_args()

    compile_times()
    if not torch.cuda.is_available():
        print("no CUDA device: kernel vs reference timings and memory need a GPU", file=sys.stderr)
        return 2
    from lowmem.kernels.device import device_info

    print(f"device: {device_info(0).describe()}, torch {torch.__version__}; "
          f"median of {args.repeat}; memory = peak allocated above the start")
    if args.kernel in ("l4q", "all"):
        bench_l4q(args)
    if args.kernel in ("cross-entropy", "all"):
        bench_cross_entropy(args)
    if args.kernel in ("adam8bit", "all"):
        bench_adam8bit(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
