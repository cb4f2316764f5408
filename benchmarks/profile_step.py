"""Profile one lowmem training step: where a QLoRA / L4Q step spends device time and memory.

This is how lowmem chooses what to write a kernel for: the ops that take the most
time, and the ops that allocate the most memory, in the trainer's own step
(`lowmem.trainer.train_step`) on a model of a built-in model's shapes with random
weights (nothing is downloaded).

    python benchmarks/profile_step.py                                   # 8B shapes, QLoRA, on the GPU
    python benchmarks/profile_step.py --method l4q --seq-len 4096
    python benchmarks/profile_step.py --model smollm2-135m --layers 4   # small enough for a CPU
    python benchmarks/profile_step.py --compare-kernels                 # lowmem.kernels on, then off

`--layers N` keeps the first N blocks (per-block costs are the same for every block;
the head and the loss are counted once either way, so their share grows as N
shrinks: say so when quoting fractions). The step runs once to warm up (and compile
kernels), then `--steps` times under torch.profiler. Printed:

  * peak memory of the profiled steps (max_memory_allocated on CUDA, RSS on the CPU);
  * the top ops by self device time (CPU time without CUDA);
  * the top ops by memory they allocate themselves ("self" memory: positive is
    allocated and not freed inside the op, which is what sets peaks).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

import torch


def build(args):
    """(model, optimizer, plan, config) for the requested method on random weights of the model's shapes."""
    from lowmem.config import RunConfig
    from lowmem.measure import random_model, with_layers
    from lowmem.model import prepare_for_training, trainable_parameters
    from lowmem.optim import build_optimizer
    from lowmem.planner import plan_from_config
    from lowmem.spec import builtin_spec

    spec = builtin_spec(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = RunConfig(model=args.model, method=args.method, device=device, seq_len=args.seq_len,
                       micro_batch=args.micro_batch, grad_accum=1, loss_chunk=args.loss_chunk,
                       grad_checkpointing=args.grad_checkpointing)
    plan = dataclasses.replace(plan_from_config(config), micro_batch=args.micro_batch, grad_accum=1,
                               loss_chunk=args.loss_chunk, grad_checkpointing=args.grad_checkpointing)
    torch.manual_seed(0)
    model = random_model(with_layers(spec, args.layers), plan, device)   # NF4 blocks quantized one at a time
    prepare_for_training(model, plan)
    optimizer = build_optimizer(trainable_parameters(model), plan, config)
    return model, optimizer, plan, config, spec


def step(model, optimizer, stream, plan, config):
    from lowmem.trainer import train_step

    train_step(model, optimizer, stream, plan, config, lr=1e-5)
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profile(args, model, optimizer, plan, config, spec, label: str) -> None:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    cuda = torch.cuda.is_available()
    from lowmem.measure import FixedBatch

    stream = FixedBatch(spec.vocab, args.micro_batch, args.seq_len)
    step(model, optimizer, stream, plan, config)                     # warm-up: kernels compile, states exist
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with torch_profile(activities=activities, profile_memory=True) as prof:
        for _ in range(args.steps):
            step(model, optimizer, stream, plan, config)
    seconds = (time.perf_counter() - t0) / args.steps
    if cuda:
        peak = f"peak allocated {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    else:
        import psutil

        peak = f"RSS {psutil.Process().memory_info().rss / 2**30:.2f} GiB"
    print(f"\n== {label}: {plan.method}, {args.model} shapes, {args.layers or spec.layers} of {spec.layers} blocks, "
          f"micro-batch {args.micro_batch} x {args.seq_len} tokens, loss_chunk {plan.loss_chunk}, "
          f"checkpointing {'on' if plan.grad_checkpointing else 'off'}; {seconds:.3f} s/step under the "
          f"profiler, {peak}")
    averages = prof.key_averages()
    time_key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    memory_key = "self_cuda_memory_usage" if cuda else "self_cpu_memory_usage"
    print(f"\ntop {args.rows} ops by self {'device' if cuda else 'CPU'} time:")
    print(averages.table(sort_by=time_key, row_limit=args.rows, max_name_column_width=60))
    print(f"\ntop {args.rows} ops by memory they allocate ({'device' if cuda else 'host'}):")
    print(averages.table(sort_by=memory_key, row_limit=args.rows, max_name_column_width=60))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-3.1-8b", help="a built-in model name (`lowmem plan --list-models`)")
    ap.add_argument("--method", choices=["qlora", "l4q", "lora"], default="qlora")
    ap.add_argument("--layers", type=int, default=0, help="keep the first N blocks (default: all)")
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--loss-chunk", type=int, default=0, help="0 = whole loss (default), else tokens per chunk")
    ap.add_argument("--grad-checkpointing", action="store_true")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--compare-kernels", action="store_true",
                    help="profile with lowmem.kernels on, then with LOWMEM_KERNELS=0")
    args = ap.parse_args()

    model, optimizer, plan, config, spec = build(args)
    if not args.compare_kernels:
        profile(args, model, optimizer, plan, config, spec, "step")
        return 0
    for mode, label in (("1", "kernels on"), ("0", "LOWMEM_KERNELS=0 (references)")):
        os.environ["LOWMEM_KERNELS"] = mode
        profile(args, model, optimizer, plan, config, spec, label)
    os.environ.pop("LOWMEM_KERNELS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
