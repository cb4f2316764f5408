"""L4Q's fake quantization: fused CUDA kernels and their PyTorch references.

The math (lowmem.quant.l4q has the derivation): per group of g weights along
the input dimension, with step s, offset β (0 when symmetric), c = α/r,
Qn = −2^(b−1), Qp = 2^(b−1) − 1,

    W  = W0 + c·BA
    v  = (W − β) / s
    Ŵ  = clamp(round(v), Qn, Qp)·s + β                              (forward)

    backward, given G = ∂L/∂Ŵ and γ = 1/√(n_group·Qp):
    ∂L/∂W = G ⊙ [Qn ≤ v ≤ Qp]                                        (STE)
    ∂L/∂s = γ · Σ_group G · (round(v) − v inside, the clamped code outside)
    ∂L/∂β = γ · Σ_group G · [v outside [Qn, Qp]]

What the kernels save. The reference builds W in fp32 (4 bytes per weight),
then the codes, the STE mask and ∂Ŵ/∂s next to it: (4 + c) bytes per weight in
forward and (9 + c) in backward, c the compute dtype's size, for the largest
linear. The kernels read W0, A and B once per group tile, recompute W in
registers and write only what the caller needs: Ŵ in the compute dtype
(forward), or G masked in place plus one step (and offset) gradient per group
(backward). Their temporaries are c bytes per weight in both directions.

Kernel layout. One block covers one group column (g threads, one per input
column) and ROWS consecutive output rows; each thread keeps the rank-r dot
products B[row]·A[:, col] of its rows in registers, with A's column tile and
B's rows staged in shared memory rank-chunk by rank-chunk. Backward reduces
each row's group sums with warp shuffles and one shared-memory pass; the order
is fixed, so results are deterministic. Quantization arithmetic uses explicit
round-to-nearest operations (`__fsub_rn`, `__fdiv_rn`, `__fmul_rn`,
`__fadd_rn`), so no fused multiply-add changes a rounding decision relative to
the reference; the LoRA dot product is summed in a different order from
PyTorch's matmul, so W may differ from the reference's by an ulp and, rarely,
a weight within an ulp of a rounding boundary gets the neighbouring code
(tests/test_kernels.py states the tolerance).

Supported: W0 in fp32, bf16 or fp16; Ŵ and G in fp32, bf16 or fp16; A, B, s,
β in fp32; g ≤ 1024. Anything else runs the reference.
"""

from __future__ import annotations

import functools

import torch

from lowmem.kernels.runtime import DTYPE_CODE, DTYPE_NAMES, DTYPE_STRUCTS, Source, check_tensor, dispatch, launch
from lowmem.quant.intk import bounds, grouped, num_groups, ungrouped

ROWS = 8                       # output rows per block (the kernels' compile-time ROWS)
MAX_GROUP = 1024               # one thread per column of a group
SHARED_FLOATS = 10 * 1024      # dynamic shared memory budget per block (40 KiB)

CUDA_SOURCE = DTYPE_CODE + r"""
// lowmem.kernels.l4q: L4Q fused fake quantization (forward) and its gradients (backward).
#define ROWS 8

// acc[r] = sum_k B[row0 + r, k] * A[k, col] for the block's ROWS rows; every thread of the
// block must call it (it synchronises).
__device__ __forceinline__ void lora_rows(float (&acc)[ROWS], const float* __restrict__ A,
                                          const float* __restrict__ B, int row0, int col, bool active,
                                          int out_f, int in_f, int rank, int chunk) {
    extern __shared__ float smem[];
    const int T = blockDim.x, t = threadIdx.x;
    float* As = smem;                 // chunk x T
    float* Bs = smem + chunk * T;     // ROWS x chunk
#pragma unroll
    for (int r = 0; r < ROWS; ++r) acc[r] = 0.f;
    for (int k0 = 0; k0 < rank; k0 += chunk) {
        const int kc = min(chunk, rank - k0);
        __syncthreads();
        for (int k = 0; k < kc; ++k) As[k * T + t] = active ? A[(long long)(k0 + k) * in_f + col] : 0.f;
        for (int i = t; i < ROWS * kc; i += T) {
            const int r = i / kc, k = i - r * kc, row = row0 + r;
            Bs[r * chunk + k] = row < out_f ? B[(long long)row * rank + k0 + k] : 0.f;
        }
        __syncthreads();
        for (int k = 0; k < kc; ++k) {
            const float a = As[k * T + t];
#pragma unroll
            for (int r = 0; r < ROWS; ++r) acc[r] = fmaf(Bs[r * chunk + k], a, acc[r]);
        }
    }
}

// v = (W - beta) / s and its clamped code, with the reference's roundings.
__device__ __forceinline__ float code_of(float w, float s, float beta, bool has_offset, float qn, float qp,
                                         float* v) {
    *v = __fdiv_rn(has_offset ? __fsub_rn(w, beta) : w, s);
    return fminf(fmaxf(rintf(*v), qn), qp);
}

template <class W, class O>
__device__ __forceinline__ void forward_body(
        const typename W::T* __restrict__ w0, const float* __restrict__ A, const float* __restrict__ B,
        const float* __restrict__ step, const float* __restrict__ offset, typename O::T* __restrict__ out,
        int out_f, int in_f, int rank, int group, int n_groups, float scaling, float qn, float qp, int chunk) {
    const int t = threadIdx.x, j = blockIdx.x, row0 = blockIdx.y * ROWS;
    const int col = j * group + t;
    const bool active = t < group && col < in_f;
    float acc[ROWS];
    lora_rows(acc, A, B, row0, col, active, out_f, in_f, rank, chunk);
    if (!active) return;
    const bool has_offset = offset != nullptr;
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r;
        if (row >= out_f) break;
        const long long gi = (long long)row * n_groups + j, i = (long long)row * in_f + col;
        const float s = step[gi], beta = has_offset ? offset[gi] : 0.f;
        const float w = __fadd_rn(W::load(w0, i), __fmul_rn(scaling, acc[r]));
        float v;
        const float q = code_of(w, s, beta, has_offset, qn, qp, &v);
        float wq = __fmul_rn(q, s);
        if (has_offset) wq = __fadd_rn(wq, beta);
        O::store(out, i, wq);
    }
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

template <class W, class G>
__device__ __forceinline__ void backward_body(
        const typename W::T* __restrict__ w0, const float* __restrict__ A, const float* __restrict__ B,
        const float* __restrict__ step, const float* __restrict__ offset, const float* __restrict__ grad_scale,
        typename G::T* __restrict__ grad, float* __restrict__ grad_step, float* __restrict__ grad_offset,
        int out_f, int in_f, int rank, int group, int n_groups, float scaling, float qn, float qp, int chunk) {
    __shared__ float partial[2][32];
    const int t = threadIdx.x, j = blockIdx.x, row0 = blockIdx.y * ROWS;
    const int col = j * group + t, lane = t & 31, warp = t >> 5, warps = (blockDim.x + 31) >> 5;
    const bool active = t < group && col < in_f;
    const bool has_offset = offset != nullptr;
    float acc[ROWS];
    lora_rows(acc, A, B, row0, col, active, out_f, in_f, rank, chunk);
#pragma unroll
    for (int r = 0; r < ROWS; ++r) {
        const int row = row0 + r;
        if (row0 + r >= out_f) break;                      // uniform across the block
        const long long gi = (long long)row * n_groups + j;
        float d_step = 0.f, d_offset = 0.f;
        if (active) {
            const long long i = (long long)row * in_f + col;
            const float s = step[gi], beta = has_offset ? offset[gi] : 0.f;
            const float w = __fadd_rn(W::load(w0, i), __fmul_rn(scaling, acc[r]));
            float v;
            const float q = code_of(w, s, beta, has_offset, qn, qp, &v);
            const float g = G::load(grad, i);
            const bool inside = v >= qn && v <= qp;
            d_step = __fmul_rn(g, inside ? __fsub_rn(q, v) : q);
            d_offset = inside ? 0.f : g;
            G::store(grad, i, inside ? g : 0.f);
        }
        d_step = warp_sum(d_step);
        d_offset = warp_sum(d_offset);
        if (lane == 0) { partial[0][warp] = d_step; partial[1][warp] = d_offset; }
        __syncthreads();
        if (t == 0) {
            float s0 = 0.f, s1 = 0.f;
            for (int w = 0; w < warps; ++w) { s0 += partial[0][w]; s1 += partial[1][w]; }
            grad_step[gi] = s0 * grad_scale[j];
            if (has_offset) grad_offset[gi] = s1 * grad_scale[j];
        }
        __syncthreads();
    }
}

#define L4Q_KERNELS(WN, WT, ON, OT)                                                                   \
extern "C" __global__ void __launch_bounds__(1024) l4q_forward_##WN##_##ON(                          \
        const WT::T* w0, const float* A, const float* B, const float* step, const float* offset,     \
        OT::T* out, int out_f, int in_f, int rank, int group, int n_groups, float scaling, float qn, \
        float qp, int chunk) {                                                                      \
    forward_body<WT, OT>(w0, A, B, step, offset, out, out_f, in_f, rank, group, n_groups, scaling,  \
                         qn, qp, chunk);                                                            \
}                                                                                                   \
extern "C" __global__ void __launch_bounds__(1024) l4q_backward_##WN##_##ON(                         \
        const WT::T* w0, const float* A, const float* B, const float* step, const float* offset,     \
        const float* grad_scale, OT::T* grad, float* grad_step, float* grad_offset, int out_f,       \
        int in_f, int rank, int group, int n_groups, float scaling, float qn, float qp, int chunk) { \
    backward_body<WT, OT>(w0, A, B, step, offset, grad_scale, grad, grad_step, grad_offset, out_f,  \
                          in_f, rank, group, n_groups, scaling, qn, qp, chunk);                     \
}

"""


def variant_code(w_dtype: torch.dtype, out_dtype: torch.dtype) -> str:
    """The line of CUDA that instantiates the kernels of one dtype pair after CUDA_SOURCE."""
    return (f"L4Q_KERNELS({DTYPE_NAMES[w_dtype]}, {DTYPE_STRUCTS[w_dtype]}, "
            f"{DTYPE_NAMES[out_dtype]}, {DTYPE_STRUCTS[out_dtype]})\n")


@functools.lru_cache(maxsize=None)
def source(w_dtype: torch.dtype, out_dtype: torch.dtype) -> Source:
    """The forward and backward kernels for W0 in `w_dtype` and Ŵ/G in `out_dtype`.

    One module per dtype pair, so a run compiles only the pair it uses.
    """
    w, o = DTYPE_NAMES[w_dtype], DTYPE_NAMES[out_dtype]
    return Source(name=f"l4q_{w}_{o}", code=CUDA_SOURCE + variant_code(w_dtype, out_dtype),
                  kernels=(f"l4q_forward_{w}_{o}", f"l4q_backward_{w}_{o}"))


SOURCES = tuple(source(w, o) for w in DTYPE_NAMES for o in DTYPE_NAMES)


# ---------------------------------------------------------------- references (CPU, tests, fallback)

def weight_dtype(w0: torch.Tensor) -> torch.dtype:
    """The dtype of the weight-space math: fp32, or fp64 for fp64 weights (tests)."""
    return torch.promote_types(w0.dtype, torch.float32)


def merged_weight(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """W = W0 + c · B A in fp32 (or fp64), a new (out × in) tensor; W0 itself is never written."""
    dtype = weight_dtype(w0)
    return torch.addmm(w0.to(dtype), b.to(dtype), a.to(dtype), alpha=scaling)


def fake_quant_(w: torch.Tensor, step: torch.Tensor, offset: torch.Tensor | None, bits: int,
                group: int) -> torch.Tensor:
    """Ŵ = clamp(round((W − β)/s), Qn, Qp)·s + β, overwriting `w` (fp32, out × in) where it can."""
    qn, qp = bounds(bits)
    in_f = w.shape[1]
    v = grouped(w, group)
    s = step.unsqueeze(-1)
    if offset is not None:
        v.sub_(offset.unsqueeze(-1))
    v.div_(s).round_().clamp_(qn, qp).mul_(s)
    if offset is not None:
        v.add_(offset.unsqueeze(-1))
    return ungrouped(v, in_f)


def fake_quant_reference(w0, a, b, step, offset, scaling: float, bits: int, group: int,
                         out_dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = Q(W0 + c·BA) as a new (out × in) tensor of `out_dtype`."""
    wq = fake_quant_(merged_weight(w0, a, b, scaling), step, offset, bits, group)
    return wq.to(out_dtype)


def fake_quant_backward_reference(w0, a, b, step, offset, grad_scale, grad: torch.Tensor, scaling: float,
                                  bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Turn `grad` = ∂L/∂Ŵ (out × in) into ∂L/∂W = grad ⊙ 1_in in place; return (∂L/∂s, ∂L/∂β).

    ∂L/∂β is None when `offset` is None (symmetric). Temporaries: W and
    ∂Ŵ/∂s in the weight dtype, the codes (freed early) and a bool mask.
    """
    qn, qp = bounds(bits)
    in_f = w0.shape[1]
    dtype = weight_dtype(w0)
    v = grouped(merged_weight(w0, a, b, scaling), group)
    if offset is not None:
        v.sub_(offset.unsqueeze(-1))
    v.div_(step.unsqueeze(-1))
    inside = (v >= qn) & (v <= qp)
    q = v.round().clamp_(qn, qp)
    v.mul_(inside).neg_().add_(q)               # ∂Ŵ/∂s: round(v) − v inside, the clamped code outside
    del q
    g = grouped(grad, group)                    # a view unless g does not divide `in` (then a padded copy)
    gamma = grad_scale.to(dtype).unsqueeze(0)
    grad_step = v.mul_(g).sum(-1).mul_(gamma)
    del v
    total = None if offset is None else g.sum(-1, dtype=dtype)
    g.mul_(inside)
    grad_offset = None if total is None else (total - g.sum(-1, dtype=dtype)).mul_(gamma)
    if g.data_ptr() != grad.data_ptr():
        grad.copy_(ungrouped(g, in_f))
    return grad_step, grad_offset


# ---------------------------------------------------------------- dispatch

WHAT = "L4Q fake quantization"           # one fallback warning for forward and backward together


def _unsupported(w0: torch.Tensor, dtypes: tuple[torch.dtype, ...], group: int,
                 grad: torch.Tensor | None = None) -> str | None:
    """Why the kernels do not cover this call, or None."""
    if any(d not in DTYPE_NAMES for d in dtypes):
        return f"no kernel for dtypes {', '.join(str(d) for d in dtypes)}"
    if group > MAX_GROUP:
        return f"group size {group} is above the kernel's {MAX_GROUP}"
    if w0.numel() == 0:
        return "the weight is empty"
    if not w0.is_contiguous():
        return "the weight is not contiguous"
    if (w0.shape[0] + ROWS - 1) // ROWS > 65535:
        return f"{w0.shape[0]} output rows are more than the kernel's grid covers"
    if grad is not None and not grad.is_contiguous():
        return "the gradient is not contiguous"
    return None


def _launch_shape(group: int, rank: int) -> tuple[int, int, int]:
    """(threads per block, rank chunk, dynamic shared memory bytes)."""
    threads = (group + 31) // 32 * 32
    chunk = max(1, min(rank, SHARED_FLOATS // (threads + ROWS)))
    return threads, chunk, 4 * chunk * (threads + ROWS)


def _check_args(kernel, w0, a, b, step, offset, group):
    out_f, in_f = w0.shape
    rank, n_groups = a.shape[0], num_groups(in_f, group)
    dev = w0.device
    check_tensor(w0, "W0", dtypes=DTYPE_NAMES, shape=(out_f, in_f), device=dev, kernel=kernel)
    check_tensor(a, "lora_A", dtypes=(torch.float32,), shape=(rank, in_f), device=dev, kernel=kernel)
    check_tensor(b, "lora_B", dtypes=(torch.float32,), shape=(out_f, rank), device=dev, kernel=kernel)
    check_tensor(step, "step", dtypes=(torch.float32,), shape=(out_f, n_groups), device=dev, kernel=kernel)
    check_tensor(offset, "offset", dtypes=(torch.float32,), shape=(out_f, n_groups), device=dev,
                 kernel=kernel, optional=True)


def _fp32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def fake_quant_cuda(w0, a, b, step, offset, scaling: float, bits: int, group: int,
                    out_dtype: torch.dtype) -> torch.Tensor:
    """The forward kernel: Ŵ (out × in, `out_dtype`), nothing else allocated."""
    out_f, in_f = w0.shape
    a, b, step, offset = _fp32(a), _fp32(b), _fp32(step), _fp32(offset)
    n_groups = num_groups(in_f, group)
    name = f"l4q_forward_{DTYPE_NAMES[w0.dtype]}_{DTYPE_NAMES[out_dtype]}"
    _check_args(name, w0, a, b, step, offset, group)
    out = torch.empty(out_f, in_f, dtype=out_dtype, device=w0.device)
    qn, qp = bounds(bits)
    threads, chunk, shared = _launch_shape(group, a.shape[0])
    launch(source(w0.dtype, out_dtype), name, (n_groups, (out_f + ROWS - 1) // ROWS, 1), (threads, 1, 1),
           [w0, a, b, step, offset, out, out_f, in_f, a.shape[0], group, n_groups, float(scaling),
            float(qn), float(qp), chunk], shared, w0.device)
    return out


def fake_quant_backward_cuda(w0, a, b, step, offset, grad_scale, grad: torch.Tensor, scaling: float,
                             bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The backward kernel: masks `grad` in place, returns (∂L/∂s, ∂L/∂β) in fp32."""
    out_f, in_f = w0.shape
    a, b, step, offset, grad_scale = _fp32(a), _fp32(b), _fp32(step), _fp32(offset), _fp32(grad_scale)
    n_groups = num_groups(in_f, group)
    name = f"l4q_backward_{DTYPE_NAMES[w0.dtype]}_{DTYPE_NAMES[grad.dtype]}"
    _check_args(name, w0, a, b, step, offset, group)
    check_tensor(grad_scale, "grad_scale", dtypes=(torch.float32,), shape=(n_groups,), device=w0.device,
                 kernel=name)
    check_tensor(grad, "grad", dtypes=DTYPE_NAMES, shape=(out_f, in_f), device=w0.device, kernel=name)
    grad_step = torch.empty(out_f, n_groups, dtype=torch.float32, device=w0.device)
    grad_offset = None if offset is None else torch.empty_like(grad_step)
    qn, qp = bounds(bits)
    threads, chunk, shared = _launch_shape(group, a.shape[0])
    launch(source(w0.dtype, grad.dtype), name, (n_groups, (out_f + ROWS - 1) // ROWS, 1), (threads, 1, 1),
           [w0, a, b, step, offset, grad_scale, grad, grad_step, grad_offset, out_f, in_f, a.shape[0],
            group, n_groups, float(scaling), float(qn), float(qp), chunk], shared, w0.device)
    torch.autograd.graph.increment_version(grad)         # written in place through a pointer
    return grad_step, grad_offset


def fake_quant(w0, a, b, step, offset, scaling: float, bits: int, group: int,
               out_dtype: torch.dtype) -> torch.Tensor:
    """Ŵ = Q(W0 + c·BA) in `out_dtype`: the kernel on a GPU that can run it, else the reference."""
    args = (w0, a, b, step, offset, scaling, bits, group, out_dtype)
    return dispatch(WHAT, w0, lambda: fake_quant_cuda(*args), lambda: fake_quant_reference(*args),
                    _unsupported(w0, (w0.dtype, out_dtype), group))


def fake_quant_backward(w0, a, b, step, offset, grad_scale, grad: torch.Tensor, scaling: float, bits: int,
                        group: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """∂L/∂Ŵ → ∂L/∂W in place, and (∂L/∂s, ∂L/∂β): the kernel where it can run, else the reference."""
    args = (w0, a, b, step, offset, grad_scale, grad, scaling, bits, group)
    return dispatch(WHAT, w0, lambda: fake_quant_backward_cuda(*args),
                    lambda: fake_quant_backward_reference(*args),
                    _unsupported(w0, (w0.dtype, grad.dtype), group, grad))
