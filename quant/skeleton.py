"""A model without weights, filled tensor by tensor from safetensors files.

`empty_model` builds the module tree on the meta device (accelerate's
`init_empty_weights`: parameters take no memory; buffers such as rotary
frequencies stay real). `read_tensors` yields one tensor at a time, shard by
shard, so a caller can convert or quantize each one and drop it before the
next is read.

Why not `safetensors.safe_open`: it memory-maps the shard and hands out
tensors backed by the mapping, and every page read stays in the process's
resident set until the shard is closed, so quantizing a 5 GB shard tensor by
tensor still costs 5 GB of RSS (measured: +410 MB of file-backed RSS for the
embedded 538 MB model). The format is simple enough to read directly: an
8-byte little-endian header length, a JSON header mapping each name to its
dtype, shape and byte range, then the raw little-endian data. Each tensor is
read into a buffer of its own, which is freed when the caller drops it. `set_tensor` puts a tensor in place; `finish`
ties shared weights, checks nothing is left on the meta device and moves the
buffers to the device.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import nn

from lowmem.errors import ModelError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def shard_files(model_dir: Path, single: str = SINGLE) -> list[Path]:
    """The model's safetensors files, in the order the index lists them: `single` (model.safetensors)
    or the shards its index (`single` + ".index.json") names."""
    model_dir = Path(model_dir)
    index = model_dir / f"{single}.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / f for f in dict.fromkeys(weight_map.values())]
    if (model_dir / single).is_file():
        return [model_dir / single]
    if single == SINGLE and any(model_dir.glob("pytorch_model*.bin")):
        raise ModelError(f"{model_dir} holds PyTorch .bin weights, which lowmem cannot read one tensor at a "
                         f"time; write a safetensors copy once (it loads the whole model into RAM): python -c "
                         f"\"from transformers import AutoModelForCausalLM as M; "
                         f"M.from_pretrained('{model_dir}', dtype='auto').save_pretrained('{model_dir}-st')\"")
    raise ModelError(f"{model_dir}: no {single} or {index.name}; expected a Hugging Face safetensors model")


def hf_config(model_dir: Path):
    """The transformers config of `model_dir`; ModelError naming the folder when it cannot be read."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read the config in {model_dir}: {str(e).splitlines()[0]}") from None


def empty_model(model_dir: Path, dtype: torch.dtype) -> nn.Module:
    """The causal LM of `model_dir`'s config.json, parameters on the meta device."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    config = hf_config(model_dir)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=dtype)


def checkpoint_keys(model: nn.Module) -> set[str]:
    """The tensor names a checkpoint may set in `model`: its parameters and persistent buffers.
    A non-persistent buffer (rotary inv_freq) is computed from the config, so an old
    checkpoint's copy is not one of them; transformers' loader drops such tensors too."""
    return set(model.state_dict(keep_vars=True))


def left_out_note(model_dir: Path, skipped: list[str]) -> str:
    """What a loader says of the checkpoint tensors it left out (not in checkpoint_keys)."""
    return f"{model_dir}: left out {len(skipped)} tensors the model does not define, e.g. {skipped[0]}"


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of one small safetensors file (an adapter), or a ModelError naming the
    file when it is missing, cut short or not safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        bin_file = path.with_suffix(".bin")
        if bin_file.is_file():
            raise ModelError(f"{path.parent}: the tensors are in {bin_file.name}, a pickle lowmem does not read; "
                             f"save them as {path.name} (PEFT: save_pretrained(folder, safe_serialization=True))")
        raise ModelError(f"{path.parent}: no {path.name} here")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise ModelError(f"{path} cannot be read ({e}): the file is damaged or incomplete") from None


DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _header(path: Path) -> tuple[dict, int]:
    """(tensor entries, offset of the data) of a safetensors file."""
    size = Path(path).stat().st_size
    try:
        with open(path, "rb", buffering=0) as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > size - 8:
                raise ValueError(f"a header of {length} bytes in a file of {size}")
            header = json.loads(f.read(length))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise ModelError(f"{path} is not a safetensors file ({e}): the file is damaged or incomplete") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def _read_one(f, path: Path, key: str, info: dict, start: int) -> torch.Tensor:
    if info["dtype"] not in DTYPES:
        raise ModelError(f"{path}: tensor '{key}' has dtype {info['dtype']}, which lowmem cannot read")
    begin, end = info["data_offsets"]
    buf = torch.empty(end - begin, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    f.seek(start + begin)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ModelError(f"{path} ends inside tensor '{key}'; the file is truncated")
        done += n
    return buf.view(DTYPES[info["dtype"]]).reshape(info["shape"])


def natural_key(name: str) -> tuple:
    """Sort key putting "layers.2." before "layers.10.": digit runs compare as numbers."""
    return tuple(int(part) if part.isdigit() else part for part in name.split("."))


def tensor_entries(files: list[Path]) -> dict[str, tuple[Path, dict, int]]:
    """name → (file, header entry, data start) for every tensor of `files`, headers only."""
    entries = {}
    for path in files:
        header, start = _header(path)
        for key, info in header.items():
            entries[key] = (path, info, start)
    return entries


def read_named(entries: dict[str, tuple[Path, dict, int]],
               names: Iterable[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for each of `names`, in that order, one at a time, on the CPU;
    `entries` from `tensor_entries`."""
    handles: dict[Path, object] = {}
    try:
        for key in names:
            path, info, start = entries[key]
            if path not in handles:
                handles[path] = open(path, "rb", buffering=0)
            yield key, _read_one(handles[path], path, key, info, start)
    finally:
        for f in handles.values():
            f.close()


def read_tensors(files: list[Path], *, in_name_order: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, tensor) for every tensor of every file, one at a time, on the CPU.

    In file order by default (sequential reads). `in_name_order` yields them across
    all files sorted by `natural_key`, so every block's tensors arrive together and
    blocks arrive in order, however the checkpoint was sharded (seeking between files).
    """
    entries = tensor_entries(files)
    if in_name_order:
        names = sorted(entries, key=natural_key)
    else:
        number = {path: i for i, path in enumerate(files)}
        names = sorted(entries, key=lambda k: (number[entries[k][0]], entries[k][1]["data_offsets"][0]))
    yield from read_named(entries, names)


def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):   # not glibc: nothing to do
        return None


_TRIM = _malloc_trim()


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS (glibc `malloc_trim`; a no-op elsewhere).

    Why: glibc raises its mmap threshold after the first large buffer is freed,
    so later multi-MB buffers come from the heap, and the holes they leave
    between small long-lived allocations (the packed weights) are never
    returned. Loading the embedded model tensor by tensor grew the peak RSS
    by 450 MB that way for a 168 MB result; trimming after each dropped weight
    brought it to 206 MB, close to what is really alive.
    """
    if _TRIM is not None:
        _TRIM(0)


def set_tensor(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    """Put `tensor` at parameter or buffer `key` (a float parameter stays trainable-capable)."""
    module_name, _, name = key.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        raise ModelError(f"the checkpoint has tensor '{key}', which this model's config does not "
                         f"define; is config.json from the same model?") from None
    if name in module._parameters:
        old = module._parameters[name]
        if old is not None and old.shape != tensor.shape:
            raise ModelError(f"tensor '{key}' has shape {tuple(tensor.shape)}, the model expects "
                             f"{tuple(old.shape)}")
        module._parameters[name] = nn.Parameter(tensor, requires_grad=tensor.is_floating_point())
    elif name in module._buffers:
        module._buffers[name] = tensor
    else:
        raise ModelError(f"the checkpoint has tensor '{key}', which this model does not define")


def finish(model: nn.Module, device: str) -> nn.Module:
    """Tie shared weights, fail on weights the files did not provide, move buffers to `device`."""
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    missing += [n for n, b in model.named_buffers() if b is not None and b.is_meta]
    if missing:
        raise ModelError(f"the model files lack {len(missing)} tensors, e.g. {missing[0]}")
    model.to(device)
    model.eval()
    return model
