"""RunConfig: every choice of a run, validated once and frozen.

Sources, later ones win: the defaults below (which are the embedded demo),
a preset YAML (`--preset NAME` or a path), command-line flags, then
`key=value` overrides. Every field is a key; nested sections use dots
(`lora.rank=16`) in YAML and overrides, dashes in flags (`--lora-rank 16`).
Errors name the file, line or key and what was expected.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterable

import yaml

from lowmem.errors import ConfigError

# Methods this build can train. The planner issue adds qlora, l4q, galore, loram
# here as each lands; an unknown method is refused by validation, never ignored.
METHODS = ("lora", "full", "qlora", "l4q", "loram", "galore")

# The peak learning rate of a method when the config does not set one: adapters learn from
# zero and take a large one; full fine-tuning moves pretrained weights and takes a small one;
# GaLore's update is scaled by galore.scale (0.25), so 2e-4 moves weights as 5e-5 does.
METHOD_LR = {"full": 5e-5, "galore": 2e-4}


def default_lr(method: str) -> float:
    return METHOD_LR.get(method, RunConfig.lr)


# Optional memory techniques this build has; the planner only tries these.
FEATURES: tuple[str, ...] = ("offload", "chunked_loss", "adamw8bit")

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(i?B?)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str | int | float) -> int:
    """Bytes from `24G`, `24GB`, `24GiB`, `500M`, `0.5T` or a plain number.

    G, GB and GiB all mean 2^30 bytes: a "24 GB" card reports 24 GiB to CUDA.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected a size like 24G, got {text!r}")
    if isinstance(text, (int, float)):
        number, unit, suffix = str(text), "", ""
    else:
        m = _SIZE_RE.match(str(text))
        if not m:
            raise ValueError(f"expected a size like 24G, 24GB, 24GiB, 500M or 0.5T, got {text!r}")
        number, unit, suffix = m.groups()
    size = int(float(number) * _UNITS[unit.upper()])
    said = str(text).strip()
    if not unit and not suffix and size < 2**20:   # `vram: 24` in YAML as well as --vram 24
        hint = f"did you mean {said}G? " if size > 0 else ""
        raise ValueError(f"{said!r} has no unit: {hint}sizes are like 24G or 500M (a bare number "
                         f"counts bytes, and a memory budget is 1M or more)")
    if 0 < size < 2**20:     # `24B`, `24KB`: no memory budget is that small
        raise ValueError(f"{said!r} is {format_size(size)}: did you mean {number}G? sizes are like 24G "
                         f"or 500M, and a memory budget is 1M or more")
    return size


def size_text(n: int) -> str | int:
    """`n` bytes as parse_size reads them, in the largest unit that holds it whole (24G, 500M),
    else the number of bytes."""
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return n


def format_size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("T", 2**40), ("G", 2**30), ("M", 2**20), ("K", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}iB"
    return f"{n}B"


def _key(help: str, *, min: float | None = None, max: float | None = None, above: float | None = None,
         choices: tuple | None = None, unit: str = "", size: bool = False, derived: bool = False) -> dict:
    """`min`/`max` bound a number inclusively, `above` exclusively (a value that must be positive);
    `derived`: unset, the key follows others (its help says how), so it has no one default."""
    return {"help": help, "min": min, "max": max, "above": above, "choices": choices, "unit": unit,
            "size": size, "derived": derived}


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: y = x Wᵀ + s · dropout(x) Aᵀ Bᵀ, s = alpha/rank (or alpha/√rank)."""

    rank: int = field(default=16, metadata=_key("adapter rank r", min=1, max=4096))
    alpha: float = field(default=32.0, metadata=_key("scaling numerator alpha", above=0))
    dropout: float = field(default=0.0, metadata=_key("dropout on the adapter input", min=0, max=0.99))
    targets: tuple[str, ...] = field(
        default=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
        metadata=_key("linear layers that get adapters, in every block (self_attn.q_proj is q_proj)"))
    rslora: bool = field(default=False, metadata=_key("scale by alpha/sqrt(rank) (rsLoRA) instead of alpha/rank"))


@dataclass(frozen=True)
class L4QConfig:
    """L4Q: LoRA trained through fake quantization Q(W0 + s·BA) with learned per-group step sizes."""

    bits: int = field(default=4, metadata=_key("bits of the quantized weights", choices=(2, 3, 4, 8)))
    group: int = field(default=128, metadata=_key(
        "weights per step size, along the input dimension", min=1, unit="weights"))


@dataclass(frozen=True)
class LoramConfig:
    """LoRAM: LoRA trained on a structurally pruned base, saved recovered to the full shapes."""

    ratio: float = field(default=0.5, metadata=_key(
        "share of KV groups / query heads / MLP channels pruned in the middle blocks", min=0.0, max=0.95))
    criterion: str = field(default="auto", metadata=_key(
        "importance: taylor = |w*dL/dw| on calibration batches (scored one dense block at a time "
        "before the weights load pruned; with loram.align_steps the dense model and its gradients), "
        "magnitude = |w| (no data; pruned while the weights load), auto = taylor where its scoring "
        "fits the GPU budget or this machine's RAM, else magnitude",
        choices=("auto", "taylor", "magnitude")))
    calibration_batches: int = field(default=4, metadata=_key(
        "training micro-batches scored for taylor importance", min=1))
    keep_first: int = field(default=1, metadata=_key("blocks kept whole at the start", min=0))
    keep_last: int = field(default=1, metadata=_key("blocks kept whole at the end", min=0))
    layer_ratios: tuple[float, ...] = field(default=(), metadata=_key(
        "prune ratios of the first blocks, in block order, each overriding ratio, keep_first and keep_last "
        "for its block (at most one per block); empty = uniform"))
    quantize: bool = field(default=False, metadata=_key("NF4-quantize the pruned base (QLoRAM)"))
    align_steps: int = field(default=0, metadata=_key(
        "continual pre-training steps of the pruned model on the training text before LoRA; 0 = none", min=0))
    align_lr: float = field(default=1e-5, metadata=_key("alignment learning rate", above=0.0))
    align_subset: str = field(default="all", metadata=_key(
        "weights the alignment trains", choices=("all", "attention", "mlp")))


@dataclass(frozen=True)
class GaloreConfig:
    """GaLore (method galore): gradients projected to rank r, Adam moments of the projection in 8 bits."""

    rank: int = field(default=0, metadata=_key("projection rank r; 0 = hidden/4", min=0, max=65536))
    update_gap: int = field(default=200, metadata=_key(
        "refresh the projection (SVD of the gradient) every T steps", min=1, unit="steps"))
    scale: float = field(default=0.25, metadata=_key("scale alpha of the projected-back update", above=0.0))
    per_layer: bool = field(default=True, metadata=_key(
        "update each weight inside backward and free its gradient (clips per tensor)"))
    embeddings: bool = field(default=False, metadata=_key(
        "project the embeddings and output head too (else they use 8-bit AdamW)"))


@dataclass(frozen=True)
class RunConfig:
    """Everything that decides a run. Defaults are the embedded CPU demo."""

    model: str = field(default="smollm2-135m", metadata=_key(
        "local HF model directory, .gguf file, or built-in name (smollm2-135m is embedded)"))
    data: str = field(default="embedded", metadata=_key(
        "training data: .jsonl (chat messages / instruction / ShareGPT / prompt-completion / text, one "
        "per line), a .json list of those, or .txt; 'embedded' = built-in tasks"))
    eval_data: str = field(default="", metadata=_key(
        "held-out data file; empty = the embedded held-out split, or eval_fraction of --data"))
    eval_fraction: float = field(default=0.05, metadata=_key(
        "share of --data held out when no eval_data is given", min=0.0, max=0.5))
    runs_dir: str = field(default="runs", metadata=_key(
        "folder that holds run directories (a relative one is under the current folder)"))
    name: str = field(default="", metadata=_key(
        "run name (a folder directly under runs_dir, so no / or \\); empty = timestamp"))
    method: str = field(default="lora", metadata=_key("training method", choices=METHODS))
    vram: int | None = field(default=None, metadata=_key(
        "memory budget of the device (24G, 24GB, 24GiB, 500M, 0.5T; G = 2^30 bytes)", min=1, size=True))
    safety_margin: float = field(default=0.05, metadata=_key(
        "share of --vram (and --host-ram) the planner keeps free for what it cannot predict", min=0.0, max=0.5))
    host_ram: int | None = field(default=None, metadata=_key(
        "host RAM that offloaded activations may pin (64G, 500M); "
        "none = what this machine has available when planning", min=1, size=True))
    target_tokens_per_step: int = field(default=0, metadata=_key(
        "tokens per optimizer step the planner keeps while it changes micro_batch; "
        "0 = micro_batch x grad_accum x seq_len", min=0, unit="tokens"))
    seq_len: int = field(default=192, metadata=_key(
        "tokens per sequence (longer examples are cut; one whose answer starts past it is left out, "
        "with a warning)", min=8, unit="tokens"))
    micro_batch: int = field(default=8, metadata=_key("sequences per forward/backward", min=1))
    grad_accum: int = field(default=1, metadata=_key("micro-batches per optimizer step", min=1))
    steps: int = field(default=50, metadata=_key("optimizer steps", min=1))
    lr: float = field(default=2e-3, metadata=_key(
        "peak learning rate; unset, it follows the method: 2e-3 for adapters, 5e-5 full, 2e-4 GaLore",
        above=0.0, derived=True))
    schedule: str = field(default="cosine", metadata=_key(
        "learning-rate decay after warmup", choices=("cosine", "linear", "constant")))
    warmup_steps: int = field(default=5, metadata=_key(
        "linear warmup steps; unset, a tenth of the steps up to 5", min=0, derived=True))
    min_lr_ratio: float = field(default=0.1, metadata=_key("final lr as a share of lr", min=0.0, max=1.0))
    weight_decay: float = field(default=0.0, metadata=_key("AdamW weight decay", min=0.0))
    adam_betas: tuple[float, ...] = field(default=(0.9, 0.999), metadata=_key("AdamW betas (two numbers)"))
    max_grad_norm: float = field(default=1.0, metadata=_key("clip gradient norm to this; 0 = no clipping", min=0.0))
    grad_checkpointing: bool = field(default=False, metadata=_key("recompute layer activations in backward"))
    offload: bool = field(default=False, metadata=_key(
        "move tensors saved for backward to pinned CPU memory (with grad_checkpointing: layer inputs only)"))
    loss_chunk: int = field(default=0, metadata=_key(
        "tokens per loss chunk: logits of one chunk at a time; 0 = all at once", min=0, unit="tokens"))
    packing: bool = field(default=False, metadata=_key(
        "pack several examples into each sequence: fewer pad tokens; each example still attends "
        "only to itself, through a block-diagonal mask the plan counts (a batch × seq² mask per layer)"))
    eval_every: int = field(default=0, metadata=_key("held-out eval every N steps; 0 = only before and after", min=0))
    eval_max_examples: int = field(default=0, metadata=_key("cap on held-out examples; 0 = all", min=0))
    eval_generate: bool = field(default=True, metadata=_key("also generate answers and score exact match"))
    max_new_tokens: int = field(default=16, metadata=_key("answer length of the exact-match evaluation, in tokens (`lowmem generate` has its own --max-new-tokens)", min=1))
    save_every: int = field(default=0, metadata=_key("checkpoint every N steps; 0 = only at the end", min=0))
    save_minutes: float = field(default=30.0, metadata=_key(
        "also checkpoint once this many minutes have passed since the last checkpoint (or the start), so a "
        "killed long run loses at most that much; 0 = off", min=0))
    keep_checkpoints: int = field(default=2, metadata=_key("checkpoints kept (older ones are deleted)", min=1))
    log_every: int = field(default=1, metadata=_key("progress line every N steps", min=1))
    seed: int = field(default=0, metadata=_key("seed for data order, adapter init and dropout",
                                               min=-2**63, max=2**63 - 1))
    device: str = field(default="auto", metadata=_key("where to train", choices=("auto", "cpu", "cuda")))
    lora: LoraConfig = field(default_factory=LoraConfig)
    galore: GaloreConfig = field(default_factory=GaloreConfig)
    l4q: L4QConfig = field(default_factory=L4QConfig)
    loram: LoramConfig = field(default_factory=LoramConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain values for YAML; a size as it is typed (24G), which parse_size reads back."""
        plain = _to_plain(self)
        for f in fields(self):
            if f.metadata.get("size") and plain[f.name] is not None:
                plain[f.name] = size_text(plain[f.name])
        return plain

    def replace(self, **changes: Any) -> "RunConfig":
        return dataclasses.replace(self, **changes)


def _to_plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj):
        return {f.name: _to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_to_plain(v) for v in obj]
    return obj


# ---------------------------------------------------------------- key catalogue

def _sections(cls: type = RunConfig, prefix: str = "") -> Iterable[tuple[str, dataclasses.Field]]:
    for f in fields(cls):
        if dataclasses.is_dataclass(f.default_factory if f.default_factory is not dataclasses.MISSING else None):
            yield from _sections(f.default_factory, prefix + f.name + ".")
        else:
            yield prefix + f.name, f


def all_keys() -> dict[str, dataclasses.Field]:
    """Dotted key -> dataclass field, for every leaf key of RunConfig."""
    return dict(_sections())


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key, all_keys(), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# Text keys that cannot be empty, with what they expect.
REQUIRED_TEXT = {"model": "a model: a local folder, a .gguf file or smollm2-135m",
                 "data": "training data: a .jsonl, .json or .txt file, or embedded"}


def _section_of(key: str) -> str | None:
    """The first key of section `key` (lora -> lora.rank), when `key` names a section."""
    return next((k for k in all_keys() if k.startswith(key + ".")), None)


def bad_run_name(name: str) -> str | None:
    """Why `name` cannot be a run directory's name (a folder directly under runs_dir), or None."""
    if name in (".", "..") or "/" in name or "\\" in name or name != name.strip() or not name.isprintable():
        return (f"expected a folder name (no / or \\, not . or .., no spaces at its ends or unprintable "
                f"characters), got {name!r}: runs_dir says where runs go")
    return None


def _coerce(key: str, f: dataclasses.Field, value: Any, where: str) -> Any:
    """Convert `value` to the field's type and check its range, or raise ConfigError."""
    meta, ftype = f.metadata, str(f.type)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{where}key '{key}': expected {expected}, got {value!r}")

    if meta.get("size"):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none", "null", "auto")):
            return None
        try:
            value = parse_size(value)
        except ValueError as e:
            raise ConfigError(f"{where}key '{key}': {e}") from None
    elif ftype.startswith("tuple[str"):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value) or not value:
            raise bad("a non-empty list of names")
        value = tuple(value)
    elif ftype.startswith("tuple[float"):
        if value is None or (isinstance(value, str) and not value.strip()):
            value = []                     # `loram.layer_ratios=`, `layer_ratios:`: cleared
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]                # one number: a list of one
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",")]
        try:
            value = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise bad("a list of numbers") from None
        if not all(math.isfinite(v) for v in value):
            raise bad("a list of finite numbers")
        if key == "adam_betas" and (len(value) != 2 or not all(0 <= b < 1 for b in value)):
            raise bad("two numbers in [0, 1)")
        if key == "loram.layer_ratios" and not all(0 <= r <= 0.95 for r in value):
            raise bad("prune ratios from 0 to 0.95, as loram.ratio")
    elif ftype == "bool":
        if isinstance(value, str) and value.lower() in ("true", "false", "on", "off", "yes", "no", "1", "0"):
            value = value.lower() in ("true", "on", "yes", "1")
        elif type(value) is int and value in (0, 1):     # `grad_checkpointing=1` reads as the number 1
            value = bool(value)
        if not isinstance(value, bool):
            raise bad("true or false")
    elif ftype == "int":
        if isinstance(value, str):
            try:
                value = int(value)
            except ValueError:
                raise bad("a whole number") from None
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("a whole number")
    elif ftype == "float":
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise bad("a number") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("a finite number")
    elif ftype == "str":
        if value is None:
            value = ""
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise bad("text")
        value = str(value)

    if key == "runs_dir" and not value.strip():
        raise ConfigError(f"{where}key 'runs_dir' is empty: expected the folder that holds run directories "
                          f"(default: runs, under the current folder; . for the current folder itself)")
    if key == "name" and value:
        why = bad_run_name(value)
        if why:
            raise ConfigError(f"{where}key 'name': {why}")
    if key == "lora.targets":
        from lowmem.spec import LINEARS

        other = next((t for t in value if t.rsplit(".", 1)[-1] not in LINEARS), None)
        if other is not None:
            raise ConfigError(f"{where}key '{key}': '{other}' is not a block projection; adapters go on "
                              f"{', '.join(LINEARS)} (the loss reads the head's weight itself, so lm_head "
                              f"and the embeddings cannot carry an adapter)")
        indexed = next((t for t in value if any(part.isdigit() for part in t.split("."))), None)
        if indexed is not None:
            raise ConfigError(f"{where}key '{key}': '{indexed}' names one block's projection; adapters go on "
                              f"a projection in every block: give its name ({indexed.rsplit('.', 1)[-1]})")
        # Every block's projection of that name gets one: a dotted path names no more than its
        # last part, and the plan counts adapters by that name.
        value = tuple(dict.fromkeys(t.rsplit(".", 1)[-1] for t in value))
    if meta.get("choices") and isinstance(value, str) and value not in meta["choices"] \
            and value.lower() in meta["choices"]:
        value = value.lower()           # method=LoRA
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{where}key '{key}': expected one of {', '.join(map(str, meta['choices']))}, "
                          f"got {value!r}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        lo, hi, above = meta.get("min"), meta.get("max"), meta.get("above")
        if lo is not None and value < lo:
            raise ConfigError(f"{where}key '{key}': {value} is below the minimum {lo}")
        if above is not None and value <= above:
            raise ConfigError(f"{where}key '{key}': expected a number above {above:g}, got {value:g}")
        if hi is not None and value > hi:
            raise ConfigError(f"{where}key '{key}': {value} is above the maximum {hi}")
    return value


def build_config(layers: Iterable[tuple[dict[str, Any], dict[str, str]]], *, resuming: bool = False,
                 note: Callable[[str], None] | None = None, presets: int = 0) -> RunConfig:
    """Merge flat `{dotted_key: value}` layers onto the defaults and validate.

    Each layer comes with `{dotted_key: where}` telling where a value came from
    (`presets/x.yaml: line 7: ` or `override: `), used in error messages.
    `resuming`: the layers are a run's own config.yaml and what a resume changes; its
    schedule is the run's, so it is not checked against the new steps. The first `presets`
    layers are presets: their lr and warmup_steps give way to a method and steps a later layer
    gives (`note` is told), where a user's own flags and overrides stand.
    """
    keys = all_keys()
    merged: dict[str, Any] = {}
    set_at: dict[str, str] = {}
    layer_of: dict[str, int] = {}       # which layer gave each key
    method_after: list[str] = []        # the method in force after each layer
    for layer, (values, origins) in enumerate(layers):
        for key, value in values.items():
            layer_of[key] = layer
            where = set_at[key] = origins.get(key, "")
            if key not in keys:
                first = _section_of(key)
                if first is not None:
                    leaf = first.split(".", 1)[1]
                    raise ConfigError(f"{where}'{key}' is a section, not a value: set its keys, as "
                                      f"{first}=… or in YAML `{key}:` with `  {leaf}: …` under it")
                raise ConfigError(f"{where}unknown key '{key}'{_did_you_mean(key)}")
            merged[key] = _coerce(key, keys[key], value, where)
        method_after.append(merged.get("method", RunConfig.method))
    for key, expected in REQUIRED_TEXT.items():
        # Checked once merged: a preset may leave one empty for a flag to fill (`--model`).
        if key in merged and not merged[key].strip():
            if layer_of[key] < presets:      # left for the user to give, as the preset's comment says
                raise ConfigError(f"{set_at[key]}this preset leaves '{key}' for you to give: {expected} "
                                  f"(--{key} or {key}=…)")
            raise ConfigError(f"{set_at[key]}key '{key}' is empty: expected {expected} "
                              f"(--{key} or {key}=…)")
    # Unset keys whose good value depends on others.
    steps = merged.get("steps", RunConfig.steps)
    if ("warmup_steps" in merged and merged["warmup_steps"] > steps and not resuming
            and layer_of["warmup_steps"] < presets and layer_of.get("steps", -1) >= presets):
        # A preset's warmup was for its own steps: `--preset demo-cpu --steps 3` shortens both.
        if note is not None:
            note(f"warmup_steps {min(RunConfig.warmup_steps, steps // 10)}: the {merged['warmup_steps']} given "
                 f"({set_at['warmup_steps'].rstrip(': ')}) are more than steps={steps}")
        del merged["warmup_steps"]
    if "warmup_steps" not in merged:
        merged["warmup_steps"] = min(RunConfig.warmup_steps, steps // 10)
    elif merged["warmup_steps"] > steps and not resuming:
        raise ConfigError(f"{set_at['warmup_steps']}key 'warmup_steps': {merged['warmup_steps']} warmup steps "
                          f"in a run of {steps} steps: the learning rate would never reach lr; give at most {steps}")
    method = merged.get("method", RunConfig.method)
    if "lr" in merged and layer_of["lr"] < presets and layer_of.get("method", -1) >= presets:
        chosen_for = method_after[layer_of["lr"]]
        if default_lr(chosen_for) != default_lr(method):
            # A preset's lr was tuned for its method; `--method full` on it must not train every
            # weight at a LoRA learning rate.
            if note is not None:
                note(f"lr {default_lr(method):g}: the default for {method}; the lr {merged['lr']:g} given "
                     f"({set_at['lr'].rstrip(': ')}) is for {chosen_for} (set lr to choose)")
            del merged["lr"]
    if "lr" not in merged:
        merged["lr"] = default_lr(method)

    def section(name: str) -> dict[str, Any]:
        return {k.split(".", 1)[1]: v for k, v in merged.items() if k.startswith(name + ".")}

    top = {k: v for k, v in merged.items() if "." not in k}
    return RunConfig(**top, lora=LoraConfig(**section("lora")), l4q=L4QConfig(**section("l4q")),
                     loram=LoramConfig(**section("loram")), galore=GaloreConfig(**section("galore")))


# ---------------------------------------------------------------- YAML with line numbers

def _explicit_tag(node: yaml.Node) -> bool:
    """Whether the YAML text tags the value itself (`!!int 7`, `!env X`): its node starts at the `!`."""
    mark = node.start_mark
    return bool(mark.buffer) and mark.buffer[mark.pointer:mark.pointer + 1] == "!"


class NumberLoader(yaml.SafeLoader):
    """YAML as a person reads numbers: `010` is ten (YAML 1.1 reads octal 8) and `1:30` is
    refused (YAML 1.1 reads base 60: 90). Decimal, 0x and 0o numbers read as before."""


def _construct_number(loader: yaml.SafeLoader, node: yaml.ScalarNode) -> int | float:
    text = node.value.replace("_", "")
    if ":" in text:
        raise yaml.constructor.ConstructorError(
            None, None, f"{node.value!r} is base 60 in YAML 1.1 ({yaml.SafeLoader(node.value).get_single_data()}); "
                        f"write the number itself", node.start_mark)
    if node.tag.endswith(":int"):
        digits = text.lstrip("+-")
        if len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXoObB":
            return int(text, 10)         # leading zeros: the decimal number typed
        return yaml.SafeLoader.construct_yaml_int(loader, node)
    return yaml.SafeLoader.construct_yaml_float(loader, node)


NumberLoader.add_constructor("tag:yaml.org,2002:int", _construct_number)
NumberLoader.add_constructor("tag:yaml.org,2002:float", _construct_number)


def _flatten_node(node: yaml.Node, source: str, prefix: str = "",
                  lines: dict[str, int] | None = None) -> tuple[dict, dict]:
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if not isinstance(node, yaml.MappingNode):
        raise ConfigError(f"{source}: line {node.start_mark.line + 1}: expected a mapping of key: value")
    lines = {} if lines is None else lines     # by full key: `lora.rank:` and `lora: {rank:}` clash
    keys = all_keys()
    for key_node, value_node in node.value:
        key = prefix + str(key_node.value)
        where = f"{source}: line {key_node.start_mark.line + 1}: "
        if key in lines:      # YAML keeps the last silently; one of the two is a mistake
            raise ConfigError(f"{where}'{key}' is given twice (also on line {lines[key]}); keep one")
        lines[key] = key_node.start_mark.line + 1
        if isinstance(value_node, yaml.MappingNode):
            sub_values, sub_origins = _flatten_node(value_node, source, key + ".", lines)
            values.update(sub_values)
            origins.update(sub_origins)
        else:
            field_type = str(keys[key].type) if key in keys else ""
            if (field_type == "str" and isinstance(value_node, yaml.ScalarNode) and value_node.style is None
                    and value_node.value != "" and not _explicit_tag(value_node)
                    and value_node.tag != "tag:yaml.org,2002:null"):      # `null` and `~` stay empty
                # A text key takes the text as written: `name: 007` is "007", `name: on` is "on".
                value = value_node.value
            else:
                # Constructed from the node itself: an empty value (`eval_data:`) is None, where
                # re-serializing the node would give YAML that does not parse.
                try:
                    value = NumberLoader("").construct_object(value_node, deep=True)
                except (yaml.YAMLError, ValueError, TypeError, IndexError) as e:
                    problem = (getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
                               if value_node.value else "there is no value after the tag")
                    raise ConfigError(f"{where}'{key}': cannot read the value "
                                      f"{value_node.tag.rsplit(':', 1)[-1]} {value_node.value!r} ({problem})") from None
            if value is None and not prefix and any(k.startswith(key + ".") for k in keys):
                continue        # an empty section (`lora:` with nothing under it)
            values[key] = value
            origins[key] = where
    return values, origins


def read_yaml_layer(text: str, source: str) -> tuple[dict, dict]:
    """Flat `{dotted_key: value}` and `{dotted_key: 'file: line N: '}` from YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        if "'\\t'" in problem:
            problem += " (YAML indents with spaces: replace the tab)"
        raise ConfigError(f"{source}: {line}bad YAML: {problem}") from None
    if node is None:
        return {}, {}
    return _flatten_node(node, source)


def parse_overrides(items: Iterable[str]) -> tuple[dict, dict]:
    """`['lora.rank=16', 'lr=1e-4']` -> flat values; the value is read as YAML."""
    values, origins = {}, {}
    for item in items:
        if "=" not in item:
            if re.fullmatch(r"[KMGT]i?B?", item.strip(), re.IGNORECASE):   # `--vram 24 GB`
                raise ConfigError(f"'{item}' looks like the unit of a size: write it against the number, "
                                  f"e.g. --vram 24{item.strip()}")
            raise ConfigError(f"override '{item}': expected key=value, e.g. lora.rank=16")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key in values:
            before = origins[key].removeprefix("override ").removesuffix(": ")
            raise ConfigError(f"override '{item}': {key} is given twice ({before} before it); give it once")
        field_ = all_keys().get(key)
        if field_ is not None and str(field_.type) == "str" and raw.strip()[:1] not in ("'", '"'):
            # Text as typed: name=007 is "007", not 7; null and ~ clear it, as in YAML.
            values[key] = "" if raw.strip() in ("null", "~", "Null", "NULL") else raw.strip()
        else:
            try:
                values[key] = yaml.load(raw, Loader=NumberLoader) if raw.strip() else ""
            except yaml.YAMLError:
                values[key] = raw
        origins[key] = f"override '{item}': "
    return values, origins


# ---------------------------------------------------------------- presets

def preset_dir() -> Path:
    """The shipped presets (found through the package, so non-editable installs work)."""
    return Path(str(resources.files("lowmem.presets")))


def list_presets() -> dict[str, Path]:
    return {p.stem: p for p in sorted(preset_dir().glob("*.yaml"))}


def find_preset(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.is_file() or (path.exists() and name_or_path not in list_presets()):
        if path.is_dir():
            raise ConfigError(f"{path} is a directory; expected a preset YAML file")
        if not path.is_file():
            raise ConfigError(f"preset file {path} does not exist")
        return path
    presets = list_presets()
    name_or_path = next((name for name in presets if name.lower() == name_or_path.lower()), name_or_path)
    if name_or_path not in presets:
        close = difflib.get_close_matches(name_or_path, presets, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"unknown preset '{name_or_path}'{hint}; `lowmem presets` lists them")
    return presets[name_or_path]


def preset_summary(path: Path) -> str:
    """The first comment line of a preset, shown by `lowmem presets`."""
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def load_config(preset: str | None = None, flags: dict[str, Any] | None = None,
                overrides: Iterable[str] = (), note: Callable[[str], None] | None = None) -> RunConfig:
    """Defaults <- preset <- flags <- key=value overrides, validated (`note`: see build_config)."""
    layers = []
    if preset:
        path = find_preset(preset)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
        layers.append(read_yaml_layer(text, str(path)))
    if flags:
        layers.append((flags, {k: f"--{k.replace('.', '-').replace('_', '-')}: " for k in flags}))
    layers.append(parse_overrides(overrides))
    return build_config(layers, note=note, presets=1 if preset else 0)
