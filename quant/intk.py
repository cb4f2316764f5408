"""Low-bit integer weights with one step size (and offset) per group: the reference math.

A weight W (out × in) is cut into groups of `g` consecutive weights along the
input dimension (G = ⌈in/g⌉ groups per row; the last one is shorter when g
does not divide `in`). Each group j of row o has a step size s[o, j] and an
offset β[o, j] (β ≡ 0 when symmetric). With b bits and

    Qn = −2^(b−1),  Qp = 2^(b−1) − 1

a weight is stored as the integer code and read back as

    q = clamp(round((w − β) / s), Qn, Qp)          (round half to even, as torch.round)
    ŵ = q · s + β

This module is the one place that defines grouping, codes and their packing;
L4Q's training-time fake quantization (lowmem.quant.l4q), round-to-nearest
quantization for export, and the exported model's inference layer all call it,
so a model exported from L4Q reproduces the weights it was trained with.

Packing (the exported `qweight`): codes are stored unsigned, u = q − Qn in
[0, 2^b − 1], as a little-endian bit stream per row: code i of a row occupies
bits i·b … i·b + b − 1 of that row, bit k of the stream is bit (k mod 8) of
byte ⌊k/8⌋. Each row is padded with zero bits to a whole byte, so a row takes
⌈in·b/8⌉ bytes. 2-, 4- and 8-bit codes never straddle a byte; 3-bit ones do
(eight codes fill three bytes).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

BITS = (2, 3, 4, 8)


def bounds(bits: int) -> tuple[int, int]:
    """(Qn, Qp) = (−2^(b−1), 2^(b−1) − 1)."""
    if bits not in BITS:
        raise ValueError(f"bits must be one of {BITS}, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def num_groups(in_features: int, group: int) -> int:
    return math.ceil(in_features / group)


def group_sizes(in_features: int, group: int) -> torch.Tensor:
    """Weights per group along a row, shape (G,): g everywhere, the remainder in the last."""
    sizes = torch.full((num_groups(in_features, group),), group, dtype=torch.float32)
    sizes[-1] = in_features - group * (len(sizes) - 1)
    return sizes


def grouped(t: torch.Tensor, group: int) -> torch.Tensor:
    """(out, in) → (out, G, g). A view when g divides `in`; else a zero-padded copy."""
    out_f, in_f = t.shape
    pad = num_groups(in_f, group) * group - in_f
    if pad:
        t = F.pad(t, (0, pad))
    return t.view(out_f, -1, group)


def ungrouped(t: torch.Tensor, in_features: int) -> torch.Tensor:
    """(out, G, g) → (out, in), dropping the padding (a view)."""
    return t.reshape(t.shape[0], -1)[:, :in_features]


@torch.no_grad()
def minmax_params(w: torch.Tensor, bits: int, group: int, symmetric: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Step sizes (out, G) and offsets (out, G) (None when symmetric) that map each
    group's range onto the codes without clipping, in fp32.

        asymmetric:  s = (max − min) / (Qp − Qn),   β = min − Qn·s   (min ↦ Qn, max ↦ Qp)
        symmetric:   s = max(|min|/|Qn|, max/Qp),   β = 0

    Quantizing with these is round-to-nearest (RTN) quantization; L4Q starts from them.
    """
    qn, qp = bounds(bits)
    wg = grouped(w.float(), group)
    # The padding is zeros; keep it out of min/max by filling it with each group's first weight.
    in_f = w.shape[1]
    pad = wg.shape[1] * group - in_f
    if pad:  # grouped() padded a copy, so writing into it leaves `w` alone
        wg[:, -1, group - pad:] = wg[:, -1, :1]
    lo, hi = wg.amin(dim=-1), wg.amax(dim=-1)
    tiny = torch.finfo(torch.float32).tiny * 1e6   # a constant group gets a step that is not zero
    if symmetric:
        step = torch.maximum(lo.abs() / -qn, hi.clamp(min=0) / qp).clamp(min=tiny)
        return step, None
    step = ((hi - lo) / (qp - qn)).clamp(min=tiny)
    return step, lo - qn * step


def codes(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, bits: int,
          group: int) -> torch.Tensor:
    """Integer codes q = clamp(round((w − β)/s), Qn, Qp), shape (out, in), int8, computed in fp32
    (fp64 for fp64 weights), exactly as L4Q's fake quantization computes them."""
    qn, qp = bounds(bits)
    dtype = torch.promote_types(w.dtype, torch.float32)
    v = grouped(w.to(dtype), group).clone()
    if offset is not None:
        v -= offset.to(dtype).unsqueeze(-1)
    v /= step.to(dtype).unsqueeze(-1)
    v.round_().clamp_(qn, qp)
    return ungrouped(v, w.shape[1]).to(torch.int8)


def dequantize(q: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, group: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """ŵ = q · s + β, shape (out, in), computed in fp32 and returned in `dtype`."""
    in_f = q.shape[1]
    w = grouped(q.float(), group) * step.float().unsqueeze(-1)
    if offset is not None:
        w += offset.float().unsqueeze(-1)
    return ungrouped(w, in_f).to(dtype)


# ---------------------------------------------------------------- packing

def _chunk(bits: int) -> tuple[int, int]:
    """(codes, bytes) of the smallest whole-byte run: 2-bit 4→1, 3-bit 8→3, 4-bit 2→1, 8-bit 1→1."""
    codes = 8 // math.gcd(bits, 8)
    return codes, codes * bits // 8


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Signed codes (out, in) → packed uint8 (out, ⌈in·bits/8⌉), layout in the module docstring.

    Codes go in runs that fill whole bytes (eight 3-bit codes in three bytes):
    a run's codes are summed into one integer, u_j << (bits·j), whose
    little-endian bytes are the run's bytes; this is the bit stream itself.
    """
    qn, _ = bounds(bits)
    rows, n = q.shape
    per, nb = _chunk(bits)
    u = F.pad(q.to(torch.int32) - qn, (0, -n % per)).view(rows, -1, per)      # [0, 2^b − 1]
    shifts = torch.arange(per, device=q.device, dtype=torch.int32) * bits
    run = (u << shifts).sum(-1, dtype=torch.int32)                              # < 2^24
    byte_shifts = torch.arange(nb, device=q.device, dtype=torch.int32) * 8
    packed = ((run.unsqueeze(-1) >> byte_shifts) & 0xFF).to(torch.uint8).view(rows, -1)
    return packed[:, :math.ceil(n * bits / 8)].contiguous()


def unpack(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Packed uint8 (out, ⌈in·bits/8⌉) → signed codes (out, in), int8."""
    qn, _ = bounds(bits)
    rows, _ = packed.shape
    per, nb = _chunk(bits)
    runs = math.ceil(in_features / per)
    p = F.pad(packed.to(torch.int32), (0, runs * nb - packed.shape[1])).view(rows, runs, nb)
    byte_shifts = torch.arange(nb, device=packed.device, dtype=torch.int32) * 8
    run = (p << byte_shifts).sum(-1, dtype=torch.int32)
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    u = (run.unsqueeze(-1) >> shifts) & (2**bits - 1)
    return (u.view(rows, -1)[:, :in_features] + qn).to(torch.int8)


def packed_bytes(out_features: int, in_features: int, bits: int, group: int,
                 symmetric: bool = False, scale_bytes: int = 2) -> int:
    """Bytes of one exported weight: out·⌈in·b/8⌉ codes + (1 or 2)·out·G·scale_bytes."""
    per_group = 1 if symmetric else 2
    return (out_features * math.ceil(in_features * bits / 8)
            + per_group * out_features * num_groups(in_features, group) * scale_bytes)


class IntKLinear(nn.Module):
    """A linear layer that runs from packed b-bit codes: y = x ŵᵀ + bias, ŵ = q·s + β.

    Buffers: `qweight` uint8 (out, ⌈in·b/8⌉), `scales` (out, G), `offsets`
    (out, G) unless symmetric, `bias` (out,) if any. The weight is unpacked
    and dequantized at every forward (only codes stay resident); call
    `materialize()` to keep the dequantized weight instead (faster: about 6x for a token of
    smollm2-135m on the CPU; memory of the dense weight instead of the codes).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group: int,
                 qweight: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                 bias: torch.Tensor | None = None, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group = bits, group
        self.symmetric = offsets is None
        self.compute_dtype = compute_dtype
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", bias)
        self.weight: torch.Tensor | None = None

    @torch.no_grad()
    def materialize(self) -> None:
        """Dequantize once and keep the weight, dropping the codes (and scales) it came from."""
        self.weight = self.dequantized_weight()
        self.qweight = self.scales = self.offsets = None

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.qweight is None:            # materialized: the codes are gone
            return self.weight.to(dtype or self.compute_dtype)
        q = unpack(self.qweight, self.bits, self.in_features)
        return dequantize(q, self.scales, self.offsets, self.group, dtype or self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight if self.weight is not None else self.dequantized_weight()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, w.to(x.dtype), bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, symmetric={self.symmetric}, materialized={self.qweight is None}")
