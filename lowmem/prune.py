"""Structured pruning of a Llama-style decoder (for LoRAM; scores after LLM-Pruner, Ma et al., 2023).

A block loses whole units, never single weights, so the pruned model is a
physically smaller dense model:

- attention: KV groups (one key/value head and the query heads that read it),
  then, inside each kept group, query heads, so that every kept group keeps
  the same number g' of query heads (transformers requires uniform groups);
- MLP: intermediate channels (a row of gate_proj and up_proj, a column of
  down_proj).

Kept counts per pruned block follow `lowmem.spec.ModelSpec.pruned`, so the
planner's predicted shapes and the real ones agree:

    K' = max(1, round(K·(1−p)))     H' = K'·max(1, round(H·(1−p)/K'))     I' = max(1, round(I·(1−p)))

Importance of a unit is the sum over its weights w (in every linear it owns)
of a per-weight score:

    magnitude:  |w|                                  (no data needed)
    taylor:     |w · ∂L/∂w|   ≈ |ΔL| when w is set to 0   (first-order Taylor, LLM-Pruner's
                                                          element-wise criterion, sum aggregation)

with ∂L/∂w accumulated over a few calibration batches. Query heads are ranked
within their group by their q_proj rows and o_proj columns; a KV group's score
adds its k/v rows to its query heads' scores.

Pruning works on float weights (fp32/bf16): QLoRAM prunes first, then quantizes
the smaller model. The `IndexMap` records which original rows and columns
every pruned linear kept; LoRAM recovery (`lowmem.loram`) scatters the adapter
back through it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from lowmem.data import decoder_inputs
from lowmem.spec import layer_ratio_list

CRITERIA = ("taylor", "magnitude")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
# Which side of each linear's weight (out × in) a pruned unit removes.
PRUNED_OUT = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")   # rows
PRUNED_IN = ("o_proj", "down_proj")                                     # columns


def _round(x: float) -> int:
    return int(x + 0.5)  # round half up, as lowmem.spec does


def kept_counts(heads: int, kv_heads: int, intermediate: int, ratio: float) -> tuple[int, int, int]:
    """(H', K', I') kept in a block pruned by `ratio` (the formula of ModelSpec.pruned)."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"prune ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return heads, kv_heads, intermediate
    keep = 1.0 - ratio
    kv = max(1, _round(kv_heads * keep))
    per_group = min(heads // kv_heads, max(1, _round(heads * keep / kv)))
    return kv * per_group, kv, max(1, _round(intermediate * keep))


# ---------------------------------------------------------------- the index map

@dataclass(frozen=True)
class LayerKeep:
    """What one block kept, as indices into the original model (sorted)."""

    layer: int
    heads: tuple[int, ...]       # query heads, grouped: kept group j owns heads[j·g' : (j+1)·g']
    kv_heads: tuple[int, ...]
    channels: tuple[int, ...]    # MLP intermediate channels


@dataclass(frozen=True)
class IndexMap:
    """The original shapes and, per block, the kept heads / KV heads / channels."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    ratio: float
    criterion: str
    keep: tuple[LayerKeep, ...] = field(default=())

    def layer(self, i: int) -> LayerKeep:
        return self.keep[i]

    def is_pruned(self, i: int) -> bool:
        k = self.keep[i]
        return (len(k.heads), len(k.kv_heads), len(k.channels)) != (self.heads, self.kv_heads, self.intermediate)

    def ratio_text(self) -> str:
        """"ratio 50%", or "ratios 30% to 90% by block" where loram.layer_ratios gave blocks their
        own (read from the MLP channels each pruned block lost)."""
        shares = {len(self.keep[i].channels) for i in range(self.layers) if self.is_pruned(i)}
        if len(shares) <= 1:
            return f"ratio {self.ratio:.0%}"
        least = 1 - max(shares) / self.intermediate
        return f"ratios {least:.0%} to {self.ratio:.0%} by block"

    def kept_indices(self, i: int, proj: str) -> torch.Tensor:
        """Original indices kept along the pruned side of block i's `proj` (rows or columns)."""
        k, d = self.keep[i], self.head_dim
        if proj in ("q_proj", "o_proj"):
            units = k.heads
        elif proj in ("k_proj", "v_proj"):
            units = k.kv_heads
        elif proj in MLP:
            return torch.tensor(k.channels, dtype=torch.long)
        else:
            raise KeyError(f"{proj} is not a prunable projection ({', '.join(ATTENTION + MLP)})")
        return (torch.tensor(units, dtype=torch.long)[:, None] * d + torch.arange(d)).reshape(-1)

    def full_shape(self, proj: str) -> tuple[int, int]:
        """(out, in) of `proj` in the original model."""
        h, d = self.hidden, self.head_dim
        return {"q_proj": (self.heads * d, h), "k_proj": (self.kv_heads * d, h),
                "v_proj": (self.kv_heads * d, h), "o_proj": (h, self.heads * d),
                "gate_proj": (self.intermediate, h), "up_proj": (self.intermediate, h),
                "down_proj": (h, self.intermediate)}[proj]

    def params_removed(self) -> int:
        """Weights the pruning removed from the linear layers (biases not counted)."""
        total = 0
        for i in range(self.layers):
            for proj in ATTENTION + MLP:
                out, inp = self.full_shape(proj)
                kept = len(self.kept_indices(i, proj))
                total += (out if proj in PRUNED_IN else inp) * ((inp if proj in PRUNED_IN else out) - kept)
        return total

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> "IndexMap":
        raw = json.loads(text)
        keep = tuple(LayerKeep(k["layer"], tuple(k["heads"]), tuple(k["kv_heads"]), tuple(k["channels"]))
                     for k in raw.pop("keep"))
        return cls(**raw, keep=keep)

    def save(self, path: Path) -> Path:
        Path(path).write_text(self.to_json() + "\n")
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> "IndexMap":
        return cls.from_json(Path(path).read_text())


# ---------------------------------------------------------------- importance

def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.get_decoder().layers


def _linears(block: nn.Module) -> list[nn.Linear]:
    """The seven prunable projections of one block: attention's, then the MLP's."""
    return [getattr(owner, n) for owner, names in ((block.self_attn, ATTENTION), (block.mlp, MLP)) for n in names]


def _block_prefixes(model: nn.Module) -> dict[str, int]:
    """Each block's tensor-name prefix ("model.layers.3.") → its index."""
    index = {id(b): i for i, b in enumerate(_blocks(model))}
    return {name + ".": index[id(m)] for name, m in model.named_modules() if id(m) in index}


def _in_block(key: str, prefixes: dict[str, int]) -> tuple[int, str] | None:
    """(block index, the rest of the name) of tensor `key`, or None outside the blocks."""
    for prefix, i in prefixes.items():
        if key.startswith(prefix):
            return i, key[len(prefix):]
    return None


def _check_prunable(model: nn.Module) -> None:
    for i, block in enumerate(_blocks(model)):
        for owner, names in ((block.self_attn, ATTENTION), (block.mlp, MLP)):
            for name in names:
                layer = getattr(owner, name, None)
                if type(layer) is not nn.Linear:
                    raise TypeError(
                        f"layer {i} {name} is {type(layer).__name__}, not a plain nn.Linear: prune the "
                        f"float model before quantizing it or adding adapters (QLoRAM = prune, then NF4)")


@torch.no_grad()
def _unit_scores(block: nn.Module, per_weight, n_heads: int, n_kv: int, head_dim: int) -> dict[str, torch.Tensor]:
    """Scores of every query head, KV group and MLP channel of one block.

    `per_weight(linear)` gives an (out × in) score per weight. Sums are fp32 whatever
    the weights' dtype: bf16 sums of thousands of |w| round so coarsely that many
    units tie (and ties go to the lower index).
    """
    attn, mlp = block.self_attn, block.mlp
    d = head_dim

    def total(linear: nn.Linear, dim: int) -> torch.Tensor:
        return per_weight(linear).sum(dim, dtype=torch.float32)

    q = total(attn.q_proj, 1).view(n_heads, d).sum(1)
    o = total(attn.o_proj, 0).view(n_heads, d).sum(1)
    k = total(attn.k_proj, 1).view(n_kv, d).sum(1)
    v = total(attn.v_proj, 1).view(n_kv, d).sum(1)
    head = q + o
    group = k + v + head.view(n_kv, n_heads // n_kv).sum(1)
    channel = total(mlp.gate_proj, 1) + total(mlp.up_proj, 1) + total(mlp.down_proj, 0)
    return {"head": head, "group": group, "channel": channel}


def importance(model: nn.Module, criterion: str = "taylor",
               batches: Iterable[dict[str, torch.Tensor]] | None = None,
               loss_chunk: int = 0) -> list[dict[str, torch.Tensor]]:
    """Per block: {"head": (H,), "group": (K,), "channel": (I,)} importance scores.

    `taylor` needs calibration `batches` (dicts with input_ids and labels, right-padded
    as `lowmem.data.collate` makes them); gradients of the summed token loss (logits
    `loss_chunk` tokens at a time when > 0) are accumulated over all of them, then
    scored as |w · g|. As in training, no attention mask goes into the model: a
    right-padded batch needs none (a real token never sees a pad, and pads carry no
    loss). Parameters' `requires_grad` flags are restored afterwards.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"unknown pruning criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
    config = model.config
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    blocks = _blocks(model)
    if criterion == "magnitude":
        return [_unit_scores(b, lambda lin: lin.weight.abs(), n_heads, n_kv, head_dim) for b in blocks]

    batches = list(batches or [])
    if not batches:
        raise ValueError("the taylor criterion needs calibration batches; pass some, or use 'magnitude'")
    from lowmem.loss import causal_lm_loss

    linears = [lin for b in blocks for lin in _linears(b)]
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {lin: torch.zeros_like(lin.weight, dtype=torch.float32) for lin in linears}
    was_training = model.training
    model.eval()  # no dropout: the score describes the model as it will be used
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for lin in linears:
            lin.weight.requires_grad_(True)
        device = linears[0].weight.device
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            hidden = model.get_decoder()(**decoder_inputs(batch)).last_hidden_state
            labels = batch.get("labels", batch["input_ids"])
            loss = causal_lm_loss(hidden, model.get_output_embeddings().weight, labels, reduction="sum",
                                  chunk_size=loss_chunk)
            loss.backward()
            for lin in linears:
                # Summed over batches before |w·g|, as one large calibration batch would be.
                grads[lin].add_(lin.weight.grad)
                lin.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return [_unit_scores(b, lambda lin: _taylor(lin, grads[lin]), n_heads, n_kv, head_dim) for b in blocks]


def _taylor(linear: nn.Linear, grad_sum: torch.Tensor) -> torch.Tensor:
    """|w · g| in fp32 with one temporary of the weight's size (w is promoted inside the product)."""
    return torch.mul(grad_sum, linear.weight).abs_()


# ---------------------------------------------------------------- choosing and cutting

def _top(scores: torch.Tensor, n: int) -> list[int]:
    # Ties broken by the lower index, so equal scores choose deterministically.
    order = sorted(range(len(scores)), key=lambda j: (-float(scores[j]), j))
    return sorted(order[:n])


def keep_block(i: int, scores: dict[str, torch.Tensor], ratio: float, heads: int, kv_heads: int,
               intermediate: int) -> LayerKeep:
    """What block i keeps at `ratio`: the highest-scoring KV groups, query heads within each, channels."""
    group = heads // kv_heads
    h_keep, kv_keep, i_keep = kept_counts(heads, kv_heads, intermediate, ratio)
    if ratio == 0.0:                      # everything, without needing scores
        return LayerKeep(i, tuple(range(heads)), tuple(range(kv_heads)), tuple(range(intermediate)))
    scores = {name: t.detach().float().cpu() for name, t in scores.items()}   # no device sync per unit
    per_group = h_keep // kv_keep
    kv = _top(scores["group"], kv_keep)
    kept_heads = [kvh * group + j for kvh in kv for j in _top(scores["head"][kvh * group:(kvh + 1) * group],
                                                                 per_group)]
    return LayerKeep(i, tuple(kept_heads), tuple(kv), tuple(_top(scores["channel"], i_keep)))


def _shape_of(config) -> tuple[int, int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim, intermediate) of a Llama-style config."""
    n_heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return config.hidden_size, n_heads, config.num_key_value_heads, head_dim, config.intermediate_size


def _index_map(config, keep: Iterable[LayerKeep | None], ratios: list[float], criterion: str) -> IndexMap:
    hidden, n_heads, n_kv, head_dim, inter = _shape_of(config)
    return IndexMap(layers=len(ratios), hidden=hidden, heads=n_heads, kv_heads=n_kv, head_dim=head_dim,
                    intermediate=inter, ratio=max(ratios) if ratios else 0.0, criterion=criterion,
                    keep=tuple(keep))


def select(model: nn.Module, scores: list[dict[str, torch.Tensor]], ratios: list[float],
           criterion: str = "") -> IndexMap:
    """The IndexMap keeping the highest-scoring units at each block's ratio."""
    _, n_heads, n_kv, _, inter = _shape_of(model.config)
    keep = [keep_block(i, s, r, n_heads, n_kv, inter) for i, (s, r) in enumerate(zip(scores, ratios))]
    return _index_map(model.config, keep, ratios, criterion)


def _cut(linear: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = linear.weight.detach()
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=linear.bias is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if linear.bias is not None:
            b = linear.bias.detach()
            new.bias.copy_(b.index_select(0, rows.to(b.device)) if rows is not None else b)
    new.weight.requires_grad_(linear.weight.requires_grad)
    return new


@torch.no_grad()
def cut_block(block: nn.Module, index_map: IndexMap, i: int) -> None:
    """Cut block i (`block`) down to the units `index_map` keeps there, in place."""
    if not index_map.is_pruned(i):
        return
    attn, mlp, k = block.self_attn, block.mlp, index_map.layer(i)
    for name in PRUNED_OUT:
        owner = attn if name in ATTENTION else mlp
        setattr(owner, name, _cut(getattr(owner, name), index_map.kept_indices(i, name), None))
    for name in PRUNED_IN:
        owner = attn if name in ATTENTION else mlp
        setattr(owner, name, _cut(getattr(owner, name), None, index_map.kept_indices(i, name)))
    attn.num_key_value_groups = len(k.heads) // len(k.kv_heads)
    for attr, value in (("num_heads", len(k.heads)), ("num_key_value_heads", len(k.kv_heads))):
        if hasattr(attn, attr):  # older transformers kept these on the module
            setattr(attn, attr, value)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(k.channels)


@torch.no_grad()
def apply_index_map(model: nn.Module, index_map: IndexMap) -> nn.Module:
    """Cut `model` down to the units `index_map` keeps, in place; returns the model.

    transformers' Llama attention reshapes with -1 heads and reads only
    `num_key_value_groups` (and `head_dim`) from the module, so those are the
    attributes updated per block; `config.num_attention_heads` etc. keep
    describing the original model (the rotary embedding and the recovered
    adapter need its shapes). The map is attached as `model.loram_index_map`.
    """
    _check_prunable(model)
    for i, block in enumerate(_blocks(model)):
        cut_block(block, index_map, i)
    model.loram_index_map = index_map
    return model


def prune(model: nn.Module, ratio: float, *, criterion: str = "taylor",
          batches: Iterable[dict[str, torch.Tensor]] | None = None, keep_first: int = 1,
          keep_last: int = 1, layer_ratios: dict[int, float] | None = None, loss_chunk: int = 0) -> IndexMap:
    """Score, choose and cut `model` in place; returns the IndexMap (also at `model.loram_index_map`)."""
    _check_prunable(model)
    ratios = layer_ratio_list(model.config.num_hidden_layers, ratio, keep_first, keep_last, layer_ratios)
    scores = importance(model, criterion, batches, loss_chunk)
    index_map = select(model, scores, ratios, criterion)
    apply_index_map(model, index_map)
    return index_map


def masked_copy_reference(model: nn.Module, index_map: IndexMap) -> nn.Module:
    """The full model with every pruned unit's output contribution zeroed (o_proj / down_proj
    columns): the reference the pruned model must equal. For tests and checks."""
    import copy

    ref = copy.deepcopy(model)
    with torch.no_grad():
        for i, block in enumerate(_blocks(ref)):
            for owner, name in ((block.self_attn, "o_proj"), (block.mlp, "down_proj")):
                w = getattr(owner, name).weight
                mask = torch.zeros(w.shape[1], dtype=torch.bool, device=w.device)
                mask[index_map.kept_indices(i, name).to(w.device)] = True
                w[:, ~mask] = 0
    return ref


# ---------------------------------------------------------------- pruning while the weights stream in

def load_pruned_model(model_dir: Path, device: str, dtype: torch.dtype, ratio: float, *, keep_first: int = 1,
                      keep_last: int = 1, layer_ratios: dict[int, float] | None = None,
                      index_map: IndexMap | None = None, nf4_targets: tuple[str, ...] = (),
                      double_quant: bool = True) -> nn.Module:
    """A causal LM from a safetensors folder, pruned by magnitude block by block as its weights are read.

    `ratio`, `keep_first`, `keep_last` and `layer_ratios` mean what they mean for `prune`.

    The dense model never exists: tensors are read one at a time, in name order
    (lowmem.quant.skeleton), so a block's tensors arrive together whatever the
    sharding. A block's linears wait on `device` until all of them have arrived;
    then the block is scored (|w|), cut, and its `nf4_targets` linears quantized to
    NF4 there, and the dense weights are dropped. Memory: the pruned model plus one
    dense block (and its cut copy). With `index_map` (a resumed run) each block
    keeps what the map says instead of being scored: Taylor scores need gradients, so
    a Taylor map comes from `taylor_index_map_streamed` beforehand. Targeted linears
    outside the blocks (a targeted `lm_head`) are quantized at the end. The map is attached as
    `model.loram_index_map`; the model is returned in eval mode.
    """
    from lowmem.errors import ModelError
    from lowmem.quant.nf4 import NF4Linear, quantize_linears
    from lowmem.quant.skeleton import (empty_model, finish, read_tensors, release_freed_memory,
                                       set_tensor, shard_files)

    model = empty_model(model_dir, dtype)
    _check_prunable(model)
    config = model.config
    _, n_heads, n_kv, head_dim, inter = _shape_of(config)
    blocks = _blocks(model)
    ratios = layer_ratio_list(len(blocks), ratio, keep_first, keep_last, layer_ratios)
    prefixes = _block_prefixes(model)
    # Per block, the linear tensors still to come ("self_attn.q_proj.weight", ...; biases where present).
    waiting = {i: {f"{owner_name}.{proj}.{part}"
                   for owner_name, owner, names in (("self_attn", b.self_attn, ATTENTION), ("mlp", b.mlp, MLP))
                   for proj in names for part in ("weight", "bias")
                   if getattr(getattr(owner, proj), part) is not None}
               for i, b in enumerate(blocks)}
    keep: list[LayerKeep | None] = [None] * len(blocks)

    def block_linear(key: str) -> tuple[int, str] | None:
        found = _in_block(key, prefixes)
        return found if found is not None and found[1] in waiting[found[0]] else None

    def quantize_targets(module: nn.Module) -> None:
        if any(isinstance(m, nn.Linear) and not isinstance(m, NF4Linear) and n.split(".")[-1] in nf4_targets
               for n, m in module.named_modules()):
            quantize_linears(module, nf4_targets, dtype, double_quant)

    for key, tensor in read_tensors(shard_files(model_dir), in_name_order=True):
        value = tensor.to(device=device, dtype=dtype) if tensor.is_floating_point() else tensor.to(device)
        del tensor
        set_tensor(model, key, value)
        del value
        found = block_linear(key)
        if found is None:
            continue
        i, part = found
        waiting[i].discard(part)
        if waiting[i]:
            continue
        block = blocks[i]                                   # every linear of block i is here: prune it
        if index_map is not None:
            keep[i] = index_map.layer(i)
        else:                                               # a block kept whole needs no scores
            scores = _unit_scores(block, lambda lin: lin.weight.abs(), n_heads, n_kv, head_dim) if ratios[i] else {}
            keep[i] = keep_block(i, scores, ratios[i], n_heads, n_kv, inter)
        cut_block(block, _index_map(config, keep, ratios, "magnitude"), i)
        if nf4_targets:
            quantize_targets(block)
        release_freed_memory()
    left = [i for i, parts in waiting.items() if parts]
    if left:
        raise ModelError(f"{model_dir}: the model files lack block {left[0]}'s {sorted(waiting[left[0]])[0]}")
    result = index_map if index_map is not None else _index_map(config, keep, ratios, "magnitude")
    model = finish(model, device)
    if nf4_targets:
        quantize_targets(model)                            # targets outside the blocks, if any
    model.loram_index_map = result
    return model


# ---------------------------------------------------------------- Taylor scores while the weights stream in

class _Recorder(nn.Module):
    """Stands in for a decoder block during one call of the decoder: records what the decoder
    hands the block (its input, and the mask / rotary embeddings it would attend with) and
    passes the hidden states through unchanged."""

    def __init__(self, block: nn.Module, calls: list):
        super().__init__()
        self.calls = calls
        if hasattr(block, "attention_type"):      # decoders that pick a mask per block read it
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        self.calls.append((hidden_states, args, kwargs))
        return hidden_states


def _block_inputs(decoder: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, list]:
    """(embedded input, per block the (args, kwargs) the decoder calls it with) for `batch`,
    without running a block: the decoder itself builds masks and rotary embeddings, so this
    follows whatever its architecture does."""
    blocks = decoder.layers
    calls: list = []
    decoder.layers = nn.ModuleList(_Recorder(b, calls) for b in blocks)
    try:
        with torch.no_grad():
            decoder(**decoder_inputs(batch), use_cache=False)   # as the trainer feeds it
    finally:
        decoder.layers = blocks
    if len(calls) != len(blocks):
        raise RuntimeError(f"the decoder called {len(calls)} of its {len(blocks)} blocks")
    return calls[0][0], [(args, kwargs) for _, args, kwargs in calls]


def _run_block(block: nn.Module, x: torch.Tensor, call: tuple) -> torch.Tensor:
    args, kwargs = call
    out = block(x, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out   # older transformers return a tuple


def taylor_scores_streamed(model_dir: Path, batches: Iterable[dict[str, torch.Tensor]], device: str,
                           dtype: torch.dtype, score: Iterable[int] | None = None, *, loss_chunk: int = 0,
                           store: str = "cpu", log=None) -> list[dict[str, torch.Tensor] | None]:
    """Taylor importance (the scores `importance(model, "taylor", batches)` gives) of a
    safetensors model, computed with one dense block in memory at a time.

    Per-weight gradients need the whole network's backward, but not the whole
    network at once: the backward of block i needs only block i, its input and
    the gradient arriving at its output. So the weights are read twice, block by
    block: forward, keeping every block's input on `store` (one c·N·h tensor per
    block and calibration batch); the loss, giving the gradient at the last
    block's output; then backward from the last block, re-running each block on
    its kept input and passing the gradient at its input to the block before.
    Each block's gradients are summed over the batches in fp32 and scored as soon
    as its backward is done, then the block is dropped. Blocks before the first
    one in `score` (default: all) need no backward at all.

    Memory on `device`: the embeddings, final norm and head, one dense block with
    its gradient sums, one batch's activations of one block, and every batch's
    gradient at the current block boundary (memory.loram_taylor_stream_bytes).
    Returns per block its scores, or None for a block not in `score`.
    """
    from lowmem.errors import ModelError
    from lowmem.loss import causal_lm_loss
    from lowmem.quant.skeleton import (empty_model, read_named, release_freed_memory, set_tensor,
                                       shard_files, tensor_entries)

    batches = list(batches)
    if not batches:
        raise ValueError("the taylor criterion needs calibration batches; pass some, or use 'magnitude'")
    model = empty_model(model_dir, dtype)
    _check_prunable(model)
    config, decoder, blocks = model.config, model.get_decoder(), _blocks(model)
    _, n_heads, n_kv, head_dim, _ = _shape_of(config)
    score = set(range(len(blocks)) if score is None else score)
    if not score:
        return [None] * len(blocks)
    first = min(score)

    entries = tensor_entries(shard_files(model_dir))
    prefixes = _block_prefixes(model)
    owned: dict[int, list[str]] = {i: [] for i in range(len(blocks))}
    rest = []
    for key in entries:
        found = _in_block(key, prefixes)
        (rest if found is None else owned[found[0]]).append(key)

    def load(keys: list[str]) -> None:
        for key, tensor in read_named(entries, keys):
            set_tensor(model, key, tensor.to(device=device, dtype=dtype) if tensor.is_floating_point()
                       else tensor.to(device))
            del tensor

    def load_block(i: int) -> nn.Module:
        load(owned[i])
        missing = [n for n, p in blocks[i].named_parameters() if p.is_meta]
        if missing:
            raise ModelError(f"{model_dir}: the model files lack block {i}'s {missing[0]}")
        return blocks[i]

    def drop(i: int) -> None:
        blocks[i].to("meta")
        release_freed_memory()

    load(rest)                                          # embeddings, final norm, head
    model.tie_weights()
    in_blocks = tuple(prefixes)
    missing = [n for n, p in model.named_parameters() if p.is_meta and not n.startswith(in_blocks)]
    if missing:
        raise ModelError(f"{model_dir}: the model files lack {missing[0]}")
    for name, module in model.named_modules():
        if not (name + ".").startswith(in_blocks):
            for key, buf in module._buffers.items():
                if buf is not None:
                    module._buffers[key] = buf.to(device)
    model.eval()                                        # no dropout: the model as it will be used
    for p in model.parameters():
        p.requires_grad_(False)
    head = model.get_output_embeddings().weight

    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    hidden, calls = [], []
    for batch in batches:
        x, per_block = _block_inputs(decoder, batch)
        hidden.append(x)
        calls.append(per_block)
    kept: dict[int, list[torch.Tensor]] = {}
    for i in range(len(blocks)):                        # forward, one block at a time
        block = load_block(i)
        with torch.no_grad():
            for b in range(len(batches)):
                if i >= first:
                    kept.setdefault(i, []).append(hidden[b].to(store))
                hidden[b] = _run_block(block, hidden[b], calls[b][i])
        drop(i)
        if log is not None:
            log(f"taylor scoring: forward through block {i + 1}/{len(blocks)}")

    grads = []                                          # ∂L/∂(last block's output), per batch
    for b, batch in enumerate(batches):
        x = hidden[b].requires_grad_(True)
        with torch.enable_grad():
            labels = batch.get("labels", batch["input_ids"])
            loss = causal_lm_loss(decoder.norm(x), head, labels, reduction="sum", chunk_size=loss_chunk)
            loss.backward()
        grads.append(x.grad)
        hidden[b] = x = None
    del hidden

    scores: list[dict[str, torch.Tensor] | None] = [None] * len(blocks)
    for i in range(len(blocks) - 1, first - 1, -1):     # backward, last block first
        block = load_block(i)
        linears = _linears(block)
        scored = i in score
        sums = {lin: torch.zeros_like(lin.weight, dtype=torch.float32) for lin in linears} if scored else {}
        for p in block.parameters():                    # norms and biases: no gradient wanted
            p.requires_grad_(False)
        for lin in linears:
            lin.weight.requires_grad_(scored)
        for b in range(len(batches)):
            x = kept[i][b].to(device)
            kept[i][b] = None
            x.requires_grad_(i > first)
            with torch.enable_grad():
                _run_block(block, x, calls[b][i]).backward(grads[b])
            for lin in linears if scored else ():
                # Summed over batches before |w·g|, as one large calibration batch would be.
                sums[lin].add_(lin.weight.grad)
                lin.weight.grad = None
            grads[b] = x.grad if i > first else None
            del x
        del kept[i]
        if scored:
            scores[i] = _unit_scores(block, lambda lin: _taylor(lin, sums[lin]), n_heads, n_kv, head_dim)
        sums = None
        drop(i)
        if log is not None:
            log(f"taylor scoring: backward through block {i + 1}/{len(blocks)}")
    return scores


def taylor_index_map_streamed(model_dir: Path, batches: Iterable[dict[str, torch.Tensor]], ratio: float, *,
                              device: str, dtype: torch.dtype, keep_first: int = 1, keep_last: int = 1,
                              layer_ratios: dict[int, float] | None = None, loss_chunk: int = 0,
                              log=None) -> IndexMap:
    """The IndexMap `prune(model, ratio, criterion="taylor", ...)` would choose, without the
    dense model: scores from `taylor_scores_streamed`, of the blocks the ratios prune only.
    Load the pruned model with `load_pruned_model(..., index_map=)`."""
    from lowmem.quant.skeleton import hf_config

    config = hf_config(model_dir)
    _, n_heads, n_kv, _, inter = _shape_of(config)
    ratios = layer_ratio_list(config.num_hidden_layers, ratio, keep_first, keep_last, layer_ratios)
    scores = taylor_scores_streamed(model_dir, batches, device, dtype, [i for i, r in enumerate(ratios) if r],
                                    loss_chunk=loss_chunk, log=log)
    keep = [keep_block(i, s or {}, r, n_heads, n_kv, inter) for i, (s, r) in enumerate(zip(scores, ratios))]
    return _index_map(config, keep, ratios, "taylor")
