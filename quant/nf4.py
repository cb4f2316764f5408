"""NF4 base weights with double quantization (QLoRA), loaded without a full-precision model.

Paper: Dettmers et al., "QLoRA: Efficient Finetuning of Quantized LLMs" (2023).
Quantization is bitsandbytes' (`quantize_4bit(quant_type="nf4",
compress_statistics=True)`, blocks of 64): each block of 64 weights keeps
4-bit codes into the 16 NF4 levels and one absmax; with double quantization
the absmaxes themselves are 8-bit, blockwise over 256 of them.

    ŵ = NF4[code] · absmax_block              w ≈ ŵ,  |w − ŵ| ≤ ½·(largest NF4 gap)·absmax_block
    y = x ŵᵀ + bias                          compute in bf16 on CUDA, fp32 on the CPU

`NF4Linear` is frozen. Its forward is `bitsandbytes.matmul_4bit`, whose
backward keeps only the packed weight and dequantizes again, so no
full-precision weight is saved for backward; `dequantized_weight()` +
`F.linear` is the reference path (tests hold them equal).

`load_nf4_model` streams: it builds the model on the meta device, then reads
the safetensors files tensor by tensor and quantizes each targeted linear as
it arrives, so host RAM holds at most one full-precision linear weight at a
time beside the parts that stay dense (embeddings, norms, head). On CUDA each
weight is moved to the GPU first and quantized there.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

BLOCKSIZE = 64           # weights per absmax (bitsandbytes' default for NF4)
NESTED_BLOCKSIZE = 256   # absmaxes per second-level absmax under double quantization


class NF4Linear(nn.Linear):
    """A frozen linear layer whose weight is NF4 (bitsandbytes), optionally double-quantized.

    An `nn.Linear` subclass, so `lowmem.lora.apply_lora` wraps it like any
    linear; its `weight` is the packed uint8 codes (a frozen Parameter, as in
    bitsandbytes' Linear4bit), the quantization statistics are buffers, so
    `.to(device)` and `state_dict()` carry everything.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 compute_dtype: torch.dtype = torch.float32, double_quant: bool = True):
        import bitsandbytes.functional as bnbf

        nn.Module.__init__(self)   # not nn.Linear.__init__: it would allocate a dense weight
        self.out_features, self.in_features = weight.shape
        self.compute_dtype = compute_dtype
        self.double_quant = double_quant
        packed, state = bnbf.quantize_4bit(weight.to(compute_dtype), blocksize=BLOCKSIZE,
                                           compress_statistics=double_quant, quant_type="nf4")
        self.weight = nn.Parameter(packed, requires_grad=False)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code)
        if double_quant:
            self.register_buffer("offset", state.offset)
            self.register_buffer("nested_absmax", state.state2.absmax)
            self.register_buffer("nested_code", state.state2.code)
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def quant_state(self):
        """bitsandbytes' QuantState over this module's buffers (rebuilt, so it follows `.to()`)."""
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.double_quant:
            state2 = QuantState(absmax=self.nested_absmax.float(), code=self.nested_code.float(),
                                blocksize=NESTED_BLOCKSIZE, dtype=torch.float32)
        return QuantState(absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
                          code=self.code.float(), blocksize=BLOCKSIZE, quant_type="nf4",
                          dtype=self.compute_dtype,
                          offset=self.offset.float() if self.double_quant else None, state2=state2)

    def dequantized_weight(self) -> torch.Tensor:
        """ŵ (out × in) in the compute dtype."""
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.weight, self.quant_state())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import bitsandbytes as bnb

        dtype = x.dtype
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        y = bnb.matmul_4bit(x.to(self.compute_dtype), self.weight.t(), quant_state=self.quant_state(),
                            bias=bias)
        return y.to(dtype)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dequantize, then a plain linear: what `forward` computes, written out."""
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return F.linear(x.to(self.compute_dtype), self.dequantized_weight(), bias).to(x.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, nf4, double_quant={self.double_quant}")


def _targets_in(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and not isinstance(module, NF4Linear)
            and name.split(".")[-1] in targets]


def quantize_linears(model: nn.Module, targets: tuple[str, ...], compute_dtype: torch.dtype,
                     double_quant: bool = True, device: str | torch.device | None = None) -> list[str]:
    """Replace every dense nn.Linear whose name ends with a target by an NF4Linear, in place.

    Embeddings and the head stay as they are unless named in `targets`. With
    `device`, each weight moves there first and is quantized there, one at a
    time, so a model on the host reaches the GPU without ever being dense on it
    (the rest of the model is left where it is: move it after).
    Returns the replaced names; ValueError when nothing matches.
    """
    from lowmem.lora import replace_linears

    def make(old: nn.Linear) -> NF4Linear:
        weight = old.weight.detach() if device is None else old.weight.detach().to(device)
        bias = old.bias if device is None or old.bias is None else old.bias.detach().to(device)
        return NF4Linear(weight, bias, compute_dtype, double_quant)

    return replace_linears(model, targets, make, skip=NF4Linear, what="targets")


# ---------------------------------------------------------------- streaming load

@dataclass
class LoadStats:
    """What a streaming load read and how much full-precision weight was alive at once.

    `full_precision_peak` counts the bytes of full-precision tensors of
    *targeted* linears alive at the same time, tracked by weak references, so
    a tensor counts until it is really freed, not until the loader says so.
    """

    tensors: int = 0
    bytes_read: int = 0
    quantized: list[str] = field(default_factory=list)
    full_precision_alive: int = 0
    full_precision_peak: int = 0
    largest_target: int = 0

    def track(self, tensor: torch.Tensor) -> None:
        n = tensor.numel() * tensor.element_size()
        self.full_precision_alive += n
        self.full_precision_peak = max(self.full_precision_peak, self.full_precision_alive)
        self.largest_target = max(self.largest_target, n)
        weakref.finalize(tensor, self._freed, n)

    def _freed(self, n: int) -> None:
        self.full_precision_alive -= n


def load_nf4_model(model_dir: Path, device: str, compute_dtype: torch.dtype,
                   targets: tuple[str, ...], *, double_quant: bool = True,
                   stats: LoadStats | None = None, log=None) -> nn.Module:
    """A causal LM from a Hugging Face safetensors folder with its `targets` linears in NF4.

    Weights are read one tensor at a time; a targeted linear's weight is
    quantized on `device` as soon as it arrives and its full-precision copy
    dropped. Every other tensor is cast to `compute_dtype` and kept. Tensors the
    model does not define (an old checkpoint's rotary inv_freq) are left out, as
    the dense loader (lowmem.model.load_streamed) and transformers do, and told
    to `log`. The model is returned in eval mode on `device`.
    """
    from lowmem.errors import ModelError
    from lowmem.quant.skeleton import (checkpoint_keys, empty_model, finish, left_out_note, read_tensors,
                                       release_freed_memory, set_tensor, shard_files)

    stats = stats if stats is not None else LoadStats()
    model = empty_model(model_dir, compute_dtype)
    defined = checkpoint_keys(model)   # before quantization renames the targets' tensors
    wanted = {f"{name}.weight": name for name in _targets_in(model, targets)}
    if not wanted:
        linear = sorted({n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ModelError(f"lora.targets {list(targets)} match no linear layer; this model has {linear}")
    skipped = []
    for key, tensor in read_tensors(shard_files(model_dir)):
        stats.tensors += 1
        stats.bytes_read += tensor.numel() * tensor.element_size()
        if key not in defined:
            skipped.append(key)
            continue
        name = wanted.pop(key, None)
        if name is None:
            set_tensor(model, key, tensor.to(device=device, dtype=compute_dtype)
                       if tensor.is_floating_point() else tensor.to(device))
            continue
        stats.track(tensor)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        on_device = tensor.to(device=device, dtype=compute_dtype)
        if on_device is not tensor:
            stats.track(on_device)
            del tensor   # the host copy goes before quantization allocates
        # A bias read earlier is real by now; one still to come stays meta and is set later.
        setattr(parent, child, NF4Linear(on_device, old.bias, compute_dtype, double_quant))
        stats.quantized.append(name)
        del old, on_device
        tensor = None
        release_freed_memory()
    if wanted:
        raise ModelError(f"{model_dir}: the model files lack {len(wanted)} weights, e.g. {next(iter(wanted))}")
    if skipped and log is not None:
        log(left_out_note(model_dir, skipped))
    return finish(model, device)
