"""L4Q: fake quantization of W0 + c·BA with learned step sizes (LSQ), its gradients and memory."""

import math

import pytest
import torch

from lowmem.lora import LoRALinear
from lowmem.model import tiny_llama
from lowmem.quant import intk
from lowmem.quant.l4q import (L4QLinear, L4QLinearFunction, apply_l4q, l4q_modules, load_l4q_state,
                              save_l4q_state)
from lowmem.quant.nf4 import quantize_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
OUT, IN, RANK, GROUP, C = 6, 20, 2, 8, 1.5    # 20 = 8 + 8 + 4: the last group is short


pytestmark = pytest.mark.usefixtures("one_thread")


def _case(bits: int, symmetric: bool, seed: int = 0):
    """Small float64 tensors, step sizes set so that some weights clip and most do not."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 4, IN, generator=g, dtype=torch.float64)
    w0 = torch.randn(OUT, IN, generator=g, dtype=torch.float64)
    a = torch.randn(RANK, IN, generator=g, dtype=torch.float64) * 0.3
    b = torch.randn(OUT, RANK, generator=g, dtype=torch.float64) * 0.3
    step, offset = intk.minmax_params(w0 + C * b @ a, bits, GROUP, symmetric)
    step = (step * 0.8).double()                       # a narrower range: the extremes clip
    offset = None if offset is None else (offset + 0.1 * step).double()
    gamma = 1 / torch.sqrt(intk.group_sizes(IN, GROUP).double() * intk.bounds(bits)[1])
    return x, w0, a, b, step, offset, gamma


def _grad_scale(t, scale):
    """Value t, gradient scaled by `scale` (LSQ's trick)."""
    return (t - t * scale).detach() + t * scale


def _expand(t):
    """(out, G) → (out, in): each group's value repeated over its weights."""
    return t.repeat_interleave(GROUP, dim=1)[:, :IN]


def _reference(x, w0, a, b, step, offset, gamma, bits):
    """L4Q written with plain autograd: clamp, round through a straight-through estimator."""
    qn, qp = intk.bounds(bits)
    s = _expand(_grad_scale(step, gamma))
    beta = 0 if offset is None else _expand(_grad_scale(offset, gamma))
    v = ((w0 + C * b @ a) - beta) / s
    v = v.clamp(qn, qp)
    q = v + (v.round() - v).detach()
    return x @ (q * s + beta).T


def _leaves(x, a, b, step, offset):
    return [t.clone().requires_grad_(True) if t is not None else None for t in (x, a, b, step, offset)]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_gradients_equal_an_autograd_reference_built_on_the_straight_through_estimator(bits, symmetric):
    x, w0, a, b, step, offset, gamma = _case(bits, symmetric)
    grad_out = torch.randn(3, 4, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    mine, ref = _leaves(x, a, b, step, offset), _leaves(x, a, b, step, offset)
    y = L4QLinearFunction.apply(mine[0], w0, None, mine[1], mine[2], mine[3], mine[4], gamma, C, bits,
                                GROUP, torch.float64)
    y_ref = _reference(ref[0], w0, ref[1], ref[2], ref[3], ref[4], gamma, bits)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    y.backward(grad_out)
    y_ref.backward(grad_out)
    for name, m, r in zip(("x", "A", "B", "s", "beta"), mine, ref):
        if m is not None:
            torch.testing.assert_close(m.grad, r.grad, rtol=1e-10, atol=1e-12, msg=name)
    # The case really exercises both branches: some weights clip, most do not.
    v = ((w0 + C * b @ a) - (0 if offset is None else _expand(offset))) / _expand(step)
    qn, qp = intk.bounds(bits)
    clipped = ((v < qn) | (v > qp)).float().mean()
    assert 0 < clipped < 0.5


def _frozen_residual_loss(w0, x, grad_out, a, step, offset, b, bits, r, inside, bound):
    """Σ grad_out ⊙ y with Ŵ's rounding residual r and clip pattern held fixed: LSQ's gradient
    of s and β (before the scale γ) and the STE gradient of A are this function's true derivatives."""
    s = _expand(step)
    beta = 0 if offset is None else _expand(offset)
    v = ((w0 + C * b @ a) - beta) / s
    w_hat = torch.where(inside, (v + r) * s, bound * s) + beta
    return float((grad_out * (x @ w_hat.T)).sum())


@pytest.mark.parametrize("bits", [3, 4])
def test_step_size_offset_and_adapter_gradients_match_finite_differences(bits):
    x, w0, a, b, step, offset, gamma = _case(bits, symmetric=False, seed=1)
    grad_out = torch.randn(3, 4, OUT, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    xa, aa, ba, sa, oa = _leaves(x, a, b, step, offset)
    L4QLinearFunction.apply(xa, w0, None, aa, ba, sa, oa, gamma, C, bits, GROUP, torch.float64).backward(grad_out)

    qn, qp = intk.bounds(bits)
    v0 = ((w0 + C * b @ a) - _expand(offset)) / _expand(step)
    inside = (v0 >= qn) & (v0 <= qp)
    r = (v0.round() - v0).detach()
    bound = v0.clamp(qn, qp).round()
    args = dict(w0=w0, x=x, grad_out=grad_out, b=b, bits=bits, r=r, inside=inside, bound=bound)
    eps = 1e-6

    def fd(tensor, name, **fixed):
        out = torch.empty_like(tensor)
        for i in range(tensor.numel()):
            plus, minus = tensor.clone(), tensor.clone()
            plus.view(-1)[i] += eps
            minus.view(-1)[i] -= eps
            out.view(-1)[i] = (_frozen_residual_loss(**args, **fixed, **{name: plus})
                               - _frozen_residual_loss(**args, **fixed, **{name: minus})) / (2 * eps)
        return out

    g = gamma.unsqueeze(0)
    torch.testing.assert_close(sa.grad, g * fd(step, "step", a=a, offset=offset), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(oa.grad, g * fd(offset, "offset", a=a, step=step), rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(aa.grad, fd(a, "a", step=step, offset=offset), rtol=1e-6, atol=1e-8)


def test_gradient_scale_is_one_over_root_of_group_size_times_qp():
    layer = L4QLinear(torch.nn.Linear(200, 4, bias=False), rank=2, alpha=2.0, bits=3, group=128)
    _, qp = intk.bounds(3)
    assert layer.quant_step.shape == (4, 2)
    torch.testing.assert_close(layer.grad_scale, torch.tensor([1 / math.sqrt(128 * qp), 1 / math.sqrt(72 * qp)]))


@pytest.mark.parametrize("symmetric", [False, True])
def test_a_fresh_l4q_layer_is_round_to_nearest_quantization_of_the_base(symmetric):
    torch.manual_seed(0)
    base = torch.nn.Linear(300, 16)
    layer = L4QLinear(base, rank=4, alpha=8.0, bits=4, group=128, symmetric=symmetric)
    w = base.weight.detach()
    step, offset = intk.minmax_params(w, 4, 128, symmetric)
    q = intk.codes(w, step, offset, 4, 128)
    # min–max initialisation clips nothing: the codes reach both ends of the range and no further
    assert int(q.min()) >= -8 and int(q.max()) <= 7
    if not symmetric:
        assert int(q.min()) == -8 and int(q.max()) == 7
    x = torch.randn(5, 300)
    expected = x @ intk.dequantize(q, step, offset, 128).T + base.bias
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)
    err = (intk.dequantize(q, step, offset, 128) - w).abs()
    assert float(err.max()) <= float(step.max()) / 2 * (2 if symmetric else 1) + 1e-7


def test_backward_keeps_only_the_input_the_frozen_weight_and_small_tensors():
    base = torch.nn.Linear(256, 192, bias=False)
    layer = L4QLinear(base, rank=8, alpha=16.0, bits=4, group=64)
    x = torch.randn(2, 10, 256, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    full = [t for t in saved if t.numel() >= base.weight.numel()]
    assert len(full) == 1 and full[0].data_ptr() == base.weight.data_ptr()   # W0 itself, no copy
    others = sum(t.numel() * t.element_size() for t in saved if t.data_ptr() not in
                 (base.weight.data_ptr(), x.data_ptr()))
    # A, B (r·(in+out)), step sizes and offsets (2·out·G) and γ (G), in fp32
    assert others == 4 * (8 * (256 + 192) + 2 * 192 * 4 + 4)
    y.sum().backward()
    assert all(p.grad is not None for p in (layer.lora_A, layer.lora_B, layer.quant_step, layer.quant_offset))


def test_l4q_trains_adapters_and_step_sizes_together_and_nothing_else():
    torch.manual_seed(0)
    model = tiny_llama()
    names = apply_l4q(model, 4, 8.0, TARGETS, bits=3, group_size=32)
    assert len(names) == 14 and all(isinstance(m, L4QLinear) for m in l4q_modules(model).values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {n.rsplit(".", 1)[1] for n in trainable} == {"lora_A", "lora_B", "quant_step", "quant_offset"}
    step0 = model.model.layers[0].mlp.down_proj.quant_step.detach().clone()
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert losses[-1] < losses[0] - 0.05
    assert not torch.equal(model.model.layers[0].mlp.down_proj.quant_step, step0)


def test_apply_l4q_refuses_dropout_a_quantized_base_and_unknown_bits():
    with pytest.raises(ValueError, match="dropout"):
        apply_l4q(tiny_llama(), 4, 8.0, TARGETS, dropout=0.1)
    nf4 = tiny_llama()
    quantize_linears(nf4, TARGETS, torch.float32)
    with pytest.raises(ValueError, match="dense"):
        apply_l4q(nf4, 4, 8.0, TARGETS)
    with pytest.raises(ValueError, match="bits"):
        apply_l4q(tiny_llama(), 4, 8.0, TARGETS, bits=5)


def test_merge_bakes_the_quantized_weight_into_the_base():
    torch.manual_seed(0)
    layer = L4QLinear(torch.nn.Linear(64, 32), rank=4, alpha=8.0, bits=4, group=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 64)
    before = layer(x)
    layer.merge()
    torch.testing.assert_close(layer(x), before, rtol=1e-6, atol=1e-6)
    assert isinstance(layer, LoRALinear)
    with pytest.raises(RuntimeError):
        layer.unmerge()


def test_saved_l4q_state_rebuilds_the_same_model(tmp_path):
    torch.manual_seed(0)
    model = tiny_llama()
    apply_l4q(model, 4, 8.0, ("q_proj", "down_proj"), bits=3, group_size=32)
    with torch.no_grad():
        for m in l4q_modules(model).values():
            m.lora_B.normal_(std=0.02)
            m.quant_step.mul_(1.1)
    save_l4q_state(model, tmp_path / "l4q", base_model="tiny")
    fresh = tiny_llama()
    names = load_l4q_state(fresh, tmp_path / "l4q")
    assert sorted(names) == sorted(l4q_modules(model))
    ids = torch.randint(0, 512, (2, 8))
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, rtol=0, atol=0)


@pytest.mark.gpu
def test_l4q_under_cuda_autocast_quantizes_in_fp32_and_runs_the_matmul_in_bf16():
    base = torch.nn.Linear(256, 64, bias=False).cuda().to(torch.bfloat16)
    layer = L4QLinear(base, rank=4, alpha=8.0, bits=4, group=128)
    assert layer.quant_step.dtype == torch.float32 and layer.lora_A.dtype == torch.float32
    x = torch.randn(2, 8, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    expected = x.float() @ layer.quantized_weight().T
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=3e-2)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in (layer.lora_B, layer.quant_step, layer.quant_offset))
