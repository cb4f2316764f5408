"""The optimizer a Plan asks for.

`build_optimizer(named_params, plan, config)` returns a torch optimizer. The
training loop sets each group's `lr` before `step()`, clips gradients over
`param_groups`, and saves `state_dict()` in checkpoints as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem.config import RunConfig


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], plan, config: RunConfig) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norms and biases are not decayed)."""
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=tuple(config.adam_betas))
