"""NF4 (QLoRA) base weights: round-trip error, the frozen layer, QLoRA training, streaming load."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from lowmem import memory
from lowmem.lora import apply_lora, lora_modules
from lowmem.model import tiny_llama
from lowmem.quant.nf4 import LoadStats, NF4Linear, load_nf4_model, quantize_linears

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


pytestmark = pytest.mark.usefixtures("one_thread")


def _blocks(t: torch.Tensor, size: int = 64) -> torch.Tensor:
    """Row-major blocks of `size` (bitsandbytes' NF4 blocks), zero-padded."""
    flat = t.flatten()
    pad = -flat.numel() % size
    return torch.nn.functional.pad(flat, (0, pad)).view(-1, size)


@pytest.fixture
def weight():
    torch.manual_seed(0)
    w = torch.randn(96, 200) * 0.02
    w[3, 7] = 0.5    # an outlier: its block's error scales with it, the others' must not
    return w


def _half_largest_gap(layer: NF4Linear) -> float:
    levels = layer.code.float().sort().values
    return float((levels[1:] - levels[:-1]).max()) / 2


def test_nf4_error_is_at_most_half_the_widest_level_gap_times_the_block_absmax(weight):
    layer = NF4Linear(weight, double_quant=False)
    err = _blocks(layer.dequantized_weight() - weight).abs().amax(1)
    absmax = _blocks(weight).abs().amax(1)
    bound = _half_largest_gap(layer)                       # 0.1519: between -1 and -0.6962
    assert bound == pytest.approx(0.1519, abs=1e-3)
    assert torch.all(err <= bound * absmax * (1 + 1e-5))
    # The outlier's block has the largest error, several times the typical block's:
    # blocks keep one outlier from costing the whole tensor its precision.
    assert err.max() == err[(3 * 200 + 7) // 64]
    assert err.max() > 3 * err.median()


def test_double_quantization_adds_only_the_error_of_the_8bit_absmax(weight):
    import bitsandbytes.functional as bnbf

    layer = NF4Linear(weight, double_quant=True)
    state = layer.quant_state()
    absmax_dq = bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset
    absmax = _blocks(weight).abs().amax(1)
    # |w − c·Â| ≤ |w − c·A| + |c|·|A − Â| ≤ ½gap·A + |A − Â|   (|c| ≤ 1)
    err = _blocks(layer.dequantized_weight() - weight).abs().amax(1)
    assert torch.all(err <= _half_largest_gap(layer) * absmax + (absmax - absmax_dq).abs() + 1e-7)
    assert float(((absmax - absmax_dq).abs() / absmax).max()) < 0.02
    assert float((err / absmax).mean()) < 0.12           # typical error well below the worst case


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_layer_holds_the_bytes_the_memory_model_predicts(double_quant):
    weight = torch.randn(512, 1024)
    layer = NF4Linear(weight, double_quant=double_quant)
    held = sum(t.numel() * t.element_size() for t in [*layer.parameters(), *layer.buffers()])
    assert held == memory.nf4_bytes(weight.numel(), double_quant)
    # 0.5 B of codes + 4/64 B of fp32 absmax, or ~1/64 B of 8-bit absmax when double-quantized
    assert held / weight.numel() == pytest.approx(0.5159 if double_quant else 0.5625, abs=3e-3)


def test_nf4_forward_and_input_gradient_match_the_dequantize_then_linear_reference(weight):
    bias = torch.randn(96)
    layer = NF4Linear(weight, bias)
    x = torch.randn(5, 3, 200, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), layer.reference_forward(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    assert not layer.weight.requires_grad and layer.weight.grad is None


def test_nf4_layer_saves_no_full_precision_weight_for_backward(weight):
    layer = NF4Linear(weight)
    saved = []
    x = torch.randn(4, 200, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x).sum().backward()
    assert not any(t.is_floating_point() and t.numel() == weight.numel() for t in saved)


def _lora_models():
    """The same tiny model with the same random adapters over three bases: fp32, NF4,
    and fp32 holding the NF4 weights dequantized."""
    dense = tiny_llama(seed=0)
    quant = tiny_llama(seed=0)
    quantize_linears(quant, TARGETS, torch.float32)
    dequant = tiny_llama(seed=0)
    with torch.no_grad():
        for name, m in quant.named_modules():
            if isinstance(m, NF4Linear):
                dequant.get_submodule(name).weight.copy_(m.dequantized_weight())
    for model in (dense, quant, dequant):
        torch.manual_seed(1)
        apply_lora(model, 4, 8.0, TARGETS)
        g = torch.Generator().manual_seed(2)
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
    return dense, quant, dequant


def test_qlora_is_lora_over_the_dequantized_base_and_trains_only_the_adapters():
    dense, quant, dequant = _lora_models()
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    out_d, out_q, out_r = (m(ids, labels=ids) for m in (dense, quant, dequant))
    # Exactly LoRA over the NF4 weights, forward and backward ...
    torch.testing.assert_close(out_q.logits, out_r.logits, rtol=1e-4, atol=1e-5)
    # ... and near the fp32 model: NF4 moves each weight by ~10% of its rms on these
    # random Gaussian weights, and the logits of this 2-layer model by about as much.
    rel = (out_q.logits - out_d.logits).norm() / out_d.logits.norm()
    assert 0 < rel < 0.2
    for out in (out_d, out_q, out_r):
        out.loss.backward()
    trainable = {n: p for n, p in quant.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert all(isinstance(m.base, NF4Linear) for m in lora_modules(quant).values())
    assert all(p.grad is None for p in quant.parameters() if not p.requires_grad)
    reference = dict(dequant.named_parameters())
    for name, p in trainable.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
        torch.testing.assert_close(p.grad, reference[name].grad, rtol=1e-3, atol=1e-6)


def test_quantize_linears_leaves_embeddings_and_head_dense():
    model = tiny_llama()
    names = quantize_linears(model, TARGETS, torch.float32)
    assert len(names) == 2 * 7
    assert type(model.lm_head) is torch.nn.Linear and model.lm_head.weight.dtype == torch.float32
    assert model.model.embed_tokens.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="match no linear"):
        quantize_linears(tiny_llama(), ("qproj",), torch.float32)


# ---------------------------------------------------------------- streaming load

@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-sharded")
    tiny_llama(seed=3).save_pretrained(folder, max_shard_size="100KB")
    return folder


def test_streaming_load_holds_one_full_precision_linear_at_a_time(sharded_dir):
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 2
    stats = LoadStats()
    model = load_nf4_model(sharded_dir, "cpu", torch.float32, TARGETS, stats=stats)
    assert len(stats.quantized) == 2 * 7
    # Peak of full-precision target weights alive at once = the largest single one,
    # though they total 14 of them; all of them freed by the end.
    total = sum(m.in_features * m.out_features * 4 for m in model.modules() if isinstance(m, NF4Linear))
    assert stats.full_precision_peak == stats.largest_target < total / 4
    assert stats.full_precision_alive == 0
    # Streaming gives the model that quantizing a fully loaded one gives.
    reference = tiny_llama(seed=3)
    quantize_linears(reference, TARGETS, torch.float32)
    ids = torch.randint(0, 512, (2, 10))
    torch.testing.assert_close(model(ids).logits, reference.eval()(ids).logits, rtol=0, atol=0)
    assert model.lm_head.weight is model.model.embed_tokens.weight   # tied again


def test_load_stats_count_a_tensor_until_it_is_really_freed():
    stats = LoadStats()
    t = torch.zeros(1000)
    stats.track(t)
    kept = t
    del t
    assert stats.full_precision_alive == 4000     # still referenced
    del kept
    assert stats.full_precision_alive == 0 and stats.full_precision_peak == 4000


PROBE = textwrap.dedent("""
    import json, torch
    import bitsandbytes.functional, transformers.models.llama.modeling_llama  # imports before the baseline
    from lowmem.model import resolve_model_dir
    from lowmem.quant.nf4 import LoadStats, load_nf4_model

    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024

    folder = resolve_model_dir("smollm2-135m", log=lambda m: None)
    open("/proc/self/clear_refs", "w").write("5")   # reset the peak (VmHWM) to the current RSS
    base = status("VmRSS:")
    stats = LoadStats()
    model = load_nf4_model(folder, "cpu", torch.float32, {targets!r}, stats=stats)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    print(json.dumps({{"peak": status("VmHWM:") - base, "held": held, "read": stats.bytes_read,
                      "largest": stats.largest_target}}))
""")


@pytest.mark.slow
def test_streaming_load_of_the_embedded_model_never_holds_it_in_full_precision(embedded_dir):
    import os

    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    result = subprocess.run([sys.executable, "-c", PROBE.format(targets=TARGETS)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    r = json.loads(result.stdout.strip().splitlines()[-1])
    fp32 = r["read"]                      # the file's fp32 tensors: 538 MB
    # What stays: NF4 linears (~55 MB) + fp32 embeddings and norms (~113 MB). The
    # peak adds one linear in fp32, bitsandbytes' quantization temporaries and
    # the allocator's slack, which 64 MiB covers (measured: ~38 MB).
    assert r["peak"] < r["held"] + r["largest"] + 64 * 2**20
    assert r["peak"] < 0.5 * fp32


@pytest.mark.gpu
def test_nf4_on_cuda_computes_in_bf16_and_matches_the_reference(weight):
    layer = NF4Linear(weight.cuda(), compute_dtype=torch.bfloat16)
    x = torch.randn(4, 200, device="cuda", requires_grad=True)
    y = layer(x)
    assert y.dtype == torch.float32 and layer.dequantized_weight().dtype == torch.bfloat16
    torch.testing.assert_close(y, layer.reference_forward(x), rtol=2e-2, atol=2e-2)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_quantized_model_counts_its_parameters_as_the_dense_one():
    from lowmem.model import parameter_count, tiny_llama

    model = tiny_llama()
    dense = parameter_count(model)
    assert dense == sum(p.numel() for p in model.parameters())
    quantize_linears(model, TARGETS, torch.float32)
    assert sum(p.numel() for p in model.parameters()) < dense  # packed bytes, not weights
    assert parameter_count(model) == dense


def with_stale_tensors(source, folder, keys):
    """A copy of the sharded model `source` whose first shard also holds `keys` (eight ones each),
    as old Llama checkpoints hold rotary inv_freq tensors the model now computes."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, folder)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    for key in keys:
        tensors[key] = torch.ones(8)
        index["weight_map"][key] = shard.name
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return folder


def test_an_nf4_load_leaves_out_what_the_model_does_not_define(sharded_dir, tmp_path):
    """The computed rotary inv_freq is kept (not overwritten with the checkpoint's, in the compute
    dtype), and a tensor of an older layout is left out, not refused: as the dense loader does."""
    stale = ["model.rotary_emb.inv_freq", "model.layers.0.self_attn.rotary_emb.inv_freq"]
    folder = with_stale_tensors(sharded_dir, tmp_path / "m", stale)
    said = []
    model = load_nf4_model(folder, "cpu", torch.bfloat16, TARGETS, log=said.append)
    clean = load_nf4_model(sharded_dir, "cpu", torch.bfloat16, TARGETS)
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    assert torch.equal(model.model.rotary_emb.inv_freq, clean.model.rotary_emb.inv_freq)
    assert said and said[0].startswith(f"{folder}: left out 2 tensors the model does not define, e.g. ")
    ids = torch.randint(0, 512, (2, 10))
    torch.testing.assert_close(model(ids).logits, clean(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_dense_model_loads_one_tensor_at_a_time_into_what_transformers_would_build(sharded_dir, tmp_path,
                                                                                     dtype):
    """lowmem.model.load_model (load_streamed) reads safetensors one tensor at a time (on its way to a GPU the
    host then holds one tensor, not the model): the same tensors as from_pretrained, a tensor
    the model does not define left out, and never more live than the model plus one tensor."""
    from transformers import AutoModelForCausalLM

    from lowmem.measure import LiveTensorBytes, model_bytes
    from lowmem.model import load_streamed

    folder = with_stale_tensors(sharded_dir, tmp_path / "m", ["model.rotary_emb.inv_freq"])
    said = []
    with LiveTensorBytes("cpu") as live:
        model = load_streamed(folder, "cpu", dtype, log=said.append)
    reference = AutoModelForCausalLM.from_pretrained(str(sharded_dir), dtype=dtype, attn_implementation="sdpa")
    ours, theirs = model.state_dict(), reference.state_dict()
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].dtype == theirs[k].dtype for k in ours)
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.training
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)   # not the ones
    assert "left out 1 tensors the model does not define, e.g. model.rotary_emb.inv_freq" in said[0]
    largest = max(t.numel() * t.element_size() for t in theirs.values())
    assert live.growth <= model_bytes(model) + 2 * largest, (live.growth, model_bytes(model))
