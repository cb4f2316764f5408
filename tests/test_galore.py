"""GaLore with 8-bit moments: the paper's update, per-layer updates, accumulation, exact resume."""

import copy
import dataclasses
import io
import math

import pytest
import torch

from lowmem import galore
from lowmem.galore import BLOCK, GaLoreAdamW8bit, dequantized_moments
from lowmem.kernels.adam8bit import adam8bit_step_
from lowmem.rounding import generator
from lowmem.loss import causal_lm_loss
from lowmem.model import tiny_llama

B1, B2, EPS = 0.9, 0.999, 1e-8


@pytest.fixture(scope="module")
def base_model():
    model = tiny_llama(vocab_size=256, hidden=64, layers=1, heads=4, kv_heads=2, intermediate=128, seed=1)
    model.config.use_cache = False
    return model


def fresh(model):
    return copy.deepcopy(model)


def batch(seed, rows=2, length=12):
    return torch.randint(0, 256, (rows, length), generator=torch.Generator().manual_seed(seed))


def backward(model, ids, targets=None):
    """Sum of token losses / `targets` (the trainer's normalisation over a whole step)."""
    hidden = model.model(input_ids=ids).last_hidden_state
    targets = targets or ids.shape[0] * (ids.shape[1] - 1)
    (causal_lm_loss(hidden, model.lm_head.weight, ids, reduction="sum") / targets).backward()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


# ---------------------------------------------------------------- the update

@pytest.mark.parametrize("min_8bit", [10**9, 256], ids=["fp32-moments", "8bit-moments"])
def test_two_galore_steps_equal_the_papers_update_computed_by_hand(base_model, min_8bit):
    model = fresh(base_model)
    lr, rank, scale, wd = 1e-2, 8, 0.5, 0.1
    opt = GaLoreAdamW8bit(model.named_parameters(), lr=lr, weight_decay=wd, rank=rank, update_gap=100,
                          scale=scale, min_8bit_size=min_8bit)
    names = ["model.layers.0.mlp.up_proj.weight",     # 128×64: right projection
             "model.layers.0.mlp.down_proj.weight"]   # 64×128: left projection
    params = dict(model.named_parameters())
    w = {n: params[n].detach().clone() for n in names}
    seen = []
    for step in (1, 2):
        backward(model, batch(step))
        seen.append(grads(model))
        opt.step()
        opt.zero_grad()

    for name in names:
        g1, g2 = seen[0][name], seen[1][name]
        right = g1.shape[0] >= g1.shape[1]
        u, _, vh = torch.linalg.svd(g1, full_matrices=False)
        basis = vh[:rank].T if right else u[:, :rank]                  # the first step's gradient, top r
        proj = (lambda g: g @ basis) if right else (lambda g: basis.T @ g)
        back = (lambda n: n @ basis.T) if right else (lambda n: basis @ n)
        state = opt.state[params[name]]
        assert state["projection"].shape == (min(g1.shape), rank)
        torch.testing.assert_close(state["projection"], basis)

        m = v = torch.zeros_like(proj(g1))
        expected = w[name]
        for t, g in ((1, g1), (2, g2)):
            r = proj(g)
            m, v = B1 * m + (1 - B1) * r, B2 * v + (1 - B2) * r**2
            n = (m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS)
            expected = expected * (1 - lr * wd) - lr * scale * back(n)
        moment1, moment2 = dequantized_moments(state, opt.qmaps)
        if min_8bit > 1000:   # fp32 moments: the same numbers
            torch.testing.assert_close(params[name].detach(), expected, rtol=0, atol=1e-6)
            torch.testing.assert_close(moment1, m, rtol=0, atol=1e-7)
        else:                 # 8-bit moments: within a code gap (≤ 1.4% of the absmax) a step, blockwise
            assert (moment1 - m).abs().max() <= 0.03 * m.abs().max()
            assert (moment2 - v).abs().max() <= 0.03 * v.abs().max()
            step2 = params[name].detach() - w[name]
            assert (step2 - (expected - w[name])).norm() < 0.03 * (expected - w[name]).norm()
        assert state["state1" if min_8bit < 1000 else "exp_avg"].shape == m.shape


def test_the_8bit_update_goes_chunk_by_chunk_with_the_tensors_noise(monkeypatch):
    """The optimizer's update of a tensor is adam8bit_step_ on each chunk of whole blocks (the
    last one partial) in turn, with the noise of (seed, step, tensor): a resume rounds alike."""
    monkeypatch.setattr(galore, "UPDATE_CHUNK", 512)
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(30, 100))   # a matrix, so weight decay applies
    opt = GaLoreAdamW8bit([("w", p)], lr=1e-2, weight_decay=0.1, rank=None, min_8bit_size=256, seed=3)
    target, state = p.detach().clone().view(-1), None
    for step in (1, 2, 3):
        g = torch.randn(30, 100)
        p.grad = g.clone()
        opt.step()
        if state is None:
            state = {k: torch.zeros_like(v).view(-1) for k, v in opt.state[p].items() if torch.is_tensor(v)}
        gen = generator(3, step, 0, torch.device("cpu"))
        for start in range(0, 3000, 512):
            end, blocks = min(start + 512, 3000), slice(start // BLOCK, math.ceil(min(start + 512, 3000) / BLOCK))
            adam8bit_step_(g.view(-1)[start:end], target[start:end], state["state1"][start:end],
                           state["state2"][start:end], state["absmax1"][blocks], state["absmax2"][blocks],
                           opt.qmaps, step, 1e-2, (B1, B2), EPS, 0.1, gen)
        assert torch.equal(p.detach().view(-1), target)
        for key in ("state1", "state2", "absmax1", "absmax2"):
            assert torch.equal(opt.state[p][key].view(-1), state[key]), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_8bit_update_stays_within_the_temporaries_the_plan_counts(monkeypatch, dtype):
    """memory.EIGHT_BIT_STEP_TEMPORARIES bytes a value of one chunk (4 more for a bf16 weight),
    whatever the tensor's size."""
    from lowmem import memory
    from lowmem.measure import LiveTensorBytes

    monkeypatch.setattr(galore, "UPDATE_CHUNK", 4096)
    p = torch.nn.Parameter(torch.randn(64, 1000).to(dtype))        # 16 chunks, the last one partial
    opt = GaLoreAdamW8bit([("w", p)], lr=1e-3, rank=None)
    for step in range(2):                                           # the first creates the states
        p.grad = torch.randn(64, 1000).to(dtype)
        with LiveTensorBytes() as live:
            opt.step()
    per_value = memory.EIGHT_BIT_STEP_TEMPORARIES + (memory.EIGHT_BIT_STEP_BF16 if dtype == torch.bfloat16 else 0)
    assert 0.75 * per_value * 4096 < live.growth <= per_value * 4096, (live.growth, live.peak_op)


def test_other_tensors_follow_fp32_adamw_nearer_than_bitsandbytes_adamw8bit(base_model):
    """The unprojected tensors get 8-bit AdamW, as bitsandbytes' AdamW8bit, but with V rounded
    stochastically (and M to its nearest code, which bitsandbytes' CPU op misses now and then):
    after two steps nearer fp32 AdamW than AdamW8bit (measured: 2.4x)."""
    import bitsandbytes as bnb

    ours = fresh(base_model)
    opt = GaLoreAdamW8bit(ours.named_parameters(), lr=1e-3, weight_decay=0.1, rank=8)
    # the tied embedding / head, 256×64: not projected, 8-bit moments
    start = ours.model.embed_tokens.weight.detach().clone()
    theirs, exact = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    ref = bnb.optim.AdamW8bit([theirs], lr=1e-3, weight_decay=0.1, betas=(B1, B2), eps=EPS)
    fp32 = torch.optim.AdamW([exact], lr=1e-3, weight_decay=0.1, betas=(B1, B2), eps=EPS)
    for step in (1, 2):
        backward(ours, batch(step))
        theirs.grad = ours.model.embed_tokens.weight.grad.clone()
        exact.grad = theirs.grad.clone()
        opt.step()
        ref.step()
        fp32.step()
        opt.zero_grad()
    assert "state1" in opt.state[ours.model.embed_tokens.weight]
    moved = (exact - start).norm()
    off_ours = (ours.model.embed_tokens.weight - exact).norm()
    assert off_ours < 0.03 * moved and off_ours < (theirs - exact).norm()


# ---------------------------------------------------------------- per-layer updates

def _peak_live_gradient_bytes(model, per_layer):
    params = list(model.parameters())
    peak = [0]

    def count(_):
        live = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        peak[0] = max(peak[0], live)

    for p in params:   # registered first, so it runs before the optimizer's hook sees each gradient
        p.register_post_accumulate_grad_hook(count)
    opt = GaLoreAdamW8bit(model.named_parameters(), lr=1e-3, rank=8, per_layer=per_layer)
    backward(model, batch(1))
    count(None)
    return peak[0], opt


def test_per_layer_updates_hold_one_full_gradient_at_a_time(base_model):
    sizes = [p.numel() * 4 for p in base_model.parameters()]
    per_layer, opt = _peak_live_gradient_bytes(fresh(base_model), per_layer=True)
    assert per_layer == max(sizes)                   # the largest single gradient, nothing beside it
    assert all(p.grad is None for p in opt._group_of)
    whole, _ = _peak_live_gradient_bytes(fresh(base_model), per_layer=False)
    assert whole == sum(sizes)


def test_per_layer_updates_equal_a_global_step(base_model):
    a, b = fresh(base_model), fresh(base_model)
    opt_a = GaLoreAdamW8bit(a.named_parameters(), lr=1e-3, rank=8, update_gap=2, min_8bit_size=256)
    opt_b = GaLoreAdamW8bit(b.named_parameters(), lr=1e-3, rank=8, update_gap=2, min_8bit_size=256,
                            per_layer=True)
    for step in range(3):
        backward(a, batch(step))
        opt_a.step()
        opt_a.zero_grad()
        backward(b, batch(step))
        opt_b.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def _accumulated_step(model, opt, parts):
    targets = sum(p.shape[0] * (p.shape[1] - 1) for p in parts)
    for i, part in enumerate(parts):
        opt.begin_micro_batch(i, len(parts))
        backward(model, part, targets)
    opt.step()


def test_accumulating_two_micro_batches_equals_one_batch_of_both(base_model):
    a, b = fresh(base_model), fresh(base_model)
    opts = [GaLoreAdamW8bit(m.named_parameters(), lr=1e-3, rank=8, update_gap=100, min_8bit_size=256,
                            per_layer=True) for m in (a, b)]
    first, one, two = batch(0, rows=4), batch(1), batch(2)
    for model, opt in zip((a, b), opts):
        _accumulated_step(model, opt, [first])       # the projection is set by the same gradient
    _accumulated_step(a, opts[0], [one, two])
    _accumulated_step(b, opts[1], [torch.cat([one, two])])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    assert all(p.grad is None for p in a.parameters())
    assert abs(opts[0].grad_norm - opts[1].grad_norm) < 1e-5


def test_a_refresh_during_accumulation_takes_the_first_micro_batchs_subspace(base_model):
    model = fresh(base_model)
    opt = GaLoreAdamW8bit(model.named_parameters(), lr=1e-3, rank=8, per_layer=True)
    weight = model.model.layers[0].mlp.up_proj.weight
    probe = fresh(base_model)
    backward(probe, batch(1))
    g1 = probe.model.layers[0].mlp.up_proj.weight.grad
    _accumulated_step(model, opt, [batch(1), batch(2)])
    # normalised per micro-batch, so compare directions: the top-r right singular vectors of g1
    expected = torch.linalg.svd(g1, full_matrices=False)[2][:8].T
    overlap = (opt.state[weight]["projection"].T @ expected).abs()
    torch.testing.assert_close(overlap, torch.eye(8), rtol=0, atol=1e-4)


def test_per_layer_mode_clips_each_tensor_and_reports_the_norm(base_model):
    model = fresh(base_model)
    opt = GaLoreAdamW8bit(model.named_parameters(), lr=1e-3, rank=8, per_layer=True, max_grad_norm=0.01,
                          min_8bit_size=10**9)
    probe = fresh(base_model)
    backward(probe, batch(1))
    norms = {}
    for name, p in probe.named_parameters():
        group = opt._group_of[dict(model.named_parameters())[name]]
        g = p.grad
        if group["galore"]:
            g = galore.project(g, galore.new_projection(g, 8, g.dtype))
        norms[name] = g.norm()
    backward(model, batch(1))
    opt.step()
    assert opt.grad_norm == pytest.approx(math.sqrt(sum(float(n) ** 2 for n in norms.values())), rel=1e-5)
    for name, p in model.named_parameters():
        m = opt.state[p]["exp_avg"]   # (1 − β1)·clipped gradient after one step
        assert float(m.norm()) == pytest.approx((1 - B1) * min(float(norms[name]), 0.01), rel=1e-3)


def test_a_dropped_per_layer_optimizer_frees_its_states_and_stops_updating(base_model):
    """The gradient hooks must not keep the optimizer (and every state it holds) alive."""
    import gc
    import weakref

    model = fresh(base_model)
    opt = GaLoreAdamW8bit(model.named_parameters(), lr=1e-3, rank=8, per_layer=True)
    backward(model, batch(1))
    opt.step()
    alive = weakref.ref(opt)
    del opt
    gc.collect()
    assert alive() is None
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    backward(model, batch(1))                   # the hooks still fire, and do nothing
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


# ---------------------------------------------------------------- checkpoints and bytes

def test_state_dict_round_trip_resumes_exactly(base_model):
    def make(model):
        return GaLoreAdamW8bit(model.named_parameters(), lr=1e-3, rank=8, update_gap=2, min_8bit_size=256,
                               per_layer=True)

    straight = fresh(base_model)
    opt = make(straight)
    for step in range(2):
        _accumulated_step(straight, opt, [batch(step)])
    saved = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "weights": straight.state_dict()}, saved)
    saved.seek(0)
    checkpoint = torch.load(saved, weights_only=True)     # what the trainer's resume does

    resumed = fresh(base_model)
    resumed.load_state_dict(checkpoint["weights"])
    opt_resumed = make(resumed)
    opt_resumed.load_state_dict(checkpoint["optimizer"])
    for step in (2, 3):                                    # step 2 refreshes the projection
        _accumulated_step(straight, opt, [batch(step)])
        _accumulated_step(resumed, opt_resumed, [batch(step)])
    for pa, pb in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    state = opt_resumed.state[resumed.model.layers[0].mlp.up_proj.weight]
    assert state["step"] == 4 and state["state1"].dtype == torch.uint8


def test_state_bytes_match_the_memory_model(base_model):
    from lowmem import memory

    model = fresh(base_model)
    rank = 40   # up/down projections: 40·128 ≥ 4096 values (8-bit); q/k/v/o: fp32 moments
    opt = GaLoreAdamW8bit(model.named_parameters(), lr=1e-3, rank=rank)
    backward(model, batch(1))
    opt.step()
    expected = memory.ADAM8_CODE_BYTES
    for name, p in model.named_parameters():
        if p.ndim == 2 and "embed" not in name:
            expected += memory.galore_state_bytes(p.shape[0], p.shape[1], rank, projection_bytes=4)
        else:
            expected += memory.adamw_state_bytes(p.numel(), bits=8)
    assert opt.state_bytes() == expected


def test_embeddings_are_projected_only_when_asked(base_model):
    model = fresh(base_model)
    embed = model.model.embed_tokens.weight
    plain = GaLoreAdamW8bit(model.named_parameters(), rank=8)
    asked = GaLoreAdamW8bit(model.named_parameters(), rank=8, project_embeddings=True)
    assert not plain._group_of[embed]["galore"]
    assert asked._group_of[embed]["galore"]


def test_build_optimizer_follows_the_plan(base_model):
    from lowmem.config import RunConfig
    from lowmem.optim import build_optimizer
    from lowmem.planner import plan_from_config

    named = list(fresh(base_model).named_parameters())
    config = RunConfig(method="full", device="cpu")
    plan = plan_from_config(config)
    cpu = build_optimizer(named, plan, config)
    assert type(cpu) is torch.optim.AdamW and not cpu.defaults["fused"]
    # On CUDA the fused step: foreach's holds a copy of every second moment, which the plan does not count.
    assert build_optimizer(named, dataclasses.replace(plan, device="cuda"), config).defaults["fused"] is True
    eight = build_optimizer(named, dataclasses.replace(plan, optimizer="adamw8bit", optimizer_state_bits=8), config)
    assert isinstance(eight, GaLoreAdamW8bit) and not any(g["galore"] for g in eight.param_groups)
    g = build_optimizer(named, dataclasses.replace(plan, method="galore", optimizer="galore-adamw8bit",
                                                   optimizer_state_bits=8, galore_rank=16,
                                                   galore_per_layer=True), config)
    assert isinstance(g, GaLoreAdamW8bit) and g.per_layer and g.param_groups[0]["rank"] == 16
    g.remove_hooks()


@pytest.mark.parametrize("project_embeddings", [False, True])
def test_the_planners_optimizer_term_counts_what_the_optimizer_holds(base_model, project_embeddings):
    """memory.optimizer_bytes for a GaLore plan (galore.embeddings on or off) against the state
    the optimizer really allocates on the same model."""
    import dataclasses

    from lowmem import memory
    from lowmem.config import RunConfig
    from lowmem.planner import plan_from_config
    from lowmem.spec import from_hf_config

    model = fresh(base_model)
    rank = 40
    opt = GaLoreAdamW8bit(model.named_parameters(), lr=1e-3, rank=rank, project_embeddings=project_embeddings)
    backward(model, batch(1))
    opt.step()
    spec = from_hf_config(model.config.to_dict())
    plan = dataclasses.replace(plan_from_config(RunConfig(method="galore", device="cpu")), galore_rank=rank,
                               galore_embeddings=project_embeddings)
    assert memory.optimizer_bytes(spec, plan) == opt.state_bytes()


@pytest.mark.parametrize("rank", [None, 16])
def test_bf16_weights_follow_the_fp32_run_where_rounding_to_nearest_loses_the_updates(rank, monkeypatch):
    """8-bit AdamW (rank None) and GaLore on bf16 weights, as on CUDA, at an effective lr of
    5e-5: rounded to nearest (what bitsandbytes' op and addmm_ do on bf16) most of each small
    update is lost; rounded stochastically the weights move as the fp32 run's."""
    import lowmem.galore

    torch.manual_seed(0)
    w0, g = torch.randn(256, 512) * 0.02, torch.randn(256, 512)

    def run(dtype, rounding=True):
        if not rounding:
            monkeypatch.setattr(lowmem.galore, "generator", lambda *a: None)
        p = torch.nn.Parameter(w0.to(dtype).clone())
        opt = GaLoreAdamW8bit([("layers.0.mlp.up_proj.weight", p)], lr=2e-4 if rank else 5e-5, rank=rank,
                              scale=0.25, update_gap=200)
        for _ in range(30):
            p.grad = g.to(dtype)
            opt.step()
        monkeypatch.undo()
        return p.detach().float() - w0.to(dtype).float()

    ref = run(torch.float32)
    along = {name: ((moved * ref.sign()).mean() / ref.abs().mean()).item()
             for name, moved in (("stochastic", run(torch.bfloat16)), ("nearest", run(torch.bfloat16, False)))}
    assert abs(along["stochastic"] - 1) < 0.05 and along["nearest"] < 0.85, along
