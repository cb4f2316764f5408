"""BF16AdamW: a full run's bf16 weights updated in fp32 and rounded stochastically."""

import dataclasses

import pytest
import torch

import lowmem.optim
from lowmem import memory
from lowmem.config import RunConfig
from lowmem.optim import BF16AdamW, build_optimizer
from lowmem.rounding import round_stochastically_
from lowmem.planner import plan_from_config
from lowmem.spec import builtin_spec


def _noise(shape, seed=0):
    return torch.randint(0, 1 << 16, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(seed))


def test_stochastic_rounding_lands_on_a_neighbour_and_is_unbiased():
    step = 2.0 ** -13                                                        # bf16's step near 0.02
    base = float(torch.tensor(0.02).to(torch.bfloat16))
    x = torch.tensor([base + 0.3 * step, -base - 0.7 * step, 1.0, -3.5, float("inf"), 1e-30])
    samples = torch.stack([round_stochastically_(x.clone(), _noise(x.shape, seed)) for seed in range(4000)])
    assert torch.equal(samples.to(torch.bfloat16).float(), samples)          # bf16 values, exactly
    down = x.to(torch.bfloat16).float()                                      # to nearest, for reference
    for i in range(len(x)):
        values = set(samples[:, i].tolist())
        assert len(values) <= 2
        if torch.isfinite(x[i]) and x[i] != down[i]:
            assert len(values) == 2                                          # both neighbours occur
    assert samples[:, 2].eq(1.0).all() and samples[:, 3].eq(-3.5).all()      # exact values stay
    assert samples[:, 4].eq(float("inf")).all()
    mean = samples[:, :2].double().mean(0)
    assert torch.allclose(mean, x[:2].double(), atol=step * 0.03)           # nearest is off by 0.3 steps
    assert samples[:, 0].gt(base).float().mean().item() == pytest.approx(0.3, abs=0.03)
    assert samples[:, 1].lt(-base).float().mean().item() == pytest.approx(0.7, abs=0.03)


def test_on_fp32_weights_it_is_torchs_adamw():
    torch.manual_seed(0)
    weights = [torch.randn(33, 17), torch.randn(17)]
    ours = [torch.nn.Parameter(w.clone()) for w in weights]
    theirs = [torch.nn.Parameter(w.clone()) for w in weights]
    groups = lambda ps: [{"params": [ps[0]], "weight_decay": 0.1}, {"params": [ps[1]], "weight_decay": 0.0}]
    a = BF16AdamW(groups(ours), lr=1e-2, betas=(0.9, 0.95), seed=3)
    b = torch.optim.AdamW(groups(theirs), lr=1e-2, betas=(0.9, 0.95))
    for step in range(5):
        grads = [torch.randn_like(w) for w in weights]
        for p, q, g in zip(ours, theirs, grads):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7)
    assert set(a.state_dict()["state"][0]) == set(b.state_dict()["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}


def test_small_updates_move_bf16_weights_as_fp32_ones_where_torchs_adamw_leaves_them():
    """lr 5e-5 (full's default) on weights of std 0.02 under a steady gradient: torch's AdamW on
    bf16 weights leaves over 40% of them where they were; these follow the fp32 run."""
    torch.manual_seed(0)
    w0 = (torch.randn(256, 256) * 0.02)
    grad = torch.randn(256, 256)
    runs = {}
    for name, dtype, cls in (("fp32", torch.float32, torch.optim.AdamW), ("nearest", torch.bfloat16, torch.optim.AdamW),
                             ("stochastic", torch.bfloat16, BF16AdamW)):
        p = torch.nn.Parameter(w0.to(dtype))
        opt = cls([p], lr=5e-5, weight_decay=0.0)
        start = p.detach().clone()
        for _ in range(40):
            p.grad = grad.to(dtype)
            opt.step()
        runs[name] = (p.detach().float(), start.float())
    moved = {k: (w - s) for k, (w, s) in runs.items()}
    unmoved = (moved["nearest"] == 0).float().mean().item()
    assert unmoved > 0.4                                        # torch's AdamW on bf16: the bug
    assert (moved["stochastic"] == 0).float().mean().item() < 0.05
    ref = moved["fp32"]
    err = {k: ((moved[k] - ref).abs().mean() / ref.abs().mean()).item() for k in ("nearest", "stochastic")}
    assert err["stochastic"] < 0.2 < err["nearest"], err
    along = {k: ((moved[k] * ref.sign()).mean() / ref.abs().mean()).item() for k in moved}
    assert abs(along["stochastic"] - 1) < 0.02 and along["nearest"] < 0.8, along   # unbiased; nearest falls short


def test_bf16_second_moments_follow_the_fp32_ones_instead_of_only_growing():
    """Rounded to nearest, v's change (1−β2)·(g² − v) is under half a bf16 step once t ≳ 250: v
    could only grow. After a start of 5x gradients it stayed 1.5x fp32 AdamW's at step 1000."""
    torch.manual_seed(0)
    n = 4000
    w = torch.nn.Parameter(torch.randn(n).bfloat16())
    ref = torch.nn.Parameter(w.detach().float().clone())
    ours = BF16AdamW([{"params": [w], "weight_decay": 0.0}], lr=1e-6)
    torchs = torch.optim.AdamW([{"params": [ref], "weight_decay": 0.0}], lr=1e-6)
    for t in range(1, 1001):
        g = (torch.randn(n) * (5.0 if t <= 100 else 1.0)).bfloat16()
        w.grad, ref.grad = g, g.float()
        ours.step()
        torchs.step()
    v, v_ref = ours.state[w]["exp_avg_sq"].float().mean(), torchs.state[ref]["exp_avg_sq"].mean()
    m, m_ref = ours.state[w]["exp_avg"].float(), torchs.state[ref]["exp_avg"]
    assert v / v_ref == pytest.approx(1.0, abs=0.02)
    assert torch.corrcoef(torch.stack([m, m_ref]))[0, 1] > 0.99


def test_a_resumed_optimizer_rounds_as_the_uninterrupted_one():
    torch.manual_seed(1)
    w0 = torch.randn(64, 32).to(torch.bfloat16)
    grads = [torch.randn(64, 32).to(torch.bfloat16) for _ in range(6)]

    def run(steps, p, opt):
        for g in steps:
            p.grad = g.clone()
            opt.step()

    p = torch.nn.Parameter(w0.clone())
    whole = BF16AdamW([p], lr=1e-3, seed=5)
    run(grads, p, whole)
    q = torch.nn.Parameter(w0.clone())
    first = BF16AdamW([q], lr=1e-3, seed=5)
    run(grads[:3], q, first)
    saved = first.state_dict()
    r = torch.nn.Parameter(q.detach().clone())
    again = BF16AdamW([r], lr=1e-3, seed=5)
    again.load_state_dict(saved)
    run(grads[3:], r, again)
    assert torch.equal(p, r)
    other = torch.nn.Parameter(w0.clone())
    run(grads, other, BF16AdamW([other], lr=1e-3, seed=6))
    assert not torch.equal(p, other)                             # the seed decides the rounding


def test_chunks_give_the_same_step(monkeypatch):
    torch.manual_seed(2)
    w0, g = torch.randn(10, 9), torch.randn(10, 9)
    results = []
    for chunk in (1 << 22, 7):
        monkeypatch.setattr(lowmem.optim, "BF16_STEP_CHUNK", chunk)
        p = torch.nn.Parameter(w0.clone())
        opt = BF16AdamW([p], lr=1e-2, weight_decay=0.1)
        for _ in range(3):
            p.grad = g.clone()
            opt.step()
        results.append(p.detach())
    assert torch.equal(results[0], results[1])


def test_a_plan_with_16_bit_states_gets_it_and_counts_its_temporaries():
    config = RunConfig(method="full", device="cpu")
    plan = dataclasses.replace(plan_from_config(config), base_format="bf16", compute_dtype="bfloat16",
                               optimizer_state_bits=16, device="cuda")
    params = [("w", torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))),
              ("b", torch.nn.Parameter(torch.zeros(4, dtype=torch.bfloat16)))]
    opt = build_optimizer(params, plan, config)
    assert type(opt) is BF16AdamW and [g["weight_decay"] for g in opt.param_groups] == [config.weight_decay, 0.0]
    spec = builtin_spec("llama-3.1-8b")                      # embeddings of 525M elements: a chunk's worth
    assert memory.optimizer_step_bytes(spec, plan) == memory.BF16_STEP_TEMPORARIES * memory.BF16_STEP_CHUNK
    small = dataclasses.replace(builtin_spec("smollm2-135m"), vocab=512)     # largest tensor: 1536 x 576
    assert memory.optimizer_step_bytes(small, plan) == memory.BF16_STEP_TEMPORARIES * 1536 * 576
    assert memory.optimizer_step_bytes(spec, dataclasses.replace(plan, optimizer_state_bits=32)) == 0
    eight = dataclasses.replace(plan, optimizer_state_bits=8, optimizer="adamw8bit")   # its moments rounded too
    assert memory.optimizer_step_bytes(spec, eight) == (memory.EIGHT_BIT_STEP_TEMPORARIES + memory.EIGHT_BIT_STEP_BF16) * memory.EIGHT_BIT_STEP_CHUNK


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_it_follows_the_fp32_update_within_its_temporaries():
    torch.manual_seed(0)
    w0, g = (torch.randn(3000, 4096) * 0.02).cuda(), torch.randn(3000, 4096).cuda()
    ref = torch.nn.Parameter(w0.clone())
    fp32 = torch.optim.AdamW([ref], lr=5e-5, weight_decay=0.0)
    p = torch.nn.Parameter(w0.to(torch.bfloat16))
    opt = BF16AdamW([p], lr=5e-5, weight_decay=0.0)
    start = p.detach().float()
    p.grad, ref.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    opt.step()                                                   # creates the states
    fp32.step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    p.grad, ref.grad = g.to(torch.bfloat16), g.to(torch.bfloat16).float()
    opt.step()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    assert extra <= memory.BF16_STEP_TEMPORARIES * min(p.numel(), memory.BF16_STEP_CHUNK) * 1.1, extra
    fp32.step()
    moved, expected = p.detach().float() - start, ref.detach() - w0
    along = (moved * expected.sign()).mean() / expected.abs().mean()
    assert abs(along.item() - 1) < 0.02                          # unbiased, as on the CPU


@pytest.mark.parametrize("state_bits", [32, 8])
def test_weight_decay_leaves_l4q_step_sizes_and_offsets_and_so_the_quantized_base_alone(state_bits):
    """Decayed, s and β shrink by (1 − lr·λ) a step, and with them the whole base q·s + β."""
    from types import SimpleNamespace

    from torch import nn

    from lowmem.quant.l4q import L4QLinear

    torch.manual_seed(0)
    layer = L4QLinear(nn.Linear(128, 16, bias=False), 4, 8.0, bits=4, group=64)
    layer.base.requires_grad_(False)         # frozen, as the trainer holds it
    named = [(f"layers.0.q_proj.{n}", p) for n, p in layer.named_parameters() if p.requires_grad]
    config = SimpleNamespace(lr=1e-2, adam_betas=(0.9, 0.999), weight_decay=0.1, seed=0)
    optimizer = build_optimizer(named, SimpleNamespace(method="l4q", optimizer_state_bits=state_bits,
                                                       device="cpu"), config)
    names = {id(p): n.rpartition(".")[2] for n, p in named}
    decayed = {names[id(p)] for g in optimizer.param_groups if g["weight_decay"] for p in g["params"]}
    assert decayed == {"lora_A", "lora_B"}
    base = layer.quantized_weight().detach().clone()
    for _ in range(20):
        for _, p in named:
            p.grad = torch.zeros_like(p)
        optimizer.step()
    assert torch.equal(layer.quantized_weight(), base)


def test_parameters_it_cannot_update_are_refused_when_it_is_made():
    with pytest.raises(ValueError, match=r"contiguous bf16 \(or fp32\) parameters; got a torch.float16 one"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.float16))])
    with pytest.raises(ValueError, match="got a non-contiguous torch.bfloat16 one of shape"):
        BF16AdamW([torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.bfloat16).t())])


def test_a_fused_adamw_stays_fused_when_it_loads_an_unfused_ones_state():
    from lowmem.optim import load_optimizer_state

    w = torch.nn.Parameter(torch.randn(4, 4))
    unfused = torch.optim.AdamW([w], lr=1e-3)
    w.grad = torch.randn(4, 4)
    unfused.step()
    v = torch.nn.Parameter(w.detach().clone())
    fused = torch.optim.AdamW([v], lr=1e-3, fused=True)
    plain = torch.optim.AdamW([v], lr=1e-3, fused=True)
    plain.load_state_dict(unfused.state_dict())
    assert not plain.param_groups[0]["fused"]                 # what torch does on its own
    load_optimizer_state(fused, unfused.state_dict())
    assert fused.param_groups[0]["fused"] and not fused.param_groups[0]["foreach"]
    v.grad = w.grad.clone()
    fused.step()
    unfused.step()
    assert torch.allclose(v, w, atol=1e-6)


def test_an_optimizer_state_grouped_otherwise_is_a_checkpoint_error_not_a_crash():
    from lowmem.errors import CheckpointError
    from lowmem.optim import load_optimizer_state

    a, b, c = (torch.nn.Parameter(torch.zeros(2, 2)) for _ in range(3))
    older = torch.optim.AdamW([{"params": [a]}, {"params": [b, c]}])
    ours = torch.optim.AdamW([{"params": [a, b]}, {"params": [c]}])
    with pytest.raises(CheckpointError, match=r"does not fit this optimizer .*start a new run"):
        load_optimizer_state(ours, older.state_dict())
