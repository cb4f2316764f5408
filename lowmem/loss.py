"""Next-token cross-entropy from final hidden states, whole or in chunks.

    loss = mean over labelled positions t of  −log softmax(h_t Wᵀ)[y_{t+1}]

h: (batch, seq, hidden) final hidden states, W: (vocab, hidden) output
projection, y: labels with -100 where no loss is taken. The log-softmax is
computed in fp32 because a bf16 one over a large vocabulary loses the small
probabilities the loss is made of.

Chunked (`chunk_size = C > 0`): the N = batch·seq positions are taken C at a
time, so logits exist for one chunk only, in the forward and again in the
backward, which recomputes them instead of keeping them:

    forward, chunk c:   z_c = h_c Wᵀ,  ℓ_t = logsumexp(z_t) − z_t[y_t]
    backward, chunk c:  recompute z_c;  g_c = (softmax(z_c) − onehot(y_c)) · ∂L/∂ℓ_c
                        ∂L/∂h_c = g_c W,   ∂L/∂W += g_cᵀ h_c

Whole (`chunk_size = 0`): where lowmem.kernels run (CUDA), the same with one
chunk of all N positions whose logits are kept for backward instead of
recomputed (`KeptLogitsCrossEntropy`); elsewhere `F.cross_entropy` on fp32
logits.

The cross-entropy itself (ℓ from z, and g written over z) is
`lowmem.kernels.cross_entropy`: a CUDA kernel that reads the logits in the
compute dtype where the matmul wrote them, or on the CPU its PyTorch reference.

Memory (c = bytes of the compute dtype, 4 on the CPU):
    whole, F.cross_entropy:  fp32 logits, log-probs and their gradients for all N
              positions, ≈ 12·N·V at the backward's peak; log-probs (4·N·V) saved
    whole, kernel:  the logits (c·N·V) saved, overwritten by their gradient in
              backward, plus the gradient of h (c·N·h)
    chunked:  saves only h (c·N·h, usually alive anyway), the labels (8·N) and the
              per-token losses' shape; per chunk a transient of c·C·V with the
              kernel (the logits, overwritten by their gradient), ≈ (12 + c)·C·V
              with the reference (fp32 copies beside them), plus the gradient of h
              (c·N·h) and, when W is trained, its gradient (W's size)
This is what `lowmem.memory.saved_loss_bytes` / `logits_bytes` predict.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowmem.kernels import runtime
from lowmem.kernels.cross_entropy import IGNORE, WHAT, cross_entropy, cross_entropy_backward_


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with positions: position t predicts token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   reduction: str = "mean", chunk_size: int = 0) -> torch.Tensor:
    """Cross-entropy of next-token prediction; `reduction="sum"` for token-weighted averaging.

    `chunk_size` > 0 computes the logits `chunk_size` tokens at a time (forward
    and backward) with the same loss and gradients; 0 computes them at once.
    """
    targets = shift_labels(labels).reshape(-1)
    flat = hidden.reshape(-1, hidden.shape[-1])
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    if chunk_size > 0:
        per_token = ChunkedCrossEntropy.apply(flat, weight, targets, int(chunk_size))
    elif runtime.use_kernel(flat, WHAT):
        per_token = KeptLogitsCrossEntropy.apply(flat, weight, targets)
    else:
        logits = (flat @ weight.T.to(hidden.dtype)).float()
        return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)
    if reduction == "none":
        return per_token
    total = per_token.sum()
    return total if reduction == "sum" else total / (targets != IGNORE).sum()


def count_targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels) != IGNORE).sum())


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    # The plain path's matmul, so both round the same way (bf16 under autocast, fp32 on
    # the CPU); left in that dtype: the cross-entropy works in fp32 internally.
    return h @ weight.T.to(h.dtype)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (0 at ignored positions) over chunks of tokens.

    hidden (N, h), weight (V, h), targets (N,) int64 with IGNORE → losses (N,) fp32.
    Saves hidden, weight and targets only; logits are recomputed per chunk in
    backward. `custom_fwd/custom_bwd` make the backward's recomputation run under
    the forward's autocast state, so it reproduces the forward's logits.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                chunk: int) -> torch.Tensor:
        losses = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            end = min(start + chunk, hidden.shape[0])
            losses[start:end] = cross_entropy(_chunk_logits(hidden[start:end], weight), targets[start:end])
        ctx.save_for_backward(hidden, weight, targets)
        ctx.chunk = chunk
        return losses

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, targets = ctx.saved_tensors
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if want_h else None
        # Summed over chunks in W's dtype (fp32 for trained weights on the CPU).
        grad_w = torch.zeros_like(weight) if want_w else None
        w = None                           # W in the logits' dtype, made once
        for start in range(0, hidden.shape[0], ctx.chunk):
            end = min(start + ctx.chunk, hidden.shape[0])
            h = hidden[start:end]
            # g stays in the logits' dtype (bf16 under autocast): no upcast copy of the chunk.
            g = cross_entropy_backward_(_chunk_logits(h, weight), targets[start:end], grad_losses[start:end])
            if w is None:
                w = weight.to(g.dtype)
            if want_h:
                grad_h[start:end] = g @ w
            if want_w:
                grad_w += (g.T @ h.to(g.dtype)).to(weight.dtype)
            del g
        return grad_h, grad_w, None, None


class KeptLogitsCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy (0 at ignored positions) over all positions, logits kept for backward.

    hidden (N, h), weight (V, h), targets (N,) int64 with IGNORE → losses (N,) fp32.
    Saves the logits in the compute dtype (and hidden only when W is trained);
    backward overwrites them with their gradient, so a second backward through
    the same graph is refused by autograd's in-place check.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = _chunk_logits(hidden, weight)
        losses = cross_entropy(logits, targets)
        ctx.save_for_backward(hidden if ctx.needs_input_grad[1] else None, weight, targets, logits)
        ctx.hidden_dtype = hidden.dtype
        return losses

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad_losses: torch.Tensor):
        hidden, weight, targets, logits = ctx.saved_tensors
        g = cross_entropy_backward_(logits, targets, grad_losses)     # the logits' dtype, no upcast copy
        del logits
        grad_h = (g @ weight.to(g.dtype)).to(ctx.hidden_dtype) if ctx.needs_input_grad[0] else None
        grad_w = (g.T @ hidden.to(g.dtype)).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_h, grad_w, None
