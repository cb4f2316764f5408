"""Low-rank adapters (LoRA: Hu et al., 2021; rsLoRA scaling: Kalajdzievski, 2023).

A frozen linear layer W (out × in) gets a trainable update of rank r:

    y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ        A: (r × in), B: (out × r), s = α/r  (rsLoRA: α/√r)

B starts at zero so the adapted model starts equal to the base. Adapters are
saved in the Hugging Face PEFT layout (`adapter_config.json` +
`adapter_model.safetensors`, keys `base_model.model.<module>.lora_A.weight`),
which PEFT, transformers and vLLM load.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def scaling(rank: int, alpha: float, rslora: bool = False) -> float:
    """s of ΔW = s·B A: alpha/rank, or alpha/√rank with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


class LoRALinear(nn.Module):
    """A frozen `base` linear plus a rank-r update; `merge()` folds it into the base."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0,
                 rslora: bool = False):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank = rank
        self.scaling = scaling(rank, alpha, rslora)
        # Adapters live in fp32 even over a bf16 or 4-bit base: their updates are
        # small relative to their values, and bf16 would round many of them away.
        device = next(base.parameters()).device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default for A
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        a = self.lora_A.to(x.dtype)
        b = self.lora_B.to(x.dtype)
        return y + (self.dropout(x) @ a.T @ b.T) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · B A, shape (out × in)."""
        return (self.lora_B @ self.lora_A) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
            self.merged = False

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}"


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: tuple[str, ...],
               dropout: float = 0.0, rslora: bool = False) -> list[str]:
    """Wrap every nn.Linear whose name ends with a target in a LoRALinear, in place.

    Freezes all other parameters. Returns the wrapped module names; raises
    ValueError when no module matches (a typo in `lora.targets` must not
    silently train nothing).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    return replace_linears(model, targets, lambda base: LoRALinear(base, rank, alpha, dropout, rslora))


def replace_linears(model: nn.Module, targets: tuple[str, ...], make, *,
                    skip: type | tuple[type, ...] = (), what: str = "lora.targets") -> list[str]:
    """Replace every nn.Linear (not of a `skip` type) whose name ends with a target by `make(linear)`.

    In place; returns the replaced names. A `targets` that matches nothing is a
    ValueError naming the model's linear layers, so a typo never silently
    trains (or quantizes) nothing.
    """
    names = [name for name, module in model.named_modules()
             if isinstance(module, nn.Linear) and not isinstance(module, skip)
             and name.split(".")[-1] in targets]
    if not names:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(f"{what} {list(targets)} match no linear layer; this model has {linear}")
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, make(getattr(parent, child)))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter weights under PEFT's key names."""
    state = {}
    for name, m in lora_modules(model).items():
        state[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        state[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    return state


def save_adapter(model: nn.Module, folder: Path, *, rank: int, alpha: float, targets: tuple[str, ...],
                 dropout: float, rslora: bool, base_model: str) -> Path:
    """Write `adapter_config.json` + `adapter_model.safetensors` (PEFT layout) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), str(folder / ADAPTER_WEIGHTS))
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "target_modules": sorted(targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "modules_to_save": None,
    }
    (folder / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return folder


def read_folder_json(folder: Path, name: str, expected: str) -> dict:
    """The JSON object in `folder/name`; ModelError naming the file when it is missing or malformed."""
    from lowmem.errors import ModelError

    path = Path(folder) / name
    if not path.is_file():
        raise ModelError(f"{folder}: no {name} here; expected {expected}")
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ModelError(f"{path}: not valid JSON ({e}); expected {expected}") from e
    if not isinstance(data, dict):
        raise ModelError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_adapter_config(folder: Path) -> dict:
    return read_folder_json(folder, ADAPTER_CONFIG, "an adapter folder (PEFT layout)")


@dataclass(frozen=True)
class AdapterFile:
    """A PEFT-layout LoRA adapter as read from its folder, checked against itself."""

    folder: Path
    rank: int
    alpha: float
    rslora: bool
    targets: tuple[str, ...] | None         # target_modules' names; None: PEFT's regex or "all-linear"
    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]   # module name -> (A (r, in), B (out, r))

    @property
    def scale(self) -> float:
        return scaling(self.rank, self.alpha, self.rslora)

    @property
    def wrapped(self) -> tuple[str, ...]:
        """The linear names to wrap: target_modules, else those the tensors name."""
        return self.targets or tuple(sorted({name.rsplit(".", 1)[-1] for name in self.pairs}))

    def missing(self, modules) -> list[str]:
        """Of `modules` (names of a model's linears), those target_modules names that this
        adapter holds no tensors for: an incomplete file. A pattern (or layers_to_transform)
        may leave layers out, so then none is missing."""
        if self.targets is None:
            return []
        return [m for m in modules if m.rsplit(".", 1)[-1] in self.targets and m not in self.pairs]


def read_adapter(folder: Path) -> AdapterFile:
    """The adapter in `folder`; a ModelError naming the file and key when its config or its
    tensors are not a LoRA adapter's (rank, alpha, targets, an A and a B of that rank per layer)."""
    from lowmem.errors import ModelError
    from lowmem.quant.skeleton import load_safetensors

    folder = Path(folder)
    cfg, where = read_adapter_config(folder), folder / ADAPTER_CONFIG
    rank, alpha, targets = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("target_modules")
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ModelError(f"{where}: 'r' must be the adapter's rank, a positive integer; found {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ModelError(f"{where}: 'lora_alpha' must be a positive number; found {alpha!r}")
    if not (isinstance(targets, str) and targets) and not (
            isinstance(targets, list) and targets and all(isinstance(t, str) for t in targets)):
        raise ModelError(f"{where}: 'target_modules' must be a list of layer names or a pattern; found {targets!r}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise ModelError(f"{where}: 'use_rslora' must be true or false; found {rslora!r}")
    pattern = isinstance(targets, str) or cfg.get("layers_to_transform") is not None
    targets = None if pattern else tuple(targets)

    weights = folder / ADAPTER_WEIGHTS
    found: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_safetensors(weights).items():
        module, _, which = key.removeprefix("base_model.model.").rpartition(".lora_")
        if which not in ("A.weight", "B.weight") or tensor.ndim != 2:
            raise ModelError(f"{weights}: unexpected tensor {key} {tuple(tensor.shape)} (expected "
                             f"…lora_A.weight and …lora_B.weight matrices)")
        found.setdefault(module, {})[which[0]] = tensor
    if not found:
        raise ModelError(f"{weights}: holds no LoRA tensors")
    pairs = {}
    for module, got in found.items():
        if set(got) != {"A", "B"}:
            raise ModelError(f"{weights}: {module} has lora_{next(iter(got))} without lora_"
                             f"{'B' if 'A' in got else 'A'}: the file is incomplete")
        a, b = got["A"], got["B"]
        if a.shape[0] != rank or b.shape[1] != rank:
            raise ModelError(f"{weights}: {module} has tensors of rank {a.shape[0]} ({tuple(a.shape)}, "
                             f"{tuple(b.shape)}), but {ADAPTER_CONFIG} says r={rank}")
        if targets is not None and module.rsplit(".", 1)[-1] not in targets:
            raise ModelError(f"{weights}: tensors for {module}, which target_modules {list(targets)} "
                             f"does not name")
        pairs[module] = (a, b)
    return AdapterFile(folder, rank, float(alpha), rslora, targets, pairs)


def load_adapter(model: nn.Module, folder: Path | AdapterFile) -> list[str]:
    """Apply the adapter saved in `folder` (PEFT layout) to `model`; returns wrapped names."""
    from lowmem.errors import ModelError

    adapter = folder if isinstance(folder, AdapterFile) else read_adapter(folder)
    try:
        names = apply_lora(model, adapter.rank, adapter.alpha, adapter.wrapped, 0.0, adapter.rslora)
    except ValueError as e:
        raise ModelError(f"{adapter.folder / ADAPTER_CONFIG}: {e}") from None
    modules = lora_modules(model)
    for name, (a, b) in adapter.pairs.items():
        module = modules.get(name)
        if module is None or module.lora_A.shape != a.shape or module.lora_B.shape != b.shape:
            raise ModelError(f"{adapter.folder}: adapter tensors of {name} {tuple(a.shape)}, {tuple(b.shape)} "
                             f"do not fit this model")
        with torch.no_grad():
            module.lora_A.copy_(a)
            module.lora_B.copy_(b)
    missing = adapter.missing(names)
    if missing:
        raise ModelError(f"{adapter.folder / ADAPTER_WEIGHTS}: the file is incomplete: no tensors for "
                         f"{len(missing)} of the {len(names)} layers that target_modules names, e.g. {missing[0]}")
    return names
