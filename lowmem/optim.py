"""The optimizer a Plan asks for.

`build_optimizer(named_params, plan, config)` returns a torch optimizer:

    plan.method == "galore"          GaLoreAdamW8bit (lowmem.galore): projected 8-bit moments for
                                     the block linears, 8-bit AdamW for the rest; per-layer
                                     updates inside backward when `plan.galore_per_layer`
    plan.optimizer_state_bits == 8   the same class projecting nothing: blockwise 8-bit AdamW
    otherwise                        torch.optim.AdamW (fused on CUDA)

The training loop sets each group's `lr` before backward (a per-layer
optimizer steps inside it), clips gradients over `param_groups` unless the
optimizer is `per_layer` (which clips per tensor and reports `grad_norm`),
and saves `state_dict()` in checkpoints as it is.
"""

from __future__ import annotations

import torch
from torch import nn

from lowmem.config import RunConfig
from lowmem.galore import GaLoreAdamW8bit

#: GaLore settings when the config has no `galore` section (the paper's values). Rank,
#: per-layer and embeddings decide memory, so they come from the plan; the update gap
#: and scale are hyperparameters, like lr, and come from the config.
GALORE_DEFAULTS = {"update_gap": 200, "scale": 0.25, "embeddings": False}


def _galore_setting(config: RunConfig, key: str):
    section = getattr(config, "galore", None)
    value = getattr(section, key, None) if section is not None else None
    return GALORE_DEFAULTS[key] if value is None else value


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], plan, config: RunConfig) -> torch.optim.Optimizer:
    """The plan's optimizer; weight decay on matrices only (norms and biases are not decayed)."""
    common = dict(lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay)
    if plan.method == "galore":
        if not plan.galore_rank:
            raise ValueError("a GaLore plan needs galore_rank")
        return GaLoreAdamW8bit(
            named_params, **common, rank=plan.galore_rank,
            update_gap=int(_galore_setting(config, "update_gap")),
            scale=float(_galore_setting(config, "scale")),
            project_embeddings=bool(getattr(plan, "galore_embeddings", _galore_setting(config, "embeddings"))),
            per_layer=bool(plan.galore_per_layer), max_grad_norm=config.max_grad_norm)
    if getattr(plan, "optimizer_state_bits", 32) == 8:
        return GaLoreAdamW8bit(named_params, **common, rank=None)
    decay = [p for _, p in named_params if p.ndim >= 2]
    no_decay = [p for _, p in named_params if p.ndim < 2]
    # On CUDA torch's default is the foreach AdamW, whose step holds a copy of every second
    # moment of a group at once (2 bytes a parameter more at the peak of a bf16 full run);
    # the fused one updates in place, as memory.optimizer_step_bytes counts.
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=config.lr, betas=tuple(config.adam_betas), fused=True if getattr(plan, "device", "cpu") == "cuda" else None)
