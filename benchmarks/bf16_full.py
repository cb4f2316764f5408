"""Full fine-tuning of bf16 weights: torch's AdamW (rounds to nearest) vs BF16AdamW (stochastic).

A full run on CUDA keeps its weights and AdamW moments in bf16. torch's AdamW rounds each
updated weight to nearest, which loses every update under half a bf16 step of the weight;
lowmem.optim.BF16AdamW computes the update in fp32 and rounds stochastically. Here, on the
embedded model and the CPU (bf16 weights, bf16 compute, as on CUDA), three runs from the
same weights in the same data order: fp32 weights (the reference), bf16 with torch's AdamW,
bf16 with BF16AdamW; the training loss of every step, the held-out loss after, and the
share of the block weights that moved at all.

    python benchmarks/bf16_full.py                 # 5 steps, micro-batch 4, lr 5e-5 (~7 min: bf16
                                                   # matmuls are slow on a CPU, ~30 s a step)

Every run steps through lowmem.trainer.train_step, the trainer's own step.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from galore_cpu import print_losses      # beside this file
from lowmem.config import RunConfig
from lowmem.data import BatchStream, load_datasets
from lowmem.evaluate import heldout_loss
from lowmem.model import load_model, prepare_for_training, trainable_parameters
from lowmem.optim import build_optimizer
from lowmem.planner import plan_from_config
from lowmem.trainer import lr_at, train_step


def run(name: str, config: RunConfig, args, data, tokenizer) -> dict:
    plan = plan_from_config(config)
    if name != "fp32":     # the CUDA recipe: bf16 weights, bf16 moments
        plan = dataclasses.replace(plan, base_format="bf16", compute_dtype="bfloat16", optimizer_state_bits=16)
    model, _, _ = load_model(config.model, "cpu", torch.float32, log=lambda m: None)
    if name != "fp32":
        model.to(torch.bfloat16)
    prepare_for_training(model, plan)
    params = trainable_parameters(model)
    if name == "nearest":
        decay = [p for _, p in params if p.ndim >= 2]
        rest = [p for _, p in params if p.ndim < 2]
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                                       {"params": rest, "weight_decay": 0.0}],
                                      lr=config.lr, betas=tuple(config.adam_betas))
    else:
        optimizer = build_optimizer(params, plan, config)
    blocks = [p for n, p in params if ".layers." in n and p.ndim == 2]
    start = [p.detach().clone() for p in blocks]
    stream = BatchStream(data.train, plan.micro_batch, config.seed, tokenizer.pad_token_id)
    losses, started = [], time.perf_counter()
    model.train()
    for step in range(config.steps):
        loss, _, _ = train_step(model, optimizer, stream, plan, config, lr_at(step, config))
        losses.append(loss)
        print(f"  {name:10s} step {step + 1:2d}/{config.steps}  loss {loss:.4f}", flush=True)
    seconds = (time.perf_counter() - started) / config.steps
    moved = sum(int((p.detach() != s).sum()) for p, s in zip(blocks, start)) / sum(p.numel() for p in blocks)
    held = heldout_loss(model, data.heldout[:args.heldout], tokenizer.pad_token_id, "cpu")
    return dict(name=name, optimizer=type(optimizer).__name__, losses=losses, heldout=held, moved=moved,
                s_per_step=seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=5e-5, help="full fine-tuning's default")
    parser.add_argument("--heldout", type=int, default=32, help="held-out examples scored after training")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = RunConfig(method="full", device="cpu", steps=args.steps, micro_batch=args.micro_batch,
                       warmup_steps=2, lr=args.lr, eval_generate=False)
    _, tokenizer, _ = load_model(config.model, "cpu", torch.float32, log=lambda m: None)
    data = load_datasets(config, tokenizer)
    results = []
    for name in ("fp32", "nearest", "stochastic"):
        torch.manual_seed(0)
        results.append(run(name, config, args, data, tokenizer))

    print(f"\nSmolLM2-135M (embedded), full fine-tuning on the CPU, {args.steps} steps x micro-batch "
          f"{args.micro_batch}, lr {args.lr:g}, same data order\n")
    print_losses(results, "name", args.steps)
    print(f"| weights, optimizer | block weights moved | mean loss, last 5 steps | held-out loss "
          f"({args.heldout} ex.) | s/step |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        tail = r["losses"][-5:]
        print(f"| {r['name']}, {r['optimizer']} | {r['moved']:.1%} | {sum(tail) / len(tail):.4f} | "
              f"{r['heldout']:.4f} | {r['s_per_step']:.1f} |")


if __name__ == "__main__":
    main()
