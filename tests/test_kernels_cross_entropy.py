"""lowmem.kernels.cross_entropy: the references against the math written out, the kernels' own
CUDA source run in the CPU emulator against the references, the chunked loss through the
kernels, the memory model's per-chunk term, and (marked `gpu`) the kernels on a GPU.
"""

import math
import warnings

import pytest
import torch

from lowmem import memory
from lowmem.kernels import cross_entropy as ce
from lowmem.kernels import runtime
from lowmem.loss import causal_lm_loss
from tests.kernel_emulator import fixtures

pytestmark = pytest.mark.usefixtures("one_thread")


def _case(n, vocab, dtype=torch.float32, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g, dtype=torch.float64) * scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=g)
    if n > 1:
        targets[1] = ce.IGNORE
    if n > 2:
        targets[2] = vocab - 1
    grad = torch.rand(n, generator=g, dtype=torch.float32) + 0.5
    return logits, targets, grad


def _by_hand(logits, targets, grad):
    """Losses and ∂L/∂z row by row in fp64, with math.exp/log."""
    losses, grads = [], []
    for row, y, g in zip(logits.double().tolist(), targets.tolist(), grad.double().tolist()):
        m = max(row)
        lse = m + math.log(sum(math.exp(z - m) for z in row))
        if y == ce.IGNORE:
            losses.append(0.0)
            grads.append([0.0] * len(row))
            continue
        losses.append(lse - row[y])
        grads.append([(math.exp(z - lse) - (v == y)) * g for v, z in enumerate(row)])
    return torch.tensor(losses, dtype=torch.float64), torch.tensor(grads, dtype=torch.float64)


@pytest.mark.parametrize("n,vocab", [(1, 2), (4, 7), (6, 300)])
def test_references_equal_the_math(n, vocab):
    logits, targets, grad = _case(n, vocab)
    want_loss, want_grad = _by_hand(logits, targets, grad)
    before = logits.clone()
    losses = ce.cross_entropy_reference(logits, targets)
    assert losses.dtype == torch.float32 and torch.equal(logits, before)   # forward does not write
    torch.testing.assert_close(losses.double(), want_loss, rtol=1e-6, atol=1e-6)
    out = ce.cross_entropy_backward_reference(logits, targets, grad)
    assert out.data_ptr() == logits.data_ptr()                             # in place
    torch.testing.assert_close(logits.double(), want_grad, rtol=1e-5, atol=1e-7)


def test_backward_reference_rounds_once_into_a_half_precision_logits_buffer():
    logits, targets, grad = _case(5, 50, torch.bfloat16)
    want = _by_hand(logits, targets, grad)[1].to(torch.bfloat16)   # exact math, one rounding
    ce.cross_entropy_backward_reference(logits, targets, grad)
    assert logits.dtype == torch.bfloat16
    assert ((logits.double() - want.double()).abs() <= want.double().abs() * 2**-8 + 1e-9).all()


def test_dispatch_runs_the_reference_on_the_cpu_without_a_warning():
    logits, targets, grad = _case(3, 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(ce.cross_entropy(logits, targets), ce.cross_entropy_reference(logits, targets))


def test_calls_outside_the_kernels_are_named():
    logits, targets, _ = _case(3, 20)
    assert ce._unsupported(logits, targets) is None
    assert "float64" in ce._unsupported(logits.double(), targets)
    assert "int32" in ce._unsupported(logits, targets.int())
    assert "not contiguous" in ce._unsupported(logits.T.contiguous().T, targets)
    assert "(N, V)" in ce._unsupported(logits[None], targets)


@pytest.mark.parametrize("chunk", [1024, 0])
def test_the_loss_predicts_one_compute_dtype_copy_of_the_logits_with_the_kernel(monkeypatch, chunk):
    """The memory model's loss term on CUDA with kernels against the reference's: chunked, c·C·V
    instead of (c + 8)·C·V; whole, the kept logits c·N·V (+ ∂h) instead of 12·N·V."""
    import dataclasses

    from lowmem.spec import builtin_spec
    from tests.test_memory import _gpu_plans

    spec = builtin_spec("llama-3.1-8b")
    lora = next(p for p in _gpu_plans() if p.method == "lora")
    plan = dataclasses.replace(lora, loss_chunk=chunk, micro_batch=1, seq_len=4096)
    assert plan.device == "cuda" and memory.compute_bytes(plan) == 2
    kernel = memory.logits_bytes(spec, plan)
    # A trained head adds its gradient (bf16), and when chunked one chunk's share beside the sum.
    full = dataclasses.replace(plan, method="full", base_format="bf16", lora_rank=None, lora_targets=())
    head = spec.vocab * spec.hidden
    assert memory.logits_bytes(spec, full) - kernel == (4 if chunk else 2) * head
    monkeypatch.setenv("LOWMEM_KERNELS", "0")
    reference = memory.logits_bytes(spec, plan)
    assert memory.logits_bytes(spec, dataclasses.replace(plan, device="cpu")) == reference
    n, v, h = 4096, spec.vocab, spec.hidden
    if chunk:
        assert reference - kernel == 8 * chunk * v   # the fp32 copy and the fp32 log-probs
    else:
        assert (kernel, reference) == (2 * n * v + 8 * n + 2 * n * h, 12 * n * v + 8 * n + 4)


# ---------------------------------------------------------------- the kernels, emulated on the CPU

emulator, emulated = fixtures(ce)       # the kernels' own source, compiled for the host


SHAPES = [(1, 1), (3, 31), (4, 256), (5, 1000), (3, 3001)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


#: How far a kernel's gradient may be from the reference's, in units in the last place of the logits'
#: dtype: exp(z − lse) against the reference's exp(z − max) / Σ differ by a few fp32 ulps times |lse|
#: (≈ log V), so fp32 allows 64 ulps (relative 8e-6); bf16 and fp16 round that to at most one unit.
GRAD_ULPS = {torch.float32: 64, torch.bfloat16: 1, torch.float16: 1}


def _ulps(got, want, dtype):
    """|got − want| in units of `dtype`'s spacing at `want` (fp32 math on both)."""
    spacing = {torch.float32: 2**-23, torch.bfloat16: 2**-7, torch.float16: 2**-10}[dtype]
    tiny = {torch.float32: 1e-38, torch.bfloat16: 1e-38, torch.float16: 2**-24}[dtype]
    return ((got.float() - want.float()).abs() / (want.float().abs() * spacing).clamp_min(tiny)).max()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,vocab", SHAPES)
def test_emulated_forward_kernel_equals_the_reference(emulated, n, vocab, dtype):
    logits, targets, _ = _case(n, vocab, dtype)
    before = logits.clone()
    got = ce.cross_entropy_cuda(logits, targets)
    want = ce.cross_entropy_reference(logits, targets)
    assert got.dtype == torch.float32 and torch.equal(logits, before)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=2e-6)
    assert (got[targets == ce.IGNORE] == 0).all()
    kernel, grid, block, shared, source = emulated.launches[-1]
    assert (kernel, grid, block, source) == (f"cross_entropy_forward_{runtime.DTYPE_NAMES[dtype]}", (n, 1, 1),
                                             (ce.THREADS, 1, 1), f"cross_entropy_{runtime.DTYPE_NAMES[dtype]}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,vocab", SHAPES)
def test_emulated_backward_kernel_equals_the_reference(emulated, n, vocab, dtype):
    logits, targets, grad = _case(n, vocab, dtype)
    want = ce.cross_entropy_backward_reference(logits.clone(), targets, grad)
    got = ce.cross_entropy_backward_cuda(logits, targets, grad)
    assert got.data_ptr() == logits.data_ptr() and got.dtype == dtype
    assert _ulps(got, want, dtype) <= GRAD_ULPS[dtype]
    assert (got[targets == ce.IGNORE] == 0).all()


def test_emulated_kernels_handle_masked_logits_and_a_bad_target(emulated):
    logits, targets, grad = _case(4, 300)
    logits[0, ::3] = float("-inf")                          # a masked vocabulary
    targets[0] = 1                                          # (the target is not masked)
    logits[3, :5] = float("-inf")                           # -inf where a thread starts its walk
    targets[3] = 300                                        # outside [0, V): NaN, not a wrong number
    good = targets != 300
    got = ce.cross_entropy_cuda(logits, targets)
    want = ce.cross_entropy_reference(logits[good], targets[good])
    torch.testing.assert_close(got[good], want, rtol=1e-6, atol=2e-6)
    assert got[3].isnan()
    g_want = ce.cross_entropy_backward_reference(logits[good].clone(), targets[good], grad[good])
    ce.cross_entropy_backward_cuda(logits, targets, grad)
    torch.testing.assert_close(logits[good], g_want, rtol=1e-5, atol=1e-7)
    assert (logits[0, ::3] == 0).all() and logits[3].isnan().all()


def test_emulated_kernels_take_an_expanded_gradient(emulated):
    """Autograd hands `per_token.sum()`'s gradient as a stride-0 expansion of one scalar."""
    logits, targets, _ = _case(3, 40)
    want = ce.cross_entropy_backward_reference(logits.clone(), targets, torch.full((3,), 0.25))
    ce.cross_entropy_backward_cuda(logits, targets, torch.tensor(0.25).expand(3))
    torch.testing.assert_close(logits, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_emulated_chunked_loss_trains_like_the_reference(emulated, monkeypatch, reduction):
    """lowmem.loss's chunked loss with its cross-entropy in the kernels: same loss and gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = (torch.randn(333, 16) * 0.3).requires_grad_()
    labels = torch.randint(0, 333, (2, 9))
    labels[0, :3] = ce.IGNORE

    def run(kernels: bool):
        monkeypatch.setattr(runtime, "use_kernel", lambda t, what: kernels)
        hidden.grad = weight.grad = None
        loss = causal_lm_loss(hidden, weight, labels, reduction=reduction, chunk_size=5)
        loss.backward()
        return loss.detach(), hidden.grad.clone(), weight.grad.clone()

    got = run(True)
    kinds = {k.split("_")[2] for k, *_ in emulated.launches}
    assert kinds == {"forward", "backward"} and len(emulated.launches) == 2 * 4   # 18 positions, chunks of 5
    want = run(False)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def _saved_bytes(fn) -> int:
    """Bytes autograd saves for backward while fn() runs (storages counted once, parameters excluded)."""
    seen = {}

    def pack(t):
        if not isinstance(t, torch.nn.Parameter):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


@pytest.mark.parametrize("train_head", [False, True])
def test_emulated_whole_loss_keeps_the_logits_and_trains_like_f_cross_entropy(emulated, monkeypatch, train_head):
    """chunk_size=0 where kernels run: one chunk whose logits are saved (and overwritten by their
    gradient) instead of F.cross_entropy's fp32 log-probs; the same loss and gradients."""
    from types import SimpleNamespace

    torch.manual_seed(0)
    batch, seq, vocab = 2, 9, 333
    hidden = torch.randn(batch, seq, 16, requires_grad=True)
    weight = torch.nn.Parameter(torch.randn(vocab, 16) * 0.3, requires_grad=train_head)
    labels = torch.randint(0, vocab, (batch, seq))
    labels[0, :3] = ce.IGNORE

    def run(kernels: bool):
        monkeypatch.setattr(runtime, "use_kernel", lambda t, what: kernels)
        hidden.grad = weight.grad = None
        loss, saved = _saved_bytes(lambda: causal_lm_loss(hidden, weight, labels, "sum", chunk_size=0))
        loss.backward()
        grads = (hidden.grad.clone(), weight.grad.clone() if train_head else None)
        return loss.detach(), grads, saved

    loss, grads, saved = run(True)
    assert [k for k, *_ in emulated.launches] == ["cross_entropy_forward_f32", "cross_entropy_backward_f32"]
    n = batch * seq
    plan = SimpleNamespace(method="lora", device="cuda", compute_dtype="float32", micro_batch=batch,
                           seq_len=seq, loss_chunk=0)
    # What the memory model says this path saves; a trained head also keeps its input (counted with
    # the layers' activations in the model, here as the hidden states themselves).
    assert saved == memory.saved_loss_bytes(SimpleNamespace(vocab=vocab), plan) + (4 * n * 16 if train_head else 0)
    ref_loss, ref_grads, ref_saved = run(False)
    assert ref_saved >= 4 * n * vocab                      # F.cross_entropy's fp32 log-probs
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for g, w in zip(grads, ref_grads):
        if w is not None:
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-6)


def test_emulated_whole_loss_refuses_a_second_backward(emulated, monkeypatch):
    """Backward overwrites the kept logits; autograd's in-place check must catch a second pass."""
    monkeypatch.setattr(runtime, "use_kernel", lambda t, what: True)
    hidden = torch.randn(1, 5, 8, requires_grad=True)
    loss = causal_lm_loss(hidden, torch.randn(40, 8), torch.randint(0, 40, (1, 5)))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# ---------------------------------------------------------------- GPU: kernels against references

GPU_SHAPES = SHAPES + [(64, 32000), (17, 128256), (2, 151936)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n,vocab", GPU_SHAPES)
def test_kernels_equal_their_references(n, vocab, dtype):
    """Losses to a relative 1e-6 (the sums run in another order); gradients within GRAD_ULPS."""
    logits, targets, grad = (t.cuda() for t in _case(n, vocab, dtype))
    torch.testing.assert_close(ce.cross_entropy_cuda(logits, targets), ce.cross_entropy_reference(logits, targets),
                               rtol=1e-6, atol=2e-6)
    want = ce.cross_entropy_backward_reference(logits.clone(), targets, grad)
    got = ce.cross_entropy_backward_cuda(logits, targets, grad)
    assert _ulps(got, want, dtype) <= GRAD_ULPS[dtype]


@pytest.mark.gpu
@pytest.mark.parametrize("n,chunk", [(2048, 0), (4096, 1024)])
def test_the_loss_keeps_one_compute_dtype_copy_of_the_logits(n, chunk):
    """Llama-3 vocabulary in bf16, whole (chunk 0) or in chunks: with the kernels the loss's peak above
    its inputs is near one bf16 copy of the logits it holds at once (c·N·V = 501 MiB whole, c·C·V =
    251 MiB per chunk) plus ∂h; the reference path holds ≥ 10·N·V (whole) or 10·C·V beside it."""
    import os

    vocab, hidden_size = 128256, 4096
    hidden = torch.randn(1, n, hidden_size, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, device="cuda", dtype=torch.bfloat16) * 0.02
    labels = torch.randint(0, vocab, (1, n), device="cuda")
    peaks = {}
    for mode in ("1", "0", "1"):                                   # the first "1" compiles and warms up
        os.environ["LOWMEM_KERNELS"] = mode
        try:
            hidden.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            causal_lm_loss(hidden, weight, labels, chunk_size=chunk).backward()
            torch.cuda.synchronize()
            peaks[mode] = torch.cuda.max_memory_allocated() - base
        finally:
            os.environ.pop("LOWMEM_KERNELS")
    logits = 2 * (chunk or n) * vocab
    assert peaks["1"] <= logits * 1.1 + 2 * 2 * n * hidden_size + 16 * 2**20
    assert peaks["0"] >= 10 * (chunk or n) * vocab
