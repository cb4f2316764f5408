"""8-bit AdamW's second moment rounded to the nearest code (bitsandbytes) vs stochastically (lowmem).

Two measurements, both on the CPU in a minute or two, one thread:

1. The moments. 4096 values in blocks of 256; in each block one value keeps gradients
   of std 10 throughout, the other 255 get std 5 for 500 steps, then 1. fp32 Adam's
   second moment V of the quiet values falls 25-fold; rounded to nearest, a step moves
   V by at most (1 − β2) = 0.1%, under half a code gap, so it can only fall as fast as
   its block's largest value. Printed: the quiet values' mean V (bias-corrected) over
   fp32 Adam's, and the same for the update's RMS, at steps 500 to 3000.

2. A training run. A 2-layer Llama (vocab 512, hidden 64) learns to copy a sequence of
   Zipf-distributed tokens, full training with fp32 AdamW, then lowmem's 8-bit AdamW
   (GaLoreAdamW8bit, rank None) with V rounded to nearest and stochastically (M to nearest
   in both, as lowmem does), same data and weights; the held-out loss at every tenth of
   the steps.

    python benchmarks/adam8bit_moments.py                  # 3000 steps each (~4 min)
    python benchmarks/adam8bit_moments.py --steps 600      # a quick look
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lowmem.galore import BLOCK, GaLoreAdamW8bit, dequantized_moments
from lowmem.kernels.adam8bit import adam8bit_step_
from lowmem.loss import causal_lm_loss
from lowmem.model import tiny_llama

B1, B2, EPS = 0.9, 0.999, 1e-8


def moments(steps: int) -> None:
    n = 4096
    loud = torch.arange(n) % BLOCK == 0
    qmaps = GaLoreAdamW8bit([("w", torch.nn.Parameter(torch.zeros(1)))], rank=None).qmaps
    states = {mode: [torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8),
                     torch.zeros(n // BLOCK), torch.zeros(n // BLOCK)] for mode in ("nearest", "stochastic")}
    m, v = torch.zeros(n), torch.zeros(n)
    data, noise = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)
    checks = [s for s in (500, 1000, 2000, 3000) if s <= steps]
    print(f"1. second moment of the quiet values (255 of each 256), over fp32 Adam's; {steps} steps")
    print("| step | fp32 V̂ | V nearest: V̂ ratio | update RMS ratio | V stochastic: V̂ ratio | update RMS ratio |")
    print("|---|---|---|---|---|---|")
    for step in range(1, steps + 1):
        g = torch.randn(n, generator=data) * torch.where(loud, 10.0, 5.0 if step <= 500 else 1.0)
        m.mul_(B1).add_(g, alpha=1 - B1)
        v.mul_(B2).addcmul_(g, g, value=1 - B2)
        for mode, (s1, s2, a1, a2) in states.items():
            adam8bit_step_(g, torch.zeros(n), s1, s2, a1, a2, qmaps, step, 1e-3, (B1, B2), EPS, 0.0, noise,
                           stochastic=mode == "stochastic")
        if step in checks:
            def summary(m_, v_):
                m_hat, v_hat = m_[~loud] / (1 - B1**step), v_[~loud] / (1 - B2**step)
                return v_hat.mean(), (m_hat / (v_hat.sqrt() + EPS)).pow(2).mean().sqrt()
            v_ref, u_ref = summary(m, v)
            row = [f"{step}", f"{v_ref:.4g}"]
            for s1, s2, a1, a2 in states.values():
                v8, u8 = summary(*dequantized_moments(dict(state1=s1, state2=s2, absmax1=a1, absmax2=a2), qmaps))
                row += [f"{v8 / v_ref:.3f}", f"{u8 / u_ref:.3f}"]
            print("| " + " | ".join(row) + " |", flush=True)


def training(steps: int, lr: float) -> None:
    base = tiny_llama(vocab_size=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, seed=1)
    base.config.use_cache = False
    zipf = 1.0 / torch.arange(1, 513).float() ** 1.1

    def batch(seed: int, rows: int = 16, half: int = 16) -> torch.Tensor:
        first = torch.multinomial(zipf, rows * half, replacement=True,
                                  generator=torch.Generator().manual_seed(seed)).view(rows, half)
        return torch.cat([first, first], 1)

    def loss_of(model, ids: torch.Tensor) -> torch.Tensor:
        labels = ids.clone()
        labels[:, :ids.shape[1] // 2] = -100          # the copy is what is learned
        return causal_lm_loss(model.model(input_ids=ids).last_hidden_state, model.lm_head.weight, labels)

    runs = {}
    for name in ("fp32 AdamW", "8-bit, V nearest", "8-bit, V stochastic"):
        model = copy.deepcopy(base)
        if name == "fp32 AdamW":
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        else:
            optimizer = GaLoreAdamW8bit(model.named_parameters(), lr=lr, rank=None,
                                        stochastic_moments=name.endswith("stochastic"))
        held, started = [], time.perf_counter()
        for step in range(1, steps + 1):
            loss_of(model, batch(step)).backward()
            optimizer.step()
            optimizer.zero_grad()
            if step % max(steps // 10, 1) == 0:
                with torch.no_grad():
                    held.append((step, sum(float(loss_of(model, batch(10**6 + i))) for i in range(8)) / 8))
        runs[name] = (held, time.perf_counter() - started)
    print(f"\n2. held-out loss, copy task, tiny Llama, {steps} steps, lr {lr}, full training")
    print("| step | " + " | ".join(runs) + " |")
    print("|---|" + "---|" * len(runs))
    for i, (step, _) in enumerate(runs["fp32 AdamW"][0]):
        print(f"| {step} | " + " | ".join(f"{held[i][1]:.4f}" for held, _ in runs.values()) + " |")
    print("seconds: " + ", ".join(f"{name} {seconds:.1f}" for name, (_, seconds) in runs.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    moments(args.steps)
    training(args.steps, args.lr)


if __name__ == "__main__":
    main()
