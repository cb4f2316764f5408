"""Full AdamW vs GaLore (8-bit, per-layer) vs LoRA on the embedded model, on the CPU.

For each method: the same data order and steps from the same weights; the
training loss of every step, the held-out loss after, and the optimizer-state
and gradient bytes counted from the real tensors (states: every tensor in the
optimizer's state; gradients: the most `.grad` bytes alive at once, counted in
post-accumulate-grad hooks that run before the optimizer's), beside what
`lowmem.memory` predicts for the same plan.

    python benchmarks/galore_cpu.py                   # 20 steps, micro-batch 4 (~5 min, one thread)
    python benchmarks/galore_cpu.py --steps 5         # a quick look

Every method steps through lowmem.trainer.train_step, the trainer's own step
(per-layer updates inside backward for GaLore).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from types import SimpleNamespace

import torch

from lowmem import memory
from lowmem.config import RunConfig, format_size
from lowmem.data import BatchStream, load_datasets
from lowmem.evaluate import heldout_loss
from lowmem.model import load_model, prepare_for_training, trainable_parameters
from lowmem.optim import build_optimizer
from lowmem.planner import plan_from_config
from lowmem.spec import spec_for
from lowmem.trainer import lr_at, train_step


def state_bytes(optimizer) -> int:
    if hasattr(optimizer, "state_bytes"):
        return optimizer.state_bytes()
    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value) and value.untyped_storage().data_ptr() not in seen:
                seen.add(value.untyped_storage().data_ptr())
                total += value.untyped_storage().nbytes()
    return total


class GradientBytes:
    """The most `.grad` bytes alive at once, counted whenever a gradient is complete."""

    def __init__(self, params):
        self.params, self.peak = params, 0
        self.handles = [p.register_post_accumulate_grad_hook(self.count) for p in params]

    def count(self, _=None):
        live = sum(p.grad.numel() * p.grad.element_size() for p in self.params if p.grad is not None)
        self.peak = max(self.peak, live)


def run(method: str, config: RunConfig, args, spec, data, tokenizer) -> dict:
    base = plan_from_config(config.replace(method="lora" if method == "lora" else "full"))
    if method == "galore":
        plan = dataclasses.replace(base, method="galore", optimizer="galore-adamw8bit", optimizer_state_bits=8,
                                   galore_rank=args.rank, galore_per_layer=True)
    else:
        plan = base
    model, _, _ = load_model(config.model, "cpu", torch.float32, log=lambda m: None)
    prepare_for_training(model, base)   # "galore" trains every parameter, like "full"
    params = trainable_parameters(model)
    counter = GradientBytes([p for _, p in params])   # before the optimizer's hooks
    optimizer = build_optimizer(params, plan, config)
    stream = BatchStream(data.train, plan.micro_batch, config.seed, tokenizer.pad_token_id)
    losses, started = [], time.perf_counter()
    model.train()
    for step in range(config.steps):
        loss, _, _ = train_step(model, optimizer, stream, plan, config, lr_at(step, config))
        counter.count()
        losses.append(loss)
        print(f"  {method:6s} step {step + 1:2d}/{config.steps}  loss {loss:.4f}", flush=True)
    seconds = (time.perf_counter() - started) / config.steps
    held = heldout_loss(model, data.heldout[:args.heldout], tokenizer.pad_token_id, "cpu")
    return dict(method=method, plan=plan, lr=config.lr, losses=losses, heldout=held, s_per_step=seconds,
                trainable=sum(p.numel() for _, p in params), state=state_bytes(optimizer),
                state_predicted=memory.optimizer_bytes(spec, plan), grads=counter.peak,
                grads_predicted=memory.gradient_bytes(spec, plan))


def print_losses(results: list[dict], name: str, steps: int) -> None:
    """The training loss of every step, one column a run (results[i][name] heads it)."""
    print("| step | " + " | ".join(r[name] for r in results) + " |")
    print("|---:|" + "---:|" * len(results))
    for i in range(steps):
        print(f"| {i + 1} | " + " | ".join(f"{r['losses'][i]:.4f}" for r in results) + " |")
    print()


def with_galore(config: RunConfig, **values) -> RunConfig:
    """`config` with GaLore settings, whether or not this build's RunConfig has a galore section yet."""
    if hasattr(config, "galore"):
        return config.replace(galore=dataclasses.replace(config.galore, **values))
    object.__setattr__(config, "galore", SimpleNamespace(**values))   # frozen dataclass: a copy of our own
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=144, help="GaLore rank (hidden/4 for SmolLM2-135M)")
    parser.add_argument("--update-gap", type=int, default=10, help="GaLore subspace refresh every T steps")
    parser.add_argument("--scale", type=float, default=0.25, help="GaLore scale alpha")
    parser.add_argument("--lr-full", type=float, default=5e-5)
    parser.add_argument("--lr-galore", type=float, default=2e-4, help="with scale 0.25: 5e-5 effective")
    parser.add_argument("--lr-lora", type=float, default=2e-3)
    parser.add_argument("--heldout", type=int, default=64, help="held-out examples scored after training")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; 1 is fastest on a CPU shared with other jobs")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True, warn_only=True)

    config = RunConfig(device="cpu", steps=args.steps, micro_batch=args.micro_batch, warmup_steps=2,
                       eval_generate=False)
    _, tokenizer, _ = load_model(config.model, "cpu", torch.float32, log=lambda m: None)
    data = load_datasets(config, tokenizer)
    spec = spec_for(config.model)
    results = []
    for method, lr in (("full", args.lr_full), ("galore", args.lr_galore), ("lora", args.lr_lora)):
        cfg = config.replace(method="lora" if method == "lora" else "full", lr=lr)
        if method == "galore":
            cfg = with_galore(cfg, update_gap=args.update_gap, scale=args.scale, embeddings=False)
        torch.manual_seed(0)
        results.append(run(method, cfg, args, spec, data, tokenizer))

    print(f"\nSmolLM2-135M (embedded), CPU fp32, {args.steps} steps x micro-batch {args.micro_batch}, "
          f"same data order; GaLore rank {args.rank}, T={args.update_gap}, alpha={args.scale}, per-layer\n")
    print_losses(results, "method", args.steps)
    print("| method | lr | trainable | optimizer states (counted / predicted) | "
          "gradients at peak (counted / predicted) | states + gradients | mean loss, last 5 steps | "
          f"held-out loss ({args.heldout} ex.) | s/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        tail = r["losses"][-5:]
        print(f"| {r['plan'].label} | {r['lr']:.0e} | {r['trainable'] / 1e6:.2f}M | "
              f"{format_size(r['state'])} / {format_size(r['state_predicted'])} | "
              f"{format_size(r['grads'])} / {format_size(r['grads_predicted'])} | "
              f"{format_size(r['state'] + r['grads'])} | {sum(tail) / len(tail):.4f} | "
              f"{r['heldout']:.4f} | {r['s_per_step']:.1f} |")


if __name__ == "__main__":
    main()
