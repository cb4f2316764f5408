"""The training loop on a tiny model: exact resume, control requests, signals, outputs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from lowmem.checkpoint import checkpoint_step, list_checkpoints
from lowmem.config import load_config
from lowmem.events import read_events, send_control
from lowmem.planner import make_plan, plan_from_config
from lowmem.spec import spec_for
from lowmem.trainer import lr_at, new_run_dir, train, write_run_files
from tests.conftest import write_jsonl


def _config(model_dir, data, tmp_path, **overrides):
    base = {"model": str(model_dir), "data": str(data), "runs_dir": str(tmp_path / "runs"),
            "steps": 6, "micro_batch": 4, "seq_len": 64, "lr": 1e-2, "warmup_steps": 1,
            "eval_fraction": 0.2, "eval_generate": False, "lora.rank": 4, "lora.dropout": 0.1}
    base.update(overrides)
    return load_config(overrides=[f"{k}={v}" for k, v in base.items()])


def _start(config, name):
    config = config.replace(name=name)
    plan = plan_from_config(config)
    run_dir = new_run_dir(config)
    write_run_files(run_dir, config, plan)
    return config, plan, run_dir


def _losses(run_dir):
    return [e["loss"] for e in read_events(run_dir) if e["kind"] == "step"]


@pytest.mark.parametrize("packing", [False, True])
def test_resume_continues_the_loss_sequence_exactly(tmp_path, tiny_model_dir, tiny_chat_data, packing):
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, packing=packing)
    train(*_start(config, "straight"), out=lambda m: None)

    config_b, plan_b, run_b = _start(config, "stopped")

    def stop_after_step_3(message):
        if message.startswith("step 2/"):
            time.sleep(1.0)   # an elapsed time the resumed session cannot reach by itself
        if message.startswith("step 3/"):
            send_control(run_b, "stop")

    done = train(config_b, plan_b, run_b, out=stop_after_step_3)
    assert done["reason"] == "stopped" and done["step"] == 3
    saved = json.loads((run_b / "checkpoints" / "step-3" / "state.json").read_text())["elapsed_s"]
    done = train(config_b, plan_b, run_b, resume=True, out=lambda m: None)
    assert done["reason"] == "finished"

    straight = _losses(tmp_path / "runs" / "straight")
    assert len(straight) == 6
    assert _losses(run_b) == straight  # bit for bit: same floats in the same order
    # The elapsed time goes on from the checkpoint's instead of starting over.
    elapsed = [e["elapsed_s"] for e in read_events(run_b) if e["kind"] == "step"]
    assert 1.0 <= elapsed[2] <= saved <= elapsed[3]


def test_a_run_writes_its_contract_files_and_improves(tmp_path, tiny_model_dir, tiny_chat_data):
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=8)
    config, plan, run_dir = _start(config, "r")
    train(config, plan, run_dir, out=lambda m: None)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 8
    assert yaml.safe_load((run_dir / "plan.yaml").read_text())["lora_rank"] == 4
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    events = read_events(run_dir)
    kinds = [e["kind"] for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 8
    evals = [e for e in events if e["kind"] == "eval"]
    assert [e["label"] for e in evals] == ["before", "after"]
    assert evals[1]["loss"] < evals[0]["loss"]
    step = next(e for e in events if e["kind"] == "step")
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "eta_s", "mem"} <= set(step)
    assert step["mem"]["rss"] > 0


def test_the_adapter_names_a_base_peft_opens_from_anywhere(tmp_path, tiny_model_dir, tiny_chat_data,
                                                           monkeypatch):
    """Given a relative model path, the run records the absolute folder it loaded, so
    AutoPeftModelForCausalLM finds the base offline from another directory."""
    from peft import AutoPeftModelForCausalLM

    from lowmem.lora import load_adapter
    from lowmem.model import load_model

    monkeypatch.chdir(tiny_model_dir.parent)
    config = _config(tiny_model_dir.name, tiny_chat_data, tmp_path, steps=2)
    config, plan, run_dir = _start(config, "r")
    train(config, plan, run_dir, out=lambda m: None)
    recorded = json.loads((run_dir / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(tiny_model_dir.resolve())

    monkeypatch.chdir(tmp_path)
    peft_model = AutoPeftModelForCausalLM.from_pretrained(str(run_dir / "adapter")).eval()
    ours, _, _ = load_model(recorded)
    load_adapter(ours, run_dir / "adapter")
    x = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x).logits, ours.eval()(x).logits, atol=1e-4, rtol=1e-4)


def test_a_diverging_run_skips_non_finite_updates_then_stops_and_saves_nothing_after(
        tmp_path, tiny_model_dir, tiny_chat_data):
    from lowmem.errors import DivergedError
    from lowmem.trainer import MAX_SKIPPED_STEPS

    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=12, lr=1e30, warmup_steps=0,
                     max_grad_norm=0, save_every=1, keep_checkpoints=2)
    config, plan, run_dir = _start(config, "nan")
    with pytest.raises(DivergedError, match=r"training diverged \(3 steps in a row were not finite\); nothing "
                                            r"after it is saved and the newest checkpoint, step-\d+, is from "
                                            r"before it and is kept\. Start a new run with a lower lr \(this "
                                            r"one: 1e\+30\) or a warmup .* or clipping"):
        train(config, plan, run_dir, out=lambda m: None)
    events = read_events(run_dir)
    steps = [e for e in events if e["kind"] == "step"]
    bad = [e["step"] for e in steps if not (math.isfinite(e["loss"]) and math.isfinite(e["grad_norm"]))]
    assert len(bad) == MAX_SKIPPED_STEPS and bad == list(range(bad[0], bad[0] + MAX_SKIPPED_STEPS))
    assert steps[-1]["step"] == bad[-1] and events[-1]["kind"] == "error"
    warned = [e["message"] for e in events if e["kind"] == "warning" and "held-out example" not in e["message"]]
    assert len(warned) == MAX_SKIPPED_STEPS - 1 and all("update was skipped" in m for m in warned)
    # The checkpoints written during the skipped steps hold the last finite weights, unchanged.
    saved = list_checkpoints(run_dir)
    assert saved and checkpoint_step(saved[-1]) == bad[-2]
    from safetensors.torch import load_file
    last, before = (load_file(str(f / "trainable.safetensors")) for f in saved[-1:] + saved[-2:-1])
    for name, tensor in last.items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, before[name]), name


def test_a_resumed_run_counts_the_non_finite_steps_before_its_checkpoint(tmp_path, tiny_model_dir, tiny_chat_data):
    """Stopped after a non-finite step and resumed, a run stops where the uninterrupted one did; the
    count of such steps in a row was not in the checkpoint, so it took two more."""
    from lowmem.errors import DivergedError

    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=12, lr=1e30, warmup_steps=0,
                     max_grad_norm=0, save_every=1, keep_checkpoints=2)

    def last_step(run_dir):
        return [e["step"] for e in read_events(run_dir) if e["kind"] == "step"][-1]

    straight = _start(config, "straight")
    with pytest.raises(DivergedError):
        train(*straight, out=lambda m: None)
    first_bad = next(e["step"] for e in read_events(straight[2])
                     if e["kind"] == "step" and not math.isfinite(e["loss"] * e["grad_norm"]))
    config_b, plan_b, run_b = _start(config, "stopped")

    def stop_after_the_first_bad_step(message):
        if message.startswith(f"step {first_bad:2d}/") or message.startswith(f"step {first_bad}/"):
            send_control(run_b, "stop")

    assert train(config_b, plan_b, run_b, out=stop_after_the_first_bad_step)["step"] == first_bad
    with pytest.raises(DivergedError):
        train(config_b, plan_b, run_b, resume=True, out=lambda m: None)
    assert last_step(run_b) == last_step(straight[2])


def test_a_galore_run_with_per_layer_updates_stops_at_its_first_non_finite_step(
        tmp_path, tiny_model_dir, tiny_chat_data, monkeypatch):
    """GaLore's per-layer updates apply in backward: the first non-finite step has reached the
    weights, so the run stops there, and no checkpoint holds it."""
    from lowmem import trainer
    from lowmem.errors import DivergedError

    calls = {"n": 0}
    real = trainer.causal_lm_loss

    def loss_nan_on_the_third_step(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(trainer, "causal_lm_loss", loss_nan_on_the_third_step)
    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=5, method="galore",
                                           lr=1e-3, save_every=1), "g")
    assert plan.galore_per_layer
    with pytest.raises(DivergedError, match=r"step 3: loss nan, .*\(the per-layer updates applied it"):
        train(config, plan, run_dir, out=lambda m: None)
    assert [checkpoint_step(c) for c in list_checkpoints(run_dir)] == [1, 2]


def test_the_divergence_advice_is_what_the_config_accepts(tmp_path):
    """GaLore's per-layer updates stop at once; a skipped step warns; the warmup suggested fits the run."""
    from lowmem.config import RunConfig
    from lowmem.errors import DivergedError
    from lowmem.events import EventLog
    from lowmem.trainer import diverged

    events, said = EventLog(tmp_path), []
    config = RunConfig(lr=0.01, warmup_steps=5, max_grad_norm=1.0)
    diverged(7, float("nan"), 3.0, 1, False, config, None, events, said.append)
    assert said == ["warning: step 7: loss nan, gradient norm 3: not finite, so its update was skipped "
                    "(the weights are unchanged)"]
    with pytest.raises(DivergedError, match=r"step 8: loss 2, gradient norm inf: training diverged \(the "
                                            r"per-layer updates applied it in backward\); nothing after it is "
                                            r"saved and no checkpoint was written before it\. Start a new run "
                                            r"with a lower lr \(this one: 0.01\)$"):
        diverged(8, 2.0, float("inf"), 1, True, config, None, events, said.append)
    short = RunConfig(lr=0.01, steps=12, warmup_steps=0, max_grad_norm=1.0)
    with pytest.raises(DivergedError, match=r"or a warmup \(warmup_steps=1\)$") as raised:
        diverged(9, 2.0, float("nan"), 3, False, short, None, events, said.append)
    assert load_config(overrides=["steps=12", raised.value.args[0].rsplit("(", 1)[1].rstrip(")")]).warmup_steps == 1
    events.close()


def test_a_refused_resume_leaves_the_run_as_it_was_and_changed_heldout_data_is_said(
        tmp_path, tiny_model_dir, tiny_chat_data, capsys):
    from lowmem.cli import main

    held = tmp_path / "held.jsonl"
    held.write_text("".join(tiny_chat_data.read_text().splitlines(keepends=True)[:3]))
    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2,
                                           eval_data=str(held)), "r")
    train(config, plan, run_dir, out=lambda m: None)
    original = tiny_chat_data.read_text()
    tiny_chat_data.write_text(original.replace("number 5.", "number 7."))        # same size, other tokens
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "steps=4", "--no-tui"]) == 2
    assert f"DataError: --data {tiny_chat_data}: the training data changed since" in capsys.readouterr().err
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 2    # as it was
    tiny_chat_data.write_text(original)
    # Refused on loading the model (moved, say): config.yaml is as it was too, nothing is left over.
    from lowmem import trainer
    from lowmem.errors import ModelError

    def moved(*args, **kwargs):
        raise ModelError("the model folder is gone")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "load_model", moved)
        assert main(["train", "--resume", str(run_dir), "steps=4", "--no-tui"]) == 2
        # Stopped while it loads: the command it gives asks for steps=4 again.
        patch.setattr(trainer, "load_model", interrupted)
        capsys.readouterr()
        assert main(["train", "--resume", str(run_dir), "steps=4", "--no-tui"]) == 130
        said = capsys.readouterr()
        assert f"interrupted: `lowmem train --resume {run_dir} steps=4` continues" in said.out
        assert "interrupted" not in said.err      # said once, with the way on
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 2
    assert sorted(p.name for p in run_dir.iterdir() if p.suffix == ".yaml") == ["config.yaml", "plan.yaml"]
    held.write_text(held.read_text().replace("number 1.", "number 9."))
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "steps=4", "--no-tui"]) == 0
    warnings = [e["message"] for e in read_events(run_dir) if e["kind"] == "warning"]
    assert any(w.startswith("the held-out data changed since the checkpoint") for w in warnings)
    assert not [line for line in capsys.readouterr().out.splitlines()      # no before -> after across
                if line.startswith("held-out loss ")]                      # other held-out data
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["steps"] == 4


def test_a_full_disk_at_the_end_leaves_no_half_written_adapter_and_a_resume_writes_it(
        tmp_path, tiny_model_dir, tiny_chat_data, monkeypatch):
    from lowmem import trainer
    from lowmem.errors import CheckpointError

    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2), "full")
    real = trainer.save_adapter_for

    def disk_fills(model, plan, config, folder, model_dir):
        if folder.parent != run_dir:      # a checkpoint's copy: that one fits
            return real(model, plan, config, folder, model_dir)
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"cut sh")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(trainer, "save_adapter_for", disk_fills)
    with pytest.raises(CheckpointError, match=r"adapter: cannot be written \(No space left on device\); the "
                                              r"checkpoint step-2 holds everything trained: once the folder can "
                                              r"be written \(a full disk, permissions\), "
                                              r"`lowmem train --resume .*` writes it"):
        train(config, plan, run_dir, out=lambda m: None)
    assert not (run_dir / "adapter").exists() and not list(run_dir.glob(".adapter*"))
    monkeypatch.setattr(trainer, "save_adapter_for", real)
    assert train(config, plan, run_dir, resume=True, out=lambda m: None)["reason"] == "finished"
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_running_out_of_gpu_memory_is_one_line_with_the_plans_figure_and_the_checkpoint_kept(
        tmp_path, tiny_model_dir, tiny_chat_data, monkeypatch):
    from lowmem import trainer
    from lowmem.planner import BudgetError

    import dataclasses

    from lowmem.spec import spec_for
    from lowmem.memory import predict

    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=4, save_every=2), "oom")
    plan = dataclasses.replace(plan, vram=2**30, breakdown=predict(spec_for(config.model), plan))
    real, calls = trainer.train_step, {"n": 0}

    def third_step_runs_out(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has ...\nmore")
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", third_step_runs_out)
    monkeypatch.delattr(torch, "OutOfMemoryError", raising=False)    # torch 2.4 has only torch.cuda's
    with pytest.raises(BudgetError, match=r"^out of GPU memory at step 3 \(CUDA out of memory\. Tried to allocate "
                                          r"2\.00 GiB\. GPU 0 has \.\.\.\); the plan predicted a peak of .* \(.*\) for "
                                          r"--vram 1\.00GiB, and whatever else runs on the GPU .* The newest checkpoint, step-2, is "
                                          r"intact: with the GPU freed, `lowmem train --resume .*` continues; or"):
        train(config, plan, run_dir, out=lambda m: None)
    assert read_events(run_dir)[-1]["message"].startswith("BudgetError: out of GPU memory at step 3")


def test_a_run_says_when_its_held_out_data_is_its_training_data_and_when_chats_have_no_template(
        tmp_path, tiny_model_dir, tiny_chat_data, monkeypatch):
    from lowmem import trainer

    real = trainer.load_model

    def without_template(*args, **kwargs):
        model, tokenizer, model_dir = real(*args, **kwargs)
        tokenizer.chat_template = None
        return model, tokenizer, model_dir

    monkeypatch.setattr(trainer, "load_model", without_template)
    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=1,
                                           eval_data=str(tiny_chat_data)), "same")
    said = []
    train(config, plan, run_dir, out=said.append)
    # The model's own parameters as `lowmem plan` counts them, and the adapters' beside them.
    start = next(e for e in read_events(run_dir) if e["kind"] == "start")
    assert any(f"{(start['total_params'] - start['trainable_params']) / 1e6:.1f}M parameters + "
               f"{start['trainable_params'] / 1e6:.2f}M trainable in adapters (lora, rank 4)" in m for m in said)
    warned = [e["message"] for e in read_events(run_dir) if e["kind"] == "warning"]
    assert any(w.startswith("the held-out data is the training data (--eval-data names the --data file)")
               for w in warned)
    assert any(w.startswith("the model has no chat template, so conversations are laid out as '### User:'")
               for w in warned)


def test_the_console_and_lowmem_monitor_print_a_step_alike(tmp_path, tiny_model_dir, tiny_chat_data, capsys):
    """One line for a step wherever it is read: the trainer's console, and the monitor replaying the
    run (they differed: `lr 2.00e-03  grad 3.731 ... 0:00:24 elapsed` against `lr 0.002  |g| 3.73 ...
    elapsed 0:24`); both give the memory."""
    import re

    from lowmem.commands.monitor import print_progress

    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=3), "alike")
    said = []
    train(config, plan, run_dir, out=said.append)
    console = [m for m in said if m.startswith("step ")]
    assert len(console) == 3 and all(re.fullmatch(r"step \d/3  loss \d+\.\d{4}  lr \d\.\d\de-\d\d  grad \d+\.\d{3}  "
                                                  r"[\d,]+ tok/s  RSS [\d.]+[MG]iB  \d:\d\d:\d\d elapsed  "
                                                  r"ETA \d:\d\d:\d\d", m) for m in console), console
    capsys.readouterr()
    assert print_progress(run_dir, poll_s=0.01, check_trainer=False) == 0
    assert [m for m in capsys.readouterr().out.splitlines() if m.startswith("step ")] == console


def test_a_finished_run_trained_further_sets_its_old_adapter_aside_and_answers_with_its_newest(
        tmp_path, tiny_model_dir, tiny_chat_data):
    from lowmem.checkpoint import run_adapter_folder
    from lowmem.lora import ADAPTER_CONFIG

    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2), "longer")
    train(config, plan, run_dir, out=lambda m: None)
    final = (run_dir / "adapter" / "adapter_model.safetensors").read_bytes()
    longer = config.replace(steps=5)

    def stop_after_step_3(message):
        if message.startswith("step 3/"):
            send_control(run_dir, "stop")

    notes = []
    done = train(longer, plan, run_dir, resume=True, out=lambda m: (notes.append(m), stop_after_step_3(m)))
    assert done["reason"] == "stopped"
    assert not (run_dir / "adapter").exists()
    assert (run_dir / "adapter-step-2" / "adapter_model.safetensors").read_bytes() == final   # kept
    assert any(m.startswith("note: adapter/ from the end at step 2 is kept as adapter-step-2") for m in notes)
    assert run_adapter_folder(run_dir, ADAPTER_CONFIG)[0] == run_dir / "checkpoints" / "step-3" / "adapter"
    said = []
    train(longer, plan, run_dir, resume=True, out=said.append)
    assert run_adapter_folder(run_dir, ADAPTER_CONFIG)[0] == run_dir / "adapter"
    # Its end compares with the run's first evaluation, as a run that was never stopped does.
    first = next(e for e in read_events(run_dir) if e["kind"] == "eval" and e["label"] == "before")
    assert [m for m in said if m.startswith("held-out loss ")] == [
        f"held-out loss {first['loss']:.4f} -> {[e for e in read_events(run_dir) if e['kind'] == 'eval'][-1]['loss']:.4f}"]
    assert (run_dir / "adapter" / "adapter_model.safetensors").read_bytes() != final


def test_final_weights_set_aside_are_named_by_the_step_the_run_finished_at_not_the_resumed_one(tmp_path):
    """A finished run resumed from an earlier checkpoint (its last one damaged): adapter/ holds the
    weights of the end, and is named by that step."""
    from lowmem.events import EventLog
    from lowmem.trainer import set_aside_final_weights

    (tmp_path / "adapter").mkdir()
    log = EventLog(tmp_path)
    log.emit("done", step=4, reason="finished")
    log.emit("start", steps=8)
    log.emit("done", step=8, reason="finished")
    log.emit("start", steps=12)
    log.emit("done", step=9, reason="stopped")
    log.close()
    moved = set_aside_final_weights(tmp_path, 7)
    assert (tmp_path / "adapter-step-8").is_dir() and moved[0].startswith("adapter/ from the end at step 8 is kept")


def test_accumulation_gives_the_same_step_as_one_large_batch(tmp_path, tiny_model_dir, tiny_chat_data):
    results = []
    for name, mb, accum in (("one", 4, 1), ("two", 2, 2)):
        config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2, micro_batch=mb,
                         grad_accum=accum, **{"lora.dropout": 0.0})
        config, plan, run_dir = _start(config, name)
        train(config, plan, run_dir, out=lambda m: None)
        results.append([(e["loss"], e["grad_norm"]) for e in read_events(run_dir) if e["kind"] == "step"])
    for (loss_a, norm_a), (loss_b, norm_b) in zip(*results):
        assert loss_a == pytest.approx(loss_b, rel=1e-5)
        assert norm_a == pytest.approx(norm_b, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral"])
def test_packed_examples_train_as_they_would_alone(family):
    """Loss and gradient of a packed sequence are those of its examples in a padded batch:
    positions restart and attention stays within each example (mistral: a sliding window)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from lowmem.config import RunConfig
    from lowmem.data import BatchStream, Example, collate, pack
    from lowmem.loss import causal_lm_loss
    from lowmem.trainer import train_step

    extra = {"sliding_window": 4} if family == "mistral" else {}
    hf = AutoConfig.for_model(family, vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                              initializer_range=0.2, use_cache=False, attn_implementation="sdpa", **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(hf)
    g = torch.Generator().manual_seed(1)
    examples = [Example(tuple(ids), tuple(ids)) for ids in
                (torch.randint(1, 64, (n,), generator=g).tolist() for n in (5, 9, 6))]
    config = RunConfig(method="full", device="cpu", seq_len=32, max_grad_norm=0.0)
    results = []
    for examples_, micro_batch in ((examples, 3), (pack(examples, 32), 1)):
        plan = plan_from_config(config.replace(micro_batch=micro_batch, grad_accum=1))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        loss, norm, _ = train_step(model, optimizer, BatchStream(examples_, micro_batch, 0, 0), plan, config, 0.0)
        results.append((loss, norm))
    (alone, alone_norm), (packed, packed_norm) = results
    assert packed == pytest.approx(alone, rel=1e-5) and packed_norm == pytest.approx(alone_norm, rel=1e-4)
    # Without the restarting positions the examples would see each other and the loss would differ.
    batch = collate(pack(examples, 32), 0)
    hidden = model.get_decoder()(input_ids=batch["input_ids"]).last_hidden_state
    leaky = float(causal_lm_loss(hidden, model.get_output_embeddings().weight, batch["labels"]).detach())
    assert abs(leaky - alone) > 1e-4 * alone   # ten times the tolerance of the match above


def test_control_requests_are_obeyed_and_acknowledged(tmp_path, tiny_model_dir, tiny_chat_data):
    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=4), "c")

    def drive(message):
        if message.startswith("step 1/"):
            send_control(run_dir, "save")
            send_control(run_dir, "pause")
            send_control(run_dir, "resume")

    train(config, plan, run_dir, out=drive)
    acks = [(e["request"], e["status"]) for e in read_events(run_dir) if e["kind"] == "control"]
    assert acks == [("save", "done"), ("pause", "done"), ("resume", "done")]
    saved = [e["step"] for e in read_events(run_dir) if e["kind"] == "checkpoint"]
    assert saved == [1, 4]


def test_resume_skips_a_corrupted_latest_checkpoint(tmp_path, tiny_model_dir, tiny_chat_data):
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, save_every=2, keep_checkpoints=3)
    config, plan, run_dir = _start(config, "k")

    def stop_after_4(message):
        if message.startswith("step 4/"):
            send_control(run_dir, "stop")

    train(config, plan, run_dir, out=stop_after_4)
    latest = list_checkpoints(run_dir)[-1]
    assert latest.name == "step-4"
    (latest / "optimizer.pt").write_bytes(b"garbage")
    lines = []
    done = train(config, plan, run_dir, resume=True, out=lines.append)
    assert any("step-4 is damaged" in line for line in lines)
    assert "resuming" in "\n".join(lines) and "step-2" in "\n".join(lines)
    steps = [e["step"] for e in read_events(run_dir) if e["kind"] == "step"]
    assert steps == [1, 2, 3, 4, 3, 4, 5, 6] and done["reason"] == "finished"
    assert any(e["kind"] == "warning" and "damaged" in e["message"] for e in read_events(run_dir))


def test_full_training_updates_every_weight_and_saves_the_model(tmp_path, tiny_model_dir, tiny_chat_data):
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2, method="full", lr=1e-3)
    config, plan, run_dir = _start(config, "f")
    train(config, plan, run_dir, out=lambda m: None)
    start = next(e for e in read_events(run_dir) if e["kind"] == "start")
    assert start["trainable_params"] == start["total_params"]
    saved = json.loads((run_dir / "model" / "config.json").read_text())
    assert saved["use_cache"] is True     # training switches the cache off; the saved model generates


def test_schedule_warms_up_then_decays_to_the_floor():
    config = load_config(overrides=["lr=1.0", "steps=10", "warmup_steps=2", "min_lr_ratio=0.1"])
    lrs = [lr_at(s, config) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:]))
    assert lr_at(10, config) == pytest.approx(0.1)
    linear = config.replace(schedule="linear")
    assert lr_at(6, linear) == pytest.approx(0.1 + 0.9 * (1 - 4 / 8))


def test_a_run_directory_is_reused_only_while_it_holds_nothing_trained(tmp_path, tiny_model_dir, tiny_chat_data):
    """A start that ended before its first checkpoint (Ctrl-C while loading, a bad setting) must
    not block its name; one with a checkpoint, or with a trainer working in it, is never reused."""
    from lowmem.checkpoint import RunLock, save_checkpoint
    from lowmem.errors import CheckpointError, ConfigError

    config, _, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path), "same")
    (run_dir / "events.jsonl").write_text('{"kind": "error"}\n')
    with RunLock(run_dir), pytest.raises(CheckpointError, match="in use by a trainer .pid"):
        new_run_dir(config)
    assert new_run_dir(config) == run_dir and not (run_dir / "events.jsonl").exists()
    write_run_files(run_dir, config, plan_from_config(config))     # a run again, now with a checkpoint
    save_checkpoint(run_dir, 1, trainable={"w": torch.zeros(2)}, optimizer={}, state={}, config={}, plan={},
                    keep=1)
    with pytest.raises(ConfigError, match="already exists"):
        new_run_dir(config)
    # A folder that is not a run, or holds anything lowmem did not write, is never emptied.
    for name, files in (("notes", {"todo.txt": "mine"}), ("looks-like-a-run", {"config.yaml": "", "x.py": "1"})):
        folder = tmp_path / "runs" / name
        folder.mkdir()
        for file, text in files.items():
            (folder / file).write_text(text)
        with pytest.raises(ConfigError, match="already exists"):
            new_run_dir(config.replace(name=name))
        assert sorted(p.name for p in folder.iterdir()) == sorted(files)


def test_sigint_finishes_the_step_checkpoints_and_says_how_to_resume(tmp_path, tiny_model_dir, tiny_chat_data):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "lowmem", "train", "--model", str(tiny_model_dir), "--data",
           str(tiny_chat_data), "--runs-dir", str(tmp_path), "--name", "sig", "--steps", "500",
           "--micro-batch", "2", "--no-eval-generate"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.split("/")[0].split() == ["step", "2"]:
            proc.send_signal(signal.SIGINT)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert f"lowmem train --resume {tmp_path / 'sig'}" in output
    done = read_events(tmp_path / "sig")[-1]
    assert done["kind"] == "done" and done["reason"] == "interrupted"
    assert list_checkpoints(tmp_path / "sig")[-1].name == f"step-{done['step']}"


def test_what_the_plan_warned_of_is_said_where_the_run_is_watched(tmp_path, tiny_model_dir, tiny_chat_data):
    """A key the method does not read, as the plan warns of it, reaches the console and the
    event log the dashboard shows (it was in plan.yaml only); a resume does not repeat it."""
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=1)
    config, plan, run_dir = _start(config, "noted")
    plan = make_plan(config, spec_for(config.model), {"galore.rank"}, device="cpu")
    said = []
    train(config, plan, run_dir, out=said.append)
    warning = ("galore.rank: set, but a lora run does not use it (method=galore would); "
               "did you mean lora.rank?")
    assert f"warning: {warning}" in said
    assert [e["message"] for e in read_events(run_dir) if e["kind"] == "warning"][0] == warning
    said.clear()
    train(config.replace(steps=2), plan, run_dir, resume=True, out=said.append)
    assert f"warning: {warning}" not in said


def test_sigterm_before_the_step_loop_stops_the_run_as_ctrl_c_does(tmp_path, tiny_model_dir, tiny_chat_data):
    """`timeout` or a scheduler's SIGTERM during the model's loading or the first evaluation: the
    run says it was interrupted and how to start it over, as Ctrl-C there does (it was killed
    with no word, and no `done` for a dashboard)."""
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2)
    said = []

    def out(message):
        said.append(message)
        if "training and" in message:       # the start line: the first evaluation comes next
            os.kill(os.getpid(), signal.SIGTERM)

    previous = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        train(*_start(config, "term"), out=out)
    assert signal.getsignal(signal.SIGTERM) is previous
    done = read_events(tmp_path / "runs" / "term")[-1]
    assert (done["kind"], done["reason"], done["step"]) == ("done", "interrupted", 0)
    assert said[-1].startswith("interrupted before a checkpoint was written: `lowmem train --resume")


@pytest.mark.parametrize("method, extra", [
    ("qlora", {}),
    ("l4q", {"lora.dropout": 0.0, "l4q.group": 16}),
    ("loram", {"loram.ratio": 0.5, "loram.keep_first": 0, "loram.keep_last": 0}),
    ("loram", {"loram.ratio": 0.5, "loram.keep_first": 0, "loram.keep_last": 0, "loram.quantize": True,
               "loram.criterion": "magnitude", "loram.align_steps": 2}),
    ("loram", {"loram.ratio": 0.5, "loram.keep_first": 0, "loram.quantize": True,       # pruned while loading
               "loram.criterion": "magnitude"}),
])
def test_every_adapter_method_trains_and_resumes_exactly(tmp_path, tiny_model_dir, tiny_chat_data, method, extra):
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=4, method=method, **extra)
    said = []
    train(*_start(config, "straight"), out=said.append)
    # A LoRAM run's evaluation is of the pruned model it trains, and its summary says so.
    summary = next(m for m in said if m.startswith("held-out loss "))
    assert summary.endswith("(the pruned model the run trained; the full one with the recovered adapter is not "
                            "evaluated)") is (method == "loram")
    config_b, plan_b, run_b = _start(config, "stopped")

    def stop_after_step_2(message):
        if message.startswith("step 2/"):
            send_control(run_b, "stop")

    train(config_b, plan_b, run_b, out=stop_after_step_2)
    train(config_b, plan_b, run_b, resume=True, out=lambda m: None)
    straight = _losses(tmp_path / "runs" / "straight")
    assert len(straight) == 4 and _losses(run_b) == straight


@pytest.mark.parametrize("state_bits", [32, 16, 8])
def test_full_training_resumes_exactly_with_each_optimizer_it_may_plan(tmp_path, tiny_model_dir, tiny_chat_data,
                                                                     state_bits):
    """torch AdamW (32), BF16AdamW (16: a budgeted full run on CUDA) and the 8-bit AdamW."""
    import dataclasses

    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=4, method="full", lr=1e-3)
    runs = []
    for name in ("straight", "stopped"):
        config_n, plan, run_dir = _start(config, name)
        plan = dataclasses.replace(plan, optimizer_state_bits=state_bits)
        write_run_files(run_dir, config_n, plan)
        runs.append((config_n, plan, run_dir))
    train(*runs[0], out=lambda m: None)
    config_b, plan_b, run_b = runs[1]

    def stop_after_step_2(message):
        if message.startswith("step 2/"):
            send_control(run_b, "stop")

    assert train(config_b, plan_b, run_b, out=stop_after_step_2)["step"] == 2
    train(config_b, plan_b, run_b, resume=True, out=lambda m: None)
    straight = _losses(runs[0][2])
    assert len(straight) == 4 and _losses(run_b) == straight and straight[-1] < straight[0]


@pytest.mark.parametrize("method, extra", [
    ("qlora", {}),
    ("loram", {"loram.ratio": 0.5, "loram.quantize": True, "loram.criterion": "magnitude"}),   # streamed
    ("loram", {"loram.ratio": 0.5, "loram.quantize": True, "loram.criterion": "taylor"}),
])
def test_a_4bit_base_quantizes_every_block_projection_not_only_the_adapted_ones(
        tmp_path, tiny_model_dir, tiny_chat_data, monkeypatch, method, extra):
    """As QLoRA does, and as the memory model counts the weights (lowmem.memory.weight_bytes):
    adapting only q_proj and v_proj leaves no dense projection in the base."""
    from lowmem import trainer
    from lowmem.lora import LoRALinear
    from lowmem.quant.nf4 import NF4Linear
    from lowmem.spec import LINEARS

    trained = []
    real = trainer.prepare_for_training
    monkeypatch.setattr(trainer, "prepare_for_training", lambda model, plan: trained.append(model) or real(model, plan))
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=1, method=method,
                     **{"lora.targets": "[q_proj, v_proj]", **extra})
    train(*_start(config, "r"), out=lambda m: None)
    for i, block in enumerate(trained[0].get_decoder().layers):
        for name in LINEARS:
            layer = block.get_submodule(("self_attn." if name in LINEARS[:4] else "mlp.") + name)
            assert isinstance(layer, LoRALinear) == (name in ("q_proj", "v_proj")), (i, name)
            assert isinstance(getattr(layer, "base", layer), NF4Linear), (i, name)


def test_a_loram_run_saves_an_adapter_for_the_full_model(tmp_path, tiny_model_dir, tiny_chat_data):
    from lowmem.lora import load_adapter
    from lowmem.model import load_model

    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2, method="loram",
                     **{"loram.ratio": 0.5, "loram.keep_first": 0, "loram.keep_last": 0})
    config, plan, run_dir = _start(config, "r")
    train(config, plan, run_dir, out=lambda m: None)
    full, _, _ = load_model(str(tiny_model_dir))
    load_adapter(full, run_dir / "adapter")  # raises if any shape is the pruned one
    assert (run_dir / "loram_index.json").is_file()


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_pruning_while_loading_trains_exactly_like_pruning_the_loaded_model(tmp_path, tiny_model_dir,
                                                                            tiny_chat_data, monkeypatch, criterion):
    """QLoRAM streamed (one dense block at a time; taylor scored block by block beforehand) vs
    loaded whole, then scored and pruned: the same units kept, the same run."""
    from lowmem import trainer

    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=3, method="loram",
                     **{"loram.ratio": 0.5, "loram.keep_first": 0, "loram.quantize": True,
                        "loram.criterion": criterion})
    said = []
    train(*_start(config, "streamed"), out=said.append)
    assert any("while loading, one dense block at a time (NF4)" in m for m in said)
    assert any(m.startswith("LoRAM: scoring by taylor on 4 calibration batches") for m in said) == (
        criterion == "taylor")
    # Progress: the first block's message, then at most one every 30 s.
    assert any(m == "taylor scoring: forward through block 1/2" for m in said) == (criterion == "taylor")
    monkeypatch.setattr(trainer, "loram_streams", lambda config, resume=False: False)
    train(*_start(config, "whole"), out=lambda m: None)
    runs = tmp_path / "runs"
    assert _losses(runs / "streamed") == _losses(runs / "whole")
    assert (runs / "streamed" / "loram_index.json").read_text() == (runs / "whole" / "loram_index.json").read_text()


def _galore_config(model_dir, data, tmp_path, **overrides):
    keys = {"steps": 4, "micro_batch": 2, "grad_accum": 2, "lr": 1e-3, "method": "galore", "galore.rank": 8,
            "galore.update_gap": 2, "offload": True, "loss_chunk": 16, "grad_checkpointing": True,
            "lora.dropout": 0.0}
    keys.update(overrides)
    return _config(model_dir, data, tmp_path, **keys)


def test_a_galore_run_with_offloading_and_chunked_loss_resumes_exactly(tmp_path, tiny_model_dir, tiny_chat_data):
    config = _galore_config(tiny_model_dir, tiny_chat_data, tmp_path)
    plan = plan_from_config(config)
    assert plan.optimizer == "galore-adamw8bit" and plan.galore_per_layer
    assert plan.offload_activations and plan.loss_chunk == 16
    train(*_start(config, "straight"), out=lambda m: None)
    config_b, plan_b, run_b = _start(config, "stopped")

    def stop_after_step_2(message):
        if message.startswith("step 2/"):
            send_control(run_b, "stop")

    assert train(config_b, plan_b, run_b, out=stop_after_step_2)["step"] == 2
    assert train(config_b, plan_b, run_b, resume=True, out=lambda m: None)["reason"] == "finished"
    straight = _losses(tmp_path / "runs" / "straight")
    assert len(straight) == 4 and _losses(run_b) == straight
    assert straight[-1] < straight[0]


def test_offloading_and_chunked_loss_do_not_change_the_losses(tmp_path, tiny_model_dir, tiny_chat_data):
    common = {"method": "full", "steps": 2, "grad_accum": 1, "lr": 1e-3}
    plain = _config(tiny_model_dir, tiny_chat_data, tmp_path, offload=False, loss_chunk=0, **common)
    saver = _config(tiny_model_dir, tiny_chat_data, tmp_path, offload=True, loss_chunk=16, **common)
    train(*_start(plain, "plain"), out=lambda m: None)
    train(*_start(saver, "saver"), out=lambda m: None)
    plain_losses, saver_losses = _losses(tmp_path / "runs" / "plain"), _losses(tmp_path / "runs" / "saver")
    assert len(plain_losses) == 2
    assert saver_losses == pytest.approx(plain_losses, rel=1e-5)


def test_an_event_after_a_partial_last_line_is_not_lost(tmp_path):
    """A trainer killed mid-write leaves half a line; the next trainer's events must still read."""
    from lowmem.events import EventLog

    (tmp_path / "events.jsonl").write_text('{"kind": "step", "step": 1}\n{"kind": "st')
    log = EventLog(tmp_path)
    log.emit("start", step=1)
    log.close()
    assert [e["kind"] for e in read_events(tmp_path)] == ["step", "start"]


def test_a_request_sent_while_the_trainer_loads_is_obeyed_and_older_ones_are_history(tmp_path):
    """A dashboard's stop sent after the trainer began but before it opened the control channel
    (the model still loading) is for it; one from before it began is a past run's."""
    import time

    from lowmem.events import ControlReader

    send_control(tmp_path, "stop")
    time.sleep(0.01)
    began = time.time()
    send_control(tmp_path, "save")
    assert [r["request"] for r in ControlReader(tmp_path, since=began).poll()] == ["save"]
    assert ControlReader(tmp_path).poll() == []


def test_a_stop_sent_before_the_worker_started_training_is_obeyed(tmp_path, tiny_model_dir, tiny_chat_data):
    """The dashboard starts the worker with --since (its launch time): a stop pressed while the
    worker still imports torch stops the run after its first step instead of being history."""
    import time

    from lowmem.cli import main

    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path), "quick")
    launched = time.time()
    send_control(run_dir, "stop")
    assert main(["worker", str(run_dir), "--since", repr(launched)]) == 0
    done = read_events(run_dir)[-1]
    assert done["kind"] == "done" and done["reason"] == "stopped" and done["step"] == 1


def test_ctrl_c_before_the_first_checkpoint_ends_the_run_for_readers_and_says_resume_starts_over(
        tmp_path, tiny_model_dir, tiny_chat_data):
    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path), "early")
    said = []

    def interrupt_in_the_first_evaluation(message):
        said.append(message)
        if message.startswith("eval (before"):
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        train(config, plan, run_dir, out=interrupt_in_the_first_evaluation)
    assert said[-1] == f"interrupted before a checkpoint was written: `lowmem train --resume {run_dir}` starts it over"
    done = read_events(run_dir)[-1]
    assert done["kind"] == "done" and done["reason"] == "interrupted" and done["step"] == 0


def test_a_ctrl_c_while_the_last_checkpoint_is_written_waits_for_it(tmp_path, tiny_model_dir, tiny_chat_data,
                                                                    monkeypatch):
    """With save_every=0 the end's checkpoint is the only one: a Ctrl-C while it was written
    interrupted the write and lost the run. Now it is written, and resuming finishes the run."""
    import lowmem.trainer as trainer

    real = trainer.save_checkpoint

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)     # arrives while the checkpoint is being written
        return real(*args, **kwargs)

    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2), "ctrlc")
    monkeypatch.setattr(trainer, "save_checkpoint", interrupted_save)
    said = []
    done = train(config, plan, run_dir, out=said.append)
    assert done["reason"] == "interrupted" and done["step"] == 2
    assert done["resume"] == f"lowmem train --resume {run_dir}"
    assert [checkpoint_step(c) for c in list_checkpoints(run_dir)] == [2]
    assert not (run_dir / "adapter").exists()
    monkeypatch.setattr(trainer, "save_checkpoint", real)
    done = train(config, plan, run_dir, resume=True, out=said.append)
    assert done["reason"] == "finished" and (run_dir / "adapter" / "adapter_config.json").is_file()


def test_a_stop_during_the_last_step_ends_the_run_finished(tmp_path, tiny_model_dir, tiny_chat_data, monkeypatch):
    """It was recorded as stopped, though every step was done and the end written."""
    import lowmem.trainer as trainer

    config, plan, run_dir = _start(_config(tiny_model_dir, tiny_chat_data, tmp_path, steps=2), "laststop")
    real, steps = trainer.train_step, []

    def step_then_stop(*args, **kwargs):
        steps.append(1)
        if len(steps) == 2:
            send_control(run_dir, "stop")      # pressed during the last step
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step_then_stop)
    done = train(config, plan, run_dir, out=lambda m: None)
    assert done["reason"] == "finished" and done["resume"] is None
    assert (run_dir / "adapter" / "adapter_config.json").is_file()


def test_time_paused_or_evaluating_is_not_training_time(monkeypatch):
    """A 15 s pause made a run at 1,500 tok/s report 42 and then 186 tok/s to its end."""
    import lowmem.trainer as trainer

    clock = [100.0]
    monkeypatch.setattr(trainer.time, "perf_counter", lambda: clock[0])
    progress = trainer.Progress(total_steps=10, start_step=0)
    clock[0] += 2.0
    progress.tokens = 2000
    fields = progress.fields(2)
    assert fields["tokens_per_s"] == 1000.0 and fields["eta_s"] == 8.0
    with progress.aside():
        clock[0] += 60.0                         # paused a minute
    clock[0] += 1.0
    progress.tokens = 3000
    fields = progress.fields(3)
    assert fields["tokens_per_s"] == 1000.0 and fields["eta_s"] == 7.0
    assert fields["elapsed_s"] == 63.0           # the wall clock, pause included


def test_a_handful_of_held_out_examples_is_warned_of_and_counted_right(tmp_path, tiny_model_dir, tiny_chat_data):
    said = []
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=1, eval_fraction=0.05)
    train(*_start(config, "few"), out=said.append)
    assert any(m.endswith("23 training and 1 held-out example") for m in said)
    warned = [e["message"] for e in read_events(tmp_path / "runs" / "few") if e["kind"] == "warning"]
    assert warned == ["only 1 held-out example: its loss and exact match move by chance; 20 or more "
                      "(--eval-data, or a larger eval_fraction) measure the run"]


def test_a_fraction_that_holds_out_no_record_says_why_evaluation_is_skipped(tmp_path, tiny_model_dir,
                                                                          tiny_chat_data):
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=1, eval_fraction=0.01)
    train(*_start(config, "none"), out=lambda m: None)
    events = read_events(tmp_path / "runs" / "none")
    assert [e["message"] for e in events if e["kind"] == "warning"] == [
        "no held-out examples: eval_fraction=0.01 of this data is under one record, so it holds none out, "
        "and evaluation is skipped (give --eval-data, or a larger eval_fraction)"]
    assert not [e for e in events if e["kind"] == "eval"]


def test_elapsed_counts_the_first_evaluation_and_the_rate_does_not(tmp_path, tiny_model_dir, tiny_chat_data,
                                                                   monkeypatch):
    import lowmem.trainer

    real = lowmem.trainer.evaluate

    def slow(*args, **kwargs):
        time.sleep(1.5)
        return real(*args, **kwargs)

    monkeypatch.setattr(lowmem.trainer, "evaluate", slow)
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=1)
    train(*_start(config, "slow"), out=lambda m: None)
    step = next(e for e in read_events(tmp_path / "runs" / "slow") if e["kind"] == "step")
    assert step["elapsed_s"] >= 1.5
    assert step["tokens"] / step["tokens_per_s"] < step["elapsed_s"] - 1.4   # the rate's time leaves it out


@pytest.mark.parametrize("report_s", [0.0, 3600.0])
def test_a_long_evaluation_says_how_far_it_has_got(tmp_path, tiny_model_dir, monkeypatch, report_s):
    """Each evaluation says it began (an event); past EVAL_REPORT_S each batch of the held-out
    loss and of the generated answers but a phase's last reports done/total, as a line and an event."""
    import lowmem.trainer

    monkeypatch.setattr(lowmem.trainer, "EVAL_REPORT_S", report_s)
    records = [{"messages": [{"role": "user", "content": f"Say the number {i}."},
                             {"role": "assistant", "content": str(i)}]} for i in range(100)]
    data = write_jsonl(tmp_path / "many.jsonl", records)
    config = _config(tiny_model_dir, data, tmp_path, steps=1, eval_fraction=0.5, eval_generate=True,
                     max_new_tokens=2)
    lines = []
    train(*_start(config, "evals"), out=lines.append)
    events = read_events(tmp_path / "runs" / "evals")
    n = next(e for e in events if e["kind"] == "eval")["examples"]
    assert 40 < n < 64 and n % 16                  # batches of the loss: 16, 32, 48, n; of answers: 40, n
    before = [(e["phase"], e["done"], e["total"]) for e in events
              if e["kind"] == "evaluating" and e["label"] == "before"]
    said = [line for line in lines if line.startswith("eval (before, step 0): ") and "/" in line]
    if report_s:
        assert before == [("loss", 0, n)] and said == []
    else:
        assert before == [("loss", 0, n), ("loss", 16, n), ("loss", 32, n), ("loss", 48, n), ("answers", 40, n)]
        assert said[0] == f"eval (before, step 0): scored 16/{n} examples (0:00:00)"
    kinds = [e["kind"] for e in events]
    assert kinds.index("evaluating") < kinds.index("eval")


@pytest.mark.parametrize("minutes, saved_at", [(1e-9, [1, 2, 3]), (0.0, [3])])
def test_a_long_run_checkpoints_by_the_clock_too(tmp_path, tiny_model_dir, tiny_chat_data, minutes, saved_at):
    """save_every=0 (the default) with save_minutes: a checkpoint once that much time passed since
    the last, so a killed long run loses at most that much; 0 turns it off."""
    config = _config(tiny_model_dir, tiny_chat_data, tmp_path, steps=3, save_every=0, save_minutes=minutes)
    train(*_start(config, "clock"), out=lambda m: None)
    events = read_events(tmp_path / "runs" / "clock")
    assert [e["step"] for e in events if e["kind"] == "checkpoint"] == saved_at


def test_the_commands_a_run_prints_are_the_ones_the_user_can_type(monkeypatch):
    """`./setup.sh demo` runs a lowmem that is on no PATH outside it, and says so through LOWMEM_TRAIN."""
    from lowmem.trainer import train_command

    monkeypatch.delenv("LOWMEM_TRAIN", raising=False)
    assert train_command("--resume runs/x") == "lowmem train --resume runs/x"
    monkeypatch.setenv("LOWMEM_TRAIN", "./setup.sh demo")
    assert train_command("--resume runs/x") == "./setup.sh demo --resume runs/x"
    assert "LOWMEM_TRAIN=\"./setup.sh demo\" exec lowmem train" in (Path(__file__).parent.parent / "setup.sh").read_text()
