"""One step of 8-bit AdamW over a chunk of a tensor: a fused CUDA kernel and its PyTorch reference.

The moments are kept as bitsandbytes' AdamW8bit keeps them: M in the signed
dynamic map, V in the unsigned one (256 ascending code values each), one fp32
absmax per block of BLOCK = 256 values, a value being qmap[code] · absmax. A step
of the chunk's gradient g on its weight w (lowmem.galore calls it per tensor,
a chunk of whole blocks at a time):

    M, V = dequantize(codes1, absmax1), dequantize(codes2, absmax2)
    M ← β1·M + (1−β1)·g,  V ← β2·V + (1−β2)·g²
    w ← w·(1 − lr·λ) − lr/(1−β1ᵗ) · M / (√V/√(1−β2ᵗ) + ε)
    absmax1, absmax2 = max |M|, max V over each block (exact)
    codes1 = the code of M/absmax1 nearest to it
    codes2 = one of the two codes around V/absmax2, the upper with the probability of
             its distance from the lower (stochastic rounding; `v_noise` None: nearest),
             but never the zero code for a V above zero: beside a nonzero M that would
             make the next update M/ε
    w, when bf16, rounded stochastically as lowmem.rounding does (`w_noise`)

Why V is rounded stochastically (bitsandbytes rounds it to nearest): with
β2 = 0.999 a step moves V by at most 0.1%, less than half the gap between two
codes (0.35% to 17% of the value), so rounded to nearest V can fall only when its
block's largest value falls: an element whose gradients shrink while its block's
largest stays keeps V high for good, and its updates stay small (measured: V̂
11.9× fp32 AdamW's after 3000 steps; rounded stochastically 1.00×). M moves by up
to 10% a step, more than half a gap; rounded stochastically its noise goes into
the update's direction (measured on a small task: a loss 5-10% above fp32
AdamW's, against 6-20% below it with M to nearest), so it keeps the nearest code.
The figures: BENCHMARKS.md, `benchmarks/adam8bit_moments.py`.

Why a kernel. The reference makes fp32 copies of the chunk's moments and
their neighbouring codes: 28 bytes of temporaries a value with the noise (32
with bf16 weights), and a dozen passes over memory. The kernel reads each code, gradient
and weight once and writes them once; its only temporaries are the noise
(4 bytes a value, 8 with bf16 weights), drawn by the caller from the same
generator in the same order as the reference draws it, so the two agree.

Kernel layout. One block of 256 threads per block of 256 values: each thread
dequantizes and updates its value, the block reduces both absmaxes in shared
memory, then each thread finds its codes by binary search in the maps (held in
shared memory). Arithmetic uses explicit round-to-nearest operations, so no
fused multiply-add changes a rounding; the reference's torch ops may fuse or
order theirs differently, so a value within an ulp of a code boundary can take
the neighbouring code (tests/test_kernels_adam8bit.py states the tolerance).

Supported: gradient fp32 or bf16, weight fp32 or bf16, contiguous; other dtypes or
layouts run the reference. Codes (uint8), absmaxes and maps (fp32) of another dtype or
shape are a KernelError: the optimizer makes them, so that is a bug, not a fallback.
A NaN moment (a non-finite gradient, which the trainer does not apply) differs: the
reference's absmax becomes NaN, the kernel's max skips it.
"""

from __future__ import annotations

import functools
import math

import torch

from lowmem.kernels.runtime import DTYPE_CODE, DTYPE_NAMES, DTYPE_STRUCTS, Source, check_tensor, dispatch, launch
from lowmem.rounding import round_stochastically_

BLOCK = 256            # values per absmax block (bitsandbytes' blockwise optimizers); threads per block
WHAT = "8-bit AdamW step"

CUDA_SOURCE = DTYPE_CODE + r"""
// lowmem.kernels.adam8bit: one fused step of blockwise 8-bit AdamW (see the module docstring).
#define BLOCK 256

// The first index of the ascending 256-entry map whose value is >= y, clamped to [1, 255].
__device__ __forceinline__ int upper_code(const float* map, float y) {
    int lo = 0, hi = 256;
    while (lo < hi) {
        const int mid = (lo + hi) >> 1;
        if (map[mid] < y) lo = mid + 1; else hi = mid;
    }
    return lo < 1 ? 1 : (lo > 255 ? 255 : lo);
}

// The code of y (already divided by its block's absmax): the lower or upper neighbour, the upper
// when y's position between them is > `threshold` (0.5 less a hair: nearest; noise: stochastic).
__device__ __forceinline__ unsigned char code_of(const float* map, float y, float noise, bool stochastic) {
    y = fminf(fmaxf(y, map[0]), map[255]);
    const int up = upper_code(map, y);
    const float low = map[up - 1];
    const float frac = __fdiv_rn(__fsub_rn(y, low), __fsub_rn(map[up], low));
    // Stochastically, a value above zero never rounds to a zero code: a V of 0 beside a nonzero M
    // would make the next update M/ε.
    const bool down = stochastic ? frac <= noise && !(low == 0.f && frac > 0.f) : frac < 0.5f;
    return (unsigned char)(down ? up - 1 : up);
}

template <class W, class G>
__device__ __forceinline__ void step_body(const typename G::T* __restrict__ grad, typename W::T* __restrict__ weight,
                                          unsigned char* __restrict__ codes1, unsigned char* __restrict__ codes2,
                                          float* __restrict__ absmax1, float* __restrict__ absmax2,
                                          const float* __restrict__ qmap1, const float* __restrict__ qmap2,
                                          const float* __restrict__ v_noise, const int* __restrict__ w_noise,
                                          int n, float beta1, float one_minus_beta1, float beta2,
                                          float one_minus_beta2, float eps, float decay, float step_size,
                                          float bias2_sqrt) {
    __shared__ float map1[256], map2[256], max1[BLOCK], max2[BLOCK];
    const int t = threadIdx.x;
    const long long i = (long long)blockIdx.x * BLOCK + t;
    const bool live = i < n;
    map1[t] = qmap1[t];
    map2[t] = qmap2[t];
    float m = 0.f, v = 0.f;
    if (live) {
        const float g = G::load(grad, i);
        m = __fmul_rn(qmap1[codes1[i]], absmax1[blockIdx.x]);
        v = __fmul_rn(qmap2[codes2[i]], absmax2[blockIdx.x]);
        m = __fadd_rn(__fmul_rn(m, beta1), __fmul_rn(one_minus_beta1, g));
        v = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(one_minus_beta2, g), g));
        const float denom = __fadd_rn(__fdiv_rn(sqrtf(v), bias2_sqrt), eps);
        float w = W::load(weight, i);
        if (decay != 1.f) w = __fmul_rn(w, decay);
        w = __fsub_rn(w, __fmul_rn(step_size, __fdiv_rn(m, denom)));
        if (w_noise != nullptr) {      // bf16: up or down with the probability of the dropped bits
            const unsigned u = (__float_as_uint(w) + (unsigned)w_noise[i]) & 0xffff0000u;
            w = __uint_as_float(u);
        }
        W::store(weight, i, w);
    }
    max1[t] = fabsf(m);
    max2[t] = v;
    __syncthreads();
    for (int s = BLOCK / 2; s > 0; s >>= 1) {
        if (t < s) {
            max1[t] = fmaxf(max1[t], max1[t + s]);
            max2[t] = fmaxf(max2[t], max2[t + s]);
        }
        __syncthreads();
    }
    const float a1 = max1[0], a2 = max2[0];
    if (live) {
        codes1[i] = code_of(map1, __fdiv_rn(m, a1 > 0.f ? a1 : 1.f), 0.f, false);
        codes2[i] = code_of(map2, __fdiv_rn(v, a2 > 0.f ? a2 : 1.f), v_noise ? v_noise[i] : 0.f, v_noise != nullptr);
    }
    if (t == 0) {
        absmax1[blockIdx.x] = a1;
        absmax2[blockIdx.x] = a2;
    }
}

#define ADAM8BIT_KERNEL(WN, WT, GN, GT)                                                                \
extern "C" __global__ void __launch_bounds__(BLOCK) adam8bit_step_##WN##_##GN(                        \
        const GT::T* grad, WT::T* weight, unsigned char* codes1, unsigned char* codes2,                \
        float* absmax1, float* absmax2, const float* qmap1, const float* qmap2,                        \
        const float* v_noise, const int* w_noise, int n, float beta1, float one_minus_beta1,           \
        float beta2, float one_minus_beta2, float eps, float decay, float step_size, float bias2_sqrt) { \
    step_body<WT, GT>(grad, weight, codes1, codes2, absmax1, absmax2, qmap1, qmap2, v_noise, w_noise,  \
                      n, beta1, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size,         \
                      bias2_sqrt);                                                                     \
}

"""

DTYPES = (torch.float32, torch.bfloat16)


@functools.lru_cache(maxsize=None)
def source(weight: torch.dtype, grad: torch.dtype) -> Source:
    """The step kernel for a weight and a gradient of these dtypes (one module per pair)."""
    w, g = DTYPE_NAMES[weight], DTYPE_NAMES[grad]
    return Source(name=f"adam8bit_{w}_{g}",
                  code=CUDA_SOURCE + f"ADAM8BIT_KERNEL({w}, {DTYPE_STRUCTS[weight]}, {g}, {DTYPE_STRUCTS[grad]})\n",
                  kernels=(f"adam8bit_step_{w}_{g}",))


SOURCES = tuple(source(w, g) for w in DTYPES for g in DTYPES)


# ---------------------------------------------------------------- reference (CPU, tests, fallback)

def _by_block(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of flat `values`: its whole blocks as rows of BLOCK, and the partial last block
    (empty when there is none; the last absmax is then a whole block's, and an op on the empty
    view does nothing)."""
    full = values.numel() // BLOCK * BLOCK
    return values[:full].view(-1, BLOCK), values[full:]


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor) -> torch.Tensor:
    """fp32 values of blockwise 8-bit codes: qmap[code] · absmax of the code's block of BLOCK."""
    values = qmap[codes.int()]
    blocks, tail = _by_block(values)
    blocks.mul_(absmax[:len(blocks), None])
    tail.mul_(absmax[-1])
    return values


def quantize_(values: torch.Tensor, codes: torch.Tensor, absmax: torch.Tensor, qmap: torch.Tensor,
              noise: torch.Tensor | None) -> None:
    """codes, absmax ← blockwise 8-bit `values` (fp32, overwritten), each rounded to one of the two
    code values around it: the upper when its position between them is above `noise` (uniform
    in [0, 1): stochastic, unbiased, except that a value above zero never takes a zero code), or
    above ½ (None: the nearest). `qmap` must be ascending (bitsandbytes' dynamic maps are). absmax is each block's largest |value|, exact; a value
    beyond the map's ends (−1 under the signed map, whose lowest code is −0.993) takes the end code."""
    blocks, tail = _by_block(values)
    absmax[:len(blocks)] = blocks.abs().amax(1)
    if tail.numel():
        absmax[-1] = tail.abs().amax()
    scale = torch.where(absmax > 0, absmax, torch.ones_like(absmax))
    blocks.div_(scale[:len(blocks), None])
    tail.div_(scale[-1])
    del scale, blocks, tail
    values.clamp_(qmap[0], qmap[-1])
    upper = torch.searchsorted(qmap, values, out_int32=True).clamp_(1, qmap.numel() - 1)
    high = qmap[upper]
    low = qmap[upper - 1]
    values.sub_(low).div_(high.sub_(low))        # the value's position between its codes, 0 to 1
    del high
    if noise is None:
        down = values < 0.5
    else:
        # A value above zero never rounds to a zero code: a V of 0 beside a nonzero M would make
        # the next update M/ε (measured: update RMS 2000-9000x fp32 Adam's where values span 10⁶).
        down = (values <= noise) & ~((low == 0) & (values > 0))
    del low
    upper.sub_(down.int())
    codes.copy_(upper)


def adam8bit_step_reference(grad: torch.Tensor, weight: torch.Tensor, codes1: torch.Tensor, codes2: torch.Tensor,
                            absmax1: torch.Tensor, absmax2: torch.Tensor, qmaps: tuple, step: int, lr: float,
                            betas: tuple[float, float], eps: float, weight_decay: float,
                            v_noise: torch.Tensor | None, w_noise: torch.Tensor | None) -> None:
    """The step of the module docstring on flat tensors of one chunk, in PyTorch; `weight` (fp32
    or bf16) is updated in place, bf16 rounded with `w_noise` (int32 in [0, 2¹⁶); None: to nearest)."""
    b1, b2 = betas
    g = grad.float()
    m = dequantize(codes1, absmax1, qmaps[0])
    v = dequantize(codes2, absmax2, qmaps[1])
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    del g
    denom = (v.sqrt() / math.sqrt(1 - b2**step)).add_(eps)
    w = weight.float()
    if weight_decay:
        w.mul_(1 - lr * weight_decay)
    w.addcdiv_(m, denom, value=-lr / (1 - b1**step))
    del denom
    if w_noise is not None:
        round_stochastically_(w, w_noise)
    if w.data_ptr() != weight.data_ptr():
        weight.copy_(w)
    del w
    quantize_(m, codes1, absmax1, qmaps[0], None)
    del m
    quantize_(v, codes2, absmax2, qmaps[1], v_noise)


# ---------------------------------------------------------------- the kernel and the dispatch

def _unsupported(grad: torch.Tensor, weight: torch.Tensor) -> str | None:
    for name, t in (("gradient", grad), ("weight", weight)):
        if t.dtype not in DTYPES:
            return f"a {name} in {t.dtype} (the kernel takes float32 or bfloat16)"
        if not t.is_contiguous():
            return f"a non-contiguous {name}"
    if grad.numel() >= 2**31:
        return f"a chunk of {grad.numel():,} values (the kernel indexes with 32-bit ints)"
    return None


def adam8bit_step_cuda(grad, weight, codes1, codes2, absmax1, absmax2, qmaps, step, lr, betas, eps,
                       weight_decay, v_noise, w_noise) -> None:
    """The fused kernel: the reference's arguments, on flat CUDA tensors of one chunk."""
    n = grad.numel()
    blocks = math.ceil(n / BLOCK)
    name = f"adam8bit_step_{DTYPE_NAMES[weight.dtype]}_{DTYPE_NAMES[grad.dtype]}"
    check_tensor(grad, "grad", dtypes=DTYPES, shape=(n,), kernel=name)
    check_tensor(weight, "weight", dtypes=DTYPES, shape=(n,), device=grad.device, kernel=name)
    for label, t in (("codes1", codes1), ("codes2", codes2)):
        check_tensor(t, label, dtypes=(torch.uint8,), shape=(n,), device=grad.device, kernel=name)
    for label, t in (("absmax1", absmax1), ("absmax2", absmax2)):
        check_tensor(t, label, dtypes=(torch.float32,), shape=(blocks,), device=grad.device, kernel=name)
    for label, t in (("qmap1", qmaps[0]), ("qmap2", qmaps[1])):
        check_tensor(t, label, dtypes=(torch.float32,), shape=(256,), device=grad.device, kernel=name)
    if v_noise is not None:
        check_tensor(v_noise, "v_noise", dtypes=(torch.float32,), shape=(n,), device=grad.device, kernel=name)
    if w_noise is not None:
        check_tensor(w_noise, "w_noise", dtypes=(torch.int32,), shape=(n,), device=grad.device, kernel=name)
    b1, b2 = betas
    if n:
        launch(source(weight.dtype, grad.dtype), name, (blocks, 1, 1), (BLOCK, 1, 1),
               [grad, weight, codes1, codes2, absmax1, absmax2, qmaps[0], qmaps[1], v_noise, w_noise, n,
                float(b1), float(1 - b1), float(b2), float(1 - b2), float(eps),
                float(1 - lr * weight_decay) if weight_decay else 1.0, float(lr / (1 - b1**step)),
                float(math.sqrt(1 - b2**step))], 0, grad.device)


def adam8bit_step_(grad: torch.Tensor, weight: torch.Tensor, codes1: torch.Tensor, codes2: torch.Tensor,
                   absmax1: torch.Tensor, absmax2: torch.Tensor, qmaps: tuple, step: int, lr: float,
                   betas: tuple[float, float], eps: float, weight_decay: float,
                   gen: torch.Generator | None, stochastic: bool = True) -> None:
    """One chunk's step (flat tensors; the chunk starts a block), the kernel on CUDA where kernels
    run, else the reference. `gen` draws V's noise (if `stochastic`), then a bf16 weight's: the
    same draws in the same order either way, so a resumed run steps as the uninterrupted one.
    Without `gen` both are rounded to nearest."""
    n = grad.numel()
    v_noise = w_noise = None
    if gen is not None and stochastic:
        v_noise = torch.rand(n, device=grad.device, generator=gen)
    if gen is not None and weight.dtype == torch.bfloat16:
        w_noise = torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device=grad.device, generator=gen)
    args = (grad, weight, codes1, codes2, absmax1, absmax2, qmaps, step, lr, betas, eps, weight_decay,
            v_noise, w_noise)
    dispatch(WHAT, grad, lambda: adam8bit_step_cuda(*args), lambda: adam8bit_step_reference(*args),
             _unsupported(grad, weight))
