"""Measure a plan: run its training steps on random weights of the model's shapes.

The memory model (lowmem.memory) predicts a step's peak from shapes alone, and
the values of the weights do not change what a step allocates. So a plan can be
checked without the model's weights: build a model of the same shapes with
random values, directly in its final format on the device, run a few of the
trainer's own steps (`lowmem.trainer.train_step`) and read the peak.

What "peak" is:

* on CUDA, `torch.cuda.max_memory_allocated()` (what `MemoryBreakdown.allocated`
  predicts) and `max_memory_reserved()` (plus the CUDA context, what the
  allocator really took from the card), optionally under
  `torch.cuda.set_per_process_memory_fraction` so a plan for a smaller card is
  held to that card's size;
* on the CPU, the largest sum of live tensor storages during the steps, counted
  by `LiveTensorBytes` (a dispatch mode that sees every tensor an op creates and
  when its storage dies): the same quantity, without an allocator's rounding.

Only the layers the plan trains are real; the data are one fixed random batch
of full length (no padding), which is the worst case the planner plans for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lowmem.config import RunConfig
from lowmem.memory import MemoryBreakdown, predict
from lowmem.planner import Plan
from lowmem.spec import ModelSpec

INIT_STD = 0.02   # the Llama initializer's; any finite values would do


class FixedBatch:
    """A BatchStream stand-in: one random full-length batch, every time; `packed`, each row
    holds two examples, as lowmem.data.collate gives packed ones (and the model masks them)."""

    def __init__(self, vocab: int, micro_batch: int, seq_len: int, seed: int = 0, packed: bool = False):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=g)
        self.batch = {"input_ids": ids, "labels": ids.clone(), "attention_mask": torch.ones_like(ids)}
        if packed and seq_len > 1:
            half = seq_len // 2
            self.batch["position_ids"] = torch.cat([torch.arange(half), torch.arange(seq_len - half)]).repeat(
                micro_batch, 1)
            self.batch["labels"][:, half] = -100

    def next(self) -> dict[str, torch.Tensor]:
        return self.batch


def with_layers(spec: ModelSpec, layers: int | None) -> ModelSpec:
    """`spec` cut to its first `layers` blocks (None or 0: all). Per-block costs do not
    depend on the count; a shorter model just makes the embeddings, head and loss a
    larger share of the peak."""
    if not layers or layers == spec.layers:
        return spec
    if spec.blocks:
        raise ValueError("cut the layers of the unpruned spec, then prune")
    if not 0 < layers <= spec.layers:
        raise ValueError(f"layers must be in 1..{spec.layers}, got {layers}")
    return dataclasses.replace(spec, name=f"{spec.name} (first {layers} of {spec.layers} blocks)", layers=layers)


def _prune_first_units(model: nn.Module, spec: ModelSpec, plan: Plan) -> None:
    """Cut `model` (on the meta device) to the plan's LoRAM shapes, keeping the first units of
    each pruned block: which units are kept changes no shape, so a random model needs no
    scores, only descending ones for lowmem.prune's own choice to follow."""
    from lowmem.prune import apply_index_map, layer_ratio_list, select

    ratios = layer_ratio_list(spec.layers, plan.prune_ratio, plan.prune_keep_first, plan.prune_keep_last,
                              dict(enumerate(plan.prune_layer_ratios)))
    first = {"group": -torch.arange(spec.kv_heads, dtype=torch.float32),
             "head": -torch.arange(spec.heads, dtype=torch.float32),
             "channel": -torch.arange(spec.intermediate, dtype=torch.float32)}
    apply_index_map(model, select(model, [first] * spec.layers, ratios, "none (random weights)"))


@torch.no_grad()
def _fill(module: nn.Module) -> None:
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, INIT_STD)
        elif name.endswith("bias"):
            p.zero_()
        else:
            p.fill_(1.0)   # norm weights


def random_model(spec: ModelSpec, plan: Plan, device: str | torch.device) -> nn.Module:
    """A causal LM of `spec`'s shapes with random weights, in the plan's base format on
    `device`, ready for `prepare_for_training`.

    It is built on the meta device, cut to the plan's LoRAM shapes there, then made
    real one block at a time, each block's targeted linears going to NF4 before the
    next block exists: a 4-bit base is never dense on the device as a whole.
    """
    from transformers import AutoModelForCausalLM

    from lowmem.model import dense_weight_dtype
    from lowmem.quant.nf4 import quantize_linears

    dtype = dense_weight_dtype(plan)
    config = spec.to_hf_config(attn_implementation="sdpa", use_cache=False)

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.set_default_dtype(default)
    if plan.method == "loram":
        _prune_first_units(model, spec, plan)
    decoder = model.get_decoder()
    targets = tuple(t for t in plan.nf4_targets if t != "lm_head")   # () unless the base is NF4
    for piece in (decoder.embed_tokens, *decoder.layers, decoder.norm):
        piece.to_empty(device=device)
        _fill(piece)
        if targets and piece in decoder.layers:
            quantize_linears(piece, targets, dtype, double_quant=plan.double_quant)
    decoder.rotary_emb = type(decoder.rotary_emb)(config=config).to(device)   # fp32 inv_freq, as loaded models have
    head = model.get_output_embeddings()
    if spec.tied_embeddings:
        head.weight = decoder.embed_tokens.weight
    else:
        head.to_empty(device=device)
        _fill(head)
        if "lm_head" in plan.nf4_targets:
            quantize_linears(model, ("lm_head",), dtype, double_quant=plan.double_quant)
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (NF4 codes and statistics included),
    each storage once (tied weights share one)."""
    storages = {}
    for t in (*model.parameters(), *model.buffers()):
        storage = t.untyped_storage()
        storages[storage._cdata] = storage.nbytes()
    return sum(storages.values())


@dataclass(frozen=True)
class Measurement:
    """A plan's prediction and what its steps really allocated (bytes)."""

    predicted: MemoryBreakdown
    allocated: int            # peak bytes of live tensors during the steps (the weights included)
    reserved: int | None      # CUDA: the caching allocator's peak reservation
    context: int | None       # CUDA: memory outside the allocator (context, cuBLAS/NVRTC modules)
    cap: int | None           # CUDA: the allocator's cap, if one was set
    losses: tuple[float, ...]
    seconds_per_step: float   # after the first step (kernel compilation, cuBLAS set-up) when there are more
    device: str
    peak_op: str | None = None   # CPU: the op whose outputs reached the peak
    pinned: int | None = None    # CUDA: peak pinned host bytes in use (offloaded activations)

    @property
    def error(self) -> float:
        """(predicted − measured) / measured for the allocated peak: positive is an over-estimate."""
        return (self.predicted.allocated - self.allocated) / self.allocated

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["predicted"] = self.predicted.to_dict()
        out["predicted_allocated"] = self.predicted.allocated
        out["error"] = self.error
        return out


class LiveTensorBytes(TorchDispatchMode):
    """The peak of the bytes held by live tensor storages on one device type, while active.

    At entry every storage Python can reach is counted (`base`: the model, its
    quantization state, and whatever else the process holds); afterwards every
    storage an op returns is counted until its last tensor dies (a weak
    reference's callback). Views share their base's storage and count once.
    `growth` (the peak above `base`) plus the model's own bytes is what an
    allocator's "allocated" peak is, less its rounding of each block (512 bytes
    on CUDA), and independent of other tensors the process holds.
    """

    def __init__(self, device_type: str = "cpu"):
        super().__init__()
        self.device_type = device_type
        self.live: dict[int, tuple[int, weakref.ref]] = {}
        self.now = 0
        self.peak = 0
        self.base = 0
        self.peak_op = ""          # the op whose outputs reached the peak
        self._op = "(before the steps)"

    def _add(self, t: torch.Tensor) -> None:
        if t.device.type != self.device_type or t.is_meta:
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = (size, weakref.ref(storage, lambda _, key=key: self._drop(key)))
        self.now += size
        if self.now > self.peak:
            self.peak, self.peak_op = self.now, self._op

    def _drop(self, key: int) -> None:
        size, _ = self.live.pop(key, (0, None))
        self.now -= size

    @property
    def growth(self) -> int:
        """The peak above what was live at entry."""
        return self.peak - self.base

    def __enter__(self):
        gc.collect()
        with warnings.catch_warnings():   # isinstance() on deprecated module attributes warns
            warnings.simplefilter("ignore")
            tensors = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
        for t in tensors:
            self._add(t)
        self.base = self.now
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._op = str(func)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._add(t)
        return out


def allocator_cap(vram: int, device: str | torch.device = "cuda") -> int:
    """Bytes the caching allocator may reserve so that it and the CUDA context fit in `vram`:
    vram − the context (total − free − reserved, once cuBLAS is loaded as a step loads it:
    kernels.device.load_cublas). ValueError, worded for a `--vram` flag,
    when `vram` is more than the GPU offers or not more than its context."""
    from lowmem.config import format_size
    from lowmem.kernels.device import load_cublas

    device = torch.device(device)
    load_cublas(device.index if device.index is not None else torch.cuda.current_device())
    free, total = torch.cuda.mem_get_info(device)
    context = total - free - torch.cuda.memory_reserved(device)
    if vram > total - context:
        raise ValueError(f"--vram {format_size(vram)} is more than this GPU offers ({format_size(total - context)} "
                         f"beside its CUDA context); measure with --vram {format_size(total - context)} or less")
    if vram <= context:
        raise ValueError(f"--vram {format_size(vram)} is not more than this GPU's CUDA context "
                         f"({format_size(context)}): nothing would fit")
    return vram - context


def measure(spec: ModelSpec, plan: Plan, config: RunConfig, steps: int = 3, cap: int | None = None) -> Measurement:
    """Build `plan`'s model of `spec`'s shapes on `plan.device`, run `steps` optimizer steps,
    and compare the peak with `predict(spec, plan)`.

    `cap` (CUDA only): bytes the caching allocator may reserve, for holding a plan to a
    smaller card than the one it runs on; the run fails with an out-of-memory error if
    the plan does not fit it.
    """
    from lowmem.model import prepare_for_training, trainable_parameters
    from lowmem.offload import OffloadActivations
    from lowmem.optim import build_optimizer
    from lowmem.trainer import lr_at, train_step

    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    device = torch.device(plan.device)
    cuda = device.type == "cuda"
    predicted = predict(spec, plan)
    torch.manual_seed(config.seed)
    start = 0
    if cuda:
        # cuBLAS's workspaces come from the allocator and the prediction counts them: drop any
        # an earlier call left (allocator_cap's warm-up, a previous measure) so that this
        # window allocates them, whatever ran before.
        clear_workspaces = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
        if clear_workspaces is not None:
            torch.cuda.synchronize(device)
            clear_workspaces()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated(device)    # 0 in a fresh process; subtracted either way
        if cap is not None:
            if cap <= 0:
                raise ValueError(f"the allocator cap must be positive, got {cap} bytes")
            index = device.index if device.index is not None else torch.cuda.current_device()
            total = torch.cuda.get_device_properties(index).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)   # needs an index
    model = random_model(spec, plan, device)
    prepare_for_training(model, plan)
    model.train()
    optimizer = build_optimizer(trainable_parameters(model), plan, config)
    offload = OffloadActivations(device=plan.device) if plan.offload_activations else None
    stream = FixedBatch(spec.vocab, plan.micro_batch, plan.seq_len, config.seed, packed=plan.masked_attention)
    tracker = None if cuda else LiveTensorBytes(device.type)
    pinned_start = None
    if cuda:
        torch.cuda.empty_cache()          # the build's freed dense blocks are not the step's
        torch.cuda.reset_peak_memory_stats()
        if hasattr(torch.cuda, "host_memory_stats"):
            torch.cuda.reset_peak_host_memory_stats()
            pinned_start = torch.cuda.host_memory_stats()["active_bytes.current"]
    losses = []
    # The first step compiles the kernels and sets up cuBLAS: with more than one step, the
    # time per step is that of the others. CUDA work is waited for at both ends.
    starts = []
    with tracker if tracker is not None else contextlib.nullcontext():
        for step in range(steps):
            if cuda:
                torch.cuda.synchronize(device)
            starts.append(time.perf_counter())
            loss, _, _ = train_step(model, optimizer, stream, plan, config, lr_at(step, config), offload=offload)
            losses.append(loss)
    if cuda:
        torch.cuda.synchronize(device)
    timed = starts[1:] if steps > 1 else starts
    seconds = (time.perf_counter() - timed[0]) / len(timed)
    if cuda:
        free, total = torch.cuda.mem_get_info(device)
        reserved_now = torch.cuda.memory_reserved(device)
        pinned = (None if pinned_start is None
                  else torch.cuda.host_memory_stats()["active_bytes.peak"] - pinned_start)
        return Measurement(predicted, torch.cuda.max_memory_allocated(device) - start,
                           torch.cuda.max_memory_reserved(device), total - free - reserved_now, cap, tuple(losses),
                           seconds, str(device), pinned=pinned)
    return Measurement(predicted, model_bytes(model) + tracker.growth, None, None, None, tuple(losses), seconds,
                       "cpu", tracker.peak_op)

