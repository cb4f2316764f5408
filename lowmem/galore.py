"""GaLore with 8-bit Adam states, optionally applied per layer inside backward.

Paper: Zhao et al., 2024, "GaLore: Memory-Efficient LLM Training by Gradient
Low-Rank Projection" (Algorithm 2, Adam with GaLore; 8-bit states and
per-layer weight updates as in its section 4).

For every projected weight W (m×n, the block linears by default) with
gradient G, at its optimizer step t (1-based; τ = t − 1 updates done before):

    if τ mod T = 0:  U, S, Vᵀ = svd(G)                 the subspace is refreshed every T steps
        m ≥ n (right):  Q = V[:, :r]  (n×r)    R = G Q    (m×r)    back(N) = N Qᵀ
        m < n (left):   P = U[:, :r]  (m×r)    R = Pᵀ G   (r×n)    back(N) = P N
    M ← β1·M + (1−β1)·R,   V ← β2·V + (1−β2)·R²           8-bit blockwise, see below
    N = (M / (1−β1ᵗ)) / (√(V / (1−β2ᵗ)) + ε)
    W ← W·(1 − η·λ) − η·α·back(N)                          λ weight decay, α = `scale`

The projection sits on the shorter side, so it holds r·min(m,n) numbers and
R (and M, V) r·max(m,n). The moments persist across refreshes, as in the paper.
Every other trainable tensor (norms, biases; embeddings and the head unless
`project_embeddings`) gets plain AdamW with the same 8-bit moments.

8-bit moments: bitsandbytes' blockwise dynamic quantization, as its AdamW8bit
keeps them: M in the signed dynamic map, V in the unsigned one, one fp32 absmax
per block of 256 values. The update (lowmem.kernels.adam8bit: a fused kernel on
CUDA, its PyTorch reference elsewhere) dequantizes, updates in fp32 and
re-quantizes, UPDATE_CHUNK values at a time, per tensor, so that it can run
inside backward and on a projected gradient. Unlike bitsandbytes' op, which
rounds both moments to the nearest code, it rounds V stochastically between its
two neighbouring codes: rounded to nearest, V at β2 = 0.999 cannot fall faster
than its block's largest value, and an element whose gradients shrink keeps a
large V and a small step (docs/full-training.md has the figures). Tensors (or projected gradients) under `min_8bit_size` = 4096 values
keep fp32 moments, as bitsandbytes does.

Per-layer updates (`per_layer=True`): a post-accumulate-grad hook on each
parameter applies its update as soon as its gradient is complete and sets
`.grad = None`, so full-size gradients of different layers never coexist.
Gradient accumulation over k micro-batches (call `begin_micro_batch(i, k)`
before each backward):
    projected weights: each micro-batch's hook adds R_i = proj(G_i) to an fp32
        buffer of R's shape and frees G_i; the last one applies the update with
        ΣR_i = proj(ΣG_i) (projection is linear, so this equals one large batch).
        On a refresh step the new projection comes from the first micro-batch's
        gradient (the full step gradient never exists): an estimate of the same
        subspace, and the one place where accumulation differs from one batch.
    other tensors: their gradients accumulate in `.grad` as usual and are
        applied and freed by the last micro-batch's hook.
Global clipping needs every gradient before any update, so per-layer mode
clips each tensor's gradient instead (the projected ΣR_i for projected
weights) to norm ≤ `max_grad_norm`, and reports `grad_norm` = √Σ‖·‖² of those
same (unclipped) gradients. Without `per_layer`, `step()` works on `.grad`
like any optimizer and the training loop clips globally.

Memory (bytes; r = rank, p = bytes of the parameter dtype):
    per projected m×n weight:  2·r·max(m,n) + 8·⌈r·max(m,n)/256⌉   8-bit M, V and absmaxes
                               + p·r·min(m,n)                      the projection
    per other tensor of k values:  2·k + 8·⌈k/256⌉ (k ≥ 4096), else 8·k (fp32 moments)
    once:                      2·256·4                             the two code maps
    gradients, per-layer:      the largest single gradient; with accumulation also
                               4·Σ r·max(m,n) (fp32 ΣR) and the other tensors' gradients
    update workspace:          one weight's refresh on refresh steps (memory.svd_refresh_bytes:
                               an fp32 copy of a 16-bit G, the solver's copy and workspace,
                               the SVD factors); the update is added in place, no m×n
                               temporary; the 8-bit update works on UPDATE_CHUNK
                               values at a time (memory.EIGHT_BIT_STEP_TEMPORARIES each)

bf16 weights (a run on CUDA) are updated in fp32, UPDATE_CHUNK values at a time, and
rounded stochastically (lowmem.rounding): rounded to nearest, as addmm_ on a bf16
weight does, an update under half a bf16 step of the weight is lost, and at
GaLore's effective lr of 5e-5 most weights never move.
These are the terms of `lowmem.memory.galore_state_bytes`, `adamw_state_bytes`,
`gradient_bytes` and `galore_workspace_bytes`; `state_bytes()` counts the real tensors.
"""

from __future__ import annotations

import math
import weakref
from typing import Iterable

import torch
from torch import nn

from lowmem.kernels.adam8bit import BLOCK, adam8bit_step_, dequantize
from lowmem.memory import EIGHT_BIT_STEP_CHUNK
from lowmem.rounding import generator, write_rounded_

MIN_8BIT_SIZE = 4096   # smaller tensors keep fp32 moments (bitsandbytes' min_8bit_size)
UPDATE_CHUNK = EIGHT_BIT_STEP_CHUNK   # values the 8-bit update works on at once: bounds its temporaries

_EMBEDDING_NAMES = ("embed_tokens", "lm_head", "wte", "wpe", "embed_out", "word_embeddings")


def _bnb():
    import bitsandbytes.functional as F  # imported late: it is slow to import
    return F


def is_embedding(name: str) -> bool:
    return any(part in name for part in _EMBEDDING_NAMES)


def projection_side(shape: tuple[int, int]) -> str:
    """"right" (G Q, Q: n×r) when m ≥ n, else "left" (Pᵀ G, P: m×r): the shorter side."""
    return "right" if shape[0] >= shape[1] else "left"


def projected_shape(shape: tuple[int, int], rank: int) -> tuple[int, int]:
    m, n = shape
    r = min(rank, m, n)
    return (m, r) if projection_side(shape) == "right" else (r, n)


def new_projection(grad: torch.Tensor, rank: int, dtype: torch.dtype) -> torch.Tensor:
    """The r leading singular vectors of `grad` on its shorter side (n×r or m×r)."""
    u, _, vh = torch.linalg.svd(grad.float(), full_matrices=False)
    r = min(rank, *grad.shape)
    basis = vh[:r].T if projection_side(tuple(grad.shape)) == "right" else u[:, :r]
    return basis.contiguous().to(dtype)


def project(grad: torch.Tensor, projection: torch.Tensor) -> torch.Tensor:
    """R = G Q (right) or Pᵀ G (left), in fp32."""
    if projection_side(tuple(grad.shape)) == "right":
        return (grad @ projection.to(grad.dtype)).float()
    return (projection.to(grad.dtype).T @ grad).float()


def project_back_(weight: torch.Tensor, update: torch.Tensor, projection: torch.Tensor,
                  scale: float, decay: float = 1.0, gen: torch.Generator | None = None) -> None:
    """W ← W·decay + α·back(update), in place (no m×n temporary).

    A bf16 weight given `gen` is updated in fp32, UPDATE_CHUNK values' worth of rows at a
    time, and rounded stochastically (lowmem.rounding): rounded to nearest, an update under
    half a bf16 step of the weight is lost."""
    right = projection_side(tuple(weight.shape)) == "right"
    if weight.dtype != torch.bfloat16 or gen is None:
        if decay != 1.0:
            weight.mul_(decay)
        update = update.to(weight.dtype)
        if right:
            weight.addmm_(update, projection.T, alpha=scale)
        else:
            weight.addmm_(projection, update, alpha=scale)
        return
    update, projection = update.float(), projection.float()   # small: r·max(m,n), r·min(m,n)
    rows = max(1, UPDATE_CHUNK // weight.shape[1])
    for start in range(0, weight.shape[0], rows):
        part = slice(start, start + rows)
        w = weight[part].float()
        if decay != 1.0:
            w.mul_(decay)
        if right:     # back(N) = N Qᵀ: these rows of N
            w.addmm_(update[part], projection.T, alpha=scale)
        else:         # back(N) = P N: these rows of P
            w.addmm_(projection[part], update, alpha=scale)
        write_rounded_(weight[part], w, gen)
        del w


def dequantized_moments(state: dict, qmaps: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, V) in fp32 from a tensor's optimizer state, 8-bit or not."""
    if "state1" not in state:
        return state["exp_avg"], state["exp_avg_sq"]
    shape = state["state1"].shape
    m = dequantize(state["state1"].reshape(-1), state["absmax1"], qmaps[0])
    v = dequantize(state["state2"].reshape(-1), state["absmax2"], qmaps[1])
    return m.view(shape), v.view(shape)


#: Parameters of a quantizer (L4Q's LSQ step sizes and offsets): matrices, but not weights.
#: Decayed, they would shrink the quantized base weight q·s + β itself toward zero.
QUANTIZER_PARAMS = ("quant_step", "quant_offset")


def decayed(name: str, p: nn.Parameter) -> bool:
    """Whether weight decay applies: to matrices (weights, LoRA A and B), not to vectors (norms,
    biases) nor to a quantizer's parameters."""
    return p.ndim >= 2 and name.rpartition(".")[2] not in QUANTIZER_PARAMS


class GaLoreAdamW8bit(torch.optim.Optimizer):
    """AdamW with GaLore-projected 8-bit moments for 2-D weights and 8-bit moments for the rest.

    `rank=None` (or 0) projects nothing: blockwise 8-bit AdamW for every tensor.
    Groups: projected weights (decayed), other matrices (decayed), the rest (not: `decayed`).
    """

    def __init__(self, named_params: Iterable[tuple[str, nn.Parameter]], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 *, rank: int | None = 128, update_gap: int = 200, scale: float = 0.25,
                 project_embeddings: bool = False, per_layer: bool = False, max_grad_norm: float = 0.0,
                 min_8bit_size: int = MIN_8BIT_SIZE, seed: int = 0, stochastic_moments: bool = True):
        named = [(n, p) for n, p in named_params if p.requires_grad]
        if not named:
            raise ValueError("GaLoreAdamW8bit got no trainable parameters")
        if update_gap < 1:
            raise ValueError(f"update_gap must be at least 1, got {update_gap}")

        def projected(name, p):
            return bool(rank) and p.ndim == 2 and (project_embeddings or not is_embedding(name))

        groups = [
            {"params": [p for n, p in named if projected(n, p)], "galore": True, "weight_decay": weight_decay},
            {"params": [p for n, p in named if not projected(n, p) and decayed(n, p)], "galore": False,
             "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decayed(n, p)], "galore": False, "weight_decay": 0.0},
        ]
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        rank=int(rank or 0), update_gap=update_gap, scale=scale)
        super().__init__([g for g in groups if g["params"]], defaults)
        self.names = {p: n for n, p in named}
        self._index = {p: i for i, (_, p) in enumerate(named)}   # which noise a bf16 weight's rounding draws
        self.seed = seed
        self.stochastic_moments = stochastic_moments   # False: V to nearest too, as bitsandbytes (benchmarks)
        self.per_layer = per_layer
        self.max_grad_norm = max_grad_norm
        self.min_8bit_size = min_8bit_size
        device = named[0][1].device
        F = _bnb()
        self.qmaps = (F.create_dynamic_map(signed=True).to(device),
                      F.create_dynamic_map(signed=False).to(device))
        self.grad_norm: float | None = None
        self._group_of = {p: g for g in self.param_groups for p in g["params"]}
        self._last_micro_batch = True
        self._norm_sq: list[torch.Tensor] = []
        self._hooks = []
        if per_layer:
            # The hooks reach the optimizer weakly: a parameter's hook must not keep its
            # optimizer (and through it every parameter and state) alive after the run drops it.
            on_gradient = weakref.WeakMethod(self._on_gradient)

            def hook(p: nn.Parameter) -> None:
                method = on_gradient()
                if method is not None:
                    method(p)

            for p in self._group_of:
                self._hooks.append(p.register_post_accumulate_grad_hook(hook))

    # ------------------------------------------------------------ the training loop's calls

    def begin_micro_batch(self, index: int, count: int) -> None:
        """Per-layer mode: the next backward is micro-batch `index` of `count`; the last applies updates."""
        self._last_micro_batch = index == count - 1

    @torch.no_grad()
    def step(self, closure=None):
        """Global mode: update every parameter from `.grad`. Per-layer mode: apply what the
        hooks left pending (a tensor whose last gradient came before the last micro-batch)
        and set `grad_norm`."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if self.per_layer:
                    if "pending" in state or (not group["galore"] and p.grad is not None):
                        self._apply(p, group)
                elif p.grad is not None:
                    if group["galore"]:
                        self._accumulate_projected(p, group, p.grad)
                    self._apply(p, group)
        if self.per_layer:
            self.grad_norm = float(torch.stack(self._norm_sq).sum().sqrt()) if self._norm_sq else 0.0
            self._norm_sq = []
            self._last_micro_batch = True
        return loss

    def remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------ the update of one tensor

    @torch.no_grad()
    def _on_gradient(self, p: nn.Parameter) -> None:
        group = self._group_of[p]
        if group["galore"]:
            self._accumulate_projected(p, group, p.grad)
            p.grad = None   # the full-size gradient is gone; ΣR carries it on
        if self._last_micro_batch:
            self._apply(p, group)

    def _accumulate_projected(self, p: nn.Parameter, group: dict, grad: torch.Tensor) -> None:
        state = self.state[p]
        if "pending" not in state:
            # First (or only) gradient of this step: refresh the subspace every T steps.
            if state.get("step", 0) % group["update_gap"] == 0:
                state["projection"] = new_projection(grad, group["rank"], p.dtype)
            state["pending"] = project(grad, state["projection"])
        else:
            state["pending"] += project(grad, state["projection"])

    def _apply(self, p: nn.Parameter, group: dict) -> None:
        state = self.state[p]
        if group["galore"]:
            grad = state.pop("pending")
        else:
            grad = p.grad
        if self.per_layer:
            norm = grad.float().norm()
            self._norm_sq.append(norm.square())
            if self.max_grad_norm > 0:
                # In place: the gradient (or ΣR) is ours and about to be dropped.
                grad.mul_(torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0).to(grad.dtype))
        state["step"] = state.get("step", 0) + 1
        lr, wd = group["lr"], group["weight_decay"]
        # The noise of this tensor's step: its 8-bit V's rounding, then its bf16 weight's.
        gen = generator(self.seed, state["step"], self._index[p], p.device)
        if group["galore"]:
            direction = torch.zeros_like(grad)          # becomes −lr·N
            self._adam(state, grad, direction, group, weight_decay=0.0, gen=gen)
            project_back_(p, direction, state["projection"], group["scale"], decay=1 - lr * wd, gen=gen)
        else:
            self._adam(state, grad, p, group, weight_decay=wd, gen=gen)
        if self.per_layer:
            p.grad = None

    def _adam(self, state: dict, grad: torch.Tensor, target: torch.Tensor, group: dict,
              weight_decay: float, gen: torch.Generator | None = None) -> None:
        """target ← target·(1 − lr·λ) − lr·M̂/(√V̂ + ε) with the moments of `grad` in `state`; an
        8-bit V and a bf16 target are rounded stochastically with `gen`'s noise."""
        b1, b2 = group["betas"]
        lr, eps, step = group["lr"], group["eps"], state["step"]
        numel = grad.numel()
        bf16 = target.dtype == torch.bfloat16
        if "state1" not in state and "exp_avg" not in state:
            if numel >= self.min_8bit_size:
                blocks = math.ceil(numel / BLOCK)
                for k in ("state1", "state2"):
                    state[k] = torch.zeros(grad.shape, dtype=torch.uint8, device=grad.device)
                for k in ("absmax1", "absmax2"):
                    state[k] = torch.zeros(blocks, dtype=torch.float32, device=grad.device)
            else:
                state["exp_avg"] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
                state["exp_avg_sq"] = torch.zeros(grad.shape, dtype=torch.float32, device=grad.device)
        if "exp_avg" in state:
            m, v, g = state["exp_avg"], state["exp_avg_sq"], grad.float()
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
            t = target.float() if bf16 else target
            if weight_decay:
                t.mul_(1 - lr * weight_decay)
            t.addcdiv_(m, denom, value=-lr / (1 - b1**step))
            if bf16:
                write_rounded_(target, t, gen)
            return
        flat_g = grad.reshape(-1) if grad.is_contiguous() else grad.contiguous().reshape(-1)
        flat_t = target.view(-1)
        s1, s2 = state["state1"].view(-1), state["state2"].view(-1)
        chunk = max(BLOCK, UPDATE_CHUNK // BLOCK * BLOCK)     # whole blocks, so each has one absmax
        for start in range(0, numel, chunk):
            end = min(start + chunk, numel)
            blocks = slice(start // BLOCK, math.ceil(end / BLOCK))
            adam8bit_step_(flat_g[start:end], flat_t[start:end], s1[start:end], s2[start:end],
                           state["absmax1"][blocks], state["absmax2"][blocks], self.qmaps, step, lr, (b1, b2),
                           eps, weight_decay, gen, stochastic=self.stochastic_moments)

    # ------------------------------------------------------------ checkpoints

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"]]

    def state_dict(self) -> dict:
        """Projections, 8-bit states and absmaxes as they are, step counters, groups, code maps.

        Only tensors, numbers, strings, lists, tuples and dicts: loadable with
        `torch.load(weights_only=True)`. Taken between steps (no pending ΣR).
        """
        index = {p: i for i, p in enumerate(self._params())}
        state = {index[p]: {k: v for k, v in s.items() if k != "pending"}
                 for p, s in self.state.items() if s}
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index[p] for p in g["params"]]}
                  for g in self.param_groups]
        return {"state": state, "param_groups": groups,
                "qmaps": {"signed": self.qmaps[0], "unsigned": self.qmaps[1]}}

    def load_state_dict(self, state_dict: dict) -> None:
        params = self._params()
        saved_groups = state_dict["param_groups"]
        if [len(g["params"]) for g in saved_groups] != [len(g["params"]) for g in self.param_groups]:
            raise ValueError("optimizer state does not match the model: the parameter groups differ "
                             "(was it saved with another method, rank or model?)")
        for group, saved in zip(self.param_groups, saved_groups):
            group.update({k: (tuple(v) if k == "betas" else v) for k, v in saved.items() if k != "params"})
        self.state.clear()
        for i, saved in state_dict["state"].items():
            p = params[int(i)]
            restored = {}
            for key, value in saved.items():
                if torch.is_tensor(value):
                    value = value.to(p.device, copy=True)
                restored[key] = value
            if "projection" in restored:
                expected = projected_shape(tuple(p.shape), self._group_of[p]["rank"])
                if tuple(restored.get("state1", restored.get("exp_avg")).shape) != expected:
                    raise ValueError(f"optimizer state of {self.names[p]} has the wrong shape for rank "
                                     f"{self._group_of[p]['rank']}")
            self.state[p] = restored
        maps = state_dict.get("qmaps")
        if maps is not None:
            self.qmaps = (maps["signed"].to(params[0].device), maps["unsigned"].to(params[0].device))

    # ------------------------------------------------------------ bytes

    def state_bytes(self) -> int:
        """Bytes of every state tensor (projections, moments, absmaxes) and the code maps."""
        seen, total = set(), 0
        tensors = [v for s in self.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "pending"]
        for t in tensors + list(self.qmaps):
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        return total
