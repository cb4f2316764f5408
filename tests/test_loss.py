"""Next-token loss: the chunked path equals the plain one and never keeps whole logits."""

import pytest
import torch

from lowmem.loss import IGNORE, causal_lm_loss, count_targets, shift_labels

VOCAB, HIDDEN, ROWS, LENGTH = 300, 32, 3, 17


def inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(ROWS, LENGTH, HIDDEN, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=g, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, VOCAB, (ROWS, LENGTH), generator=g)
    labels[0, :6] = IGNORE          # a prompt
    labels[2, -4:] = IGNORE         # padding
    return hidden, weight, labels


def loss_and_grads(chunk, reduction):
    hidden, weight, labels = inputs()
    loss = causal_lm_loss(hidden, weight, labels, reduction=reduction, chunk_size=chunk)
    (loss.sum() if reduction == "none" else loss).backward()
    return loss.detach(), hidden.grad, weight.grad


def test_labels_are_shifted_and_counted():
    labels = torch.tensor([[5, 6, IGNORE, 7]])
    assert shift_labels(labels).tolist() == [[6, IGNORE, 7, IGNORE]]
    assert count_targets(labels) == 2


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk", [1, 7, 16, 10_000])
def test_chunked_loss_equals_the_plain_loss_and_its_gradients(chunk, reduction):
    plain = loss_and_grads(0, reduction)
    chunked = loss_and_grads(chunk, reduction)
    for a, b, what in zip(plain, chunked, ("loss", "grad of hidden", "grad of weight")):
        # fp32 matmuls of other shapes sum in another order: 2e-6 of the largest value
        torch.testing.assert_close(b, a, rtol=1e-5, atol=2e-6 * max(1.0, float(a.abs().max())), msg=what)


def test_a_frozen_weight_gets_no_gradient_and_the_hidden_one_is_unchanged():
    hidden, weight, labels = inputs()
    frozen = weight.detach()
    causal_lm_loss(hidden, frozen, labels, chunk_size=5).backward()
    chunked = hidden.grad.clone()
    hidden.grad = None
    causal_lm_loss(hidden, frozen, labels).backward()
    torch.testing.assert_close(chunked, hidden.grad, rtol=1e-5, atol=1e-7)


def test_chunked_loss_saves_hidden_states_and_labels_only():
    """What `lowmem.memory.saved_loss_bytes` predicts: c·N·h + 8·N, against 4·N·V + ... plain."""
    def saved_bytes(chunk):
        hidden, weight, labels = inputs()
        total = []

        def pack(t):
            if not isinstance(t, torch.nn.Parameter) and t is not weight:
                total.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            causal_lm_loss(hidden, weight, labels, reduction="sum", chunk_size=chunk)
        return sum(total)

    n = ROWS * LENGTH
    assert saved_bytes(4) == 4 * n * HIDDEN + 8 * n
    assert saved_bytes(0) >= 4 * n * VOCAB
