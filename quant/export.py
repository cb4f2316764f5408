"""Exporting a fine-tuned model: low-bit packed, dequantized, or merged.

Three outputs, each a folder that holds `config.json` (+ the tokenizer files
when known) and `lowmem_export.json` (the run, method, checkpoint and step it
came from, and how it was written):

* **quantized** (`lowmem-intk`, version 1): the adapter merged into the
  weights, written as packed integer codes with a step size and an offset per
  group (lowmem.quant.intk). An L4Q layer uses its learned step sizes and
  offsets; a LoRA/QLoRA layer is merged (W0 + c·BA) and then round-to-nearest
  quantized with each group's min–max range (`bits`, `group`). Files:

      quantization.json   {"format": "lowmem-intk", "version": 2, "bits": b,
                           "group_size": g, "symmetric": false,
                           "scale_dtype": "float16", "modules": [names], "source": {...}}
      lowmem-intk.safetensors   (or shards of at most 2 GiB with
                          lowmem-intk.safetensors.index.json; version 1 named them
                          model.safetensors, which transformers took for a plain model)
                          for each quantized linear <m> (out × in, G = ⌈in/g⌉):
                            <m>.qweight  uint8 (out, ⌈in·b/8⌉)   codes u = q − Qn, little-endian
                                                                bit stream per row, rows padded
                                                                to whole bytes
                            <m>.scales   float16 (out, G)        step sizes s (float32: L4Q runs)
                            <m>.offsets  float16 (out, G)        offsets β (absent if symmetric; as scales)
                            <m>.bias     (out,)                   if the layer has one
                          every other tensor under its Hugging Face name, in the dense
                          dtype (tied weights once, as save_pretrained does)

      a weight reads back as  ŵ[o, i] = (u[o, i] + Qn) · s[o, ⌊i/g⌋] + β[o, ⌊i/g⌋]

  The codes are computed with the scales already rounded to the stored dtype,
  so the file is self-consistent; with `scale_dtype=float32` and fp32 dense
  tensors it reproduces an L4Q model's training-time forward exactly.
  `load_quantized_export` loads it (`lowmem generate --model OUT`).

* **dequantized**: the same quantized weights, dequantized, as an ordinary
  Hugging Face model folder (bf16 by default) that transformers loads.

* **merged**: a LoRA/QLoRA/LoRAM adapter merged into the base weights
  (W0 + c·BA, no quantization), as a Hugging Face model folder. For a QLoRA run
  W0 is the original full-precision weight, not its NF4 version (PEFT's
  `merge_and_unload` on a reloaded full-precision base does the same); a LoRAM
  run's adapter is the recovered one, in the full model's shapes.
  `merge_streamed` writes it from the base's safetensors one tensor at a time
  (a 70B base merges in a few GiB of RAM), in shards with an index as
  `save_pretrained` writes them; `save_merged` does it from a loaded model.

`export_run` does this for a run directory (`lowmem export RUN_DIR ...`), writing
every output asked for in one read of the base's safetensors, one tensor at a
time (`export_streamed`; `merge_streamed` and `quantize_streamed` write one
output): nothing loads the whole model. `quantize_model` and
`save_quantized` / `save_dequantized` / `save_merged` do the same from a loaded
model, and give the same tensors (tests).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lowmem.checkpoint import share_modes
from lowmem.errors import ModelError
from lowmem.events import this_host
from lowmem.lora import LoRALinear
from lowmem.quant import intk
from lowmem.quant.l4q import L4QLinear, merged_weight

QUANT_CONFIG = "quantization.json"
#: Round-to-nearest exports measure their weight error on this many rows of each weight, and
#: warn above ERROR_WARN (BENCHMARKS.md, Quantization: 4-bit moved the embedded model's weights
#: 10.0% and cost a third of its exact match; 8-bit stays under 1%).
ERROR_ROWS = 64
ERROR_WARN = 0.05
#: Beside every export: where it came from, {"run", "method", "checkpoint", "step", "output", "dtype"}
#: (+ "bits", "group", and for round-to-nearest "weight_error", when quantized).
ABOUT = "lowmem_export.json"
FORMAT = "lowmem-intk"
VERSION = 2
WEIGHTS = "model.safetensors"
#: The packed tensors' file (version 2). Not model.safetensors: transformers would load the folder
#: as a plain model, finding no weight under the projections' names, and start them at random.
INTK_WEIGHTS = "lowmem-intk.safetensors"


def packed_weights_name(version: int) -> str:
    """The packed tensors' file name in a `lowmem-intk` folder of `version` (1 used WEIGHTS)."""
    return WEIGHTS if version < 2 else INTK_WEIGHTS


@dataclass
class QuantizedWeight:
    """One exported linear: packed codes, per-group step sizes and offsets, and its bias."""

    qweight: torch.Tensor            # uint8 (out, ⌈in·bits/8⌉)
    scales: torch.Tensor             # (out, G)
    offsets: torch.Tensor | None     # (out, G), None when symmetric
    bias: torch.Tensor | None
    in_features: int
    bits: int
    group: int

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        q = intk.unpack(self.qweight, self.bits, self.in_features)
        return intk.dequantize(q, self.scales, self.offsets, self.group, dtype)


def _dense_weight(layer: nn.Module) -> torch.Tensor:
    """A copy of a (base) layer's weight in fp32: dense as is, NF4 dequantized."""
    if hasattr(layer, "dequantized_weight"):
        return layer.dequantized_weight().to(torch.float32, copy=True)
    return layer.weight.detach().to(torch.float32, copy=True)


def _quantize(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, bias, bits: int,
              group: int, scale_dtype: torch.dtype) -> QuantizedWeight:
    step = step.detach().to(scale_dtype)
    offset = None if offset is None else offset.detach().to(scale_dtype)
    q = intk.codes(w, step, offset, bits, group)
    return QuantizedWeight(intk.pack(q, bits).cpu(), step.cpu(), None if offset is None else offset.cpu(),
                           None if bias is None else bias.detach().cpu(), w.shape[1], bits, group)


def _as_trained(what: str, trained_bits: int, trained_group: int, bits: int | None, group: int | None) -> None:
    """ValueError unless the asked-for `bits` / `group` (None: any) are the ones L4Q trained with."""
    if (bits or trained_bits) != trained_bits or (group or trained_group) != trained_group:
        asked = ", ".join(f"{k}={v}" for k, v in (("bits", bits), ("group", group)) if v)
        raise ValueError(f"{what} trained with bits={trained_bits}, group={trained_group} exports only that way "
                         f"(asked for {asked})")


@torch.no_grad()
def quantize_model(model: nn.Module, *, bits: int | None = None, group: int | None = None,
                   targets: tuple[str, ...] = (), scale_dtype: torch.dtype = torch.float16
                   ) -> dict[str, QuantizedWeight]:
    """Low-bit weights for every adapter layer of `model` (and plain linears named in `targets`).

    L4Q layers: Q(W0 + c·BA) with their learned step sizes and offsets (their own
    bits and group; `bits`/`group`, if given, must agree). LoRA layers, and plain
    nn.Linear whose name ends with a target: W0 + c·BA (or W0) quantized
    round-to-nearest with min–max groups at `bits` / `group`.
    """
    out: dict[str, QuantizedWeight] = {}
    for name, m in model.named_modules():
        if isinstance(m, L4QLinear):
            if m.merged:
                raise ValueError(f"{name}: the L4Q layer is merged already; export it before merging")
            _as_trained(f"{name}: an L4Q layer", m.bits, m.group, bits, group)
            w = merged_weight(m.base.weight, m.lora_A, m.lora_B, m.scaling)
            out[name] = _quantize(w, m.quant_step, m.quant_offset, m.base.bias, m.bits, m.group, scale_dtype)
        elif isinstance(m, LoRALinear) or (isinstance(m, nn.Linear) and targets
                                           and name.split(".")[-1] in targets and not _inside(name, out)):
            if bits is None or group is None:
                raise ValueError("round-to-nearest export of LoRA layers needs bits and group")
            if isinstance(m, LoRALinear):
                w = _dense_weight(m.base)
                if not m.merged:
                    w += m.delta_weight().float()
                bias = m.base.bias
            else:
                w, bias = _dense_weight(m), m.bias
            step, offset = intk.minmax_params(w, bits, group)
            out[name] = _quantize(w, step, offset, bias, bits, group, scale_dtype)
    if not out:
        raise ValueError("nothing to quantize: the model has no adapter layers and no linear matches the targets")
    return out


def _inside(name: str, done: dict) -> bool:
    """True when `name` is a submodule of a layer already quantized (e.g. a LoRA layer's base)."""
    return any(name.startswith(prefix + ".") for prefix in done)


@torch.no_grad()
def merged_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """W0 + c·BA (fp32) for every LoRA layer; NF4 bases are dequantized first."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, L4QLinear):
            raise ValueError("an L4Q model is exported quantized or dequantized, not merged unquantized")
        if isinstance(m, LoRALinear):
            w = _dense_weight(m.base)
            out[name] = w if m.merged else w + m.delta_weight().float()
    if not out:
        raise ValueError("nothing to merge: the model has no LoRA layers")
    return out


# ---------------------------------------------------------------- writing

def _dense_tensors(model: nn.Module, replaced: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of `model`'s state dict outside the `replaced` layers, tied ones once."""
    out, seen = {}, set()
    for key, t in model.state_dict().items():
        if any(key.startswith(name + ".") for name in replaced):
            continue
        if t.device.type != "meta" and t.untyped_storage().data_ptr() in seen:
            continue   # a tied weight (lm_head = embed_tokens): written once, like save_pretrained
        seen.add(t.untyped_storage().data_ptr())
        if t.dtype == torch.uint8 or not t.is_floating_point():
            raise ValueError(f"{key}: a {t.dtype} tensor outside the exported layers (a quantized "
                             "base without an adapter?) cannot be written as a dense weight")
        out[key] = t.detach().to("cpu", dtype).contiguous()
    return out


def check_outputs(outputs: dict[str, Path | None]) -> None:
    """ModelError before anything is written when an output folder named by `outputs` ({flag:
    path}) is a file, is not empty, is named twice, or cannot be made (a file on its path, a
    folder not writable): an export writes all of them or none."""
    seen: dict[Path, str] = {}
    for flag, out in outputs.items():
        if out is None:
            continue
        out = Path(out)
        if out.is_symlink():
            raise ModelError(f"{flag} {out}: a symbolic link is there; give the folder itself")
        if out.exists() and not out.is_dir():
            raise ModelError(f"{flag} {out}: a file is there; choose an output folder")
        parent = out.absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ModelError(f"{flag} {out}: {parent} is a file, so no folder can be made in it")
        try:     # tried, not asked (os.access): root may write anywhere but /proc, a read-only mount
            os.rmdir(tempfile.mkdtemp(prefix=".lowmem-probe-", dir=parent))
        except OSError as e:
            raise ModelError(f"{flag} {out}: no folder can be made in {parent} ({e.strerror or e})") from None
        if out.is_dir() and any(out.iterdir()):
            raise ModelError(f"{flag} {out} already exists and is not empty; choose another output folder")
        key = out.resolve()
        if key in seen:
            raise ModelError(f"{seen[key]} and {flag} both name {out}; give each output its own folder")
        for other, other_flag in seen.items():
            if key.is_relative_to(other) or other.is_relative_to(key):
                inner, outer = (flag, other_flag) if key.is_relative_to(other) else (other_flag, flag)
                raise ModelError(f"{inner}'s folder is inside {outer}'s; give each output a folder of its own")
        seen[key] = flag


def _write_folder(out: Path, write: Callable[[Path], None]) -> Path:
    """Write into a temporary folder beside `out`, then rename: a failed export leaves nothing."""
    return _write_folders([out], lambda folders: write(folders[0]))[0]


def _write_folders(outs: list[Path], write: Callable[[list[Path]], None]) -> list[Path]:
    """_write_folder for several outputs written together: each into a temporary folder beside
    it, all renamed once `write` is done; a failure leaves none of them."""
    outs = [Path(out) for out in outs]
    check_outputs({"output" if len(outs) == 1 else f"output {i + 1}": out for i, out in enumerate(outs)})
    temporary: list[Path] = []
    done: list[Path] = []
    try:
        for out in outs:
            out.parent.mkdir(parents=True, exist_ok=True)
            _clear_killed_exports(out)
            temporary.append(Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}@{this_host()}@{os.getpid()}@",
                                                   dir=out.parent)))
        write(temporary)
        for tmp, out in zip(temporary, outs):
            share_modes(tmp)        # an exported model is for sharing
            if out.exists():
                out.rmdir()
            os.rename(tmp, out)
            done.append(out)
    except BaseException:
        for folder in temporary + done:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    return outs


def _clear_killed_exports(out: Path) -> None:
    """Remove the half-written folders of `out` that a killed export (SIGKILL, a power loss)
    left beside it: `.tmp-NAME@HOST@PID@*` of this host whose process is gone."""
    import psutil

    prefix = f".tmp-{out.name}@"
    for stale in out.parent.glob(f"{prefix}*"):
        host, _, rest = stale.name[len(prefix):].partition("@")
        pid = rest.partition("@")[0]
        if host == this_host() and pid.isdigit() and not psutil.pid_exists(int(pid)) and stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _save_config(model: nn.Module, folder: Path, dtype: torch.dtype, tokenizer) -> None:
    config = copy.deepcopy(model.config)
    config.use_cache = True          # training switched it off; an exported model generates
    config.dtype = _name(dtype)
    config.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_quantized(model: nn.Module, quantized: dict[str, QuantizedWeight], out: Path, *,
                   tokenizer=None, dense_dtype: torch.dtype = torch.bfloat16,
                   source: dict | None = None) -> Path:
    """Write the `lowmem-intk` folder (layout in the module docstring)."""
    from safetensors.torch import save_file

    first = next(iter(quantized.values()))
    if any((q.bits, q.group, q.offsets is None) != (first.bits, first.group, first.offsets is None)
           for q in quantized.values()):
        raise ValueError("all exported layers must share bits, group size and symmetry")

    def write(folder: Path) -> None:
        tensors = _dense_tensors(model, set(quantized), dense_dtype)
        for name, q in quantized.items():
            tensors[f"{name}.qweight"] = q.qweight.contiguous()
            tensors[f"{name}.scales"] = q.scales.contiguous()
            if q.offsets is not None:
                tensors[f"{name}.offsets"] = q.offsets.contiguous()
            if q.bias is not None:
                tensors[f"{name}.bias"] = q.bias.to(dense_dtype).contiguous()
        save_file(tensors, str(folder / INTK_WEIGHTS), metadata={"format": "pt"})
        _save_config(model, folder, dense_dtype, tokenizer)
        meta = {"format": FORMAT, "version": VERSION, "bits": first.bits, "group_size": first.group,
                "symmetric": first.offsets is None,
                "scale_dtype": _name(first.scales.dtype),
                "packing": "u = q - Qn, little-endian bit stream per row, rows padded to whole bytes",
                "modules": sorted(quantized), "source": source or {}}
        (folder / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    return _write_folder(out, write)


def save_hf(model: nn.Module, weights: dict[str, torch.Tensor], out: Path, *, tokenizer=None,
            dtype: torch.dtype = torch.bfloat16) -> Path:
    """A Hugging Face model folder with `weights` ({layer: (out × in)}) in place of those layers."""
    from safetensors.torch import save_file

    def write(folder: Path) -> None:
        tensors = _dense_tensors(model, set(weights), dtype)
        for name, w in weights.items():
            tensors[f"{name}.weight"] = w.to("cpu", dtype).contiguous()
            layer = model.get_submodule(name)
            bias = getattr(getattr(layer, "base", layer), "bias", None)
            if bias is not None:
                tensors[f"{name}.bias"] = bias.detach().to("cpu", dtype).contiguous()
        save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
        _save_config(model, folder, dtype, tokenizer)

    return _write_folder(out, write)


def save_dequantized(model: nn.Module, quantized: dict[str, QuantizedWeight], out: Path, *,
                     tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """The quantized weights, dequantized, as a Hugging Face model folder in `dtype`."""
    return save_hf(model, {n: q.dequantized() for n, q in quantized.items()}, out,
                   tokenizer=tokenizer, dtype=dtype)


def save_merged(model: nn.Module, out: Path, *, tokenizer=None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """LoRA merged into the base (no quantization) as a Hugging Face model folder in `dtype`."""
    return save_hf(model, merged_weights(model), out, tokenizer=tokenizer, dtype=dtype)


# ---------------------------------------------------------------- merging while streaming

#: Largest shard `merge_streamed` writes (the last tensor may take a shard past it if it alone is larger).
SHARD_BYTES = 2 * 2**30


@dataclass(frozen=True)
class WeightUpdate:
    """What an export does to one base weight W0 (out × in): W = W0 + s·(B A) in fp32, then,
    when quantized, these step sizes and offsets (an L4Q layer's learned ones), or None for
    round-to-nearest with min–max groups."""

    a: torch.Tensor                   # (r, in)
    b: torch.Tensor                   # (out, r)
    scale: float
    step: torch.Tensor | None = None  # (out, G)
    offset: torch.Tensor | None = None
    l4q: bool = False                 # W formed as L4Q's training forward forms it (merged_weight)

    def merged(self, w0: torch.Tensor) -> torch.Tensor:
        if self.l4q:
            return merged_weight(w0.float(), self.a, self.b, self.scale)
        return w0.float() + (self.b.float() @ self.a.float()) * self.scale


def adapter_updates(adapter: Path) -> dict[str, WeightUpdate]:
    """{base weight name: its update ΔW = s·B A} of a PEFT-layout adapter folder (lora.read_adapter
    checks it); `_check_base` then finds any targeted weight it holds no update for."""
    from lowmem.lora import read_adapter

    found = read_adapter(Path(adapter))
    return AdapterUpdates({f"{module}.weight": WeightUpdate(a, b, found.scale)
                           for module, (a, b) in found.pairs.items()}, found.missing)


class AdapterUpdates(dict):
    """adapter_updates' result: {weight name: WeightUpdate}, and `missing(module names)`, the
    targeted modules the adapter file holds no tensors for (lora.AdapterFile.missing)."""

    def __init__(self, updates: dict[str, WeightUpdate], missing: Callable[[list[str]], list[str]]):
        super().__init__(updates)
        self.missing = missing


def _check_base(model_dir: Path, files: list[Path], config, updates: dict, source: Path) -> None:
    """Before anything is read or written: every target is in the base's headers, an adapter
    updates every weight its target_modules names, none is float8."""
    from lowmem.quant.skeleton import _header

    stored = {key: info["dtype"] for path in files for key, info in _header(path)[0].items()}
    missing = sorted(set(updates) - set(stored))
    if not missing and isinstance(updates, AdapterUpdates):
        modules = [k.removesuffix(".weight") for k in stored if k.endswith(".weight")]
        incomplete = updates.missing(modules)
        if incomplete:
            raise ModelError(f"{source}: the adapter file is incomplete: no tensors for {len(incomplete)} "
                             f"layer(s) that target_modules names, e.g. {incomplete[0]}")
    if missing:
        tied = " (tied to the embeddings, so the checkpoint has no tensor of its own)" \
            if missing[0] == "lm_head.weight" and getattr(config, "tie_word_embeddings", False) else ""
        raise ModelError(f"{source}: the adapter targets {missing[0]}, which the base in {model_dir} "
                         f"does not have{tied}; {len(missing)} weight(s) could not be exported")
    scaled = sorted(k for k, d in stored.items() if d.startswith("F8"))
    if scaled:
        raise ModelError(f"{model_dir}: {scaled[0]} is stored in {stored[scaled[0]]}, whose scales live in "
                         f"other tensors; lowmem exports from bf16, fp16 or fp32 checkpoints only")


@dataclass
class _Output:
    """One folder a streamed export writes: its weights file name (`weights`, or shards of it
    with an index), `extra(folder)` for what else its format needs, and `about` (or what it
    returns once every tensor is written) for ABOUT."""

    folder: Path
    weights: str = WEIGHTS
    extra: Callable[[Path], None] | None = None
    about: dict | Callable[[], dict] | None = None


class _Shards:
    """The shards of one output as tensors arrive: a shard is saved once the next tensor would
    take it past `limit` bytes."""

    def __init__(self, folder: Path, weights: str, limit: int):
        self.folder, self.weights, self.limit = folder, weights, limit
        self.shard: dict[str, torch.Tensor] = {}
        self.weight_map: dict[str, str] = {}
        self.names: list[str] = []
        self.size = self.total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.limit:
            self.flush()
        self.shard[name] = tensor.contiguous()
        self.size += nbytes
        self.total += nbytes

    def flush(self) -> None:
        from safetensors.torch import save_file

        if self.shard:
            name = f"{self.weights.removesuffix('.safetensors')}-{len(self.names) + 1:05d}.safetensors"
            save_file(self.shard, str(self.folder / name), metadata={"format": "pt"})
            self.names.append(name)
            self.weight_map.update({key: name for key in self.shard})
            self.shard, self.size = {}, 0

    def finish(self) -> None:
        """The last shard saved; one shard named `weights`, several listed in an index."""
        self.flush()
        if len(self.names) == 1:
            os.rename(self.folder / self.names[0], self.folder / self.weights)
        else:
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(self.weight_map.items()))}
            (self.folder / f"{self.weights}.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _rewrite_streamed(model_dir: Path, updates: dict[str, WeightUpdate], source: Path, outputs: list[_Output],
                      convert: Callable[[str, torch.Tensor, WeightUpdate], list[dict[str, torch.Tensor]]], *,
                      dtype: torch.dtype, shard_bytes: int, log) -> list[Path]:
    """`model_dir`'s safetensors rewritten one tensor at a time into each of `outputs`, in one
    read of the base: each weight named in `updates` becomes, in output i, what
    `convert(name, tensor, update)[i]` holds ({name: tensor}); every other floating tensor is
    cast to `dtype` (integer buffers copied). Shards of at most `shard_bytes` with an index
    (one file when it all fits); the config (use_cache on, dtype; untied when the head got
    its own update), generation config and tokenizer go beside.
    Alive at once: one base tensor, what it becomes, and each output's shard being filled."""
    from lowmem.model import load_tokenizer
    from lowmem.quant.skeleton import DTYPES, checkpoint_keys, empty_model, hf_config, read_tensors, shard_files

    model_dir = Path(model_dir)
    files = shard_files(model_dir)
    config = hf_config(model_dir)
    _check_base(model_dir, files, config, updates, source)
    exact = {t for t in DTYPES.values() if t.is_floating_point and t.itemsize >= 2}
    # Tensors the model does not define (an old checkpoint's rotary inv_freq) are left out, as
    # loading the base drops them: the export holds what its loader expects, nothing else.
    defined = checkpoint_keys(empty_model(model_dir, torch.float32))

    def write(folders: list[Path]) -> None:
        shards = [_Shards(folder, output.weights, shard_bytes) for folder, output in zip(folders, outputs)]
        skipped = 0
        for key, tensor in read_tensors(files):
            if key not in defined:
                skipped += 1
                continue
            if key in updates:
                u = updates[key]
                if tuple(tensor.shape) != (u.b.shape[0], u.a.shape[1]):
                    raise ModelError(f"{source}: the adapter of {key} is for a ({u.b.shape[0]} × {u.a.shape[1]}) "
                                     f"weight; the base in {model_dir} has {tuple(tensor.shape)}")
                written = convert(key, tensor, u)
            else:   # other tensors (integer buffers) are copied as they are
                written = [{key: tensor.to(dtype) if tensor.dtype in exact else tensor}] * len(outputs)
            del tensor
            for into, tensors in zip(shards, written):
                for name, t in tensors.items():
                    into.add(name, t)
            del written
        config.use_cache = True
        config.dtype = _name(dtype)
        if "lm_head.weight" in updates and getattr(config, "tie_word_embeddings", False):
            config.tie_word_embeddings = False   # the head got its own update: loading must not re-tie it
        try:
            tokenizer = load_tokenizer(model_dir)
        except (OSError, ValueError, ModelError):
            tokenizer = None
            log(f"note: no tokenizer in {model_dir}; the exported model has none either")
        left = f"; {skipped} tensor(s) the model does not define left out" if skipped else ""
        for into, output in zip(shards, outputs):
            folder = into.folder
            into.finish()
            config.save_pretrained(folder)
            if (model_dir / "generation_config.json").is_file():
                shutil.copy(model_dir / "generation_config.json", folder / "generation_config.json")
            if tokenizer is not None:
                tokenizer.save_pretrained(folder)
            if output.extra is not None:
                output.extra(folder)
            if output.about is not None:
                about = output.about() if callable(output.about) else output.about
                (folder / ABOUT).write_text(json.dumps(about, indent=2) + "\n")
            log(f"{output.folder}: {len(updates)} weights updated, {len(into.names)} shard(s), "
                f"{into.total / 2**30:.2f} GiB{left}")

    return _write_folders([output.folder for output in outputs], write)


def merge_streamed(model_dir: Path, adapter: Path, out: Path, *, dtype: torch.dtype = torch.bfloat16,
                   shard_bytes: int = SHARD_BYTES, log=print, about: dict | None = None) -> Path:
    """The adapter in `adapter` (PEFT layout) merged into the base model in `model_dir`
    (Hugging Face safetensors), written to `out` as a Hugging Face folder in `dtype`.

    One base tensor at a time: a targeted weight becomes W0 + s·(B A), in fp32, as
    `LoRALinear.delta_weight` computes it, then `dtype`; every other floating tensor is
    cast. Alive at once: the adapter, one tensor and its copy, and the shard being
    filled (at most `shard_bytes`). The base's tensor names are kept (a tied head
    stays tied); config, generation config and tokenizer files are copied.
    """
    return export_streamed(model_dir, adapter_updates(Path(adapter)), Path(adapter), merged=out, dtype=dtype,
                           about=None if about is None else lambda output: about,
                           shard_bytes=shard_bytes, log=log)[0]


def quantize_streamed(model_dir: Path, updates: dict[str, WeightUpdate], out: Path, *, bits: int, group: int,
                      source: Path, dequantize: bool = False, dtype: torch.dtype = torch.bfloat16,
                      scale_dtype: torch.dtype = torch.float16, meta_source: dict | None = None,
                      shard_bytes: int = SHARD_BYTES, log=print, about: dict | None = None) -> Path:
    """`updates` merged into the base in `model_dir` and quantized at `bits` / `group`, one
    base tensor at a time, written to `out`: the `lowmem-intk` folder (module docstring),
    or with `dequantize` the quantized weights dequantized, as a Hugging Face folder in
    `dtype`. The same numbers as quantize_model + save_quantized / save_dequantized on the
    loaded model, without loading it. `source` names the adapter in errors."""
    return export_streamed(model_dir, updates, Path(source), **{"dequantized" if dequantize else "quantized": out},
                           bits=bits, group=group, dtype=dtype, scale_dtype=scale_dtype, meta_source=meta_source,
                           about=None if about is None else lambda output: about,
                           shard_bytes=shard_bytes, log=log)[0]


def export_streamed(model_dir: Path, updates: dict[str, WeightUpdate], source: Path, *,
                    merged: Path | None = None, quantized: Path | None = None, dequantized: Path | None = None,
                    bits: int = 4, group: int = 128, dtype: torch.dtype = torch.bfloat16,
                    scale_dtype: torch.dtype = torch.float16, meta_source: dict | None = None,
                    about: Callable[[str], dict] | None = None, shard_bytes: int = SHARD_BYTES,
                    log=print) -> list[Path]:
    """`updates` merged into the base in `model_dir`, written in one read of the base to each
    folder asked for: `merged`, a Hugging Face folder in `dtype`; `quantized`, the merged
    weights quantized at `bits` / `group` as a `lowmem-intk` folder (module docstring); and
    `dequantized`, those quantized weights dequantized, as a Hugging Face folder in `dtype`.
    The same numbers as save_merged / quantize_model + save_quantized / save_dequantized on the
    loaded model, without loading it; each merged weight is quantized once for both quantized
    outputs. `about(output)` ("merged", "quantized", "dequantized") goes in each folder's ABOUT,
    with the quantization's bits, group and measured weight error added. `source` names the
    adapter in errors. Returns the folders in the order merged, quantized, dequantized."""
    if not updates:
        raise ValueError("nothing to export: the adapter updates no weight")
    quantizing = quantized is not None or dequantized is not None
    symmetric = {u.offset is None and u.step is not None for u in updates.values()}
    if quantizing and len(symmetric) > 1:
        raise ValueError("all exported layers must share symmetry")

    errors: list[float] = []     # round-to-nearest: each weight's ‖Ŵ − W‖/‖W‖ over its first rows

    def quantize(key: str, w: torch.Tensor, u: WeightUpdate) -> QuantizedWeight:
        step, offset = (u.step, u.offset) if u.step is not None else intk.minmax_params(w, bits, group)
        expected = (w.shape[0], intk.num_groups(w.shape[1], group))
        if tuple(step.shape) != expected:
            raise ModelError(f"{source}: the step sizes of {key} are {tuple(step.shape)}, expected {expected} "
                             f"for groups of {group}")
        q = _quantize(w, step, offset, None, bits, group, scale_dtype)
        if u.step is None:
            rows = w[:ERROR_ROWS].float()
            scales, offsets = q.scales[:ERROR_ROWS], None if q.offsets is None else q.offsets[:ERROR_ROWS]
            sample = intk.dequantize(intk.codes(rows, scales, offsets, bits, group), scales, offsets, group)
            errors.append(float((sample - rows).norm() / rows.norm().clamp_min(1e-30)))
        return q

    def convert(key: str, w0: torch.Tensor, u: WeightUpdate) -> list[dict[str, torch.Tensor]]:
        w = u.merged(w0)
        written = []
        if merged is not None:
            written.append({key: w.to(dtype)})
        if quantizing:
            q = quantize(key, w, u)
            del w
            if quantized is not None:
                name = key.removesuffix(".weight")
                parts = {f"{name}.qweight": q.qweight, f"{name}.scales": q.scales}
                if q.offsets is not None:
                    parts[f"{name}.offsets"] = q.offsets
                written.append(parts)
            if dequantized is not None:
                written.append({key: q.dequantized().to(dtype)})
        return written

    def quant_config(folder: Path) -> None:
        meta = {"format": FORMAT, "version": VERSION, "bits": bits, "group_size": group,
                "symmetric": symmetric == {True}, "scale_dtype": _name(scale_dtype),
                "packing": "u = q - Qn, little-endian bit stream per row, rows padded to whole bytes",
                "modules": sorted(k.removesuffix(".weight") for k in updates), "source": meta_source or {}}
        (folder / QUANT_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")

    def about_of(output: str) -> Callable[[], dict] | None:
        if about is None:
            return None
        if output == "merged":
            return lambda: about(output)
        # ‖Ŵ−W‖/‖W‖, mean over the weights: known once every tensor is written.
        return lambda: {**about(output), "bits": bits, "group": group,
                        **({"weight_error": round(sum(errors) / len(errors), 5)} if errors else {})}

    outputs = [_Output(merged, about=about_of("merged"))] if merged is not None else []
    if quantized is not None:
        outputs.append(_Output(quantized, INTK_WEIGHTS, quant_config, about_of("quantized")))
    if dequantized is not None:
        outputs.append(_Output(dequantized, about=about_of("dequantized")))
    written = _rewrite_streamed(model_dir, updates, Path(source), outputs, convert, dtype=dtype,
                                shard_bytes=shard_bytes, log=log)
    if errors:
        error = sum(errors) / len(errors)
        log(f"round-to-nearest {bits}-bit moved the merged weights by {error:.1%} on average "
            f"(‖Ŵ−W‖/‖W‖, the first {ERROR_ROWS} rows of each)")
        if error > ERROR_WARN:
            log(f"warning: at {bits} bits answers may be much worse than the run's: on the embedded 135M model, round-to-nearest "
                "at 4 bits moved the weights 10.0% and a merged QLoRA run's exact match fell from 55% to 37.5% "
                "(at 3 bits: 22.2%, and 0% exact match); --bits 8 moves them under 1%, and an L4Q run "
                "(--method l4q) learns its grid (52.5% at 4 bits)")
    return written


def _check_group(updates: dict[str, WeightUpdate], group: int | None) -> None:
    """ValueError for a round-to-nearest --group wider than every weight's rows: each row would be
    one group, zero-padded to `group` values while it is quantized."""
    widest = max((u.a.shape[1] for u in updates.values()), default=0)
    if group is not None and group > widest:
        raise ValueError(f"--group {group} is wider than every weight's rows (the widest has {widest} "
                         f"values); give at most {widest} (64 or 128 are usual)")


def run_updates(folder: Path, method: str, bits: int | None, group: int | None
                ) -> tuple[dict[str, WeightUpdate], int, int, str]:
    """(updates, bits, group, quantizer) of a run's adapter `folder` for quantize_streamed: an L4Q
    run's A, B and learned step sizes and offsets, at the bits and group it trained (others
    refused); a LoRA/QLoRA/LoRAM adapter's A and B, round-to-nearest at `bits` / `group`
    (default 4 / 128)."""
    if method != "l4q":
        updates = adapter_updates(folder)
        _check_group(updates, group)
        return updates, bits or 4, group or 128, "round-to-nearest"
    from lowmem.lora import scaling
    from lowmem.quant.l4q import L4Q_WEIGHTS, read_l4q_config
    from lowmem.quant.skeleton import load_safetensors

    cfg = read_l4q_config(folder)
    _as_trained("an L4Q run", cfg["bits"], cfg["group_size"], bits, group)
    state = load_safetensors(Path(folder) / L4Q_WEIGHTS)
    scale = scaling(cfg["rank"], cfg["alpha"], bool(cfg["rslora"]))
    updates = {}
    for name in cfg["modules"]:
        try:
            updates[f"{name}.weight"] = WeightUpdate(state[f"{name}.lora_A"], state[f"{name}.lora_B"], scale,
                                                     state[f"{name}.quant_step"], state.get(f"{name}.quant_offset"),
                                                     l4q=True)
        except KeyError as e:
            raise ModelError(f"{folder}: {L4Q_WEIGHTS} lacks {e.args[0]}") from None
    return updates, cfg["bits"], cfg["group_size"], "L4Q step sizes"


# ---------------------------------------------------------------- loading

def is_quantized_export(path: str | Path) -> bool:
    return (Path(path) / QUANT_CONFIG).is_file()


def read_quant_config(folder: Path) -> dict:
    """The export's quantization.json, checked: a ModelError naming the key that is not what
    `lowmem export --quantized` writes."""
    from lowmem.lora import read_folder_json

    path = Path(folder) / QUANT_CONFIG
    meta = read_folder_json(folder, QUANT_CONFIG, "a folder written by `lowmem export --quantized`")
    if meta.get("format") != FORMAT or not isinstance(meta.get("version", 0), int) or meta.get("version", 0) > VERSION:
        raise ModelError(f"{path}: format {meta.get('format')} v{meta.get('version')} is not "
                         f"{FORMAT} v{VERSION} or older; upgrade lowmem")
    checks = (("bits", lambda v: v in intk.BITS, f"one of {intk.BITS}"),
              ("group_size", lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
              ("modules", lambda v: isinstance(v, list) and v and all(isinstance(m, str) for m in v),
               "the list of quantized modules"),
              ("scale_dtype", lambda v: v in ("float16", "bfloat16", "float32"), "float16, bfloat16 or float32"))
    for key, ok, expected in checks:
        if key == "scale_dtype" and key not in meta:
            continue
        if not ok(meta.get(key)):
            raise ModelError(f"{path}: '{key}' must be {expected}; found {meta.get(key)!r}: the export is damaged")
    return meta


def load_quantized_export(folder: str | Path, device: str = "cpu",
                          compute_dtype: torch.dtype = torch.float32, *, materialize: bool = False):
    """(model, tokenizer or None) from a `lowmem-intk` folder, quantized layers as IntKLinear.

    The layers keep only their packed codes and dequantize at each forward;
    `materialize=True` dequantizes once instead (same numbers, more memory, faster).
    """
    from lowmem.quant.skeleton import empty_model, finish, read_tensors, set_tensor, shard_files

    folder = Path(folder)
    meta = read_quant_config(folder)
    bits, group = meta["bits"], meta["group_size"]
    modules = set(meta["modules"])
    parts: dict[str, dict[str, torch.Tensor]] = {name: {} for name in modules}
    model = empty_model(folder, compute_dtype)
    weights = packed_weights_name(meta.get("version", 1))
    for key, tensor in read_tensors(shard_files(folder, weights)):
        name, _, part = key.rpartition(".")
        if name in modules and part in ("qweight", "scales", "offsets", "bias"):
            parts[name][part] = tensor
        else:
            set_tensor(model, key, tensor.to(compute_dtype) if tensor.is_floating_point() else tensor)
    for name, p in parts.items():
        try:
            old = model.get_submodule(name)
        except AttributeError:
            raise ModelError(f"{folder / QUANT_CONFIG}: lists {name}, which this model does not have: "
                             f"the export is damaged") from None
        if "qweight" not in p or "scales" not in p or (not meta.get("symmetric") and "offsets" not in p):
            raise ModelError(f"{folder}: layer {name} is incomplete in {weights}")
        expected = {"qweight": (old.out_features, -(-old.in_features * bits // 8)),
                    "scales": (old.out_features, intk.num_groups(old.in_features, group))}
        expected["offsets"] = expected["scales"]
        for part, shape in expected.items():
            if part in p and tuple(p[part].shape) != shape:
                raise ModelError(f"{folder}: {name}.{part} is {tuple(p[part].shape)}, but {bits}-bit codes in "
                                 f"groups of {group} need {shape}: {QUANT_CONFIG} and {weights} disagree")
        parent_name, _, child = name.rpartition(".")
        layer = intk.IntKLinear(old.in_features, old.out_features, bits, group, p["qweight"], p["scales"],
                                p.get("offsets"), p.get("bias"), compute_dtype)
        setattr(model.get_submodule(parent_name), child, layer)
    finish(model, device)
    if materialize:
        for m in model.modules():
            if isinstance(m, intk.IntKLinear):
                m.materialize()
    tokenizer = None
    if (folder / "tokenizer_config.json").is_file():
        from lowmem.model import load_tokenizer

        tokenizer = load_tokenizer(folder)
    return model, tokenizer


# ---------------------------------------------------------------- a run directory

def run_adapter(run_dir: Path, warn=lambda message: None) -> tuple[str, str, Path, str]:
    """(model reference, method, adapter folder, why not adapter/) of a LoRA, QLoRA, LoRAM or L4Q
    run directory: run_dir/adapter when the run finished, else the newest valid checkpoint's."""
    from lowmem.checkpoint import run_adapter_folder, run_identity
    from lowmem.lora import ADAPTER_CONFIG
    from lowmem.quant.l4q import L4Q_CONFIG

    run_dir = Path(run_dir)
    model_ref, method = run_identity(run_dir)
    if method not in ("lora", "qlora", "loram", "l4q"):
        raise ModelError(f"{run_dir}: a '{method}' run has no adapter to export; its model is in {run_dir / 'model'}")
    marker = L4Q_CONFIG if method == "l4q" else ADAPTER_CONFIG
    folder, why = run_adapter_folder(run_dir, marker, warn)
    if folder is None:
        raise ModelError(f"{run_dir}: no {marker} in adapter/ or in a usable checkpoint ({why})")
    return model_ref, method, folder, why


def _adapter_origin(run_dir: Path, folder: Path) -> tuple[str, int | None]:
    """Which adapter an export merges: ("step-N", N) for a checkpoint's, ("adapter", the step the
    run last finished at) for the run's own."""
    from lowmem.checkpoint import checkpoint_step
    from lowmem.events import finished_steps

    if folder.parent.parent.name == "checkpoints":
        return folder.parent.name, checkpoint_step(folder.parent)
    if folder.name.startswith("adapter-step-") and folder.name.removeprefix("adapter-step-").isdigit():
        return folder.name, int(folder.name.removeprefix("adapter-step-"))
    steps = finished_steps(run_dir)
    return folder.name, steps[-1] if steps else None


def model_updates(model_dir: Path) -> dict[str, WeightUpdate]:
    """{weight name: no update} for every block projection of the model in `model_dir`: what
    quantizes a full or GaLore run's own model, whose weights are already the trained ones."""
    from lowmem.quant.skeleton import _header, shard_files
    from lowmem.spec import LINEARS

    updates = {}
    for path in shard_files(model_dir):
        for key, info in _header(path)[0].items():
            shape = info.get("shape") if isinstance(info, dict) else None
            if key.endswith(".weight") and key.rsplit(".", 2)[-2] in LINEARS and shape and len(shape) == 2:
                updates[key] = WeightUpdate(torch.zeros(0, shape[1]), torch.zeros(shape[0], 0), 0.0)
    return updates


def _run_and_folder(path: Path) -> tuple[Path, Path | None]:
    """(run directory, the folder of weights to export or None for the run's own): `path` is a
    run directory, or one of its adapter/, adapter-step-N/, model-step-N/ or checkpoints/step-N/
    folders (an earlier end a longer run kept, a checkpoint)."""
    from lowmem.checkpoint import run_holding

    if (path / "config.yaml").is_file():
        return path, None
    folder = path / "adapter" if path.parent.name == "checkpoints" else path
    run = run_holding(folder)
    if run is None:
        raise ModelError(f"{path} is not a run directory (no config.yaml), nor an adapter-step-N, model-step-N "
                         f"or checkpoints/step-N folder of one")
    return run, folder


def _has_adapter(folder: Path, method: str) -> None:
    from lowmem.lora import ADAPTER_CONFIG
    from lowmem.quant.l4q import L4Q_CONFIG

    marker = L4Q_CONFIG if method == "l4q" else ADAPTER_CONFIG
    if method not in ("lora", "qlora", "loram", "l4q"):
        raise ModelError(f"{folder}: a '{method}' run has no adapter to export")
    if not (folder / marker).is_file():
        raise ModelError(f"{folder}: no {marker} here; a {method} run's adapter folder holds one")


def _trained_model(run_dir: Path, method: str, given: Path | None, merged: Path | None,
                   group: int | None) -> tuple[Path, dict[str, WeightUpdate], int | None]:
    """(model folder, its updates (none: model_updates), the step it ends) of a full or GaLore
    run: run_dir/model, or `given`, a model-step-N it kept. Its block projections are then
    quantized round-to-nearest, the same outputs as an adapter run's from weights already merged."""
    from lowmem.events import finished_steps

    model_dir = given or run_dir / "model"
    if merged is not None:
        raise ValueError(f"a {method} run's model is a full model already, with nothing to merge: {model_dir}")
    if given is not None and not model_dir.name.startswith("model"):
        raise ModelError(f"{model_dir}: a {method} run's checkpoints hold its weights for resuming, not a model "
                         f"to export; export its model/ (or a model-step-N/ it kept)")
    if not (model_dir / "config.json").is_file():
        raise ModelError(f"{run_dir}: a {method} run writes its model to {model_dir} when it finishes, and it has "
                         f"not: finish it (lowmem train --resume {run_dir}), then export")
    updates = model_updates(model_dir)
    if not updates:
        raise ModelError(f"{model_dir}: its safetensors hold no block projection (q_proj, ..., down_proj) "
                         f"to quantize")
    _check_group(updates, group)
    if model_dir.name.startswith("model-step-"):
        return model_dir, updates, int(model_dir.name.removeprefix("model-step-"))
    steps = finished_steps(run_dir)
    return model_dir, updates, steps[-1] if steps else None


def export_run(run_dir: Path, *, quantized: Path | None = None, dequantized: Path | None = None,
               merged: Path | None = None, bits: int | None = None, group: int | None = None,
               dtype: torch.dtype = torch.bfloat16, log=print) -> list[Path]:
    """Write the asked-for outputs of a run; returns their folders. A full or GaLore run's own
    model is quantized (--quantized, --dequantized; _trained_model).

    `bits`/`group` choose the round-to-nearest quantization of a LoRA/QLoRA/LoRAM run
    (default 4 / 128, float16 scales); an L4Q run exports with the bits, groups and float32
    step sizes it trained, so that with `dtype` float32 it computes what it trained. Every
    output is written in one read of the base from its files, one tensor at a time
    (`export_streamed`), so a 70B base exports in a few GiB of RAM.
    """
    from lowmem.checkpoint import run_identity
    from lowmem.model import resolve_model_dir

    run_dir, given = _run_and_folder(Path(run_dir))
    method = run_identity(run_dir)[1]
    if method in ("full", "galore"):
        model_dir, updates, step = _trained_model(run_dir, method, given, merged, group)
        folder, checkpoint, how = model_dir, model_dir.name, "round-to-nearest"
        bits, group = bits or 4, group or 128
    else:
        if given is None:
            model_ref, method, folder, why = run_adapter(run_dir, warn=lambda m: log(f"warning: {m}"))
        else:
            model_ref, method, folder, why = *run_identity(run_dir), given, ""
            _has_adapter(folder, method)
        if why:
            log(f"{why}: exporting its checkpoint {folder.parent.name}")
        if merged is not None and method == "l4q":
            raise ValueError("an L4Q model is exported quantized or dequantized, not merged unquantized")
        model_dir = resolve_model_dir(model_ref, log)
        checkpoint, step = _adapter_origin(Path(run_dir), folder)
        # The quantization's choices are checked (run_updates) before anything is written.
        if quantized is not None or dequantized is not None:
            updates, bits, group, how = run_updates(folder, method, bits, group)
        else:
            updates, how = adapter_updates(folder), None

    def about(output: str) -> dict:
        return {"run": str(Path(run_dir).resolve()), "method": method, "checkpoint": checkpoint,
                "step": step, "output": output, "dtype": _name(dtype)}

    source = {"run": str(run_dir), "method": method, "quantizer": how, "checkpoint": checkpoint, "step": step}
    # One read of the base writes every output; all of them are written, or none (_write_folders).
    # L4Q's learned step sizes and offsets are kept as trained: float16 would move its grid,
    # and the model would no longer be the one trained. Min-max ones are float16.
    written = export_streamed(model_dir, updates, folder, merged=merged, quantized=quantized,
                              dequantized=dequantized, bits=bits or 4, group=group or 128, dtype=dtype,
                              scale_dtype=torch.float32 if method == "l4q" else torch.float16,
                              meta_source=source, about=about, log=log)
    if merged is not None:
        log(f"merged model (Hugging Face, {_name(dtype)}) written to {merged}")
    if quantized is not None:
        log(f"{bits}-bit model ({how}, groups of {group}) written to {quantized}")
    if dequantized is not None:
        log(f"dequantized {bits}-bit model (Hugging Face, {_name(dtype)}) written to {dequantized}")
    return written
