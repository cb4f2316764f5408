import math

import pytest
import torch

from lowmem.lora import LoRALinear, apply_lora, load_adapter, lora_modules, save_adapter
from lowmem.model import tiny_llama

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _randomize_b(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_a_fresh_adapter_leaves_the_model_unchanged():
    model = tiny_llama()
    x = torch.randint(0, 512, (2, 12))
    before = model(x).logits
    apply_lora(model, 4, 8.0, TARGETS)
    assert torch.equal(model(x).logits, before)


def test_output_is_base_plus_scaled_low_rank_update():
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5, bias=False)
    layer = LoRALinear(base, rank=2, alpha=3.0)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 6)
    expected = x @ base.weight.T + (3.0 / 2) * (x @ layer.lora_A.T @ layer.lora_B.T)
    torch.testing.assert_close(layer(x), expected)


def test_rslora_scales_by_alpha_over_root_rank():
    base = torch.nn.Linear(8, 8)
    assert LoRALinear(base, 4, 8.0, rslora=True).scaling == pytest.approx(8.0 / math.sqrt(4))
    assert LoRALinear(base, 4, 8.0).scaling == pytest.approx(2.0)


def test_only_adapters_train():
    model = tiny_llama()
    names = apply_lora(model, 4, 8.0, ("q_proj", "v_proj"))
    assert len(names) == 2 * 2  # two layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A" in n or ".lora_B" in n for n in trainable)
    assert all("q_proj" in n or "v_proj" in n for n in trainable)


def test_a_target_that_matches_nothing_is_an_error():
    with pytest.raises(ValueError, match="match no linear layer"):
        apply_lora(tiny_llama(), 4, 8.0, ("qproj",))


def test_merge_then_unmerge_round_trips_and_merged_output_matches():
    model = tiny_llama()
    apply_lora(model, 4, 8.0, TARGETS)
    _randomize_b(model)
    x = torch.randint(0, 512, (2, 10))
    adapted = model(x).logits
    weights = {n: m.base.weight.clone() for n, m in lora_modules(model).items()}
    for m in lora_modules(model).values():
        m.merge()
    torch.testing.assert_close(model(x).logits, adapted, atol=1e-5, rtol=1e-5)
    for m in lora_modules(model).values():
        m.unmerge()
    for n, m in lora_modules(model).items():
        torch.testing.assert_close(m.base.weight, weights[n], atol=1e-6, rtol=0)


def _peft_logits(base, folder, x):
    from peft import PeftModel

    peft_model = PeftModel.from_pretrained(base, str(folder))
    peft_model.eval()
    with torch.no_grad():
        return peft_model(x).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_hugging_face_peft_loads_our_adapter_and_agrees(tmp_path, rslora):
    ours = tiny_llama(seed=3)
    apply_lora(ours, 4, 16.0, TARGETS, rslora=rslora)
    _randomize_b(ours)
    save_adapter(ours, tmp_path, rank=4, alpha=16.0, targets=TARGETS, dropout=0.0, rslora=rslora,
                 base_model="tiny")
    x = torch.randint(0, 512, (2, 9))
    ours.eval()
    with torch.no_grad():
        expected = ours(x).logits
    base = tiny_llama(seed=3)
    assert not torch.allclose(base(x).logits, expected, atol=1e-3)  # the adapter does something
    torch.testing.assert_close(_peft_logits(base, tmp_path, x), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_peft_agrees_with_us_on_the_embedded_model(tmp_path, embedded_dir):
    from transformers import AutoModelForCausalLM

    def load():
        return AutoModelForCausalLM.from_pretrained(embedded_dir, dtype=torch.float32)

    ours = load()
    apply_lora(ours, 8, 16.0, TARGETS)
    _randomize_b(ours)
    save_adapter(ours, tmp_path, rank=8, alpha=16.0, targets=TARGETS, dropout=0.0, rslora=False,
                 base_model="smollm2-135m")
    x = torch.randint(0, 49152, (1, 16))
    ours.eval()
    with torch.no_grad():
        expected = ours(x).logits
    torch.testing.assert_close(_peft_logits(load(), tmp_path, x), expected, atol=2e-4, rtol=1e-4)


def test_our_loader_restores_a_saved_adapter(tmp_path):
    ours = tiny_llama()
    apply_lora(ours, 4, 8.0, TARGETS)
    _randomize_b(ours)
    save_adapter(ours, tmp_path, rank=4, alpha=8.0, targets=TARGETS, dropout=0.0, rslora=False, base_model="t")
    again = tiny_llama()
    load_adapter(again, tmp_path)
    x = torch.randint(0, 512, (1, 7))
    torch.testing.assert_close(again(x).logits, ours(x).logits)


def test_a_missing_or_malformed_config_is_an_error_naming_the_file(tmp_path):
    from lowmem.errors import ModelError
    from lowmem.quant.l4q import load_l4q_state

    model = tiny_llama()
    with pytest.raises(ModelError, match=r"no adapter_config.json here; expected an adapter folder"):
        load_adapter(model, tmp_path)
    with pytest.raises(ModelError, match=r"no l4q_config.json here; expected a folder written by save_l4q_state"):
        load_l4q_state(model, tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": 8,')
    with pytest.raises(ModelError, match=r"adapter_config.json: not valid JSON"):
        load_adapter(model, tmp_path)
    (tmp_path / "l4q_config.json").write_text("[1, 2]")
    with pytest.raises(ModelError, match=r"l4q_config.json: expected a JSON object, found list"):
        load_l4q_state(model, tmp_path)


def _damaged_copies(tmp_path):
    """A saved adapter, and copies of it damaged as a hand-edited or half-copied one can be."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    ours = tiny_llama()
    apply_lora(ours, 4, 8.0, TARGETS)
    _randomize_b(ours)
    good = tmp_path / "good"
    save_adapter(ours, good, rank=4, alpha=8.0, targets=TARGETS, dropout=0.0, rslora=False, base_model="t")
    tensors = load_file(str(good / "adapter_model.safetensors"))

    def copy(name, config=None, keep=lambda key: True):
        folder = tmp_path / name
        shutil.copytree(good, folder)
        if config:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            cfg.update(config)
            (folder / "adapter_config.json").write_text(json.dumps({k: v for k, v in cfg.items() if v != "DROP"}))
        save_file({k: v for k, v in tensors.items() if keep(k)}, str(folder / "adapter_model.safetensors"))
        return folder

    return ours, good, copy


@pytest.mark.parametrize("config,keep,says", [
    ({"r": 8}, None, r"has tensors of rank 4 .* but adapter_config.json says r=8"),
    ({"r": "DROP"}, None, r"adapter_config.json: 'r' must be the adapter's rank, a positive integer; found None"),
    ({"lora_alpha": "16"}, None, r"'lora_alpha' must be a positive number; found '16'"),
    ({"target_modules": ["q_proj"]}, None, r"tensors for .*_proj, which target_modules \['q_proj'\] does not name"),
    (None, lambda k: "layers.1." not in k, r"the file is incomplete: no tensors for 7 of the 14 layers that "
                                           r"target_modules names, e.g. model.layers.1.self_attn.q_proj"),
    (None, lambda k: "lora_B" not in k, r"has lora_A without lora_B: the file is incomplete"),
    (None, lambda k: False, r"holds no LoRA tensors"),
])
def test_a_damaged_adapter_is_refused_naming_the_file_and_what_is_wrong(tmp_path, config, keep, says):
    from lowmem.errors import ModelError
    from lowmem.lora import read_adapter

    _, _, copy = _damaged_copies(tmp_path)
    damaged = copy("damaged", config, keep or (lambda key: True))
    with pytest.raises(ModelError, match=says):
        load_adapter(tiny_llama(), damaged)
    if "incomplete: no tensors" not in says:          # read alone cannot know the model's layers
        with pytest.raises(ModelError, match=says):
            read_adapter(damaged)


def test_a_pattern_in_target_modules_loads_the_layers_the_tensors_name(tmp_path):
    """PEFT also writes target_modules as a regex or "all-linear": the tensors say which layers."""
    ours, _, copy = _damaged_copies(tmp_path)
    x = torch.randint(0, 512, (1, 7))
    for pattern in ("all-linear", r".*\.(q|k|v|o|gate|up|down)_proj"):
        again = tiny_llama()
        load_adapter(again, copy(f"p{len(pattern)}", {"target_modules": pattern}))
        torch.testing.assert_close(again(x).logits, ours(x).logits)
    # Layers a pattern leaves out have no tensors, and stay as the base has them.
    only_first = copy("first", {"target_modules": r"model\.layers\.0\..*"}, lambda k: "layers.0." in k)
    names = load_adapter(tiny_llama(), only_first)
    assert any("layers.1." in n for n in names)
