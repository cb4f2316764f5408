"""The Plan: every choice that decides memory and speed, as plain data.

`lowmem train` writes it to the run directory as `plan.yaml`; the model
builder and the training loop read their choices from it and from nowhere
else. `plan_from_config` gives the plan that does exactly what the config
says; `make_plan` fits a plan to a memory budget (`vram`):

1. Candidates in quality order: full (fp32/bf16 AdamW states, then 8-bit)
   > galore > lora (dense base) > qlora (NF4 base) > loram (least pruning
   first; dense base before NF4). Only
   methods in `lowmem.config.METHODS` (what this build can train) are
   considered, read at call time so methods appear as they land. L4Q is
   planned only when asked for (`method=l4q`): it exists to export a low-bit
   model, not to save training memory.
2. Within a method, variants from fastest to slowest: fewer and cheaper
   memory savers first (chunked loss < checkpointing < offloading, see
   SAVER_COST), then larger micro-batches. Offloading and chunked loss are
   tried only when `lowmem.config.FEATURES` lists them.
3. The first candidate whose predicted peak (lowmem.memory) fits
   `vram · (1 − safety_margin)` wins. Better candidates that did not fit are
   kept in `rejected`, each with how far over the budget it was and the term
   that broke it (the one that grew most against the chosen plan). A field
   the user set (`pinned`) is never changed; seq_len is never changed at all.
4. If nothing fits: a `BudgetError` naming the smallest plan's total, the gap,
   and changes that would fit.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

from lowmem.config import RunConfig, format_size
from lowmem.errors import ConfigError, LowmemError
from lowmem.memory import MemoryBreakdown, gradient_bytes, predict
from lowmem.spec import LINEARS, ModelSpec

#: Default share of the budget kept free for what the model does not predict.
DEFAULT_SAFETY_MARGIN = 0.05

#: Quality order of the methods the search may pick (best first). l4q is absent on purpose.
QUALITY_ORDER = ("full", "galore", "lora", "qlora", "loram")

#: LoRAM prune ratios, least pruning first.
PRUNE_RATIOS = tuple(round(0.05 * k, 2) for k in range(1, 20))

#: Optional techniques; a build lists the ones it has in `lowmem.config.FEATURES`.
FEATURE_OFFLOAD = "offload"
FEATURE_CHUNKED_LOSS = "chunked_loss"
FEATURE_ADAMW8BIT = "adamw8bit"

#: Tokens per loss chunk when the plan chunks the loss: 256 tokens of a 128k
#: vocabulary hold ~0.5 GiB of loss buffers; fewer tokens gain little more.
DEFAULT_LOSS_CHUNK = 256


class BudgetError(LowmemError):
    """No plan fits the memory budget (or the pinned fields make none fit)."""


@dataclass(frozen=True)
class Rejection:
    """A better candidate that did not fit, and why.

    `term` is the term that broke the budget: the one that grew most against
    the chosen plan (when a plan was chosen), else the largest.
    """

    candidate: str        # e.g. "full", "lora", "loram 40% nf4"
    total: int            # its smallest predicted peak, bytes (term "host": its pinned host bytes)
    over: int             # bytes above the usable budget
    term: str             # the term that broke the budget; "host" when it fit the device but
                          # only by offloading more than the host's RAM can pin
    term_bytes: int       # that term in the candidate
    chosen_bytes: int | None = None   # the same term in the chosen plan

    def describe(self) -> str:
        if self.term == "host":
            return (f"{self.candidate}: fits the device only by offloading activations, which needs "
                    f"{format_size(self.total)} of pinned host RAM, {format_size(self.over)} over")
        versus = "" if self.chosen_bytes is None else f" vs {format_size(self.chosen_bytes)} in the chosen plan"
        return (f"{self.candidate}: needs {format_size(self.total)}, {format_size(self.over)} over; "
                f"{self.term} {format_size(self.term_bytes)}{versus}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Plan:
    """What the run will do. Serialises to YAML through `to_dict()`."""

    method: str                      # full | lora (| galore | qlora | l4q | loram as they land)
    base_format: str                 # weight format of the frozen base: fp32 | bf16 | nf4
    lora_rank: int | None
    lora_alpha: float | None
    lora_targets: tuple[str, ...]
    lora_dropout: float
    lora_rslora: bool
    optimizer: str                   # adamw | adamw8bit | galore-adamw8bit
    optimizer_state_bits: int        # 32 | 16 (bf16 moments of bf16 parameters) | 8
    grad_checkpointing: bool
    micro_batch: int
    grad_accum: int
    seq_len: int
    device: str                      # cpu | cuda
    compute_dtype: str               # float32 | bfloat16
    vram: int | None = None          # the budget, bytes
    reasons: tuple[str, ...] = ()    # why the choices were made
    # ---- added by the planner; defaults keep older plan.yaml files readable
    model: str = ""                  # the spec the plan was made for
    double_quant: bool = True        # NF4 base: 8-bit absmaxes (QLoRA double quantization)
    quant_bits: int | None = None    # L4Q: bits of the exported weights
    quant_group: int | None = None   # L4Q: weights per step size
    prune_ratio: float = 0.0         # LoRAM: share of heads / MLP channels pruned in middle blocks
    prune_keep_first: int = 1        # LoRAM: blocks kept whole at the start
    prune_keep_last: int = 1         # LoRAM: ... and at the end
    prune_layer_ratios: tuple[float, ...] = ()   # LoRAM: the first blocks' own ratios (loram.layer_ratios)
    galore_rank: int | None = None   # GaLore: projection rank
    galore_per_layer: bool = False   # GaLore: update each weight in backward, free its gradient
    galore_embeddings: bool = False  # GaLore: project embeddings and head too (else 8-bit AdamW)
    offload_activations: bool = False  # saved activations to pinned CPU memory
    loss_chunk: int = 0              # tokens per loss chunk; 0 = whole logits at once
    masked_attention: bool = False   # batches carry a mask into attention: packed sequences attend
                                     # within their examples (memory.mask_saved_bytes); padded ones need none
    safety_margin: float = 0.0       # share of vram (and host_ram) kept free
    host_ram: int | None = None      # host RAM the offloaded activations may pin, bytes
    context_bytes: int | None = None # CUDA context as measured by a run on this machine's GPU
                                     # (lowmem.kernels.device); None: memory.CUDA_CONTEXT_BYTES
    breakdown: MemoryBreakdown | None = None   # predicted peak (lowmem.memory)
    rejected: tuple[Rejection, ...] = ()       # better candidates that did not fit

    @property
    def nf4_targets(self) -> tuple[str, ...]:
        """The linears a 4-bit (NF4) base holds quantized: every block projection, adapted or
        not, as QLoRA quantizes them (and as lowmem.memory.weight_bytes counts them), plus any
        other LoRA target (lm_head); () for other bases."""
        if self.base_format != "nf4":
            return ()
        return LINEARS + tuple(t for t in self.lora_targets if t not in LINEARS)

    @property
    def tokens_per_step(self) -> int:
        return self.micro_batch * self.grad_accum * self.seq_len

    @property
    def usable(self) -> int | None:
        """The part of the budget a plan may fill: vram · (1 − safety_margin)."""
        return None if self.vram is None else int(self.vram * (1 - self.safety_margin))

    @property
    def host_usable(self) -> int | None:
        """The part of host_ram pinned activations may fill: host_ram · (1 − safety_margin)."""
        return None if self.host_ram is None else int(self.host_ram * (1 - self.safety_margin))

    @property
    def label(self) -> str:
        """Short name: "lora", "qlora", "loram 40% nf4", "full (8-bit AdamW)"."""
        if self.method == "loram":
            per_block = " (per block)" if any(self.prune_layer_ratios) else ""
            return f"loram {self.prune_ratio:.0%}{per_block} {self.base_format}"
        if self.method == "full" and self.optimizer_state_bits == 8:
            return "full (8-bit AdamW)"
        return self.method

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "breakdown":
                v = None if v is None else v.to_dict()
            elif f.name == "rejected":
                v = [r.to_dict() for r in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        out["tokens_per_step"] = self.tokens_per_step
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Plan":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
        if isinstance(kwargs.get("breakdown"), dict):
            kwargs["breakdown"] = MemoryBreakdown.from_dict(kwargs["breakdown"])
        if "rejected" in kwargs:
            kwargs["rejected"] = tuple(r if isinstance(r, Rejection) else Rejection(**r)
                                       for r in kwargs["rejected"])
        return cls(**kwargs)


def resolve_device(requested: str) -> str:
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda was asked for but torch sees no CUDA device "
                          "(is the CPU build of torch installed?)")
    return requested


def _adamw_state_bits(method: str, dense: str) -> int:
    """torch.optim.AdamW keeps its moments in the parameters' dtype: the adapters are fp32,
    a full run's weights are bf16 on CUDA."""
    return 16 if method == "full" and dense == "bf16" else 32


def plan_from_config(config: RunConfig) -> Plan:
    """The plan that does exactly what the config pins."""
    device = resolve_device(config.device)
    lora = config.method in ("lora", "qlora", "l4q", "loram")
    l4q = config.method == "l4q"
    loram = config.method == "loram"
    dense = "bf16" if device == "cuda" else "fp32"
    nf4 = config.method == "qlora" or (loram and config.loram.quantize)
    galore = config.method == "galore"
    galore_rank = None
    if galore:
        from lowmem.spec import spec_for   # shapes only: the default rank is hidden/4
        galore_rank = int(config.galore.rank) or max(1, spec_for(config.model).hidden // 4)
    return Plan(
        method=config.method,
        base_format="nf4" if nf4 else dense,
        lora_rank=config.lora.rank if lora else None,
        lora_alpha=config.lora.alpha if lora else None,
        lora_targets=config.lora.targets if lora else (),
        lora_dropout=config.lora.dropout if lora else 0.0,
        lora_rslora=config.lora.rslora if lora else False,
        optimizer="galore-adamw8bit" if galore else "adamw",
        optimizer_state_bits=8 if galore else _adamw_state_bits(config.method, dense),
        grad_checkpointing=config.grad_checkpointing,
        micro_batch=config.micro_batch,
        grad_accum=config.grad_accum,
        seq_len=config.seq_len,
        device=device,
        compute_dtype="bfloat16" if device == "cuda" else "float32",
        vram=config.vram,
        reasons=("no budget to plan for: the config as it stands (defaults and what you set)",),
        quant_bits=config.l4q.bits if l4q else None,
        quant_group=config.l4q.group if l4q else None,
        prune_ratio=config.loram.ratio if loram else 0.0,
        prune_keep_first=config.loram.keep_first,
        prune_keep_last=config.loram.keep_last,
        prune_layer_ratios=tuple(config.loram.layer_ratios) if loram else (),
        galore_rank=galore_rank,
        galore_per_layer=config.galore.per_layer if galore else False,
        galore_embeddings=config.galore.embeddings if galore else False,
        offload_activations=config.offload,
        loss_chunk=config.loss_chunk,
        masked_attention=config.packing,
    )


# ---------------------------------------------------------------- reading the config

def _config_value(config: Any, dotted: str, default: Any = None) -> Any:
    """A config value by dotted key, or `default` when this build has no such key."""
    obj = config
    for part in dotted.split("."):
        if not hasattr(obj, part):
            return default
        obj = getattr(obj, part)
    return default if obj is None else obj


def available_methods() -> tuple[str, ...]:
    """Methods this build can train (lowmem.config.METHODS, read now, not at import)."""
    import lowmem.config

    return tuple(lowmem.config.METHODS)


def available_features() -> tuple[str, ...]:
    """Optional techniques this build has (lowmem.config.FEATURES; none until they land)."""
    import lowmem.config

    return tuple(getattr(lowmem.config, "FEATURES", ()))


def safety_margin(config: Any) -> float:
    return float(_config_value(config, "safety_margin", DEFAULT_SAFETY_MARGIN))


def host_ram(config: Any) -> int:
    """Host RAM the plan's pinned activations may fill: `host_ram`, else what is available now."""
    given = _config_value(config, "host_ram", None)
    return int(given) if given else available_ram()


_AVAILABLE: list[tuple[float, int]] = []      # (when, bytes): the last reading
_clock = time.monotonic


def available_ram() -> int:
    """RAM available on this machine now (psutil: free plus reclaimable caches). Read at most
    once a minute, so one plan and what it prints cite one figure."""
    import psutil

    now = _clock()
    if not _AVAILABLE or now - _AVAILABLE[0][0] > 60:
        _AVAILABLE[:] = [(now, psutil.virtual_memory().available)]
    return _AVAILABLE[0][1]


def target_tokens(config: Any) -> int:
    """Tokens per optimizer step to aim for: `target_tokens_per_step`, else the config's own."""
    return int(_config_value(config, "target_tokens_per_step", 0)
               or config.micro_batch * config.grad_accum * config.seq_len)


# ---------------------------------------------------------------- candidates

@dataclass(frozen=True)
class _Level:
    """One rung of the quality ladder: a method with its quality-deciding settings."""

    method: str
    base: str                      # "dense" | "nf4"
    prune_ratio: float = 0.0
    state_bits: int = 32


def _levels(config: Any, pinned: set[str]) -> list[_Level]:
    methods = available_methods()
    features = available_features()
    if "method" in pinned:
        wanted = [config.method]
    else:
        wanted = [m for m in QUALITY_ORDER if m in methods]
    levels: list[_Level] = []
    for m in wanted:
        if m == "full":
            levels.append(_Level("full", "dense"))
            if FEATURE_ADAMW8BIT in features:
                levels.append(_Level("full", "dense", state_bits=8))
        elif m == "galore":
            levels.append(_Level("galore", "dense", state_bits=8))
        elif m in ("lora", "l4q"):
            levels.append(_Level(m, "dense"))
        elif m == "qlora":
            levels.append(_Level("qlora", "nf4"))
        elif m == "loram":
            fixed = _config_value(config, "loram.ratio", None)
            ratios = [fixed] if fixed is not None and "loram.ratio" in pinned else PRUNE_RATIOS
            if "loram.quantize" in pinned:
                bases = ["nf4" if _config_value(config, "loram.quantize", False) else "dense"]
            else:
                bases = ["dense"] + (["nf4"] if "qlora" in methods else [])
            levels += [_Level("loram", b, r) for r in ratios for b in bases]
    return levels


def _variants(config: Any, pinned: set[str]) -> list[dict[str, Any]]:
    """Speed-side settings, fastest first."""
    features = available_features()
    seq = config.seq_len
    # The sequences per optimizer step that come nearest the target. With the accumulation free,
    # a micro-batch divides them (every variant trains on exactly that many tokens), or is a power
    # of two that overshoots them by at most an eighth: 127 sequences run as 64 x 2, not 1 x 127.
    sequences = max(1, round(target_tokens(config) / seq))
    if "micro_batch" in pinned:
        batches = [config.micro_batch]
    elif "grad_accum" in pinned:
        # A pinned accumulation is part of every step: the micro-batch makes up the rest.
        top = max(1, target_tokens(config) // (seq * config.grad_accum))
        batches = sorted({top} | {2**k for k in range(top.bit_length()) if 2**k <= top}, reverse=True)
    else:
        powers = {2**k for k in range(sequences.bit_length())
                  if 8 * (-(-sequences // 2**k) * 2**k - sequences) <= sequences}
        batches = sorted({mb for mb in range(1, sequences + 1) if sequences % mb == 0} | powers, reverse=True)
    ckpts = [config.grad_checkpointing] if "grad_checkpointing" in pinned else [False, True]
    offload_value = bool(_config_value(config, "offload", False))
    if "offload" in pinned:
        offloads = [offload_value]
    else:
        offloads = [False, True] if FEATURE_OFFLOAD in features else [False]
    chunk_value = int(_config_value(config, "loss_chunk", 0))
    if "loss_chunk" in pinned:
        chunks = [chunk_value]
    else:
        chunks = [0, DEFAULT_LOSS_CHUNK] if FEATURE_CHUNKED_LOSS in features else [0]
    out = []
    for ckpt in ckpts:
        for off in offloads:
            for chunk in chunks:
                for mb in batches:
                    if "grad_accum" in pinned:
                        accum = config.grad_accum
                    else:
                        accum = max(1, -(-sequences // mb))
                    out.append(dict(grad_checkpointing=ckpt, offload_activations=off,
                                    loss_chunk=chunk, micro_batch=mb, grad_accum=accum))
    return sorted(out, key=_slowness)


#: Relative cost of each memory saver, for ordering variants: a chunked loss
#: recomputes only the logits; checkpointing recomputes every block's forward
#: (~+30% step time); offloading moves activations over PCIe and can stall on
#: it, so it comes after checkpointing, as torchtune's memory guide advises.
#: Offloading without checkpointing moves every saved tensor, not only the
#: layer inputs (49 GiB against 2 GiB a micro-batch for Llama-3.1-8B at 8,192
#: tokens), so it comes after the two together.
SAVER_COST = {"loss_chunk": 1, "grad_checkpointing": 2, "offload_activations": 4}
OFFLOAD_EVERYTHING_COST = 7


def _slowness(variant: dict[str, Any]) -> tuple[int, int]:
    """Sort key, fastest first: fewer / cheaper memory savers, then larger micro-batches."""
    cost = sum(c for key, c in SAVER_COST.items() if variant[key])
    if variant["offload_activations"] and not variant["grad_checkpointing"]:
        cost += OFFLOAD_EVERYTHING_COST - SAVER_COST["offload_activations"]
    return cost, -variant["micro_batch"]


def _build(config: Any, spec: ModelSpec, device: str, level: _Level, variant: dict[str, Any],
           vram: int | None, margin: float, host: int | None = None) -> Plan:
    dense = "bf16" if device == "cuda" else "fp32"
    adapter = level.method in ("lora", "qlora", "loram", "l4q")
    galore = level.method == "galore"
    if galore:
        optimizer, bits = "galore-adamw8bit", 8
    elif level.state_bits == 8:
        optimizer, bits = "adamw8bit", 8
    else:
        optimizer, bits = "adamw", _adamw_state_bits(level.method, dense)
    return Plan(
        method=level.method,
        base_format="nf4" if level.base == "nf4" else dense,
        lora_rank=config.lora.rank if adapter else None,
        lora_alpha=config.lora.alpha if adapter else None,
        lora_targets=config.lora.targets if adapter else (),
        lora_dropout=config.lora.dropout if adapter else 0.0,
        lora_rslora=config.lora.rslora if adapter else False,
        optimizer=optimizer,
        optimizer_state_bits=bits,
        seq_len=config.seq_len,
        device=device,
        compute_dtype="bfloat16" if device == "cuda" else "float32",
        vram=vram,
        model=spec.name,
        quant_bits=int(_config_value(config, "l4q.bits", 4)) if level.method == "l4q" else None,
        quant_group=int(_config_value(config, "l4q.group", 128)) if level.method == "l4q" else None,
        prune_ratio=level.prune_ratio,
        prune_keep_first=int(_config_value(config, "loram.keep_first", 1)),
        prune_keep_last=int(_config_value(config, "loram.keep_last", 1)),
        prune_layer_ratios=(tuple(_config_value(config, "loram.layer_ratios", ()) or ())
                            if level.method == "loram" else ()),
        galore_rank=int(_config_value(config, "galore.rank", 0) or max(1, spec.hidden // 4)) if galore else None,
        galore_per_layer=bool(_config_value(config, "galore.per_layer", True)) if galore else False,
        galore_embeddings=bool(_config_value(config, "galore.embeddings", False)) if galore else False,
        masked_attention=bool(_config_value(config, "packing", False)),
        safety_margin=margin,
        host_ram=host,
        **variant,
    )


@functools.lru_cache(maxsize=1)
def measured_context() -> int | None:
    """The CUDA context size a run measured on this machine's GPU 0, or None (no GPU, not measured).

    Asks the driver for the device's name only; creates no CUDA context. Read once per process.
    """
    from lowmem.kernels.device import local_context_bytes

    found = local_context_bytes(0)
    return None if found is None else found[0]


def _with_breakdown(plan: Plan, spec: ModelSpec) -> Plan:
    if plan.device == "cuda" and plan.context_bytes is None:
        plan = dataclasses.replace(plan, context_bytes=measured_context())
    return dataclasses.replace(plan, breakdown=predict(spec, plan))


def _breaking_term(b: MemoryBreakdown, chosen: MemoryBreakdown | None) -> str:
    """The term that grew most against the chosen plan's; without one, the largest."""
    if chosen is None:
        return max(MemoryBreakdown.TERMS, key=lambda t: getattr(b, t))
    return max(MemoryBreakdown.TERMS, key=lambda t: getattr(b, t) - getattr(chosen, t))


def quality(plan: Plan) -> tuple:
    """Sort key of a plan's expected quality; smaller is better."""
    order = QUALITY_ORDER + ("l4q",)
    rank = order.index(plan.method) if plan.method in order else len(order)
    return (rank, plan.prune_ratio, plan.base_format == "nf4", plan.optimizer_state_bits == 8)


# ---------------------------------------------------------------- the search

@dataclass(frozen=True)
class _Outcome:
    plan: Plan | None                 # the chosen plan, or None
    rejected: tuple[Rejection, ...]   # better levels that did not fit
    smallest: Plan | None             # the smallest candidate the host can hold (for the error)
    host_blocked: Plan | None = None  # of the candidates that fit the device but not the host, the least pinned
    smallest_any: Plan | None = None  # the smallest candidate, host or not


def _search(config: Any, spec: ModelSpec, pinned: set[str], device: str,
            preset: frozenset[str] = frozenset()) -> _Outcome:
    """The best plan of those that fit, or why none does; `preset`: the pinned keys a preset set
    (the reasons say so)."""
    margin = safety_margin(config)
    usable = int(config.vram * (1 - margin))
    host = host_ram(config)
    host_usable = int(host * (1 - margin))
    variants = _variants(config, pinned)
    failed: list[tuple[str, Plan, bool]] = []   # better levels that did not fit: (label, plan, on the host)
    loram_failed: dict[str, tuple[str, Plan, bool]] = {}
    smallest: Plan | None = None
    smallest_any: Plan | None = None
    host_blocked: Plan | None = None
    chosen: Plan | None = None
    for level in _levels(config, pinned):
        level_smallest: Plan | None = None      # by device total, among plans the host can hold
        level_blocked: Plan | None = None       # fits the device, not the host: the least pinned
        level_any: Plan | None = None           # by device total, host or not
        for variant in variants:
            plan = _with_breakdown(_build(config, spec, device, level, variant, config.vram, margin, host), spec)
            b = plan.breakdown
            if b.total <= usable and b.host <= host_usable:
                chosen = plan
                break
            if b.total <= usable:
                if level_blocked is None or b.host < level_blocked.breakdown.host:
                    level_blocked = plan
            elif b.host <= host_usable and (level_smallest is None or b.total < level_smallest.breakdown.total):
                level_smallest = plan
            if level_any is None or b.total < level_any.breakdown.total:
                level_any = plan
        if chosen is not None:
            break
        assert level_any is not None
        if smallest_any is None or level_any.breakdown.total < smallest_any.breakdown.total:
            smallest_any = level_any
        if level_smallest is not None and (smallest is None or
                                           level_smallest.breakdown.total < smallest.breakdown.total):
            smallest = level_smallest
        if level_blocked is not None and (host_blocked is None or
                                          level_blocked.breakdown.host < host_blocked.breakdown.host):
            host_blocked = level_blocked
        # A level that fit the device only by pinning too much is rejected for the host;
        # one over on both (offloading pinned on) by its smallest device total.
        entry = ((level_blocked.label, level_blocked, True) if level_blocked is not None
                 else (level_smallest.label, level_smallest, False) if level_smallest is not None
                 else (level_any.label, level_any, False))
        # LoRAM has a rung per prune ratio: keep only the last failure of each base
        # format, the rung just better than the one chosen (or, if none fits, the
        # most pruned), or the table would list nineteen of them.
        if level.method == "loram":
            loram_failed[level.base] = entry
        else:
            failed.append(entry)
    failed += loram_failed.values()
    reference = chosen.breakdown if chosen is not None else None
    rejected = []
    for label, plan, on_host in failed:
        if on_host:
            rejected.append(Rejection(label, plan.breakdown.host, plan.breakdown.host - host_usable, "host",
                                      plan.breakdown.host, None if reference is None else reference.host))
            continue
        term = _breaking_term(plan.breakdown, reference)
        rejected.append(Rejection(label, plan.breakdown.total, plan.breakdown.total - usable, term,
                                  getattr(plan.breakdown, term),
                                  None if reference is None else getattr(reference, term)))
    if chosen is not None:
        chosen = dataclasses.replace(chosen, rejected=tuple(rejected),
                                     reasons=_reasons(chosen, spec, config, pinned, preset))
    return _Outcome(chosen, tuple(rejected), smallest, host_blocked, smallest_any)


# Which methods read each section's keys.
SECTION_METHODS = {"lora": ("lora", "qlora", "loram", "l4q"), "l4q": ("l4q",), "loram": ("loram",),
                   "galore": ("galore",)}


def unused_keys(method: str, pinned: Iterable[str]) -> str | None:
    """The reason that says which keys the user set mean nothing to `method`, or None."""
    unused = sorted(k for k in pinned if k.split(".", 1)[0] in SECTION_METHODS
                    and "." in k and method not in SECTION_METHODS[k.split(".", 1)[0]])
    if not unused:
        return None
    readers = sorted({m for k in unused for m in SECTION_METHODS[k.split(".", 1)[0]]})
    from lowmem.config import all_keys

    own = [section for section, methods in SECTION_METHODS.items() if method in methods]
    meant = [f"{section}.{k.split('.', 1)[1]}" for k in unused for section in own
             if f"{section}.{k.split('.', 1)[1]}" in all_keys()]
    return (f"{', '.join(unused)}: set, but a {method} run does not use {'it' if len(unused) == 1 else 'them'} "
            f"(method={' or method='.join(readers)} would)"
            + (f"; did you mean {' and '.join(dict.fromkeys(meant))}?" if meant else ""))


def past_context(spec: ModelSpec, seq_len: int) -> str | None:
    """The warning for sequences longer than the model's context, or None."""
    if not spec.max_position or seq_len <= spec.max_position:
        return None
    return (f"warning: seq_len {seq_len} is past {spec.name}'s context of {spec.max_position} tokens "
            f"(max_position_embeddings): it never learned positions beyond it")


def _notes(plan: Plan, spec: ModelSpec, pinned: Iterable[str]) -> tuple[str, ...]:
    idle = None
    if plan.device == "cpu" and plan.offload_activations and "offload" in set(pinned):
        idle = "offload: set, but on the CPU the activations are in host memory already: it saves nothing"
    warnings = (idle and f"warning: {idle}", past_context(spec, plan.seq_len))
    return tuple(n for n in warnings if n)     # the trainer repeats them where its run is watched


def _reasons(plan: Plan, spec: ModelSpec, config: Any, pinned: set[str],
             preset: frozenset[str] = frozenset()) -> tuple[str, ...]:
    """Why each choice: the method, and what each slower setting saves."""
    b = plan.breakdown
    which = ("the method the preset pinned, and it" if "method" in preset else
             "the method you pinned, and it" if "method" in pinned else "the best method of this build that")
    reasons = [f"{plan.label}: {which} fits "
               f"{format_size(plan.vram)} ({format_size(plan.usable)} usable after the "
               f"{plan.safety_margin:.0%} safety margin); predicted peak {format_size(b.total)}"]
    if plan.method == "loram":
        pruned = spec.pruned(plan.prune_ratio, plan.prune_keep_first, plan.prune_keep_last,
                             plan.prune_layer_ratios)
        if "loram.ratio" in pinned:
            why = f"the base is pruned by {plan.prune_ratio:.0%} (loram.ratio, pinned)"
        elif "method" in pinned:
            why = f"the base is pruned by {plan.prune_ratio:.0%}, the least pruning that fits"
        else:
            why = (f"nothing unpruned fits, so the base is pruned by {plan.prune_ratio:.0%} "
                   f"(the least pruning that fits)")
        reasons.append(f"{why}: {spec.params:,} -> {pruned.params:,} parameters")
    faster = (("grad_checkpointing", "grad_checkpointing", False, "activation checkpointing"),
              ("offload", "offload_activations", False, "activation offloading"),
              ("loss_chunk", "loss_chunk", 0, "chunked loss"))
    for key, attr, off, text in faster:
        value = getattr(plan, attr)
        if key in pinned:
            reasons.append(f"{text} {_show(value)}: pinned{' by the preset' if key in preset else ''}")
        elif value:
            without = predict(spec, dataclasses.replace(plan, **{attr: off})).total
            reason = f"{text} on: without it the peak would be {format_size(without)}"
            if key == "grad_checkpointing" and plan.offload_activations and plan.usable is not None \
                    and without <= plan.usable:
                # It fits without; chosen for speed: offloading alone moves every saved tensor to the
                # host and back, with checkpointing only each block's input.
                reason += (", which fits; with offloading on, recomputing the blocks is ranked faster than "
                           "moving every saved tensor to the host and back (only each block's input crosses)")
            reasons.append(reason)
        if key == "offload" and value and b.host and plan.host_usable is not None:
            reasons[-1] += f"; it pins {format_size(b.host)} of host RAM, of {_host_budget(plan, config)}"
    if "micro_batch" in pinned:
        reasons.append(f"micro_batch {plan.micro_batch}: pinned{' by the preset' if 'micro_batch' in preset else ''}")
    else:
        reasons.append(f"micro_batch {plan.micro_batch} x grad_accum {plan.grad_accum} x seq_len "
                       f"{plan.seq_len} = {plan.tokens_per_step} tokens per optimizer step "
                       f"(target {target_tokens(config)})")
    if plan.galore_per_layer and plan.grad_accum > 1:
        alone = gradient_bytes(spec, dataclasses.replace(plan, grad_accum=1))
        reasons.append(f"grad_accum {plan.grad_accum}: between micro-batches GaLore keeps each weight's projected "
                       f"gradient (rank {plan.galore_rank}, fp32) and the other parameters' gradients, "
                       f"{format_size(b.grads)} of gradients, where grad_accum 1 holds one weight's at a time, "
                       f"at most {format_size(alone)}")
    return tuple(reasons) + _notes(plan, spec, pinned)


def make_plan(config: RunConfig, spec: ModelSpec, pinned: Iterable[str] | None = None,
              device: str | None = None, typed: Iterable[str] | None = None) -> Plan:
    """The plan for `config` on a model of shapes `spec`.

    Without a budget (`config.vram` is None) it is the config's own plan with
    its predicted memory. With one, the best-quality, then fastest plan whose
    predicted peak fits `vram · (1 − safety_margin)`; `pinned` holds the dotted
    config keys the user set, which the search never changes. `device` is
    where the plan will run (default: `config.device` resolved on this machine).
    `typed` (default `pinned`): the keys the user typed, not a preset's, of which those the
    plan's method does not read are warned of.
    """
    pinned = set(pinned or ())
    plan = _make_plan(config, spec, pinned, device, frozenset(pinned - set(typed)) if typed is not None else frozenset())
    unused = unused_keys(plan.method, pinned if typed is None else typed)
    return plan if unused is None else dataclasses.replace(plan, reasons=(*plan.reasons, f"warning: {unused}"))


def _make_plan(config: RunConfig, spec: ModelSpec, pinned: set[str], device: str | None,
               preset: frozenset[str]) -> Plan:
    if config.method == "l4q" and config.lora.dropout > 0:
        raise ConfigError(f"lora.dropout={config.lora.dropout} with method l4q: L4Q quantizes W0 + s·BA as one "
                          f"weight, so adapter dropout has nothing to act on; set lora.dropout=0")
    rank = config.galore.rank
    if rank and rank >= spec.hidden and (config.method == "galore" or "method" not in pinned):
        raise ConfigError(f"galore.rank={rank} is not below {spec.name}'s hidden size {spec.hidden}: the "
                          f"projection would keep every direction and save no memory; give less "
                          f"(0 = hidden/4 = {max(1, spec.hidden // 4)})")
    ratios = config.loram.layer_ratios
    if ratios and len(ratios) > spec.layers:
        raise ConfigError(f"loram.layer_ratios has {len(ratios)} values but {spec.name} has {spec.layers} "
                          f"blocks: give at most one ratio per block, in block order")
    if config.method == "loram" and config.loram.ratio == 0 and not any(ratios):
        raise ConfigError("loram.ratio=0 prunes nothing, so LoRAM would train LoRA on the whole model: "
                          "method=lora does that without the scoring and the recovery; or give a ratio "
                          "(default 0.5)")
    keep = config.loram.keep_first + config.loram.keep_last
    if config.method == "loram" and not ratios and keep >= spec.layers:
        raise ConfigError(f"loram.keep_first={config.loram.keep_first} and loram.keep_last="
                          f"{config.loram.keep_last} keep all {spec.layers} blocks of {spec.name} whole, so "
                          f"LoRAM would prune nothing; keep fewer (default 1 and 1), or give loram.layer_ratios")
    if config.vram is None:
        # With an explicit device, don't ask torch: planning for a GPU works without one.
        plan = plan_from_config(config if device is None else config.replace(device="cpu"))
        if device is not None and device != plan.device:
            dense = "bf16" if device == "cuda" else "fp32"
            plan = dataclasses.replace(plan, device=device,   # an NF4 base stays NF4 on any device
                                       base_format="nf4" if plan.base_format == "nf4" else dense,
                                       compute_dtype="bfloat16" if device == "cuda" else "float32",
                                       optimizer_state_bits=(plan.optimizer_state_bits if plan.optimizer_state_bits == 8
                                                             else _adamw_state_bits(plan.method, dense)))
        return _with_breakdown(dataclasses.replace(plan, model=spec.name,
                                                   reasons=plan.reasons + _notes(plan, spec, pinned)), spec)
    device = device or resolve_device(config.device)
    if "method" in pinned and config.method not in available_methods():
        raise BudgetError(f"method '{config.method}' is not in this build "
                          f"(available: {', '.join(available_methods())})")
    outcome = _search(config, spec, pinned, device, preset)
    if outcome.plan is not None:
        return outcome.plan
    raise BudgetError(_failure_message(config, spec, pinned, device, outcome))


# ---------------------------------------------------------------- when nothing fits

def _fits(config: Any, spec: ModelSpec, pinned: set[str], device: str) -> Plan | None:
    return _search(config, spec, pinned, device).plan


def _largest_fitting_seq_len(config: RunConfig, spec: ModelSpec, pinned: set[str], device: str) -> Plan | None:
    lo, hi, best = 8, config.seq_len - 1, None
    while lo <= hi:
        mid = (lo + hi) // 2
        plan = _fits(config.replace(seq_len=mid), spec, pinned | {"seq_len"}, device)
        if plan is not None:
            best, lo = plan, mid + 1
        else:
            hi = mid - 1
    return best


def _failure_message(config: RunConfig, spec: ModelSpec, pinned: set[str], device: str,
                     outcome: _Outcome) -> str:
    margin = safety_margin(config)
    usable = int(config.vram * (1 - margin))
    blocked = outcome.host_blocked
    # The smallest plan the host can hold; when there is none (offloading pinned on), the smallest.
    small = outcome.smallest or outcome.smallest_any
    assert small is not None and small.breakdown is not None
    host_only = small.breakdown.total <= usable   # every plan that fits the device pins too much
    both = outcome.smallest is None and not host_only   # every plan is over on the device and the host
    if host_only:
        assert blocked is not None and blocked.breakdown is not None
        head = (f"nothing fits {format_size(config.vram)} ({format_size(usable)} usable after the "
                f"{margin:.0%} safety margin) for {spec.name} at seq_len {config.seq_len} within the "
                f"host's RAM: {_host_note(blocked, config)}")
    else:
        gap = small.breakdown.total - usable
        size, term = max((getattr(small.breakdown, t), t) for t in MemoryBreakdown.TERMS)
        head = (f"nothing fits {format_size(config.vram)} ({format_size(usable)} usable after the "
                f"{margin:.0%} safety margin) for {spec.name} at seq_len {config.seq_len}: the smallest "
                f"plan ({small.label}, {_knobs(small)}) needs {format_size(small.breakdown.total)}, "
                f"{format_size(gap)} over; its largest term is {term} ({format_size(size)})")
        if both:
            head += (f", and it pins {format_size(small.breakdown.host)} of host RAM for offloaded activations, "
                     f"over the {_host_budget(small, config)}")
        if blocked is not None:
            head += f". Closer: {_host_note(blocked, config)}"

    fixes: list[str] = []
    shorter = _largest_fitting_seq_len(config, spec, pinned, device)
    if shorter is not None:
        fixes.append(f"seq_len={shorter.seq_len} ({shorter.label}, {format_size(shorter.breakdown.total)})")
    if "micro_batch" not in pinned:
        # Fewer sequences per step, as a shorter seq_len is fewer tokens: where accumulating costs
        # memory of its own (GaLore keeps projected gradients), the search's way of keeping the
        # tokens per step, a smaller micro-batch accumulated, is not smaller.
        mb = small.micro_batch // 2
        while mb >= 1:
            fewer = config.replace(micro_batch=mb, grad_accum=small.grad_accum)
            plan = _fits(fewer, spec, pinned | {"micro_batch", "grad_accum"}, device)
            if plan is not None:
                fixes.append(f"micro_batch={mb} grad_accum={plan.grad_accum} ({plan.label}, "
                             f"{format_size(plan.breakdown.total)}; {plan.tokens_per_step} tokens per step, "
                             f"not {small.tokens_per_step})")
                break
            mb //= 2
    if small.lora_rank and small.lora_rank > 1:
        rank = small.lora_rank // 2
        while rank >= 1:
            cfg = config.replace(lora=dataclasses.replace(config.lora, rank=rank))
            plan = _fits(cfg, spec, pinned | {"lora.rank"}, device)
            if plan is not None:
                fixes.append(f"lora.rank={rank} ({plan.label}, {format_size(plan.breakdown.total)})")
                break
            rank //= 2
    for key in sorted(pinned & {"method", "micro_batch", "grad_checkpointing", "offload",
                                "loss_chunk", "grad_accum", "loram.ratio"}):
        plan = _fits(config, spec, pinned - {key}, device)
        if plan is not None:
            value = getattr(plan, {"offload": "offload_activations", "loram.ratio": "prune_ratio"}.get(key, key))
            fixes.append(f"unpin {key} ({plan.label} with {key}={_show(value)} fits, "
                         f"{format_size(plan.breakdown.total)})")
    if both:
        fixes.append(f"--vram {_gib_up(small.breakdown.total / (1 - margin))}G or more on a host with "
                     f"{_gib_up(small.breakdown.host / (1 - margin))}G of RAM free (host_ram= plans for one)")
    elif not host_only:
        fixes.append(f"--vram {_gib_up(small.breakdown.total / (1 - margin))}G or more")
        smaller = outcome.smallest_any
        if smaller is not None and smaller.breakdown.total < small.breakdown.total:
            # Offloading would need less of the device, but more host RAM than the plan may pin.
            fixes.append(f"--vram {_gib_up(smaller.breakdown.total / (1 - margin))}G or more on a host with "
                         f"{_gib_up(smaller.breakdown.host / (1 - margin))}G of RAM free for offloaded "
                         f"activations ({smaller.label}, {_knobs(smaller)}; host_ram= plans for one)")
    if blocked is not None:
        fixes.append(f"a host with {_gib_up(blocked.breakdown.host / (1 - margin))}G of RAM free "
                     f"(host_ram= plans for one)")
    message = head + ". Changes that fit: " + "; ".join(fixes)
    beyond = past_context(spec, config.seq_len)
    if beyond:
        message += ". And " + beyond.removeprefix("warning: ")
    missing = [m for m in ("qlora", "loram") if m not in available_methods()]
    if missing and "method" not in pinned:
        message += f". Not in this build yet, and smaller: {', '.join(missing)}"
    return message


def _knobs(plan: Plan) -> str:
    knobs = [f"checkpointing {'on' if plan.grad_checkpointing else 'off'}", f"micro_batch {plan.micro_batch}"]
    if plan.offload_activations:
        knobs.append("offload on")
    if plan.loss_chunk:
        knobs.append(f"loss_chunk {plan.loss_chunk}")
    return ", ".join(knobs)


def _host_note(plan: Plan, config: Any) -> str:
    """Why a plan that fits the device was refused: what it pins against what the host has."""
    b = plan.breakdown
    assert b is not None and plan.host_usable is not None
    return (f"{plan.label} ({_knobs(plan)}) needs {format_size(b.total)} of device memory but pins "
            f"{format_size(b.host)} of host RAM for offloaded activations, "
            f"{format_size(b.host - plan.host_usable)} over the {_host_budget(plan, config)}")


def _host_budget(plan: Plan, config: Any) -> str:
    """'30.40GiB usable (32.00GiB set by host_ram, less the safety margin)'."""
    assert plan.host_ram is not None and plan.host_usable is not None
    source = "set by host_ram" if _config_value(config, "host_ram", None) else "available on this machine now"
    return (f"{format_size(plan.host_usable)} usable ({format_size(plan.host_ram)} {source}, "
            f"less the safety margin)")


def _gib_up(n: float) -> str:
    """n bytes in GiB, rounded up to a tenth."""
    return f"{math.ceil(n / 2**30 * 10) / 10:g}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
