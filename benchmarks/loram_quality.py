"""LoRAM on the embedded model and dataset: memory of the pruned base, and quality.

Rows: full base; full base + LoRA trained on the full model; pruned base; pruned
base + its LoRA; full base + the recovered LoRA (the LoRAM result). The paper's
claim to check: recovered beats the base and trails full-model LoRA slightly.

    python benchmarks/loram_quality.py [--ratio 0.5] [--steps 30] [--eval 40] [--align-steps 0]

Every run trains with `lowmem.trainer.train_step` on the same seeded batches,
AdamW at the config's learning-rate schedule, LoRA rank/targets of RunConfig().
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time

import torch

from lowmem.config import RunConfig
from lowmem.data import BatchStream, load_datasets
from lowmem.evaluate import evaluate
from lowmem.loram import align, save_recovered_adapter
from lowmem.lora import apply_lora, load_adapter
from lowmem.model import load_model
from lowmem.prune import prune
from lowmem.planner import plan_from_config
from lowmem.trainer import lr_at, train_step


def param_bytes(model) -> int:
    """Bytes of the base's parameters (adapters excluded)."""
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "lora_" not in n)


def linear_params(model) -> int:
    return sum(m.weight.numel() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and ".layers." in n)


def train_lora(model, config: RunConfig, examples, pad_id: int, log) -> float:
    """LoRA on `model` for config.steps steps; returns seconds."""
    torch.manual_seed(config.seed)
    apply_lora(model, config.lora.rank, config.lora.alpha, config.lora.targets)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=tuple(config.adam_betas), weight_decay=0.0)
    stream = BatchStream(examples, config.micro_batch, config.seed, pad_id)
    plan = plan_from_config(config.replace(device="cpu"))
    model.train()
    start = time.perf_counter()
    for step in range(config.steps):
        loss, _, _ = train_step(model, optimizer, stream, plan, config, lr_at(step, config))
        if (step + 1) % 10 == 0:
            log(f"    step {step + 1}/{config.steps}  loss {loss:.4f}")
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ratio", type=float, default=0.5, help="prune ratio of the middle blocks")
    ap.add_argument("--criterion", default="taylor", choices=("taylor", "magnitude"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--eval", type=int, default=40, help="held-out examples")
    ap.add_argument("--calib", type=int, default=4, help="calibration batches for the taylor criterion")
    ap.add_argument("--align-steps", type=int, default=0,
                    help="alignment steps on the training texts (all tokens) before LoRA; 0 = none")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    log = print

    config = RunConfig(steps=args.steps, micro_batch=args.micro_batch, warmup_steps=min(5, args.steps))
    full, tokenizer, _ = load_model(config.model, "cpu", torch.float32, log=log)
    data = load_datasets(config, tokenizer)
    heldout = data.heldout[: args.eval]
    pad = tokenizer.pad_token_id
    rows = []

    def record(label, model, params_b, seconds=None):
        t = time.perf_counter()
        r = evaluate(model, tokenizer, heldout, "cpu", generate_answers=True,
                     max_new_tokens=config.max_new_tokens)
        log(f"  {label}: loss {r['loss']:.4f}  exact match {r['exact_match']:.1%}  ({time.perf_counter() - t:.0f}s eval)")
        rows.append((label, params_b, r["loss"], r["exact_match"], seconds))

    log(f"full base ({param_bytes(full) / 2**20:.1f} MiB fp32)")
    record("full base", full, param_bytes(full))

    log("LoRA on the full model")
    lora_full = copy.deepcopy(full)
    secs = train_lora(lora_full, config, data.train, pad, log)
    record("full + LoRA (trained on full)", lora_full, param_bytes(full), secs)
    del lora_full

    log(f"pruning {args.ratio:.0%} of the middle blocks ({args.criterion})")
    pruned = copy.deepcopy(full)
    calib = BatchStream(data.train, config.micro_batch, config.seed + 1, pad)
    t = time.perf_counter()
    index_map = prune(pruned, args.ratio, criterion=args.criterion,
                      batches=[calib.next() for _ in range(args.calib)])
    log(f"  pruned in {time.perf_counter() - t:.0f}s: linear weights {linear_params(full):,} -> "
        f"{linear_params(pruned):,}; all parameters {param_bytes(full) // 4:,} -> {param_bytes(pruned) // 4:,}")
    if args.align_steps:
        stream = BatchStream(data.train, config.micro_batch, config.seed + 2, pad)
        texts = []
        for _ in range(args.align_steps):
            b = stream.next()
            b["labels"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
            texts.append(b)
        losses = align(pruned, texts, args.align_steps, lr=5e-5)
        log(f"  aligned {args.align_steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    record("pruned base", pruned, param_bytes(pruned))

    log("LoRA on the pruned model")
    secs = train_lora(pruned, config, data.train, pad, log)
    record("pruned + its LoRA", pruned, param_bytes(pruned), secs)

    with tempfile.TemporaryDirectory() as folder:
        save_recovered_adapter(pruned, folder, index_map, rank=config.lora.rank, alpha=config.lora.alpha,
                               targets=config.lora.targets, dropout=0.0, rslora=False,
                               base_model=config.model)
        recovered = copy.deepcopy(full)
        load_adapter(recovered, folder)
    record("full + recovered LoRA (LoRAM)", recovered, param_bytes(full))

    print()
    print(f"model {config.model}, prune ratio {args.ratio} ({args.criterion}, keep first/last 1), "
          f"{args.align_steps} alignment steps, LoRA r={config.lora.rank} on {len(config.lora.targets)} "
          f"projections, {args.steps} steps x micro-batch {args.micro_batch}, lr {config.lr}, "
          f"{len(heldout)} held-out examples")
    print(f"| {'model':<32} | {'base params (MiB fp32)':>22} | {'held-out loss':>13} | {'exact match':>11} | {'train s':>7} |")
    print(f"|{'-' * 34}|{'-' * 24}|{'-' * 15}|{'-' * 13}|{'-' * 9}|")
    for label, b, loss, em, s in rows:
        print(f"| {label:<32} | {b / 2**20:>22.1f} | {loss:>13.4f} | {em:>11.1%} | "
              f"{'' if s is None else f'{s:.0f}':>7} |")
    print(f"\nparameter reduction of the base: {param_bytes(full) / param_bytes(pruned):.2f}x "
          f"(linear weights of the blocks: {linear_params(full) / linear_params(pruned):.2f}x)")


if __name__ == "__main__":
    main()
