"""Export: packed low-bit weights that reproduce the trained model, HF folders, `lowmem export`."""

import argparse
import json
import re

import pytest
import torch
import yaml

from lowmem.lora import apply_lora, lora_modules, save_adapter
from lowmem.model import tiny_llama
from lowmem.quant import intk
from lowmem.errors import ModelError
from lowmem.quant.export import (QUANT_CONFIG, export_run, is_quantized_export, read_quant_config,
                                 load_quantized_export, quantize_model, save_dequantized, save_merged,
                                 save_quantized)
from lowmem.quant.intk import IntKLinear
from lowmem.quant.l4q import apply_l4q, l4q_modules, save_l4q_state

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: several threads cost more than the work on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- packing

def test_three_bit_codes_pack_as_a_little_endian_bit_stream():
    q = torch.tensor([[-3, -2, -1, 0, 1, 2, 3, -4, 1]], dtype=torch.int8)     # Qn = -4
    u = [v + 4 for v in q[0].tolist()]                                        # 1 2 3 4 5 6 7 0 5
    stream = sum(v << (3 * i) for i, v in enumerate(u))                       # code i at bits 3i..3i+2
    expected = list(stream.to_bytes(4, "little"))                             # 27 bits -> 4 bytes
    assert intk.pack(q, 3).tolist() == [expected]


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("width", [1, 7, 64, 200])
def test_pack_then_unpack_gives_back_every_code(bits, width):
    qn, qp = intk.bounds(bits)
    q = torch.randint(qn, qp + 1, (5, width), dtype=torch.int8)
    packed = intk.pack(q, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (5, -(-width * bits // 8))
    assert torch.equal(intk.unpack(packed, bits, width), q)


# ---------------------------------------------------------------- models

def _trained_l4q(bits=4, group=32, seed=0):
    """A tiny model with L4Q layers moved away from their initial state, as training would."""
    torch.manual_seed(seed)
    model = tiny_llama(seed=seed)
    apply_l4q(model, 4, 8.0, TARGETS, bits=bits, group_size=group)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for m in l4q_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)
            m.quant_step.mul_(1 + 0.2 * torch.rand(m.quant_step.shape, generator=g) - 0.1)
            m.quant_offset.add_(0.3 * m.quant_step * torch.randn(m.quant_offset.shape, generator=g))
    return model.eval()


IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(5))


@pytest.mark.parametrize("bits", [3, 4])
def test_packed_export_reproduces_the_training_time_fake_quant_model_exactly(tmp_path, bits):
    model = _trained_l4q(bits)
    with torch.no_grad():
        trained = model(IDS).logits
    q = quantize_model(model, scale_dtype=torch.float32)
    save_quantized(model, q, tmp_path / "q", dense_dtype=torch.float32)
    assert is_quantized_export(tmp_path / "q")
    loaded, _ = load_quantized_export(tmp_path / "q")
    layers = [m for m in loaded.modules() if isinstance(m, IntKLinear)]
    assert len(layers) == 14 and all(m.bits == bits for m in layers)
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, trained, rtol=1e-5, atol=1e-5)
    # Same numbers with the weights dequantized once at load.
    fast, _ = load_quantized_export(tmp_path / "q", materialize=True)
    with torch.no_grad():
        torch.testing.assert_close(fast(IDS).logits, trained, rtol=1e-5, atol=1e-5)
    dense = [m for m in fast.modules() if isinstance(m, IntKLinear)]
    assert all(m.qweight is None and m.weight is not None for m in dense)    # the codes are dropped
    assert "materialized=True" in repr(dense[0]) and f"symmetric={layers[0].symmetric}" in repr(dense[0])


def test_default_export_is_genuinely_low_bit_and_close_to_the_trained_model(tmp_path):
    model = _trained_l4q(4, group=32)
    with torch.no_grad():
        trained = model(IDS).logits
    save_quantized(model, quantize_model(model), tmp_path / "q")       # fp16 scales, bf16 dense
    meta = json.loads((tmp_path / "q" / QUANT_CONFIG).read_text())
    assert meta["bits"] == 4 and meta["group_size"] == 32 and meta["scale_dtype"] == "float16"
    from safetensors import safe_open

    assert not (tmp_path / "q" / "model.safetensors").exists()       # transformers must not take it for a model
    with safe_open(str(tmp_path / "q" / "lowmem-intk.safetensors"), "pt") as f:
        qw = f.get_tensor("model.layers.0.mlp.down_proj.qweight")    # (64, 128): 128 4-bit codes per row
        assert qw.dtype == torch.uint8 and qw.shape == (64, 64)
        assert f.get_tensor("model.layers.0.mlp.down_proj.scales").shape == (64, 4)
        assert "model.layers.0.mlp.down_proj.weight" not in f.keys()
        assert "lm_head.weight" not in f.keys()                        # tied: written once
    loaded, _ = load_quantized_export(tmp_path / "q")
    with torch.no_grad():
        out = loaded(IDS).logits
    assert float((out - trained).norm() / trained.norm()) < 0.02      # fp16 scales, bf16 embeddings


def test_dequantized_export_is_a_hugging_face_model_with_the_same_weights(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _trained_l4q(3)
    q = quantize_model(model, scale_dtype=torch.float32)
    save_quantized(model, q, tmp_path / "q", dense_dtype=torch.float32)
    save_dequantized(model, q, tmp_path / "fp32", dtype=torch.float32)
    save_dequantized(model, q, tmp_path / "bf16")
    packed, _ = load_quantized_export(tmp_path / "q")
    hf32 = AutoModelForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.float32)
    hf16 = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16")
    assert hf16.dtype == torch.bfloat16
    with torch.no_grad():
        reference = packed(IDS).logits
        torch.testing.assert_close(hf32(IDS).logits, reference, rtol=1e-5, atol=1e-5)
        rel = (hf16(IDS).logits.float() - reference).norm() / reference.norm()
    assert rel < 0.02


def test_lora_export_merges_then_rounds_to_nearest(tmp_path):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = tiny_llama()
    apply_lora(model, 4, 8.0, TARGETS)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.05)
    model.eval()
    save_merged(model, tmp_path / "merged", dtype=torch.float32)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(IDS).logits, model(IDS).logits, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        before = model(IDS).logits
        q = quantize_model(model, bits=3, group=64, scale_dtype=torch.float32)
        torch.testing.assert_close(model(IDS).logits, before, rtol=0, atol=0)   # the model is untouched
    layer = model.model.layers[1].self_attn.o_proj
    w = layer.base.weight + layer.delta_weight()
    step, offset = intk.minmax_params(w, 3, 64)
    assert torch.equal(intk.unpack(q["model.layers.1.self_attn.o_proj"].qweight, 3, 64),
                       intk.codes(w, step, offset, 3, 64))
    with pytest.raises(ValueError, match="bits and group"):
        quantize_model(model)


def test_an_l4q_layer_exports_only_with_the_bits_it_trained():
    model = _trained_l4q(4)
    with pytest.raises(ValueError, match="bits=4"):
        quantize_model(model, bits=3, group=32)


# ---------------------------------------------------------------- `lowmem export RUN_DIR`

def _fake_run(run_dir, model_dir, method, save):
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"model": str(model_dir), "method": method}))
    (run_dir / "plan.yaml").write_text(yaml.safe_dump({"method": method}))
    save(run_dir / "adapter")
    return run_dir


def _export(argv):
    from lowmem.commands import export

    parser = argparse.ArgumentParser()
    export.register(parser.add_subparsers())
    args = parser.parse_args(["export", *map(str, argv)])
    return args.func(args)


def test_export_command_writes_a_quantized_l4q_run_that_generate_can_load(tmp_path, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM

    from lowmem.model import load_model

    model, _, _ = load_model(str(tiny_model_dir))
    apply_l4q(model, 4, 8.0, ("q_proj", "v_proj", "down_proj"), bits=4, group_size=16)
    with torch.no_grad():
        for m in l4q_modules(model).values():
            m.lora_B.normal_(std=0.05)
    model.eval()
    run = _fake_run(tmp_path / "run", tiny_model_dir, "l4q",
                    lambda d: save_l4q_state(model, d, base_model=str(tiny_model_dir)))
    assert _export([run, "--quantized", tmp_path / "q", "--dequantized", tmp_path / "hf",
                    "--dtype", "fp32"]) == 0
    loaded, tokenizer = load_quantized_export(tmp_path / "q")
    assert tokenizer is not None and tokenizer.pad_token is not None
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        # The learned fp32 step sizes, kept: the model that trained, exactly
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert read_quant_config(tmp_path / "q")["scale_dtype"] == "float32"
    with torch.no_grad():
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)
        torch.testing.assert_close(hf(ids).logits, loaded(ids).logits, rtol=1e-5, atol=1e-5)
        generated = loaded.generate(ids, max_new_tokens=3, do_sample=False)
    assert generated.shape == (1, 12)
    # `lowmem generate` dequantizes once where the dense weights fit beside the codes, else not,
    # and answers the same.
    import re

    from lowmem.cli import main
    from lowmem.config import parse_size

    capsys.readouterr()
    answers, notes = [], []
    for vram in (None, "fits packed only"):
        if vram is not None:
            packed, dense = (parse_size(x) for x in re.search(
                r"predicted (\S+) of .*\(predicted (\S+)\)", notes[0]).groups())
            vram = str(int((packed + dense // 2) / 0.95))
        assert main(["generate", "Say 3.", "--model", str(tmp_path / "q"), "--max-new-tokens", "4"]
                    + (["--vram", vram] if vram else [])) == 0
        out, err = capsys.readouterr()
        answers.append(out)
        notes.append(err)
    assert "; dequantized once to fp32 (predicted" in notes[0]
    assert "; dequantized layer by layer at every step:" in notes[1] and "of fp32 weights do not fit" in notes[1]
    assert answers[0] == answers[1]
    from lowmem.errors import ConfigError, ModelError

    with pytest.raises(ConfigError, match="bits=4"):
        _export([run, "--quantized", tmp_path / "q3", "--bits", "3"])
    with pytest.raises(ModelError, match="not empty"):
        _export([run, "--quantized", tmp_path / "q"])


def test_a_damaged_quantized_export_is_refused_naming_what_is_wrong(tmp_path, tiny_model_dir):
    import shutil

    model = _lora_on(tiny_model_dir)
    run = _fake_run(tmp_path / "run", tiny_model_dir, "lora",
                    lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"), dropout=0.0,
                                           rslora=False, base_model=str(tiny_model_dir)))
    assert _export([run, "--quantized", tmp_path / "q", "--group", "16"]) == 0
    meta = json.loads((tmp_path / "q" / QUANT_CONFIG).read_text())

    def damaged(name, config=None, weights=None):
        folder = tmp_path / name
        shutil.copytree(tmp_path / "q", folder)
        if config is not None:
            (folder / QUANT_CONFIG).write_text(config if isinstance(config, str) else json.dumps({**meta, **config}))
        if weights is not None:
            path = next(folder.glob("*intk*.safetensors"))
            path.write_bytes(weights(path.read_bytes()))
        return folder

    for folder, says in (
            (damaged("json", "{"), r"quantization.json: not valid JSON"),
            (damaged("list", "[1, 2]"), r"quantization.json: expected a JSON object, found list"),
            (damaged("nobits", {"bits": None}), r"'bits' must be one of \(2, 3, 4, 8\); found None"),
            (damaged("bits8", {"bits": 8}), r"_proj.qweight is \(\d+, \d+\), but 8-bit codes in groups of 16 "
                                             r"need .*disagree"),
            (damaged("module", {"modules": meta["modules"] + ["model.layers.99.self_attn.q_proj"]}),
             r"lists model.layers.99.self_attn.q_proj, which this model does not have"),
            (damaged("header", weights=lambda b: (10**12).to_bytes(8, "little") + b[8:]),
             r"is not a safetensors file \(a header of 1000000000000 bytes")):
        with pytest.raises(ModelError, match=says):
            load_quantized_export(folder)


def _export_merged_and_8bit_match(run, reference_model, tmp_path):
    """`lowmem export RUN --merged m --quantized q --bits 8`: the merged model computes what
    `reference_model` does; the 8-bit one within 1%."""
    from transformers import AutoModelForCausalLM

    assert _export([run, "--merged", tmp_path / "m", "--quantized", tmp_path / "q", "--bits", "8",
                    "--dtype", "fp32"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=torch.float32)
    eight_bit, _ = load_quantized_export(tmp_path / "q")
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        reference = reference_model(ids).logits
        torch.testing.assert_close(merged(ids).logits, reference, rtol=1e-5, atol=1e-5)
        assert float((eight_bit(ids).logits - reference).norm() / reference.norm()) < 0.01


def test_export_command_merges_a_lora_run(tmp_path, tiny_model_dir):
    from lowmem.model import load_model

    model, _, _ = load_model(str(tiny_model_dir))
    apply_lora(model, 4, 8.0, ("q_proj", "up_proj"))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.05)
    model.eval()
    run = _fake_run(tmp_path / "run", tiny_model_dir, "qlora",
                    lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"),
                                           dropout=0.0, rslora=False, base_model=str(tiny_model_dir)))
    _export_merged_and_8bit_match(run, model, tmp_path)
    assert json.loads((tmp_path / "q" / QUANT_CONFIG).read_text())["source"]["quantizer"] == "round-to-nearest"
    # Each output says where it came from: the run's own adapter here (a finished run's last step).
    about = {out: json.loads((tmp_path / out / "lowmem_export.json").read_text()) for out in ("m", "q")}
    assert about["m"] == {"run": str(run.resolve()), "method": "qlora", "checkpoint": "adapter", "step": None,
                          "output": "merged", "dtype": "float32"}
    weight_error = about["q"].pop("weight_error")
    assert about["q"] == {**about["m"], "output": "quantized", "bits": 8, "group": 128} and 0 < weight_error < 0.01


# ---------------------------------------------------------------- merging while the base streams

def _lora_on(model_dir, targets=("q_proj", "up_proj"), seed=0):
    from lowmem.model import load_model

    model, _, _ = load_model(str(model_dir))
    torch.manual_seed(seed)
    apply_lora(model, 4, 8.0, targets)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.05)
    return model.eval()


def test_the_streamed_merge_writes_exactly_what_the_in_memory_merge_writes(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from lowmem.quant.export import merge_streamed

    model = _lora_on(tiny_model_dir)
    save_adapter(model, tmp_path / "adapter", rank=4, alpha=8.0, targets=("q_proj", "up_proj"), dropout=0.0,
                 rslora=False, base_model=str(tiny_model_dir))
    save_merged(model, tmp_path / "whole", dtype=torch.float32)
    # Shards of at most 100 kB: several files and an index, as save_pretrained writes them.
    merge_streamed(tiny_model_dir, tmp_path / "adapter", tmp_path / "streamed", dtype=torch.float32,
                   shard_bytes=100_000, log=lambda m: None)
    index = json.loads((tmp_path / "streamed" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2
    streamed = {}
    for name in shards:
        streamed.update(load_file(str(tmp_path / "streamed" / name)))
    whole = load_file(str(tmp_path / "whole" / "model.safetensors"))
    assert streamed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(streamed[key], whole[key]), key
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed", dtype=torch.float32)
    ids = torch.randint(0, 1000, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    assert (tmp_path / "streamed" / "tokenizer_config.json").is_file()


def test_an_incomplete_or_mislabelled_adapter_is_refused_before_an_export_is_written(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file, save_file

    from lowmem.errors import ModelError
    from lowmem.quant.export import merge_streamed, quantize_streamed, run_updates

    model = _lora_on(tiny_model_dir)
    adapter = tmp_path / "adapter"
    save_adapter(model, adapter, rank=4, alpha=8.0, targets=("q_proj", "up_proj"), dropout=0.0,
                 rslora=False, base_model=str(tiny_model_dir))
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v for k, v in tensors.items() if "layers.1." not in k}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(ModelError, match=r"adapter file is incomplete: no tensors for 2 layer\(s\) .*model.layers.1."):
        merge_streamed(tiny_model_dir, adapter, tmp_path / "merged", dtype=torch.float32, log=lambda m: None)
    updates, bits, group, _ = run_updates(adapter, "lora", None, None)
    with pytest.raises(ModelError, match=r"adapter file is incomplete"):
        quantize_streamed(tiny_model_dir, updates, tmp_path / "q", bits=bits, group=group, source=adapter,
                          log=lambda m: None)
    save_file(tensors, str(adapter / "adapter_model.safetensors"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    with pytest.raises(ModelError, match=r"has tensors of rank 4 .* but adapter_config.json says r=8"):
        merge_streamed(tiny_model_dir, adapter, tmp_path / "merged", dtype=torch.float32, log=lambda m: None)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "q").exists()


def test_the_streamed_merge_holds_one_tensor_at_a_time(tmp_path):
    """What the merge allocates beyond the adapter: one base tensor, its merged copy and the
    shard being filled; never the whole model (the test reads the live tensor bytes)."""
    from safetensors.torch import load_file

    from lowmem.measure import LiveTensorBytes
    from lowmem.quant.export import merge_streamed
    from lowmem.quant.skeleton import read_tensors, shard_files

    base = tiny_llama(vocab_size=256, hidden=64, layers=6, heads=4, kv_heads=2, intermediate=256)
    base.save_pretrained(tmp_path / "base")          # no tokenizer: the merge says so and goes on
    apply_lora(base, 4, 8.0, ("q_proj", "up_proj"))
    save_adapter(base, tmp_path / "adapter", rank=4, alpha=8.0, targets=("q_proj", "up_proj"), dropout=0.0,
                 rslora=False, base_model="base")
    sizes = [t.numel() * 4 for _, t in read_tensors(shard_files(tmp_path / "base"))]   # fp32 tensors
    shard, said = 100_000, []
    with LiveTensorBytes() as live:
        merge_streamed(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype=torch.float32,
                       shard_bytes=shard, log=said.append)
    adapter = sum(t.numel() * 4 for t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values())
    bound = adapter + shard + 3 * max(sizes)
    assert sum(sizes) > 2 * bound                     # holding the whole model would fail the test
    assert live.growth <= bound, (live.growth, bound, sum(sizes))
    assert any("no tokenizer" in m for m in said)


def test_export_merges_and_quantizes_a_loram_run_onto_the_full_model(tmp_path, tiny_model_dir):
    """A LoRAM run's recovered adapter (full shapes, zeros where the pruned model had no unit)
    merges into the full base: the merged model equals the full model with the adapter loaded."""
    from lowmem.loram import save_recovered_adapter
    from lowmem.lora import load_adapter
    from lowmem.model import load_model
    from lowmem.prune import prune

    pruned, _, _ = load_model(str(tiny_model_dir))
    prune(pruned, 0.5, criterion="magnitude", keep_first=0, keep_last=0)
    torch.manual_seed(0)
    apply_lora(pruned, 4, 8.0, TARGETS)
    with torch.no_grad():
        for m in lora_modules(pruned).values():
            m.lora_B.normal_(std=0.05)
    run = _fake_run(tmp_path / "run", tiny_model_dir, "loram",
                    lambda d: save_recovered_adapter(pruned, d, rank=4, alpha=8.0, targets=TARGETS, dropout=0.0,
                                                     rslora=False, base_model=str(tiny_model_dir)))
    full, _, _ = load_model(str(tiny_model_dir))
    load_adapter(full, run / "adapter")
    _export_merged_and_8bit_match(run, full.eval(), tmp_path)


def test_a_streamed_merge_refuses_an_adapter_for_other_shapes_and_leaves_nothing(tmp_path, tiny_model_dir):
    from lowmem.errors import ModelError
    from lowmem.quant.export import merge_streamed

    other = tiny_llama(vocab_size=1000, hidden=48, layers=2, heads=4, kv_heads=2, intermediate=64)
    apply_lora(other, 4, 8.0, ("q_proj",))
    save_adapter(other, tmp_path / "adapter", rank=4, alpha=8.0, targets=("q_proj",), dropout=0.0,
                 rslora=False, base_model="other")
    with pytest.raises(ModelError, match=r"model.layers.0.self_attn.q_proj.weight.*\(48 × 48\).*\(32, 32\)"):
        merge_streamed(tiny_model_dir, tmp_path / "adapter", tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".tmp-out*"))


def test_an_export_clears_what_a_killed_export_of_the_same_folder_left_and_nothing_else(tmp_path):
    import os
    import subprocess
    import sys

    from lowmem.events import this_host
    from lowmem.quant.export import _write_folder

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    killed = tmp_path / f".tmp-out@{this_host()}@{proc.pid}@abc"
    running = tmp_path / f".tmp-out@{this_host()}@{os.getpid()}@def"     # an export still writing
    elsewhere = tmp_path / f".tmp-out@{this_host()}-other@{proc.pid}@ghi"   # whose pid is not ours to judge
    other = tmp_path / f".tmp-outer@{this_host()}@{proc.pid}@jkl"           # another folder's
    for folder in (killed, running, elsewhere, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 10)
    _write_folder(tmp_path / "out", lambda d: (d / "config.json").write_text("{}"))
    assert (tmp_path / "out" / "config.json").is_file() and not killed.exists()
    assert running.is_dir() and elsewhere.is_dir() and other.is_dir()


def test_a_streamed_merge_names_a_target_the_base_does_not_have(tmp_path, tiny_model_dir):
    from lowmem.errors import ModelError
    from lowmem.quant.export import merge_streamed

    model = _lora_on(tiny_model_dir, targets=("q_proj", "lm_head"))
    save_adapter(model, tmp_path / "adapter", rank=4, alpha=8.0, targets=("q_proj", "lm_head"), dropout=0.0,
                 rslora=False, base_model=str(tiny_model_dir))
    with pytest.raises(ModelError, match="targets lm_head.weight.*tied to the embeddings"):
        merge_streamed(tiny_model_dir, tmp_path / "adapter", tmp_path / "out", log=lambda m: None)


def test_a_merged_head_is_untied_from_the_embeddings_it_was_stored_beside(tmp_path):
    """A checkpoint that stores lm_head.weight although its config ties it: the merged head must not
    be re-tied to the embeddings on loading, or its update is lost."""
    from transformers import AutoModelForCausalLM

    from lowmem.quant.export import merge_streamed

    base = tiny_llama(vocab_size=256, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)
    base.config.tie_word_embeddings = False
    base.lm_head.weight = torch.nn.Parameter(base.lm_head.weight.detach() + 0.01)   # its own tensor
    base.save_pretrained(tmp_path / "base")
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    (tmp_path / "base" / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    apply_lora(base, 4, 8.0, ("lm_head",))
    with torch.no_grad():
        lora_modules(base)["lm_head"].lora_B.normal_(std=0.1)
    save_adapter(base, tmp_path / "adapter", rank=4, alpha=8.0, targets=("lm_head",), dropout=0.0,
                 rslora=False, base_model="base")
    merge_streamed(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", dtype=torch.float32,
                   log=lambda m: None)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    expected = base.lm_head.base.weight + base.lm_head.delta_weight()
    torch.testing.assert_close(merged.lm_head.weight, expected.detach(), rtol=0, atol=1e-6)


def test_a_float8_checkpoint_is_refused_before_anything_is_written(tmp_path):
    from safetensors.torch import save_file

    from lowmem.errors import ModelError
    from lowmem.quant.export import merge_streamed

    base = tiny_llama(vocab_size=256, hidden=32, layers=1, heads=4, kv_heads=2, intermediate=64)
    base.save_pretrained(tmp_path / "base")
    apply_lora(base, 4, 8.0, ("q_proj",))
    save_adapter(base, tmp_path / "adapter", rank=4, alpha=8.0, targets=("q_proj",), dropout=0.0,
                 rslora=False, base_model="base")
    from safetensors.torch import load_file

    tensors = load_file(str(tmp_path / "base" / "model.safetensors"))
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"].to(torch.float8_e4m3fn)
    save_file(tensors, str(tmp_path / "base" / "model.safetensors"))
    with pytest.raises(ModelError, match="up_proj.weight is stored in F8_E4M3"):
        merge_streamed(tmp_path / "base", tmp_path / "adapter", tmp_path / "out", log=lambda m: None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- quantizing while the base streams

def _tensors(folder):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("method", ["l4q", "l4q-symmetric", "lora"])
def test_the_streamed_quantized_export_writes_what_quantizing_the_loaded_model_writes(tmp_path, method):
    """quantize_streamed (what `lowmem export --quantized/--dequantized` runs) against
    quantize_model + save_quantized / save_dequantized on the loaded model: the same tensors,
    bit for bit, here in several shards that load_quantized_export reads through the index."""
    from lowmem.quant.export import quantize_streamed, run_updates

    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    if method == "lora":
        model = tiny_llama(seed=0)
        apply_lora(model, 4, 8.0, ("q_proj", "down_proj"))
        with torch.no_grad():
            for m in lora_modules(model).values():
                m.lora_B.normal_(std=0.05)
        model.eval()
        save_adapter(model, tmp_path / "adapter", rank=4, alpha=8.0, targets=("q_proj", "down_proj"),
                     dropout=0.0, rslora=False, base_model="base")
        q = quantize_model(model, bits=3, group=32)
        updates, bits, group, how = run_updates(tmp_path / "adapter", "lora", 3, 32)
    else:
        model = _trained_l4q(3, group=32)
        if method == "l4q-symmetric":
            torch.manual_seed(0)
            model = tiny_llama(seed=0)
            apply_l4q(model, 4, 8.0, TARGETS, bits=3, group_size=32, symmetric=True)
            with torch.no_grad():
                for m in l4q_modules(model).values():
                    m.lora_B.normal_(std=0.05)
            model.eval()
        save_l4q_state(model, tmp_path / "adapter")
        q = quantize_model(model)
        updates, bits, group, how = run_updates(tmp_path / "adapter", "l4q", None, None)
        assert how == "L4Q step sizes"
    assert (bits, group) == (3, 32)
    save_quantized(model, q, tmp_path / "whole-q", dense_dtype=torch.float32)
    save_dequantized(model, q, tmp_path / "whole-hf", dtype=torch.float32)
    for out, dequantize in (("q", False), ("hf", True)):
        quantize_streamed(tmp_path / "base", updates, tmp_path / out, bits=bits, group=group,
                          source=tmp_path / "adapter", dequantize=dequantize, dtype=torch.float32,
                          shard_bytes=60_000, log=lambda m: None)
        streamed, whole = _tensors(tmp_path / out), _tensors(tmp_path / f"whole-{out}")
        assert streamed.keys() == whole.keys()
        for key in whole:
            assert torch.equal(streamed[key], whole[key]), (out, key)
    assert (tmp_path / "q" / "lowmem-intk.safetensors.index.json").is_file()
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    meta, reference = (json.loads((tmp_path / f / QUANT_CONFIG).read_text()) for f in ("q", "whole-q"))
    assert {k: meta[k] for k in ("bits", "group_size", "symmetric", "scale_dtype", "modules")} == \
        {k: reference[k] for k in ("bits", "group_size", "symmetric", "scale_dtype", "modules")}
    loaded, _ = load_quantized_export(tmp_path / "q")
    whole_loaded, _ = load_quantized_export(tmp_path / "whole-q")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, whole_loaded(IDS).logits, rtol=0, atol=0)


def test_the_streamed_quantized_export_holds_one_tensor_at_a_time(tmp_path):
    """Beyond the adapter: one base tensor, its merged fp32 copy and the quantizer's temporaries,
    and the shard being filled; never the whole model (live tensor bytes)."""
    from safetensors.torch import load_file

    from lowmem.measure import LiveTensorBytes
    from lowmem.quant.export import quantize_streamed, run_updates
    from lowmem.quant.skeleton import read_tensors, shard_files

    base = tiny_llama(vocab_size=256, hidden=64, layers=6, heads=4, kv_heads=2, intermediate=256)
    base.save_pretrained(tmp_path / "base")
    apply_lora(base, 4, 8.0, TARGETS)
    save_adapter(base, tmp_path / "adapter", rank=4, alpha=8.0, targets=TARGETS, dropout=0.0, rslora=False,
                 base_model="base")
    sizes = [t.numel() * 4 for _, t in read_tensors(shard_files(tmp_path / "base"))]
    updates, bits, group, _ = run_updates(tmp_path / "adapter", "lora", 4, 32)
    shard = 100_000
    with LiveTensorBytes() as live:
        quantize_streamed(tmp_path / "base", updates, tmp_path / "out", bits=bits, group=group,
                          source=tmp_path / "adapter", shard_bytes=shard, log=lambda m: None)
    adapter = sum(t.numel() * 4 for t in load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")).values())
    bound = adapter + shard + 5 * max(sizes)
    assert sum(sizes) > 2 * bound                     # holding the whole model would fail the test
    assert live.growth <= bound, (live.growth, bound, sum(sizes))


def test_a_streamed_export_of_an_l4q_state_with_other_groups_names_the_tensor(tmp_path):
    from lowmem.errors import ModelError
    from lowmem.quant.export import WeightUpdate, quantize_streamed

    tiny_llama(seed=0).save_pretrained(tmp_path / "base")
    name = "model.layers.0.self_attn.q_proj.weight"
    update = WeightUpdate(torch.zeros(4, 64), torch.zeros(64, 4), 1.0, torch.ones(64, 3), torch.zeros(64, 3),
                          l4q=True)
    with pytest.raises(ModelError, match=r"step sizes of model.layers.0.self_attn.q_proj.weight are \(64, 3\), "
                                         r"expected \(64, 2\) for groups of 32"):
        quantize_streamed(tmp_path / "base", {name: update}, tmp_path / "out", bits=4, group=32,
                          source=tmp_path / "adapter", log=lambda m: None)
    assert not (tmp_path / "out").exists()


def test_a_streamed_export_leaves_out_tensors_the_model_does_not_define(tmp_path):
    """Old checkpoints store buffers such as rotary inv_freq, which loading drops; the export
    leaves them out too, so its own loader (which refuses unknown tensors) reads it."""
    from safetensors.torch import load_file, save_file

    from lowmem.quant.export import quantize_streamed, run_updates

    model = tiny_llama(seed=0)
    model.save_pretrained(tmp_path / "base")
    stale = "model.layers.0.self_attn.rotary_emb.inv_freq"
    tensors = load_file(str(tmp_path / "base" / "model.safetensors"))
    save_file({**tensors, stale: torch.ones(8)}, str(tmp_path / "base" / "model.safetensors"))
    apply_lora(model, 4, 8.0, ("q_proj",))
    save_adapter(model, tmp_path / "adapter", rank=4, alpha=8.0, targets=("q_proj",), dropout=0.0,
                 rslora=False, base_model="base")
    updates, bits, group, _ = run_updates(tmp_path / "adapter", "lora", 4, 32)
    said = []
    quantize_streamed(tmp_path / "base", updates, tmp_path / "q", bits=bits, group=group,
                      source=tmp_path / "adapter", log=said.append)
    assert stale not in _tensors(tmp_path / "q")
    assert any("1 tensor(s) the model does not define left out" in line for line in said)
    load_quantized_export(tmp_path / "q")
    with pytest.raises(ValueError, match="nothing to export"):
        quantize_streamed(tmp_path / "base", {}, tmp_path / "none", bits=4, group=32, source=tmp_path / "adapter")


def test_every_output_is_checked_before_any_is_written(tmp_path, capsys):
    """`--merged new --quantized taken` used to write the merged model, then refuse the second."""
    from lowmem.cli import main

    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("mine")
    (tmp_path / "afile").write_text("")
    cases = ((["--merged", str(tmp_path / "new"), "--quantized", str(taken)], "--quantized .* not empty"),
             (["--merged", str(tmp_path / "afile")], "--merged .*: a file is there"),
             (["--merged", str(tmp_path / "new"), "--quantized", str(tmp_path / "afile" / "sub")],
              "--quantized .*afile is a file, so no folder can be made in it"),
             (["--merged", str(tmp_path / "same"), "--dequantized", str(tmp_path / "same")],
              "--dequantized and --merged both name"),
             (["--merged", str(tmp_path / "z" / "sub"), "--quantized", str(tmp_path / "z")],
              "--merged's folder is inside --quantized's"),
             (["--merged", str(tmp_path / "w"), "--quantized", str(tmp_path / "w" / "sub")],
              "--quantized's folder is inside --merged's"),
             (["--merged", str(tmp_path / "link")], "--merged .*link: a symbolic link is there"),
             (["--merged", "/proc/x"], r"--merged /proc/x: no folder can be made in /proc \("))
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    for flags, says in cases:
        assert main(["export", str(tmp_path / "some-run"), *flags]) == 2
        assert re.search(says, capsys.readouterr().err)
    assert not any((tmp_path / name).exists() for name in ("new", "same", "z", "w"))


def test_bits_without_a_quantized_output_are_refused(tmp_path, capsys):
    from lowmem.cli import main

    assert main(["export", str(tmp_path / "run"), "--merged", str(tmp_path / "m"), "--bits", "2"]) == 2
    assert "--bits and --group choose the quantization of --quantized/--dequantized" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_a_damaged_adapter_file_is_named_not_a_traceback(tmp_path, tiny_model_dir):
    model = _lora_on(tiny_model_dir)
    run = _fake_run(tmp_path / "run", tiny_model_dir, "lora",
                    lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"),
                                           dropout=0.0, rslora=False, base_model=str(tiny_model_dir)))
    weights = run / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelError, match="adapter_model.safetensors cannot be read .* damaged or incomplete"):
        export_run(run, merged=tmp_path / "m", log=lambda m: None)
    assert not (tmp_path / "m").exists()


def test_a_run_directory_with_a_damaged_config_or_plan_is_named_not_a_traceback(tmp_path, capsys):
    from lowmem.cli import main

    run = tmp_path / "run"
    run.mkdir()
    for config, plan, says in (("model: [unclosed\n", "method: lora\n", r"run/config.yaml cannot be read \("),
                               ("steps: 3\n", "method: lora\n", r"run/config.yaml: no 'model' in it"),
                               ("model: m\n", "", r"run/plan.yaml: no 'method' in it"),
                               ("model: m\n", None, r"run is not a run directory \(no plan.yaml\)")):
        (run / "config.yaml").write_text(config)
        (run / "plan.yaml").unlink(missing_ok=True)
        if plan is not None:
            (run / "plan.yaml").write_text(plan)
        assert main(["export", str(run), "--merged", str(tmp_path / "m")]) == 2
        err = capsys.readouterr().err
        assert re.search(says, err) and len(err.splitlines()) == 1, err
    assert not (tmp_path / "m").exists()


def test_a_round_to_nearest_export_says_how_far_it_moved_the_weights_and_warns_when_far(tmp_path, tiny_model_dir):
    model = _lora_on(tiny_model_dir)
    run = _fake_run(tmp_path / "run", tiny_model_dir, "lora",
                    lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"), dropout=0.0,
                                           rslora=False, base_model=str(tiny_model_dir)))
    said = {}
    for bits in (8, 3):
        said[bits] = []
        export_run(run, quantized=tmp_path / f"q{bits}", bits=bits, log=said[bits].append)
    moved = {bits: float(re.search(r"moved the merged weights by ([\d.]+)%", " ".join(lines)).group(1))
             for bits, lines in said.items()}
    assert moved[8] < 1.0 < 5.0 < moved[3]
    assert not any(line.startswith("warning:") for line in said[8])
    assert any(line.startswith("warning: at 3 bits answers may be much worse") for line in said[3])
    with pytest.raises(ValueError, match=r"--group 100000 is wider than every weight's rows \(the widest has \d+ "
                                         r"values\); give at most \d+"):
        export_run(run, quantized=tmp_path / "wide", bits=4, group=100000, log=lambda m: None)
    assert not (tmp_path / "wide").exists()


def test_an_unfinished_run_exports_its_newest_checkpoint_and_says_so(tmp_path, tiny_model_dir):
    model = _lora_on(tiny_model_dir)
    from lowmem.checkpoint import save_checkpoint

    run = _fake_run(tmp_path / "run", tiny_model_dir, "lora", lambda d: None)
    save_checkpoint(run, 3, trainable={"x": torch.zeros(1)}, optimizer={}, state={}, config={}, plan={}, keep=2,
                    extra_dirs={"adapter": lambda d: save_adapter(
                        model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"), dropout=0.0, rslora=False,
                        base_model=str(tiny_model_dir))})
    said = []
    export_run(run, merged=tmp_path / "m", log=said.append)
    assert said[0] == f"{run} has not finished: exporting its checkpoint step-3"
    assert (tmp_path / "m" / "config.json").is_file()
    about = json.loads((tmp_path / "m" / "lowmem_export.json").read_text())
    assert (about["checkpoint"], about["step"], about["output"]) == ("step-3", 3, "merged")
    # A newer checkpoint that is damaged is passed over, and said so.
    import shutil

    newer = run / "checkpoints" / "step-4"
    shutil.copytree(run / "checkpoints" / "step-3", newer)
    (newer / "adapter" / "adapter_model.safetensors").write_bytes(b"damaged")
    said.clear()
    export_run(run, merged=tmp_path / "m2", log=said.append)
    assert said[0].startswith(f"warning: checkpoint {newer} is damaged (") and "trying the previous one" in said[0]
    assert said[1] == f"{run} has not finished: exporting its checkpoint step-3"


def test_a_terminated_export_leaves_no_half_written_folder(tmp_path, monkeypatch):
    import os
    import signal
    import time

    import lowmem.quant.export as export_module
    from lowmem.quant.export import _write_folder

    def killed_while_writing(run_dir, *, merged, **_):
        def write(folder):
            (folder / "model.safetensors").write_bytes(b"partial")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        _write_folder(merged, write)

    monkeypatch.setattr(export_module, "export_run", killed_while_writing)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(SystemExit) as stop:
        _export([tmp_path / "run", "--merged", tmp_path / "out" / "m"])
    assert stop.value.code == 128 + signal.SIGTERM
    assert list((tmp_path / "out").iterdir()) == []
    assert signal.getsignal(signal.SIGTERM) is before   # the command's handler is gone again


def test_transformers_refuses_a_packed_export_and_a_version_1_folder_still_loads(tmp_path):
    """Version 1 named the packed tensors model.safetensors: transformers then loaded the folder as
    a plain model with every projection missing, started at random."""
    from transformers import AutoModelForCausalLM

    model = _trained_l4q(4, group=32)
    save_quantized(model, quantize_model(model), tmp_path / "q")
    with pytest.raises(OSError, match="model.safetensors"):
        AutoModelForCausalLM.from_pretrained(str(tmp_path / "q"))
    loaded, _ = load_quantized_export(tmp_path / "q")
    (tmp_path / "q" / "lowmem-intk.safetensors").rename(tmp_path / "q" / "model.safetensors")
    meta = json.loads((tmp_path / "q" / QUANT_CONFIG).read_text())
    (tmp_path / "q" / QUANT_CONFIG).write_text(json.dumps({**meta, "version": 1}))
    old, _ = load_quantized_export(tmp_path / "q")
    with torch.no_grad():
        torch.testing.assert_close(old(IDS).logits, loaded(IDS).logits, rtol=0, atol=0)


def test_an_export_that_fails_on_its_second_output_removes_the_first(tmp_path, tiny_model_dir, monkeypatch):
    import lowmem.quant.export as export_module

    model = _lora_on(tiny_model_dir)
    run = _fake_run(tmp_path / "run", tiny_model_dir, "lora",
                    lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"),
                                           dropout=0.0, rslora=False, base_model=str(tiny_model_dir)))

    flush = export_module._Shards.flush

    def disk_full(shards):
        if shards.weights == export_module.INTK_WEIGHTS:
            raise OSError(28, "No space left on device")
        flush(shards)

    monkeypatch.setattr(export_module._Shards, "flush", disk_full)
    with pytest.raises(OSError, match="No space left"):
        export_run(run, merged=tmp_path / "m", quantized=tmp_path / "q", log=lambda m: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]     # no output, no temporary folder


def test_every_output_of_an_export_comes_from_one_read_of_the_base(tmp_path, tiny_model_dir, monkeypatch):
    """--merged, --quantized and --dequantized together read the base once, quantize each weight
    once (one error figure, not one per output), and write what each would alone."""
    import lowmem.quant.skeleton as skeleton

    model = _lora_on(tiny_model_dir)
    run = _fake_run(tmp_path / "run", tiny_model_dir, "lora",
                    lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"),
                                           dropout=0.0, rslora=False, base_model=str(tiny_model_dir)))
    reads, read_tensors = [], skeleton.read_tensors
    monkeypatch.setattr(skeleton, "read_tensors", lambda files: reads.append(files) or read_tensors(files))
    said = []
    outputs = {"merged": tmp_path / "m", "quantized": tmp_path / "q", "dequantized": tmp_path / "d"}
    assert export_run(run, **outputs, log=said.append) == list(outputs.values())
    assert len(reads) == 1
    assert len([line for line in said if "moved the merged weights" in line]) == 1
    for kind, out in outputs.items():
        export_run(run, **{kind: tmp_path / f"alone-{kind}"}, log=lambda m: None)
        together, alone = _tensors(out), _tensors(tmp_path / f"alone-{kind}")
        assert together.keys() == alone.keys()
        assert all(torch.equal(together[k], alone[k]) for k in alone), kind
        about = json.loads((out / "lowmem_export.json").read_text())
        assert about == json.loads((tmp_path / f"alone-{kind}" / "lowmem_export.json").read_text())
        assert about["output"] == kind


def test_a_bin_checkpoint_is_refused_with_a_conversion_that_works(tmp_path):
    """Streamed export reads safetensors one tensor at a time; a PyTorch .bin folder gets the
    one-time command that writes a safetensors copy, and that copy is read."""
    import shlex
    import subprocess
    import sys

    from lowmem.quant.skeleton import read_tensors, shard_files

    model = tiny_llama(seed=1)
    model.config.save_pretrained(tmp_path / "old")
    torch.save(model.state_dict(), tmp_path / "old" / "pytorch_model.bin")
    with pytest.raises(ModelError, match="holds PyTorch .bin weights") as refused:
        shard_files(tmp_path / "old")
    command = str(refused.value).split("into RAM): ", 1)[1]
    argv = shlex.split(command)
    assert argv[:2] == ["python", "-c"]
    subprocess.run([sys.executable, "-c", argv[2]], check=True, capture_output=True)
    tensors = dict(read_tensors(shard_files(tmp_path / "old-st")))
    assert torch.equal(tensors["model.embed_tokens.weight"], model.model.embed_tokens.weight)


def test_a_full_runs_own_model_is_quantized_as_a_lora_run_with_nothing_learned_would_be(tmp_path, tiny_model_dir):
    """A full or GaLore run has no adapter: its model/ is quantized round-to-nearest, every block
    projection, the same tensors as a LoRA run on that model whose update is zero."""
    import shutil

    full = tmp_path / "full"
    full.mkdir()
    (full / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "method": "galore"}))
    (full / "plan.yaml").write_text(yaml.safe_dump({"method": "galore"}))
    with pytest.raises(ModelError, match="writes its model to .* when it finishes, and it has not: finish it"):
        export_run(full, quantized=tmp_path / "early", log=lambda m: None)
    shutil.copytree(tiny_model_dir, full / "model")
    with pytest.raises(ValueError, match="a galore run's model is a full model already, with nothing to merge"):
        export_run(full, merged=tmp_path / "m", log=lambda m: None)

    model = _lora_on(full / "model", targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                               "down_proj"))
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.zero_()
    lora = _fake_run(tmp_path / "lora", full / "model", "lora",
                     lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "k_proj", "v_proj",
                                                                                 "o_proj", "gate_proj", "up_proj",
                                                                                 "down_proj"),
                                            dropout=0.0, rslora=False, base_model=str(full / "model")))
    export_run(full, quantized=tmp_path / "q", dequantized=tmp_path / "d", bits=3, group=32, log=lambda m: None)
    export_run(lora, quantized=tmp_path / "lq", dequantized=tmp_path / "ld", bits=3, group=32, log=lambda m: None)
    for ours, theirs in (("q", "lq"), ("d", "ld")):
        a, b = _tensors(tmp_path / ours), _tensors(tmp_path / theirs)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = read_quant_config(tmp_path / "q")
    assert (meta["bits"], meta["group_size"], len(meta["modules"])) == (3, 32, 7 * 2)   # 2 blocks
    assert meta["source"]["method"] == "galore" and meta["source"]["checkpoint"] == "model"
    load_quantized_export(tmp_path / "q")


def test_an_earlier_end_or_a_checkpoint_of_a_run_exports_as_its_own_adapter_would(tmp_path, tiny_model_dir, capsys):
    """RUN/adapter-step-N (the end a longer run kept), RUN/checkpoints/step-N and RUN/model-step-N
    export with the run's base and say which they are; another folder is refused by name."""
    import shutil

    from lowmem.cli import main

    model = _lora_on(tiny_model_dir)
    save = lambda d: save_adapter(model, d, rank=4, alpha=8.0, targets=("q_proj", "up_proj"),  # noqa: E731
                                  dropout=0.0, rslora=False, base_model=str(tiny_model_dir))
    run = _fake_run(tmp_path / "run", tiny_model_dir, "lora", save)
    save(run / "adapter-step-4")
    (run / "checkpoints" / "step-6").mkdir(parents=True)
    save(run / "checkpoints" / "step-6" / "adapter")
    export_run(run, merged=tmp_path / "own", log=lambda m: None)
    for given, name, step in ((run / "adapter-step-4", "adapter-step-4", 4),
                              (run / "checkpoints" / "step-6", "step-6", 6)):
        export_run(given, merged=tmp_path / name, log=lambda m: None)
        about = json.loads((tmp_path / name / "lowmem_export.json").read_text())
        assert (about["run"], about["checkpoint"], about["step"]) == (str(run.resolve()), name, step)
        ours, own = _tensors(tmp_path / name), _tensors(tmp_path / "own")
        assert all(torch.equal(ours[k], own[k]) for k in own)
    (tmp_path / "loose").mkdir()
    assert main(["export", str(tmp_path / "loose"), "--merged", str(tmp_path / "x")]) == 2
    assert "loose is not a run directory (no config.yaml), nor an adapter-step-N" in capsys.readouterr().err

    full = tmp_path / "full"
    full.mkdir()
    (full / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "method": "full"}))
    (full / "plan.yaml").write_text(yaml.safe_dump({"method": "full"}))
    shutil.copytree(tiny_model_dir, full / "model-step-4")
    export_run(full / "model-step-4", quantized=tmp_path / "fq", log=lambda m: None)
    assert read_quant_config(tmp_path / "fq")["source"]["checkpoint"] == "model-step-4"


def test_generate_points_an_l4q_adapter_folder_at_export(tmp_path):
    from lowmem.commands.generate import find_adapter

    model = _trained_l4q()
    save_l4q_state(model, tmp_path / "adapter-step-4")
    with pytest.raises(ModelError, match=r"adapter-step-4: an L4Q adapter lives in its quantized weights; write "
                                         r"them with `lowmem export RUN_DIR \(the run that trained it\) --quantized"):
        find_adapter(tmp_path / "adapter-step-4")
    (tmp_path / "config.yaml").write_text("model: m\n")            # inside its run: export the folder itself
    with pytest.raises(ModelError, match=r"`lowmem export .*adapter-step-4 --quantized OUT`, then answer"):
        find_adapter(tmp_path / "adapter-step-4")
