"""LoRA training step: lowmem vs Hugging Face transformers + PEFT, same work, one run.

Both sides load the embedded SmolLM2-135M in fp32 on the CPU, put rank-16
adapters (alpha 32, no dropout) on all seven linear layers of every block,
and take AdamW steps on the same fixed batch of real chat examples with the
same loss (answer tokens only). Each side computes its step the way it does
in training: PEFT through the model's own loss with the attention mask,
lowmem as its train_step does (hidden states, then the loss; no mask, which
right-padded batches do not need, so the first losses agree exactly). Each side runs in its own process so that its
peak RSS is its own; the sides alternate for `--rounds` rounds so that a
machine that slows down part-way hurts both alike.

    python benchmarks/lora_vs_peft.py [--steps 12] [--rounds 2] [--micro-batch 8] [--seq-len 128] [--checkpointing]

Prints median step time and peak RSS per side and their ratios (lowmem / PEFT).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def batch(tokenizer, micro_batch: int, seq_len: int):
    from lowmem.config import RunConfig
    from lowmem.data import collate, load_datasets

    data = load_datasets(RunConfig(seq_len=seq_len), tokenizer)
    return collate(data.train[:micro_batch], tokenizer.pad_token_id)


def run_side(side: str, steps: int, micro_batch: int, seq_len: int, checkpointing: bool) -> dict:
    import torch

    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM

    from lowmem.model import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir("smollm2-135m", log=lambda m: None)
    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
    model.config.use_cache = False
    b = batch(tokenizer, micro_batch, seq_len)

    if side == "lowmem":
        from lowmem.loss import causal_lm_loss, count_targets
        from lowmem.lora import apply_lora

        apply_lora(model, 16, 32.0, TARGETS)
        decoder, head = model.get_decoder(), model.get_output_embeddings()
        n = count_targets(b["labels"])

        def loss_fn():  # as lowmem.trainer.train_step: right-padded batches need no mask
            hidden = decoder(input_ids=b["input_ids"]).last_hidden_state
            return causal_lm_loss(hidden, head.weight, b["labels"], reduction="sum") / n
    else:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                 target_modules=list(TARGETS), task_type="CAUSAL_LM"))

        def loss_fn():
            return model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss

    if checkpointing:
        from lowmem.model import checkpointing as enable_checkpointing

        enable_checkpointing(model)
        model.enable_input_require_grads()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times, losses = [], []
    for _ in range(steps):
        start = time.perf_counter()
        loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
        losses.append(float(loss.detach()))
    return {"side": side, "step_s": times[2:], "first_loss": losses[0],
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "trainable": sum(p.numel() for p in params), "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12, help="steps per side per round; the first 2 are warm-up")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.steps, args.micro_batch, args.seq_len, args.checkpointing)))
        return

    results: dict[str, list[dict]] = {"lowmem": [], "peft": []}
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"}
    for _ in range(args.rounds):
        for side in ("lowmem", "peft"):
            cmd = [sys.executable, __file__, "--side", side, "--steps", str(args.steps),
                   "--micro-batch", str(args.micro_batch), "--seq-len", str(args.seq_len)]
            cmd += ["--checkpointing"] if args.checkpointing else []
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout
            results[side].append(json.loads(out.strip().splitlines()[-1]))

    summary = {}
    for side, runs in results.items():
        steps = [t for r in runs for t in r["step_s"]]
        summary[side] = {"median_step_s": statistics.median(steps), "peak_rss": max(r["peak_rss"] for r in runs),
                         "first_loss": runs[0]["first_loss"], "trainable": runs[0]["trainable"],
                         "samples": len(steps)}
    print(f"LoRA step on SmolLM2-135M, fp32 CPU, {runs[0]['threads']} threads, micro-batch "
          f"{args.micro_batch}, seq<= {args.seq_len}, rank 16 on 7 linears, checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {args.rounds} rounds x {args.steps - 2} timed steps")
    print(f"{'side':<8} {'median step':>12} {'peak RSS':>10} {'first loss':>11} {'trainable':>10}")
    for side, s in summary.items():
        print(f"{side:<8} {s['median_step_s']:>11.3f}s {s['peak_rss'] / 2**20:>8.0f}MiB "
              f"{s['first_loss']:>11.4f} {s['trainable']:>10,}")
    ours, theirs = summary["lowmem"], summary["peft"]
    print(f"ratio lowmem/peft: step time {ours['median_step_s'] / theirs['median_step_s']:.3f}, "
          f"peak RSS {ours['peak_rss'] / theirs['peak_rss']:.3f}")


if __name__ == "__main__":
    main()
