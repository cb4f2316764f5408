"""Next-token cross-entropy from final hidden states.

    loss = mean over labelled positions t of  −log softmax(h_t Wᵀ)[y_{t+1}]

h: (batch, seq, hidden) final hidden states, W: (vocab, hidden) output
projection, y: labels with -100 where no loss is taken. Logits are computed
in fp32 because a bf16 log-softmax over a large vocabulary loses the small
probabilities the loss is made of.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Labels aligned with positions: position t predicts token t+1."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE)


def causal_lm_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                   reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of next-token prediction; `reduction="sum"` for token-weighted averaging."""
    targets = shift_labels(labels).reshape(-1)
    logits = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T.to(hidden.dtype)).float()
    return F.cross_entropy(logits, targets, ignore_index=IGNORE, reduction=reduction)


def count_targets(labels: torch.Tensor) -> int:
    return int((shift_labels(labels) != IGNORE).sum())
