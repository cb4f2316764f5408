"""L4Q: LoRA and quantization step sizes trained together through LSQ fake quantization.

Paper: Jeon, Kim & Kim, "L4Q: Parameter Efficient Quantization-Aware Training on
Large Language Models via LoRA-wise LSQ" (arXiv 2402.04902), building on LSQ
(Esser et al., "Learned Step Size Quantization", ICLR 2020) and LSQ+ (Bhalgat
et al., 2020) for the learned offset.

A targeted linear W0 (out × in, frozen) gets LoRA factors A (r × in), B (out × r)
and, per group of g weights along the input dimension (lowmem.quant.intk), a
learned step size s and offset β. The layer computes

    W  = W0 + c · B A                      c = α/r (rsLoRA: α/√r)
    v  = (W − β) / s                       per group
    Ŵ  = clamp(round(v), Qn, Qp) · s + β   Qn = −2^(b−1), Qp = 2^(b−1) − 1
    y  = x Ŵᵀ + bias

so training sees exactly the low-bit weights that the export writes. Gradients
(straight-through estimator for the rounding, LSQ/LSQ+ for s and β), with
1_in = [Qn ≤ v ≤ Qp] and G = ∂L/∂Ŵ = gradᵀ x:

    ∂L/∂W  = G ⊙ 1_in                                   (STE; clipped weights get none)
    ∂L/∂A  = c · Bᵀ (G ⊙ 1_in),   ∂L/∂B = c · (G ⊙ 1_in) Aᵀ
    ∂L/∂s  = γ · Σ_group G ⊙ (round(v) − v   inside,   Qn or Qp   outside)
    ∂L/∂β  = γ · Σ_group G ⊙ (1 − 1_in)
    γ      = 1 / √(n_group · Qp)                        (LSQ's gradient scale)

The gradient of s is the derivative of Ŵ with the rounding residual round(v) − v
held constant, which is what LSQ's estimator is (tests check it that way).

Quantization is asymmetric (s and β per group) as in L4Q; `symmetric=True`
gives plain LSQ (β ≡ 0, not trained). Initialisation: each group's min–max
range mapped onto [Qn, Qp] without clipping (`intk.minmax_params`), so at step
0, with B = 0, the layer equals round-to-nearest quantization of W0.

Adapter dropout does not exist here: the adapter is merged into the weight
before quantization, so there is no separate adapter path for it to act on.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lowmem.kernels.l4q import fake_quant, fake_quant_, fake_quant_backward, merged_weight
from lowmem.lora import LoRALinear, read_folder_json, replace_linears
from lowmem.quant.intk import BITS, bounds, group_sizes, minmax_params

L4Q_CONFIG = "l4q_config.json"
L4Q_WEIGHTS = "l4q_state.safetensors"


class L4QLinearFunction(torch.autograd.Function):
    """y = x · Q(W0 + c·BA)ᵀ + bias with the L4Q gradients (module docstring).

    Saved for backward: x (the layer input; any linear layer keeps it for its
    weight gradient, here it feeds ∂L/∂A and ∂L/∂B), W0 (the frozen parameter
    itself, not a copy), A, B, s, β and γ (small). Nothing of size out × in is
    kept for the graph: backward recomputes Ŵ for ∂L/∂x, frees it, then forms
    G = ∂L/∂Ŵ and turns it into ∂L/∂W in place. The weight-space work is
    lowmem.kernels.l4q's: fused CUDA kernels on a GPU (one compute-dtype
    out × in temporary at a time), its PyTorch reference elsewhere.
    """

    @staticmethod
    def forward(ctx, x, w0, bias, a, b, step, offset, grad_scale, scaling: float, bits: int,
                group: int, compute_dtype: torch.dtype):
        # Weight math in fp32 even under CUDA autocast: rounding decisions in bf16
        # would move weights across code boundaries that fp32 training never sees.
        with torch.autocast(device_type=x.device.type, enabled=False):
            wq = fake_quant(w0, a, b, step, offset, scaling, bits, group, compute_dtype)
            y = F.linear(x.to(compute_dtype), wq, None if bias is None else bias.to(compute_dtype))
        ctx.save_for_backward(x, w0, a, b, step, offset, grad_scale)
        ctx.config = (scaling, bits, group, compute_dtype, bias is not None)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        x, w0, a, b, step, offset, grad_scale = ctx.saved_tensors
        scaling, bits, group, compute_dtype, has_bias = ctx.config
        need_x, _, need_bias = ctx.needs_input_grad[:3]
        in_f = w0.shape[1]
        with torch.autocast(device_type=x.device.type, enabled=False):
            go = grad_out.reshape(-1, grad_out.shape[-1]).to(compute_dtype)
            grad_x = None
            if need_x:
                wq = fake_quant(w0, a, b, step, offset, scaling, bits, group, compute_dtype)
                grad_x = (go @ wq).reshape(x.shape).to(x.dtype)
                del wq                                   # one out × in temporary at a time
            grad_w = go.T @ x.reshape(-1, in_f).to(compute_dtype)            # ∂L/∂Ŵ
            grad_step, grad_offset = fake_quant_backward(w0, a, b, step, offset, grad_scale, grad_w,
                                                         scaling, bits, group)  # grad_w is now ∂L/∂W
            grad_a = (b.to(grad_w.dtype).T @ grad_w).mul_(scaling)
            grad_b = (grad_w @ a.to(grad_w.dtype).T).mul_(scaling)
            grad_bias = go.sum(0) if (has_bias and need_bias) else None
        return (grad_x, None, grad_bias, grad_a.to(a.dtype), grad_b.to(b.dtype),
                grad_step.to(step.dtype), None if grad_offset is None else grad_offset.to(offset.dtype),
                None, None, None, None, None)


class L4QLinear(LoRALinear):
    """A frozen dense linear, LoRA factors and per-group step sizes (and offsets), fake-quantized.

    Trainable: `lora_A` (r × in), `lora_B` (out × r), `quant_step` (out × G) and,
    unless symmetric, `quant_offset` (out × G), all fp32. G = ⌈in/group⌉.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, bits: int = 4, group: int = 128,
                 rslora: bool = False, symmetric: bool = False):
        if not isinstance(base, nn.Linear) or not base.weight.is_floating_point():
            raise ValueError(f"L4Q needs a dense linear layer to quantize, got {type(base).__name__}")
        if bits not in BITS:
            raise ValueError(f"l4q bits must be one of {BITS}, got {bits}")
        if group < 1:
            raise ValueError(f"l4q group size must be at least 1, got {group}")
        super().__init__(base, rank, alpha, 0.0, rslora)
        self.bits, self.group, self.symmetric = bits, group, symmetric
        self.alpha, self.rslora = alpha, rslora
        self.compute_dtype = base.weight.dtype
        step, offset = minmax_params(base.weight.detach(), bits, group, symmetric)
        self.quant_step = nn.Parameter(step)
        if offset is None:
            self.register_parameter("quant_offset", None)
        else:
            self.quant_offset = nn.Parameter(offset)
        _, qp = bounds(bits)
        gamma = 1.0 / torch.sqrt(group_sizes(self.in_features, group) * qp)
        self.register_buffer("grad_scale", gamma.to(step.device), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        return L4QLinearFunction.apply(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B,
                                       self.quant_step, self.quant_offset, self.grad_scale, self.scaling,
                                       self.bits, self.group, self.compute_dtype)

    @torch.no_grad()
    def quantized_weight(self) -> torch.Tensor:
        """Ŵ = Q(W0 + c·BA), fp32 (out × in): the weight the forward uses."""
        return fake_quant_(merged_weight(self.base.weight, self.lora_A, self.lora_B, self.scaling),
                           self.quant_step, self.quant_offset, self.bits, self.group)

    @torch.no_grad()
    def merge(self) -> None:
        """Overwrite the base weight with Ŵ; the layer is then a plain linear (not reversible)."""
        if not self.merged:
            self.base.weight.copy_(self.quantized_weight().to(self.base.weight.dtype))
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            raise RuntimeError("an L4Q layer cannot be unmerged: merging replaced W0 by its quantized merge")

    def extra_repr(self) -> str:
        return (f"rank={self.rank}, scaling={self.scaling:g}, bits={self.bits}, group={self.group}, "
                f"{'symmetric' if self.symmetric else 'asymmetric'}")


def apply_l4q(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...], bits: int = 4,
              group_size: int = 128, dropout: float = 0.0, rslora: bool = False,
              symmetric: bool = False) -> list[str]:
    """Wrap every dense nn.Linear whose name ends with a target in an L4QLinear, in place.

    Freezes all other parameters; returns the wrapped names. Raises ValueError
    when nothing matches, when the base is not dense (L4Q needs W0 in full
    precision: it quantizes W0 + c·BA itself), or for adapter dropout.
    """
    if dropout > 0:
        raise ValueError("l4q merges the adapter into the weight before quantizing it, so adapter "
                         f"dropout has nothing to act on; set lora.dropout=0 (got {dropout})")
    for p in model.parameters():
        p.requires_grad_(False)
    return replace_linears(model, targets, lambda base: L4QLinear(base, rank, alpha, bits, group_size,
                                                                  rslora, symmetric))


def l4q_modules(model: nn.Module) -> dict[str, L4QLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, L4QLinear)}


# ---------------------------------------------------------------- saving the trained state

def save_l4q_state(model: nn.Module, folder: Path, base_model: str = "") -> Path:
    """Write `l4q_config.json` + `l4q_state.safetensors` (A, B, step sizes, offsets) into `folder`.

    Self-describing: `load_l4q_state` rebuilds the layers on a freshly loaded
    base from it alone, which is what `lowmem export` does.
    """
    from safetensors.torch import save_file

    modules = l4q_modules(model)
    if not modules:
        raise ValueError("the model has no L4Q layers to save")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {}
    for name, m in modules.items():
        for pname in ("lora_A", "lora_B", "quant_step", "quant_offset"):
            t = getattr(m, pname)
            if t is not None:
                state[f"{name}.{pname}"] = t.detach().contiguous().cpu()
    save_file(state, str(folder / L4Q_WEIGHTS))
    first = next(iter(modules.values()))
    config = {
        "format": "lowmem-l4q", "version": 1, "base_model": base_model,
        "rank": first.rank, "alpha": first.alpha, "rslora": first.rslora,
        "bits": first.bits, "group_size": first.group, "symmetric": first.symmetric,
        "target_modules": sorted({n.split(".")[-1] for n in modules}),
        "modules": sorted(modules),
    }
    (folder / L4Q_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_l4q_config(folder: Path) -> dict:
    return read_folder_json(folder, L4Q_CONFIG, "a folder written by save_l4q_state")


def load_l4q_state(model: nn.Module, folder: Path) -> list[str]:
    """Apply the L4Q layers saved in `folder` to a dense `model`; returns the wrapped names."""
    from lowmem.errors import ModelError
    from lowmem.quant.skeleton import load_safetensors

    cfg = read_l4q_config(folder)
    names = apply_l4q(model, cfg["rank"], cfg["alpha"], tuple(cfg["target_modules"]), cfg["bits"],
                      cfg["group_size"], 0.0, cfg["rslora"], cfg["symmetric"])
    modules = l4q_modules(model)
    for key, tensor in load_safetensors(Path(folder) / L4Q_WEIGHTS).items():
        module_name, _, pname = key.rpartition(".")
        target = getattr(modules.get(module_name), pname, None) if module_name in modules else None
        if target is None or target.shape != tensor.shape:
            raise ModelError(f"{folder}: tensor {key} {tuple(tensor.shape)} does not fit this model")
        with torch.no_grad():
            target.copy_(tensor)
    return names
