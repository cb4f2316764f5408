"""Cross-entropy over a chunk of logits, in place: CUDA kernels and their PyTorch references.

For each row t of logits z (N × V, the compute dtype) with target y_t, and
IGNORE = −100 meaning "no loss at this position":

    lse_t  = log Σ_v exp(z_tv)
    ℓ_t    = lse_t − z_t[y_t]                      (0 where y_t = IGNORE)      forward
    ∂ℓ/∂z  = (exp(z_tv − lse_t) − [v = y_t]) · ∂L/∂ℓ_t   (0 where y_t = IGNORE)   backward

Why a kernel. With a 128k vocabulary the loss is the largest temporary of a
fine-tuning step (`lowmem plan --model llama-3.1-8b --vram 16G --seq-len 4096`
puts it at 41% of the peak, against 1% for the dequantized weight). In
PyTorch every chunk of C positions makes fp32 copies next to the logits: the
logits cast to fp32, the log-probabilities (forward), the softmax and its
scaled copy (backward), ≈ (12 + c)·C·V bytes with c the compute dtype's size.
The kernels read the logits where the matmul wrote them and keep the row
statistics in registers: the forward writes one loss per row, the backward
overwrites the logits with their gradient. The chunk's transient is the
logits themselves, c·C·V.

Kernel layout. One block of 256 threads per row. Each thread walks the row
with a stride of 256 keeping a running maximum m and Σ exp(z − m) (the online
softmax of Milakov & Gimelshein, 2018); the block merges the pairs with warp
shuffles and then warp by warp in a fixed order, so results are
deterministic. Backward recomputes lse the same way before it writes (the
logits it is given are a recomputation, and it does not trust a stored lse
to match them), then writes each element once. Statistics are fp32; the
gradient is rounded once, to the logits' dtype.

Differences from the reference, stated by the tests: the sums run in a
different order, so losses agree to a relative 1e-6 and gradients to a unit
in the last place of their dtype. A target outside [0, V) that is not IGNORE
makes the reference raise (on the CPU) and the kernel write NaN for that row's
loss and gradient, which the trainer's non-finite-loss check reports.

Supported: logits in fp32, bf16 or fp16, contiguous; targets int64; V < 2³¹ − 256.
Anything else runs the reference.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lowmem.kernels.runtime import DTYPE_CODE, DTYPE_NAMES, DTYPE_STRUCTS, Source, check_tensor, dispatch, launch

IGNORE = -100            # the label of positions without a loss (lowmem.loss uses this one)
THREADS = 256            # threads per row (the kernels' compile-time THREADS)

CUDA_SOURCE = DTYPE_CODE + r"""
// lowmem.kernels.cross_entropy: per-row cross-entropy (forward) and its gradient in place (backward).
#define THREADS 256
#define WARPS (THREADS / 32)

__device__ __forceinline__ float neg_inf() { return __uint_as_float(0xff800000u); }
__device__ __forceinline__ float quiet_nan() { return __uint_as_float(0x7fc00000u); }

// (m, s) <- the pair for the union of two sets of logits, each a running max m and s = sum exp(z - m).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float mm = fmaxf(m, m2);
    if (mm == neg_inf()) { s = s + s2; return; }            // both empty (or all -inf): s is 0, or NaN
    s = s * expf(m - mm) + s2 * expf(m2 - mm);
    m = mm;
}

// log sum_v exp(z[v]) over one row, the same value in every thread of the block.
template <class L>
__device__ __forceinline__ float row_logsumexp(const typename L::T* __restrict__ z, int vocab) {
    __shared__ float part_m[WARPS], part_s[WARPS], result;
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    float m = neg_inf(), s = 0.f;
    for (int v = t; v < vocab; v += THREADS) {
        const float x = L::load(z, v);
        if (x > m) { s = s * expf(m - x) + 1.f; m = x; }
        else if (x != neg_inf()) s += expf(x - m);             // a NaN logit makes s NaN
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        merge(m, s, m2, s2);
    }
    if (lane == 0) { part_m[warp] = m; part_s[warp] = s; }
    __syncthreads();
    if (t == 0) {
        float bm = part_m[0], bs = part_s[0];
        for (int w = 1; w < WARPS; ++w) merge(bm, bs, part_m[w], part_s[w]);
        result = bm + logf(bs);
    }
    __syncthreads();
    return result;
}

template <class L>
__device__ __forceinline__ void forward_body(const typename L::T* __restrict__ logits,
                                             const long long* __restrict__ targets, float* __restrict__ losses,
                                             int vocab) {
    const long long row = blockIdx.x;
    const typename L::T* z = logits + row * vocab;
    const float lse = row_logsumexp<L>(z, vocab);
    if (threadIdx.x == 0) {
        const long long y = targets[row];
        losses[row] = y == -100 ? 0.f : (y >= 0 && y < vocab ? lse - L::load(z, y) : quiet_nan());
    }
}

template <class L>
__device__ __forceinline__ void backward_body(typename L::T* __restrict__ logits,
                                              const long long* __restrict__ targets,
                                              const float* __restrict__ grad_losses, int vocab) {
    const long long row = blockIdx.x;
    typename L::T* z = logits + row * vocab;
    const float lse = row_logsumexp<L>(z, vocab);           // every read of the row is before its barrier
    const long long y = targets[row];
    const float scale = y == -100 ? 0.f : (y >= 0 && y < vocab ? grad_losses[row] : quiet_nan());
    for (int v = threadIdx.x; v < vocab; v += THREADS) {
        const float p = expf(L::load(z, v) - lse);
        L::store(z, v, (v == y ? p - 1.f : p) * scale);
    }
}

#define CE_KERNELS(LN, LT)                                                                          \
extern "C" __global__ void __launch_bounds__(THREADS) cross_entropy_forward_##LN(                  \
        const LT::T* logits, const long long* targets, float* losses, int vocab) {                 \
    forward_body<LT>(logits, targets, losses, vocab);                                               \
}                                                                                                   \
extern "C" __global__ void __launch_bounds__(THREADS) cross_entropy_backward_##LN(                 \
        LT::T* logits, const long long* targets, const float* grad_losses, int vocab) {            \
    backward_body<LT>(logits, targets, grad_losses, vocab);                                         \
}

"""


@functools.lru_cache(maxsize=None)
def source(dtype: torch.dtype) -> Source:
    """The forward and backward kernels for logits in `dtype` (one module per dtype)."""
    name = DTYPE_NAMES[dtype]
    return Source(name=f"cross_entropy_{name}",
                  code=CUDA_SOURCE + f"CE_KERNELS({name}, {DTYPE_STRUCTS[dtype]})\n",
                  kernels=(f"cross_entropy_forward_{name}", f"cross_entropy_backward_{name}"))


SOURCES = tuple(source(d) for d in DTYPE_NAMES)


# ---------------------------------------------------------------- references (CPU, tests, fallback)

def cross_entropy_reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """ℓ (N,) fp32 from logits (N, V) of any float dtype; 0 at IGNORE. `logits` is not written."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="none")


def cross_entropy_backward_reference(logits: torch.Tensor, targets: torch.Tensor,
                                     grad_losses: torch.Tensor) -> torch.Tensor:
    """Overwrite `logits` with ∂L/∂z = (softmax(z) − onehot(y)) · ∂L/∂ℓ (0 at IGNORE) and return it.

    Computed in fp32 (a softmax-sized fp32 temporary), rounded once into `logits`' dtype.
    """
    g = torch.softmax(logits.float(), dim=-1)
    labelled = targets != IGNORE
    rows = torch.arange(g.shape[0], device=g.device)
    g[rows[labelled], targets[labelled]] -= 1.0
    g *= (grad_losses.float() * labelled)[:, None]
    return logits.copy_(g)


# ---------------------------------------------------------------- dispatch

WHAT = "chunked cross-entropy"           # one fallback warning for forward and backward together


def _unsupported(logits: torch.Tensor, targets: torch.Tensor) -> str | None:
    """Why the kernels do not cover this call, or None."""
    if logits.dtype not in DTYPE_NAMES:
        return f"no kernel for logits of dtype {logits.dtype}"
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        return f"logits {tuple(logits.shape)} and targets {tuple(targets.shape)} are not (N, V) and (N,)"
    if targets.dtype != torch.int64:
        return f"targets are {targets.dtype}, the kernel reads int64"
    if logits.shape[1] > 2**31 - 1 - THREADS:       # the kernels' int column index steps by THREADS
        return f"a vocabulary of {logits.shape[1]} is more than the kernel indexes"
    if not logits.is_contiguous():
        return "the logits are not contiguous"
    return None


def _check_args(kernel: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
    n, vocab = logits.shape
    check_tensor(logits, "logits", dtypes=DTYPE_NAMES, shape=(n, vocab), kernel=kernel)
    check_tensor(targets, "targets", dtypes=(torch.int64,), shape=(n,), device=logits.device, kernel=kernel)


def cross_entropy_cuda(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The forward kernel: ℓ (N,) fp32; nothing else is allocated."""
    n, vocab = logits.shape
    name = f"cross_entropy_forward_{DTYPE_NAMES[logits.dtype]}"
    targets = targets.contiguous()
    _check_args(name, logits, targets)
    losses = torch.empty(n, dtype=torch.float32, device=logits.device)
    if n:
        launch(source(logits.dtype), name, (n, 1, 1), (THREADS, 1, 1), [logits, targets, losses, vocab], 0,
               logits.device)
    return losses


def cross_entropy_backward_cuda(logits: torch.Tensor, targets: torch.Tensor,
                                grad_losses: torch.Tensor) -> torch.Tensor:
    """The backward kernel: overwrites `logits` with their gradient and returns them."""
    n, vocab = logits.shape
    name = f"cross_entropy_backward_{DTYPE_NAMES[logits.dtype]}"
    targets = targets.contiguous()
    grad_losses = grad_losses.detach().to(torch.float32).contiguous()   # autograd hands an expanded scalar
    _check_args(name, logits, targets)
    check_tensor(grad_losses, "grad_losses", dtypes=(torch.float32,), shape=(n,), device=logits.device,
                 kernel=name)
    if n:
        launch(source(logits.dtype), name, (n, 1, 1), (THREADS, 1, 1), [logits, targets, grad_losses, vocab], 0,
               logits.device)
    # Written through a pointer: tell autograd, as an in-place op would, so a saved copy of
    # `logits` (KeptLogitsCrossEntropy) is not used again as if unchanged.
    torch.autograd.graph.increment_version(logits)
    return logits


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-row cross-entropy ℓ (N,) fp32: the kernel on a GPU that can run it, else the reference."""
    return dispatch(WHAT, logits, lambda: cross_entropy_cuda(logits, targets),
                    lambda: cross_entropy_reference(logits, targets), _unsupported(logits, targets))


def cross_entropy_backward_(logits: torch.Tensor, targets: torch.Tensor, grad_losses: torch.Tensor) -> torch.Tensor:
    """`logits` overwritten with ∂L/∂z (in their own dtype) and returned: the kernel where it runs."""
    return dispatch(WHAT, logits, lambda: cross_entropy_backward_cuda(logits, targets, grad_losses),
                    lambda: cross_entropy_backward_reference(logits, targets, grad_losses),
                    _unsupported(logits, targets))
