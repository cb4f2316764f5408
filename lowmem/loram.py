"""LoRAM: train LoRA on a pruned model, infer with the full one (Zhang et al., 2025,
"Train Small, Infer Large: Memory-Efficient LoRA Training for Large Language Models").

The run, in order:

1. prune the frozen float base (`lowmem.prune`: whole KV groups / query heads /
   MLP channels by importance), optionally NF4-quantize it (QLoRAM);
2. optionally align the pruned model to the full one by a short continual
   pre-training on plain text (`align`);
3. train LoRA on the pruned model with the one training loop;
4. recover: scatter the pruned adapter into the full shapes, zeros where the
   pruned model had no neuron, and save it in the PEFT layout of the full model.

Recovery of one linear W (out × in) with kept rows R ⊆ [out], kept columns C ⊆ [in]
(one of them is "all"): the pruned adapter has A' (r × |C|), B' (|R| × r), and

    A = 0 (r × in),  A[:, C] = A'          B = 0 (out × r),  B[R, :] = B'

so ΔW = s·B A is s·B'A' on the kept block and 0 elsewhere: the full model gets
exactly the update the pruned model learned, and the pruned neurons get none.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from lowmem.prune import ATTENTION, MLP, PRUNED_IN, IndexMap

INDEX_MAP_FILE = "loram_index.json"
ALIGN_SUBSETS = ("all", "attention", "mlp")


def _parse_key(key: str) -> tuple[int, str, str] | None:
    """(layer, projection, "A"|"B") for a PEFT key of a block's projection, else None."""
    parts = key.split(".")
    try:
        at = parts.index("layers")
        layer, proj = int(parts[at + 1]), parts[-3]
    except (ValueError, IndexError):
        return None
    if proj not in ATTENTION + MLP or parts[-2] not in ("lora_A", "lora_B"):
        return None
    return layer, proj, parts[-2][-1]


def recover_state(pruned: dict[str, torch.Tensor], index_map: IndexMap) -> dict[str, torch.Tensor]:
    """PEFT adapter tensors of the pruned model → the same keys in the full model's shapes."""
    full = {}
    for key, t in pruned.items():
        parsed = _parse_key(key)
        if parsed is None or not index_map.is_pruned(parsed[0]):
            full[key] = t.clone()
            continue
        layer, proj, which = parsed
        out, inp = index_map.full_shape(proj)
        idx = index_map.kept_indices(layer, proj).to(t.device)
        if which == "A" and proj in PRUNED_IN:      # A: (r × in), pruned columns
            full[key] = t.new_zeros(t.shape[0], inp).index_copy_(1, idx, t)
        elif which == "B" and proj not in PRUNED_IN:  # B: (out × r), pruned rows
            full[key] = t.new_zeros(out, t.shape[1]).index_copy_(0, idx, t)
        else:                                         # the side that pruning left whole
            full[key] = t.clone()
    return full


def prune_state(full: dict[str, torch.Tensor], index_map: IndexMap) -> dict[str, torch.Tensor]:
    """The inverse of `recover_state`: gather the kept rows/columns of a full-shape adapter."""
    pruned = {}
    for key, t in full.items():
        parsed = _parse_key(key)
        if parsed is None or not index_map.is_pruned(parsed[0]):
            pruned[key] = t.clone()
            continue
        layer, proj, which = parsed
        idx = index_map.kept_indices(layer, proj).to(t.device)
        if which == "A" and proj in PRUNED_IN:
            pruned[key] = t.index_select(1, idx)
        elif which == "B" and proj not in PRUNED_IN:
            pruned[key] = t.index_select(0, idx)
        else:
            pruned[key] = t.clone()
    return pruned


def save_recovered_adapter(model: nn.Module, folder: Path, index_map: IndexMap | None = None, *,
                           rank: int, alpha: float, targets: tuple[str, ...], dropout: float,
                           rslora: bool, base_model: str) -> Path:
    """Save the adapter of a pruned `model` recovered to the full shapes, in the PEFT layout.

    Keys and `adapter_config.json` are those `lowmem.lora.save_adapter` writes
    (a pruned model keeps its module names); the tensors are recovered. The
    index map is kept beside them as `loram_index.json`, which PEFT ignores.
    """
    from safetensors.torch import save_file

    from lowmem.lora import ADAPTER_WEIGHTS, adapter_state_dict, save_adapter

    index_map = index_map or getattr(model, "loram_index_map", None)
    if index_map is None:
        raise ValueError("this model carries no LoRAM index map; was it pruned with lowmem.prune?")
    folder = save_adapter(model, folder, rank=rank, alpha=alpha, targets=targets, dropout=dropout,
                          rslora=rslora, base_model=base_model)
    save_file(recover_state(adapter_state_dict(model), index_map), str(folder / ADAPTER_WEIGHTS))
    index_map.save(folder / INDEX_MAP_FILE)
    return folder


def align(model: nn.Module, batches: Iterable[dict[str, torch.Tensor] | torch.Tensor], steps: int, *,
          lr: float = 1e-5, subset: str = "all", weight_decay: float = 0.0, max_grad_norm: float = 1.0,
          log=None) -> list[float]:
    """Continual pre-training of the pruned model on plain text, before LoRA; returns the losses.

    Trains the block weights (`subset`: all of them, or only attention or MLP
    projections; embeddings, final norm and head stay frozen) with AdamW for
    `steps` steps, cycling through `batches` (token tensors B × T, or dicts with
    input_ids / attention_mask / labels; a tensor trains on every token). The
    paper aligns once, offline, so that the small model's knowledge matches the
    large one it stands in for. Leaves every parameter frozen afterwards.
    """
    from lowmem.data import decoder_inputs
    from lowmem.loss import causal_lm_loss

    if subset not in ALIGN_SUBSETS:
        raise ValueError(f"unknown alignment subset {subset!r}; choose one of {', '.join(ALIGN_SUBSETS)}")
    batches = list(batches)
    if not batches or steps < 1:
        raise ValueError("alignment needs at least one batch and one step")
    names = {"all": ATTENTION + MLP, "attention": ATTENTION, "mlp": MLP}[subset]
    for p in model.parameters():
        p.requires_grad_(False)
    params = []
    for block in model.get_decoder().layers:
        if subset == "all":
            params += list(block.parameters())
        else:
            for owner in (block.self_attn, block.mlp):
                params += [p for n, m in owner.named_children() if n in names for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    decay = [p for p in params if p.ndim >= 2]
    rest = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                   {"params": rest, "weight_decay": 0.0}], lr=lr)
    device = params[0].device
    was_training = model.training
    model.train()
    losses = []
    try:
        for step in range(steps):
            batch = batches[step % len(batches)]
            if isinstance(batch, torch.Tensor):
                batch = {"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch}
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model.get_decoder()(**decoder_inputs(batch)).last_hidden_state
            loss = causal_lm_loss(hidden, model.get_output_embeddings().weight, batch["labels"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if log is not None:
                log(f"align step {step + 1}/{steps}  loss {losses[-1]:.4f}")
    finally:
        for p in params:
            p.requires_grad_(False)
        model.train(was_training)
    return losses


def prepare_pruned(model: nn.Module, *, ratio: float, criterion: str = "taylor",
                   keep_first: int = 1, keep_last: int = 1, layer_ratios: dict[int, float] | None = None,
                   calibration: Iterable[dict[str, torch.Tensor]] | None = None,
                   index_map: IndexMap | None = None,
                   align_batches: Iterable[dict[str, torch.Tensor] | torch.Tensor] | None = None,
                   align_steps: int = 0, align_lr: float = 1e-5, align_subset: str = "all",
                   loss_chunk: int = 0, log=print) -> IndexMap:
    """Steps 1–2 of a LoRAM run on a float model, in place: prune (or re-apply a saved
    `index_map`, as a resumed run must), then align when `align_steps` > 0. Taylor's
    loss is computed `loss_chunk` tokens at a time when > 0, as the run's plan says.

    Call it before quantizing (QLoRAM) and before adding adapters.
    """
    from lowmem.prune import apply_index_map, prune

    before = sum(p.numel() for p in model.parameters())
    if index_map is not None:
        apply_index_map(model, index_map)
    else:
        index_map = prune(model, ratio, criterion=criterion, batches=calibration, keep_first=keep_first,
                          keep_last=keep_last, layer_ratios=layer_ratios, loss_chunk=loss_chunk)
    after = sum(p.numel() for p in model.parameters())
    pruned_blocks = sum(index_map.is_pruned(i) for i in range(index_map.layers))
    log(f"LoRAM: pruned {pruned_blocks} of {index_map.layers} blocks ({index_map.criterion}, "
        f"{index_map.ratio_text()}): {before:,} -> {after:,} parameters ({before / after:.2f}x)")
    if align_steps > 0:
        losses = align(model, align_batches or [], align_steps, lr=align_lr, subset=align_subset)
        log(f"LoRAM: aligned {align_steps} steps on plain text: loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return index_map


ALIGNED_BASE_FILE = "loram_aligned.safetensors"


def prepare_loram_run(model: nn.Module, plan, config, train_examples, pad_id: int, run_dir: Path,
                      log=print) -> IndexMap:
    """Prune (and align) a freshly loaded dense model for a new LoRAM run, in place.

    Importance is scored on calibration batches drawn with their own seed (so
    the training order is untouched); the index map is saved as
    `loram_index.json` and, when aligned, the aligned base as
    `loram_aligned.safetensors`. A resumed run re-applies both while it loads
    (`load_streamed_loram`), so it trains on the very model the first part trained on.
    """
    from safetensors.torch import save_model

    from lowmem.data import BatchStream

    cfg = config.loram
    run_dir = Path(run_dir)
    index_path, aligned_path = run_dir / INDEX_MAP_FILE, run_dir / ALIGNED_BASE_FILE
    calibration = calibration_batches(config, plan, train_examples, pad_id) if cfg.criterion == "taylor" else None
    align_batches = None
    if cfg.align_steps:
        stream = BatchStream(train_examples, plan.micro_batch, config.seed + 2, pad_id)
        align_batches = [stream.next() for _ in range(cfg.align_steps)]
    layer_ratios = {i: r for i, r in enumerate(cfg.layer_ratios)} or None
    index_map = prepare_pruned(model, ratio=plan.prune_ratio, criterion=cfg.criterion,
                               keep_first=plan.prune_keep_first, keep_last=plan.prune_keep_last,
                               layer_ratios=layer_ratios, calibration=calibration,
                               align_batches=align_batches, align_steps=cfg.align_steps,
                               align_lr=cfg.align_lr, align_subset=cfg.align_subset, loss_chunk=plan.loss_chunk,
                               log=log)
    index_map.save(index_path)
    if cfg.align_steps:
        save_model(model, str(aligned_path))
    model.loram_index_map = index_map
    return index_map


def calibration_batches(config, plan, train_examples, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """The `loram.calibration_batches` micro-batches Taylor importance is scored on: training
    examples drawn with their own seed, so the training order is untouched."""
    from lowmem.data import BatchStream

    stream = BatchStream(train_examples, plan.micro_batch, config.seed + 1, pad_id)
    return [stream.next() for _ in range(config.loram.calibration_batches)]


def prunes_while_loading(align_steps: int) -> bool:
    """A new LoRAM run prunes while its weights load unless alignment needs the dense pruned
    model: magnitude scores each block as it arrives; Taylor scores are computed first, one
    dense block at a time (lowmem.prune.taylor_scores_streamed), and the weights then load
    pruned to what they chose."""
    return not align_steps


def streams(config, resume: bool = False) -> bool:
    """Whether a LoRAM run prunes while its weights load (`lowmem.prune.load_pruned_model`):
    a resumed run always does (its index map is saved: no scoring), a new one as
    `prunes_while_loading` says."""
    return resume or prunes_while_loading(config.loram.align_steps)


def taylor_needs(config, plan, spec, host_available: int) -> tuple[str | None, int, int]:
    """(where, bytes there, bytes on the host besides) for a new LoRAM run's Taylor scoring:
    one dense block at a time when the run prunes while loading, else with the whole dense
    model (and its alignment). `where` is the plan's GPU, the host, or None (memory.where_fits);
    a CUDA plan's figures on the host are the CPU's (the reference loss, not the kernel's).
    When it fits nowhere the bytes are the plan device's."""
    from lowmem import memory

    align = bool(config.loram.align_steps)

    def needs(p) -> tuple[int, int]:
        if prunes_while_loading(config.loram.align_steps):
            return memory.loram_taylor_stream_bytes(spec, p, config.loram.calibration_batches)
        return memory.loram_prepare_bytes(spec, p, "taylor", align), 0

    need, host = needs(plan)
    on_host = needs(dataclasses.replace(plan, device="cpu")) if plan.device == "cuda" else None
    where = memory.where_fits(plan, need, host_available, host, on_host)
    if where == "cpu" and on_host is not None:
        need, host = on_host
    return where, need, host


def resolve_criterion(config, plan, spec, host_available: int) -> tuple[str, str]:
    """(criterion, why) for a new LoRAM run: the config's own, or for "auto" taylor where its
    scoring fits the plan's GPU budget or `host_available` bytes of RAM (taylor_needs), else
    magnitude."""
    from lowmem.config import format_size

    chosen = config.loram.criterion
    if chosen != "auto":
        return chosen, "set"
    where, need, host = taylor_needs(config, plan, spec, host_available)
    if where is not None:
        streamed = prunes_while_loading(config.loram.align_steps)
        why = "its block-by-block scoring fits" if streamed else "the dense model and its scoring fit"
        return "taylor", f"auto: {why}"
    extra = f" and {format_size(host)} of host RAM" if host else ""
    return "magnitude", f"auto: taylor scoring would need {format_size(need)}{extra}, more than fits here"


@dataclass(frozen=True)
class Preparation:
    """How a new LoRAM run gets its pruned base on this machine: `lowmem plan` shows it,
    `lowmem train` follows it, or refuses before loading anything when `where` is None."""

    criterion: str          # resolved: taylor | magnitude
    chosen: str             # "set", or why loram.criterion=auto chose it
    streamed: bool          # pruned while the weights load (lowmem.prune.load_pruned_model), after
                            # Taylor scoring one dense block at a time when criterion is taylor
    align: bool             # loram.align_steps > 0
    where: str | None       # where the scoring (streamed taylor) or the dense model (not streamed)
                            # happens: the plan's device, "cpu", or None (nowhere here)
    bytes: int              # what that needs there (streamed magnitude: one dense block)
    stream_bytes: int       # what pruning while loading needs (memory.loram_stream_bytes)
    host_available: int     # this machine's available RAM when it was decided
    host_bytes: int = 0     # streamed taylor: the blocks' inputs kept on the host between its passes

    @property
    def what(self) -> str:
        """What the preparation loads, in words."""
        if self.streamed:
            if self.criterion == "taylor":
                return "taylor scores computed one dense block at a time"
            return "pruning by magnitude while the weights load"
        return f"the dense model and its {self.criterion} scoring{' and alignment' if self.align else ''}"

    def alternative(self) -> str:
        """The setting that would need less, or "" when the run already needs the least."""
        from lowmem.config import format_size

        block = f"one dense block ({format_size(self.stream_bytes)}) at a time"
        if self.streamed:
            if self.criterion == "taylor":
                return f"loram.criterion=magnitude needs no scoring: it prunes while loading, {block}"
            return ""
        if self.criterion != "magnitude":
            return "without loram.align_steps, taylor scores one dense block at a time and prunes while loading"
        return f"without loram.align_steps, magnitude pruning happens while loading, {block}"

    def shortfall(self, plan) -> str:
        """Why the preparation fits nowhere here (`where` is None), with the figures."""
        from lowmem import memory
        from lowmem.config import format_size

        need = f"{self.what} need {format_size(self.bytes)}"
        ram = f"this machine's available RAM ({format_size(self.host_available)})"
        gpu_short = plan.device == "cuda" and not memory.fits_budget(plan, self.bytes)
        if not self.host_bytes:
            budget = f"the GPU budget ({format_size(plan.usable)}) and " if gpu_short else ""
            return f"{need}, more than {budget}{ram}"
        need += f" and {format_size(self.host_bytes)} of host RAM besides"
        if gpu_short:
            return f"{need}: more than the GPU budget ({format_size(plan.usable)}), and on the host more than {ram}"
        return f"{need}: the GPU budget holds the first, but the second is more than {ram}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def preparation(config, plan, spec, host_available: int) -> Preparation:
    """How a new LoRAM run of `plan` on a model of shapes `spec` (unpruned) prepares its pruned
    base, with `host_available` bytes of RAM: the criterion (resolve_criterion), whether it
    streams, and where Taylor scoring runs, or the dense model goes when it does not stream
    (memory.where_fits: the GPU when it fits the budget, else the host, else nowhere). A CPU
    plan prepares on the CPU, when it fits the RAM there."""
    from lowmem import memory

    criterion, chosen = resolve_criterion(config, plan, spec, host_available)
    align = bool(config.loram.align_steps)
    stream = memory.loram_stream_bytes(spec, plan)
    streamed = prunes_while_loading(config.loram.align_steps)
    host = 0
    if criterion == "taylor":
        where, need, host = taylor_needs(config, plan, spec, host_available)
    elif streamed:
        where, need = plan.device, stream
    else:
        need = memory.loram_prepare_bytes(spec, plan, criterion, align)
        where = memory.loram_prepare_device(spec, plan, criterion, host_available, align)
    return Preparation(criterion, chosen, streamed, align, where, need, stream, host_available, host)


def _saved_index_map(path: Path) -> IndexMap:
    """A resumed run's index map; CheckpointError naming the file when it is missing or damaged."""
    from lowmem.errors import CheckpointError

    try:
        return IndexMap.load(path)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: cannot read this LoRAM run's index map ({type(e).__name__}: {e}); it "
                              f"records which heads and channels the run pruned, so the run cannot resume "
                              f"without it: start a new run") from None


def _throttled(log, seconds: float):
    """`log`, passing on the first message and then at most one per `seconds`: progress of a
    long loop (a 70B model's blocks) without a line per step."""
    import time

    last = None

    def throttled(message: str) -> None:
        nonlocal last
        now = time.monotonic()
        if last is None or now - last >= seconds:
            last = now
            log(message)

    return throttled


def load_streamed_loram(model_dir: Path, plan, config, device: str, dtype: torch.dtype, run_dir: Path,
                        resume: bool, train_examples=None, pad_id: int = 0, score_on: str | None = None,
                        log=print) -> nn.Module:
    """The LoRAM base of a run that `streams`: pruned block by block as it loads, NF4 when the
    plan's base is, on `device`. A new run scores by loram.criterion (resolved): magnitude as
    each block arrives, taylor beforehand on calibration batches drawn from `train_examples`
    (calibration_batches), one dense block at a time on `score_on` (default `device`); it
    saves its index map. A resumed run re-applies its map, then its aligned weights when it
    was aligned (quantizing only after those are in)."""
    from safetensors.torch import load_model

    from lowmem.prune import load_pruned_model, taylor_index_map_streamed

    cfg = config.loram
    run_dir = Path(run_dir)
    index_path, aligned_path = run_dir / INDEX_MAP_FILE, run_dir / ALIGNED_BASE_FILE
    layer_ratios = {i: r for i, r in enumerate(cfg.layer_ratios)} or None
    index_map = _saved_index_map(index_path) if resume else None
    if not resume and cfg.criterion == "taylor":
        if train_examples is None:
            raise ValueError("taylor scoring needs the training examples to draw calibration batches from")
        calibration = calibration_batches(config, plan, train_examples, pad_id)
        where = score_on or device
        log(f"LoRAM: scoring by taylor on {len(calibration)} calibration batches, one dense block at a time "
            f"on {where}")
        index_map = taylor_index_map_streamed(model_dir, calibration, plan.prune_ratio, device=where,
                                              dtype=dtype, keep_first=plan.prune_keep_first,
                                              keep_last=plan.prune_keep_last, layer_ratios=layer_ratios,
                                              loss_chunk=plan.loss_chunk, log=_throttled(log, 30.0))
        if str(where).startswith("cuda"):
            # The scoring's blocks are gone: hand their cached memory back, and start the run's
            # own peak (what the dashboard and the step events report) from here.
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    aligned = resume and aligned_path.is_file()
    nf4 = plan.nf4_targets
    model = load_pruned_model(model_dir, device, dtype, plan.prune_ratio, keep_first=plan.prune_keep_first,
                              keep_last=plan.prune_keep_last,
                              layer_ratios=layer_ratios, index_map=index_map, nf4_targets=() if aligned else nf4,
                              double_quant=plan.double_quant)
    index_map = model.loram_index_map
    if aligned:
        load_model(model, str(aligned_path), device=str(device))
        if nf4:
            from lowmem.quant.nf4 import quantize_linears

            quantize_linears(model, nf4, dtype, double_quant=plan.double_quant)
    if not resume:
        index_map.save(index_path)
    pruned = sum(index_map.is_pruned(i) for i in range(index_map.layers))
    how = "re-applied from its index map" if resume else f"({index_map.criterion}, {index_map.ratio_text()})"
    log(f"LoRAM: pruned {pruned} of {index_map.layers} blocks {how} while loading, one dense block at a "
        f"time{' (NF4)' if nf4 else ''}: {index_map.params_removed():,} weights removed")
    return model
