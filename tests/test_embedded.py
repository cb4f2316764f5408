"""The embedded real model: SmolLM2-135M-Instruct from its GGUF package."""

import pytest

from lowmem.errors import ModelError
from lowmem.model import embedded_gguf, load_model, resolve_model_dir

pytestmark = pytest.mark.slow


def test_the_embedded_model_is_the_real_smollm2(embedded_dir):
    model, tokenizer, _ = load_model("smollm2-135m")
    cfg = model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_key_value_heads) == (30, 576, 3)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert "<|im_start|>assistant" in tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)


def test_a_gguf_path_uses_the_same_cache(embedded_dir):
    assert resolve_model_dir(str(embedded_gguf())) == embedded_dir


def test_the_embedded_model_answers_sensibly(embedded_dir):
    from lowmem.evaluate import generate

    model, tokenizer, _ = load_model("smollm2-135m")
    answer = generate(model, tokenizer, [[{"role": "user", "content": "What is the capital of France?"}]],
                      "cpu", max_new_tokens=12)[0]
    assert "Paris" in answer


def test_a_few_lora_steps_on_the_embedded_model_lower_the_heldout_loss(tmp_path, embedded_dir):
    from lowmem.config import load_config
    from lowmem.events import read_events
    from lowmem.planner import plan_from_config
    from lowmem.trainer import new_run_dir, train, write_run_files

    config = load_config("smoke", overrides=[f"runs_dir={tmp_path}", "name=e", "steps=6", "micro_batch=4",
                                             "lr=2e-3", "eval_max_examples=16"])
    plan = plan_from_config(config)
    run_dir = new_run_dir(config)
    write_run_files(run_dir, config, plan)
    train(config, plan, run_dir, out=lambda m: None)
    evals = [e["loss"] for e in read_events(run_dir) if e["kind"] == "eval"]
    assert evals[1] < evals[0] - 0.5


def test_a_cleared_conversion_of_the_embedded_model_is_made_again(embedded_dir, monkeypatch):
    """An adapter names the embedded base by its cached folder; once that folder is gone
    (cache cleared, package reinstalled) the name still leads to the embedded model."""
    gone = embedded_dir.parent / (embedded_dir.name.rsplit("-", 1)[0] + "-0000000000000000")
    notes = []
    assert resolve_model_dir(str(gone), log=notes.append) == embedded_dir
    assert notes and "no longer exists" in notes[0]
    with pytest.raises(ModelError, match=r"was lowmem's conversion of a GGUF file .* give that .gguf file again"):
        resolve_model_dir(str(embedded_dir.parent / "my-model.Q8_0-0123456789abcdef"))

