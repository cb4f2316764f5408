"""Stochastic rounding of fp32 values into bf16 weights.

A bf16 weight updated by an optimizer and rounded to nearest loses every update
smaller than half its bf16 step (2⁻⁹ to 2⁻⁸ of the weight): at the learning rates
of full fine-tuning most weights never move. Rounded stochastically, up or down
with the probability of the value's distance to each, a weight moves by its update
in expectation. lowmem.optim.BF16AdamW and lowmem.galore.GaLoreAdamW8bit write
their bf16 weights through `write_rounded_`.

The noise comes from a generator seeded by (seed, step, tensor): a resumed run
rounds as the uninterrupted one did, with nothing more in its checkpoints.
"""

from __future__ import annotations

import torch


def round_stochastically_(x: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 `x` rounded in place to a value bf16 holds exactly, up or down with the probability
    of its distance to each (unbiased: E[result] = x); `noise` is uniform int32 in [0, 2¹⁶).

    A float's bits are sign and magnitude: adding noise below bf16's last mantissa bit and
    clearing those 16 bits rounds the magnitude up exactly when the noise carries, with the
    probability of the dropped fraction. inf stays inf. (The trainer applies no step whose
    gradient is not finite.)"""
    x.view(torch.int32).add_(noise).bitwise_and_(-65536)
    return x


def generator(seed: int, step: int, index: int, device: torch.device) -> torch.Generator:
    """The noise of tensor `index` at optimizer step `step` of a run seeded `seed`."""
    return torch.Generator(device=device).manual_seed((seed * 1_000_003 + step * 65_537 + index) % (2**63))


def write_rounded_(target: torch.Tensor, value: torch.Tensor, gen: torch.Generator | None) -> None:
    """target ← value (fp32), stochastically rounded when `target` is bf16; `value` is rounded
    in place, so it is left holding what `target` got."""
    if target.dtype == torch.bfloat16 and gen is not None:
        noise = torch.randint(0, 1 << 16, value.shape, dtype=torch.int32, device=value.device, generator=gen)
        round_stochastically_(value, noise)
        del noise
    target.copy_(value)
