"""The optimizer a Plan asks for.

`build_optimizer(named_params, plan, config)` returns a torch optimizer:

    plan.method == "galore"          GaLoreAdamW8bit (lowmem.galore): projected 8-bit moments for
                                     the block linears, 8-bit AdamW for the rest; per-layer
                                     updates inside backward when `plan.galore_per_layer`
    plan.optimizer_state_bits == 8   the same class projecting nothing: blockwise 8-bit AdamW
                                     (bitsandbytes' states, rounded stochastically)
    plan.optimizer_state_bits == 16  BF16AdamW: a full run's bf16 weights and moments, the
                                     update in fp32 and rounded stochastically into the weights
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
from lowmem.galore import GaLoreAdamW8bit, decayed
from lowmem.memory import BF16_STEP_CHUNK
from lowmem.rounding import generator, write_rounded_

#: GaLore settings when the config has no `galore` section (the paper's values). Rank,
#: per-layer and embeddings decide memory, so they come from the plan; the update gap
#: and scale are hyperparameters, like lr, and come from the config.
GALORE_DEFAULTS = {"update_gap": 200, "scale": 0.25, "embeddings": False}


def _galore_setting(config: RunConfig, key: str):
    section = getattr(config, "galore", None)
    value = getattr(section, key, None) if section is not None else None
    return GALORE_DEFAULTS[key] if value is None else value


def build_optimizer(named_params: list[tuple[str, nn.Parameter]], plan, config: RunConfig) -> torch.optim.Optimizer:
    """The plan's optimizer; weight decay on matrices only (not on norms, biases, nor L4Q's
    step sizes and offsets: lowmem.galore.decayed)."""
    common = dict(lr=config.lr, betas=tuple(config.adam_betas), weight_decay=config.weight_decay)
    if plan.method == "galore":
        if not plan.galore_rank:
            raise ValueError("a GaLore plan needs galore_rank")
        return GaLoreAdamW8bit(
            named_params, **common, rank=plan.galore_rank,
            update_gap=int(_galore_setting(config, "update_gap")),
            scale=float(_galore_setting(config, "scale")),
            project_embeddings=bool(getattr(plan, "galore_embeddings", _galore_setting(config, "embeddings"))),
            per_layer=bool(plan.galore_per_layer), max_grad_norm=config.max_grad_norm, seed=config.seed)
    if getattr(plan, "optimizer_state_bits", 32) == 8:
        return GaLoreAdamW8bit(named_params, **common, rank=None, seed=config.seed)
    groups = [{"params": [p for n, p in named_params if decayed(n, p)], "weight_decay": config.weight_decay},
              {"params": [p for n, p in named_params if not decayed(n, p)], "weight_decay": 0.0}]
    if getattr(plan, "optimizer_state_bits", 32) == 16:
        return BF16AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas), seed=config.seed)
    # On CUDA torch's default is the foreach AdamW, whose step holds a copy of every second
    # moment of a group at once; the fused one updates in place, as memory.optimizer_step_bytes
    # counts.
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.adam_betas),
                             fused=True if getattr(plan, "device", "cpu") == "cuda" else None)


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """`optimizer.load_state_dict(state)`, keeping how build_optimizer made it step: torch takes
    `fused` and `foreach` from the saved groups, so a checkpoint of an unfused AdamW would make
    a fused one foreach, whose step holds a copy of the moments the plan does not count."""
    fused = [group.get("fused") for group in optimizer.param_groups]
    try:
        optimizer.load_state_dict(state)
    except ValueError as e:      # its groups differ: made by a lowmem that grouped them otherwise
        from lowmem.errors import CheckpointError

        raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({e}); a "
                              f"version of lowmem other than the run's may group parameters differently: "
                              f"resume with that version, or start a new run") from None
    for group, was in zip(optimizer.param_groups, fused):
        if was and not group.get("fused"):
            group["fused"], group["foreach"] = True, False
            for p in group["params"]:
                if "step" in optimizer.state.get(p, {}):    # a fused step keeps its count on the device
                    optimizer.state[p]["step"] = optimizer.state[p]["step"].to(p.device, torch.float32)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW for bf16 weights (a full run on CUDA) that does not lose small updates.

    torch's AdamW on bf16 weights rounds each updated weight to nearest: an update smaller
    than half a bf16 step of the weight (2⁻⁹ to 2⁻⁸ of it) is lost every time. Adam's update
    is about lr, so at lr 5e-5 every weight from 2⁻⁶ ≈ 0.016 up (where bf16's step is
    2⁻¹³ ≈ 1.2e-4) never moves. Here the update is computed in fp32 and rounded
    stochastically, so each weight moves by the update in expectation, and memory stays
    2 bytes a weight and 2 + 2 a moment (bf16, as torch's).

    Per tensor, in chunks of memory.BF16_STEP_CHUNK elements (fp32 temporaries of
    memory.BF16_STEP_TEMPORARIES bytes an element of the chunk):

        m ← round_stochastically(β1·m + (1−β1)·g)
        v ← round_stochastically(β2·v + (1−β2)·g²)
        w ← round_stochastically(w·(1 − lr·λ) − lr/(1−β1ᵗ) · m / (√(v/(1−β2ᵗ)) + ε))

    The moments too: rounded to nearest, v's change (1−β2)·(g² − v) is under half a bf16
    step of v, so v would only ever grow (to 2.3x the fp32 AdamW's after 3000 steps that
    began with larger gradients) and every update shrink.

    The noise comes from lowmem.rounding.generator (seed, step, tensor), so a resumed run
    rounds as the uninterrupted one did with nothing more saved. The state
    (`step`, `exp_avg`, `exp_avg_sq`) and groups are torch.optim.AdamW's.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01, seed: int = 0):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))
        self.seed = seed
        # Which noise a tensor's rounding draws: its place among all, whether or not others
        # have gradients this step (as GaLoreAdamW8bit's `_index`).
        self._index = {p: i for i, p in enumerate((p for g in self.param_groups for p in g["params"]), 1)}
        for group in self.param_groups:    # refused here, not after the first backward
            for p in group["params"]:
                if p.dtype not in (torch.bfloat16, torch.float32) or not p.is_contiguous():
                    raise ValueError(f"BF16AdamW updates contiguous bf16 (or fp32) parameters; got a "
                                     f"{'non-contiguous ' if not p.is_contiguous() else ''}{p.dtype} one "
                                     f"of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                step = int(state["step"].item())
                gen = generator(self.seed, step, self._index[p], p.device) if p.dtype == torch.bfloat16 else None
                self._update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step, lr, b1, b2, eps, wd, gen)
        return loss

    @staticmethod
    def _update(p, grad, exp_avg, exp_avg_sq, step, lr, b1, b2, eps, wd, gen) -> None:
        flat = [p.view(-1), grad.reshape(-1), exp_avg.view(-1), exp_avg_sq.view(-1)]
        bc1, bc2 = 1 - b1 ** step, 1 - b2 ** step
        exact = p.dtype == torch.float32       # nothing to round: a plain AdamW step
        for start in range(0, p.numel(), BF16_STEP_CHUNK):
            w_, g_, m_, v_ = (t[start:start + BF16_STEP_CHUNK] for t in flat)
            g = g_.float()
            m = m_.float().lerp_(g, 1 - b1)
            v = v_.float().mul_(b2).addcmul_(g, g, value=1 - b2)
            del g
            # The moments as stored (rounded in place) make the update below.
            write_rounded_(m_, m, gen)
            write_rounded_(v_, v, gen)
            # v is the state itself when the weights are fp32 (.float() copies nothing then).
            denom = (v.div(bc2) if exact else v.div_(bc2)).sqrt_().add_(eps)
            w = w_.float()
            if wd:
                w.mul_(1 - lr * wd)
            w.addcdiv_(m, denom, value=-lr / bc1)
            del m, v, denom
            write_rounded_(w_, w, gen)
            del w          # before the next chunk's: three fp32 chunks alive at most
