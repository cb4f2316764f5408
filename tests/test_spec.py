"""ModelSpec: shapes from built-in entries, config.json and GGUF metadata, without weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from lowmem.errors import ModelError
from lowmem.model import embedded_gguf
from lowmem.spec import builtin_entries, builtin_spec, from_hf_config, spec_for


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors are yielded once


@pytest.mark.parametrize("config", [
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False),
    LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    LlamaConfig(vocab_size=300, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
    Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
], ids=["gqa-untied", "mha-tied", "head-dim-override", "qwen2-bias"])
def test_param_count_equals_the_parameters_of_the_transformers_model(config):
    model_cls = Qwen2ForCausalLM if config.model_type == "qwen2" else LlamaForCausalLM
    model = model_cls(config)
    assert from_hf_config(config.to_dict()).params == _count(model)


@pytest.mark.parametrize("name", list(builtin_entries()))
def test_builtin_entry_matches_its_published_count_and_transformers(name):
    spec = builtin_spec(name)
    assert spec.params == builtin_entries()[name]["published_params"]
    with torch.device("meta"):  # real shapes, no memory
        model = AutoModelForCausalLM.from_config(spec.to_hf_config())
    assert _count(model) == spec.params


def test_embedded_gguf_metadata_gives_smollm2_135m_shapes():
    path = embedded_gguf()
    spec = spec_for(str(path))
    assert (spec.layers, spec.hidden, spec.intermediate, spec.heads, spec.kv_heads,
            spec.head_dim, spec.vocab) == (30, 576, 1536, 9, 3, 64, 49152)
    assert spec.tied_embeddings and not spec.attention_bias
    assert spec.params == 134_515_008
    # The folder holding the file is accepted too, and agrees with the built-in entry.
    assert spec_for(str(path.parent)).params == builtin_spec("smollm2-135m").params


def test_config_json_is_read_from_the_file_or_its_directory(tmp_path):
    config = LlamaConfig(vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True)
    (tmp_path / "config.json").write_text(json.dumps(config.to_dict()))
    from_dir, from_file = spec_for(str(tmp_path)), spec_for(str(tmp_path / "config.json"))
    assert from_dir == from_file
    assert (from_dir.layers, from_dir.kv_heads, from_dir.head_dim, from_dir.tied_embeddings) == (4, 4, 16, True)
    assert from_dir.params == _count(LlamaForCausalLM(config))


@pytest.mark.parametrize("ref", ["SmolLM2-135M", "smollm2_135m", "EMBEDDED",
                                 "HuggingFaceTB/SmolLM2-135M-Instruct"])
def test_builtin_names_are_case_insensitive_with_aliases_and_suffixes(ref):
    assert spec_for(ref).name == "smollm2-135m"


def test_llama_names_used_by_the_planner_resolve():
    assert spec_for("meta-llama/Llama-3.1-8B-Instruct").name == "llama-3.1-8b"
    assert spec_for("LLAMA-3.1-70B").params > 70e9
    assert spec_for("meta-llama/Llama-2-13b-chat-hf").name == "llama-2-13b"      # two suffixes
    assert spec_for("mistralai/Mistral-7B-Instruct-v0.1").name == "mistral-7b"   # one in the middle


def test_a_sliding_window_is_read_where_attention_uses_it():
    """Mistral v0.1 attends 4096 tokens back; v0.3 and Qwen2 (whose configs carry a window
    they leave off) attend to everything before; a random-weight model gets what the spec says."""
    assert builtin_spec("mistral-7b").sliding_window == 4096
    assert builtin_spec("mistral-7b").to_hf_config().sliding_window == 4096
    assert builtin_spec("mistral-7b-v0.3").sliding_window == 0
    assert builtin_spec("mistral-7b-v0.3").to_hf_config().sliding_window is None   # MistralConfig's default: 4096
    qwen = builtin_spec("qwen2.5-0.5b").to_hf_config(sliding_window=4096, use_sliding_window=False)
    assert from_hf_config(qwen.to_dict()).sliding_window == 0
    mistral = builtin_spec("mistral-7b").to_hf_config().to_dict()
    assert from_hf_config(mistral).sliding_window == 4096
    assert from_hf_config({**mistral, "sliding_window": None}).sliding_window == 0


def test_unknown_name_says_what_would_have_worked():
    with pytest.raises(ModelError, match=r"did you mean 'llama-3.1-70b'\?.*--list-models"):
        spec_for("llama-3.1-7Ob")


def test_missing_file_is_an_error_naming_it(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        spec_for(str(tmp_path / "model.gguf"))


def test_directory_without_config_is_an_error(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        spec_for(str(tmp_path))


def test_non_llama_config_is_refused_by_name(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 12}))
    with pytest.raises(ModelError, match="model_type 'gpt2' is not a Llama-style decoder"):
        spec_for(str(tmp_path))


def test_config_missing_a_shape_names_the_key(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
         "vocab_size": 100}))
    with pytest.raises(ModelError, match="config.json: 'intermediate_size' is missing; cannot read"):
        spec_for(str(tmp_path))


_SMALL = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
          "num_key_value_heads": 2, "num_hidden_layers": 2, "vocab_size": 100}


@pytest.mark.parametrize(("change", "message"), [
    ({"num_hidden_layers": -3}, r"'num_hidden_layers' must be a whole number, 1 or more; found -3"),
    ({"hidden_size": 0}, r"'hidden_size' must be a whole number, 1 or more; found 0"),
    ({"num_hidden_layers": True}, r"'num_hidden_layers' must be .* found True"),
    ({"num_hidden_layers": 2.5}, r"'num_hidden_layers' must be .* found 2.5"),
    ({"vocab_size": "100"}, r"'vocab_size' must be .* found '100'"),
    ({"num_hidden_layers": None}, r"'num_hidden_layers' is null; cannot read the model's shapes"),
    ({"head_dim": -1}, r"'head_dim' must be"),
    ({"num_attention_heads": 6}, r"hidden_size 64 is not a multiple of num_attention_heads 6, and no head_dim"),
    ({"num_key_value_heads": 3}, r"num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    ({"model_type": ["llama"]}, r"model_type \['llama'\] is not a Llama-style decoder"),
], ids=["negative", "zero", "bool", "fraction", "string", "null", "head-dim", "heads", "kv-heads", "type"])
def test_a_config_no_model_could_have_is_refused_naming_the_key(tmp_path, change, message):
    (tmp_path / "config.json").write_text(json.dumps({**_SMALL, **change}))
    with pytest.raises(ModelError, match=f"config.json: {message}"):
        spec_for(str(tmp_path))


@pytest.mark.parametrize("text", ["[1, 2, 3]", "null", '"llama"'])
def test_a_config_that_is_not_a_json_object_is_refused(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ModelError, match="config.json: expected a JSON object of the model's settings"):
        spec_for(str(tmp_path))


def test_optional_shapes_may_be_null_or_absent(tmp_path):
    spec = from_hf_config({**_SMALL, "num_key_value_heads": None, "head_dim": None, "max_position_embeddings": None,
                           "num_attention_heads": 8, "_name_or_path": None})
    assert (spec.kv_heads, spec.head_dim, spec.max_position, spec.name) == (8, 8, 0, "llama")
    assert from_hf_config({**_SMALL, "num_attention_heads": 6, "head_dim": 16}).head_dim == 16


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="not a readable GGUF"):
        spec_for(str(bad))


def test_pruning_keeps_outer_blocks_and_whole_gqa_groups():
    spec = builtin_spec("llama-3.1-70b")
    pruned = spec.pruned(0.5, keep_first=2, keep_last=1)
    runs = pruned.block_groups()
    assert [n for n, _ in runs] == [2, 77, 1]
    full, middle, last = (b for _, b in runs)
    assert full == last == spec.block_groups()[0][1]
    assert middle.kv_heads == 4 and middle.heads % middle.kv_heads == 0
    assert middle.intermediate == spec.intermediate // 2
    # Parameters of the pruned blocks alone: what a uniform model of that shape would have.
    uniform = builtin_spec("llama-3.1-70b").__class__(**{
        **{f: getattr(spec, f) for f in ("name", "family", "hidden", "head_dim", "vocab",
                                         "tied_embeddings")},
        "layers": 77, "heads": middle.heads, "kv_heads": middle.kv_heads,
        "intermediate": middle.intermediate})
    assert pruned.params - uniform.params == 3 * spec.block_params()


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.5, 0.85])
def test_pruned_shapes_are_the_ones_the_pruner_makes(ratio):
    prune = pytest.importorskip("lowmem.prune")
    for name in ("llama-3.1-70b", "smollm2-135m", "llama-2-7b"):
        spec = builtin_spec(name)
        middle = spec.pruned(ratio).block_groups()[1][1]
        assert (middle.heads, middle.kv_heads, middle.intermediate) == prune.kept_counts(
            spec.heads, spec.kv_heads, spec.intermediate, ratio)
        assert middle.heads // middle.kv_heads <= spec.heads // spec.kv_heads


def test_more_pruning_never_leaves_more_parameters():
    spec = builtin_spec("llama-2-13b")
    counts = [spec.pruned(r / 20).params for r in range(0, 20)]
    assert counts == sorted(counts, reverse=True)
    assert spec.pruned(0.0) is spec


def test_a_folder_of_several_gguf_files_asks_which(tmp_path):
    for name in ("a-Q4.gguf", "a-Q8.gguf"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ModelError, match=r"no config.json, and 2 .gguf files \(a-Q4.gguf, a-Q8.gguf\): give the one "
                                         r"to use, e.g. --model .*a-Q4.gguf"):
        spec_for(str(tmp_path))
