"""The budget search: best quality that fits, then fastest; pins kept; failures explained."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from dataclasses import dataclass

import pytest
import torch
import yaml

import lowmem.config
from lowmem.commands import plan as plan_command
from lowmem.config import GaloreConfig, LoraConfig, RunConfig, format_size, parse_size
from lowmem.errors import ConfigError, LowmemError
from lowmem.memory import MemoryBreakdown, gradient_bytes
from lowmem.planner import BudgetError, Plan, make_plan, plan_from_config, quality
from lowmem.spec import builtin_spec

ALL_METHODS = ("lora", "full", "qlora", "galore", "loram")
BUDGETS = [parse_size(f"{g}G") for g in (6, 8, 12, 16, 24, 32, 48, 64, 80, 120)]


@pytest.fixture
def every_method(monkeypatch):
    """A build in which the other issues' methods have landed."""
    monkeypatch.setattr(lowmem.config, "METHODS", ALL_METHODS)


def config(**kw) -> RunConfig:
    kw.setdefault("seq_len", 1024)
    kw.setdefault("micro_batch", 4)
    kw.setdefault("grad_accum", 2)
    return RunConfig(**kw)


def plan_or_none(cfg: RunConfig, model: str, pinned=()) -> Plan | None:
    try:
        return make_plan(cfg, builtin_spec(model), pinned, device="cuda")
    except BudgetError:
        return None


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3.1-8b", "llama-2-13b", "llama-3.1-70b"])
def test_more_budget_never_gives_a_lower_quality_plan(every_method, model):
    plans = [plan_or_none(config(vram=v), model) for v in BUDGETS]
    fitted = [p for p in plans if p is not None]
    assert fitted, "some budget must fit"
    first = plans.index(fitted[0])
    assert all(p is not None for p in plans[first:]), "a budget that fits must keep fitting above"
    qualities = [quality(p) for p in fitted]
    assert qualities == sorted(qualities, reverse=True)
    assert len({p.method for p in fitted}) >= 2  # the ladder is really climbed


@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3.1-70b"])
def test_every_chosen_plan_fits_inside_the_safety_margin(every_method, model):
    for vram in BUDGETS:
        plan = plan_or_none(config(vram=vram), model)
        if plan is not None:
            assert plan.breakdown.total <= vram * (1 - plan.safety_margin)
            assert plan.breakdown.total <= plan.usable


def test_only_methods_of_this_build_are_chosen(monkeypatch):
    spec, cfg = builtin_spec("llama-2-7b"), config(vram=parse_size("10G"), seq_len=512)
    monkeypatch.setattr(lowmem.config, "METHODS", ("lora", "full"))
    with pytest.raises(BudgetError):
        make_plan(cfg, spec, device="cuda")  # 7B in bf16 does not fit 10G; qlora is not built yet
    monkeypatch.setattr(lowmem.config, "METHODS", ("lora", "full", "qlora"))
    assert make_plan(cfg, spec, device="cuda").method == "qlora"  # read at call time, not import


def test_l4q_is_planned_only_when_asked_for(monkeypatch):
    monkeypatch.setattr(lowmem.config, "METHODS", ALL_METHODS + ("l4q",))
    spec = builtin_spec("llama-2-7b")
    chosen = {make_plan(config(vram=v), spec, device="cuda").method for v in BUDGETS[1:]}
    assert "l4q" not in chosen
    pinned = make_plan(config(vram=parse_size("24G"), method="l4q"), spec, {"method"}, device="cuda")
    assert pinned.method == "l4q" and pinned.quant_bits == 4


PIN_CASES = [
    ({"method": "lora"}, {"method"}),
    ({"micro_batch": 1}, {"micro_batch"}),
    ({"grad_checkpointing": False}, {"grad_checkpointing"}),
    ({"grad_checkpointing": True, "micro_batch": 8, "grad_accum": 3}, {"grad_checkpointing", "micro_batch", "grad_accum"}),
    ({"method": "qlora", "lora": LoraConfig(rank=64, alpha=16.0)}, {"method", "lora.rank", "lora.alpha"}),
    ({"method": "full", "grad_checkpointing": True}, {"method", "grad_checkpointing"}),
]


@pytest.mark.parametrize("values,pinned", PIN_CASES)
@pytest.mark.parametrize("model", ["llama-2-7b", "llama-3.1-8b"])
def test_pinned_fields_are_never_changed(every_method, values, pinned, model):
    field_of = {"lora.rank": "lora_rank", "lora.alpha": "lora_alpha"}
    cfg = config(**values)
    for vram in BUDGETS:
        plan = plan_or_none(dataclasses.replace(cfg, vram=vram), model, pinned)
        if plan is None:
            continue
        for key in pinned:
            expected = cfg.lora.rank if key == "lora.rank" else cfg.lora.alpha if key == "lora.alpha" \
                else getattr(cfg, key)
            assert getattr(plan, field_of.get(key, key)) == expected, (key, vram)
        assert plan.seq_len == cfg.seq_len  # never changed, pinned or not


@dataclass(frozen=True)
class WithSavers(RunConfig):
    """The keys issue 6 adds to RunConfig (offload, loss_chunk), as the planner reads them."""
    offload: bool = False
    loss_chunk: int = 0


def test_offload_and_chunked_loss_are_used_once_built_and_respected_when_pinned(monkeypatch):
    spec, vram = builtin_spec("llama-3.1-8b"), parse_size("20G")
    cfg = WithSavers(vram=vram, seq_len=4096, micro_batch=1, grad_accum=4, method="lora")
    monkeypatch.setattr(lowmem.config, "FEATURES", (), raising=False)
    with pytest.raises(BudgetError):  # LoRA at 4096 tokens needs a saver this build lacks
        make_plan(cfg, spec, {"method"}, device="cuda")
    monkeypatch.setattr(lowmem.config, "FEATURES", ("offload", "chunked_loss"), raising=False)
    plan = make_plan(cfg, spec, {"method"}, device="cuda")
    assert plan.loss_chunk > 0 or plan.offload_activations
    pinned = make_plan(dataclasses.replace(cfg, vram=parse_size("48G")), spec,
                       {"method", "offload", "loss_chunk"}, device="cuda")
    assert (pinned.offload_activations, pinned.loss_chunk) == (False, 0)
    forced = make_plan(dataclasses.replace(cfg, vram=parse_size("48G"), offload=True, loss_chunk=512),
                       spec, {"method", "offload", "loss_chunk"}, device="cuda")
    assert (forced.offload_activations, forced.loss_chunk) == (True, 512)
    assert any(r.startswith("activation offloading on: pinned; it pins") for r in forced.reasons)


def test_faster_variants_come_first():
    """With room to spare, no recomputation and the largest micro-batch of the target."""
    plan = make_plan(config(vram=parse_size("80G"), method="lora", seq_len=512, micro_batch=4,
                            grad_accum=4), builtin_spec("llama-2-7b"), {"method"}, device="cuda")
    assert not plan.grad_checkpointing and plan.micro_batch == 16 and plan.grad_accum == 1
    assert plan.tokens_per_step == 4 * 4 * 512


def test_a_tight_budget_turns_checkpointing_on_and_says_what_it_saves():
    spec = builtin_spec("llama-3.1-8b")
    loose = make_plan(config(vram=parse_size("48G"), method="lora"), spec, {"method"}, device="cuda")
    tight = make_plan(config(vram=parse_size("22G"), method="lora"), spec, {"method"}, device="cuda")
    assert not loose.grad_checkpointing and tight.grad_checkpointing
    reason = next(r for r in tight.reasons if r.startswith("activation checkpointing on"))
    assert "without it the peak would be" in reason and "which fits" not in reason
    # With offloading pinned, checkpointing is taken for speed where the plan fits without it too.
    offloaded = make_plan(config(vram=parse_size("24G"), method="lora", offload=True), spec, {"method", "offload"},
                          device="cuda")
    reason = next(r for r in offloaded.reasons if r.startswith("activation checkpointing on"))
    assert ", which fits; with offloading on, recomputing the blocks is ranked faster" in reason


def test_rejected_candidates_say_which_term_broke_the_budget_and_by_how_much(every_method):
    plan = make_plan(config(vram=parse_size("24G")), builtin_spec("llama-3.1-8b"), device="cuda")
    assert quality(plan) > quality(dataclasses.replace(plan, method="full"))
    assert plan.rejected and plan.rejected[0].candidate == "full"
    for r in plan.rejected:
        assert r.over == r.total - plan.usable > 0
        assert r.term in MemoryBreakdown.TERMS and 0 < r.term_bytes <= r.total
        assert r.chosen_bytes == getattr(plan.breakdown, r.term) < r.term_bytes
    assert {r.candidate for r in plan.rejected} >= {"full", "galore"}
    full = next(r for r in plan.rejected if r.candidate == "full")
    assert full.term == "optimizer"  # AdamW over 8B weights vs over the adapters


def test_a_larger_safety_margin_is_honoured():
    @dataclass(frozen=True)
    class WithMargin(RunConfig):  # the key the lead adds to RunConfig; read with a default until then
        safety_margin: float = 0.3

    spec, made_a_difference = builtin_spec("llama-2-7b"), False
    for vram in BUDGETS:
        try:
            wide = make_plan(WithMargin(vram=vram, seq_len=1024), spec, device="cuda")
        except BudgetError:
            continue
        assert wide.safety_margin == 0.3 and wide.breakdown.total <= 0.7 * vram
        narrow = make_plan(config(vram=vram), spec, device="cuda")
        made_a_difference |= narrow.breakdown.total > 0.7 * vram  # the default margin used more
    assert made_a_difference


def test_nothing_fits_names_the_smallest_plan_the_gap_and_working_changes(monkeypatch):
    monkeypatch.setattr(lowmem.config, "FEATURES", (), raising=False)   # a build without the savers
    spec = builtin_spec("llama-2-7b")
    cfg = config(vram=parse_size("4G"), seq_len=4096, micro_batch=1, grad_accum=1)
    with pytest.raises(BudgetError) as err:
        make_plan(cfg, spec, device="cuda")
    message = str(err.value)
    assert isinstance(err.value, LowmemError) and "\n" not in message
    total, gap = re.search(r"needs ([\d.]+GiB), ([\d.]+[GM]iB) over", message).groups()
    assert parse_size(total) > cfg.vram * 0.95 and parse_size(gap) > 0
    # Each suggested change really fits.
    seq = int(re.search(r"seq_len=(\d+)", message).group(1))
    assert seq < cfg.seq_len and plan_or_none(dataclasses.replace(cfg, seq_len=seq), "llama-2-7b")
    vram = re.search(r"--vram ([\d.]+G) or more", message).group(1)
    assert plan_or_none(dataclasses.replace(cfg, vram=parse_size(vram)), "llama-2-7b")


def test_pins_that_make_it_impossible_are_named_with_the_unpinned_alternative(every_method):
    cfg = config(vram=parse_size("24G"), method="full")
    with pytest.raises(BudgetError, match=r"unpin method \((galore|lora)"):
        make_plan(cfg, builtin_spec("llama-3.1-8b"), {"method"}, device="cuda")


def test_without_a_budget_the_plan_is_the_config_with_its_prediction():
    cfg = RunConfig(device="cpu")
    plan = make_plan(cfg, builtin_spec(cfg.model))
    pinned = plan_from_config(cfg)
    for f in dataclasses.fields(pinned):
        if f.name not in ("model", "breakdown"):
            assert getattr(plan, f.name) == getattr(pinned, f.name), f.name
    assert plan.breakdown is not None and plan.breakdown.overhead == 0  # the CPU has no CUDA context


@pytest.mark.parametrize("method, base", [("qlora", "nf4"), ("lora", "bf16"), ("full", "bf16")])
def test_without_a_budget_a_gpu_plan_keeps_the_methods_base_format(method, base):
    """Planning for CUDA from a CPU machine: a QLoRA plan's base is still NF4, not the dense default."""
    cfg = config(method=method)
    plan = make_plan(cfg, builtin_spec("llama-3.1-8b"), device="cuda")
    assert (plan.device, plan.base_format, plan.compute_dtype) == ("cuda", base, "bfloat16")
    loram = make_plan(config(method="loram", loram=lowmem.config.LoramConfig(quantize=True)),
                      builtin_spec("llama-3.1-8b"), device="cuda")
    assert loram.base_format == "nf4"


def test_cpu_budget_plans_fp32_on_the_cpu():
    plan = make_plan(RunConfig(device="cpu", vram=parse_size("4G")), builtin_spec("smollm2-135m"))
    assert plan.device == "cpu" and plan.base_format == "fp32" and plan.compute_dtype == "float32"
    assert plan.method == "full"  # 135M fully trained in fp32 needs ~2 GiB


def test_plan_survives_the_plan_yaml_round_trip(every_method):
    plan = make_plan(config(vram=parse_size("24G")), builtin_spec("llama-3.1-70b"), device="cuda")
    back = Plan.from_dict(yaml.safe_load(yaml.safe_dump(plan.to_dict())))
    assert back == plan and back.breakdown.total == plan.breakdown.total


def test_llama_70b_at_24g_is_qloram_with_a_paper_class_peak(every_method):
    """The LoRAM paper trains LLaMA-3.1-70B in ~20 GB by pruning and 4-bit quantization."""
    plan = make_plan(config(vram=parse_size("24G"), seq_len=512, micro_batch=1, grad_accum=16),
                     builtin_spec("llama-3.1-70b"), device="cuda")
    assert plan.method == "loram" and plan.base_format == "nf4"
    assert plan.breakdown.total <= parse_size("22.8G") and 0.5 <= plan.prune_ratio <= 0.9
    assert any("pruned" in r for r in plan.reasons)


# ---------------------------------------------------------------- the command

def run_plan(argv: list[str], capsys) -> tuple[int, str]:
    parser = argparse.ArgumentParser()
    plan_command.register(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    code = args.func(args)
    return code, capsys.readouterr().out


def test_plan_command_prints_plan_table_budget_and_rejections(every_method, capsys):
    code, out = run_plan(["--model", "llama-3.1-70b", "--vram", "24G"], capsys)
    assert code == 0
    for text in ("plan      loram", "predicted peak", "weights", "activations", "total",
                 "budget", "usable", "rejected", "full: needs"):
        assert text in out


def test_plan_command_json_is_machine_readable(every_method, capsys):
    code, out = run_plan(["--model", "llama-3.1-8b", "--vram", "24G", "--json", "seq_len=2048"], capsys)
    data = json.loads(out)
    assert code == 0 and data["plan"]["seq_len"] == 2048
    assert data["plan"]["breakdown"]["total"] == data["budget"]["total"] <= data["budget"]["usable"]
    assert data["model"]["params"] == builtin_spec("llama-3.1-8b").params


def test_plan_command_treats_flags_and_overrides_as_pins(every_method, capsys):
    code, out = run_plan(["--model", "llama-3.1-8b", "--vram", "48G", "--json", "--method", "lora",
                          "--no-grad-checkpointing", "micro_batch=1", "seq_len=256"], capsys)
    plan = json.loads(out)["plan"]
    assert (plan["method"], plan["grad_checkpointing"], plan["micro_batch"]) == ("lora", False, 1)
    code, out = run_plan(["--model", "llama-3.1-8b", "--vram", "48G", "--json", "seq_len=256"], capsys)
    assert json.loads(out)["plan"]["method"] != "lora"  # unpinned, a better method fits


def test_plan_command_reports_an_impossible_budget_as_an_error(capsys):
    with pytest.raises(BudgetError, match="nothing fits"):
        run_plan(["--model", "llama-3.1-70b", "--vram", "6G"], capsys)
    code, out = run_plan(["--model", "llama-3.1-70b", "--vram", "6G", "--json"], capsys)
    assert code == 2 and "nothing fits" in json.loads(out)["error"]
    assert json.loads(out)["kind"] == "BudgetError" and json.loads(out)["model"]["name"] == "llama-3.1-70b"
    code, out = run_plan(["--model", "gpt2", "--json"], capsys)       # any error, as JSON
    assert code == 2 and json.loads(out)["kind"] == "ModelError" and "gpt2" in json.loads(out)["error"]
    code, out = run_plan(["--json", "lora.rnak=4"], capsys)
    assert code == 2 and json.loads(out)["error"].endswith("(did you mean 'lora.rank'?)")
    code, out = run_plan(["--json", "--measure", "--measure-steps", "0", "device=cpu"], capsys)
    assert code == 2 and json.loads(out)["error"] == "--measure-steps: expected at least 1, got 0"


# The budget presets (a model family x a card's memory) and the method each says it plans.
BUDGET_PRESETS = {"qwen-7b-8g": ("qlora", "QLoRA"), "llama-8b-12g": ("qlora", "QLoRA"),
                  "llama-8b-24g": ("lora", "LoRA on the bf16 base"), "llama-70b-24g": ("loram", "LoRAM"),
                  "llama-70b-48g": ("qlora", "QLoRA")}


@pytest.mark.parametrize("name", sorted(BUDGET_PRESETS))
def test_a_budget_preset_plans_what_its_summary_says_within_its_card(name, capsys):
    from lowmem.config import find_preset, preset_summary

    method, words = BUDGET_PRESETS[name]
    summary = preset_summary(find_preset(name))
    code, out = run_plan(["--preset", name, "--json"], capsys)
    plan, budget = json.loads(out)["plan"], json.loads(out)["budget"]
    assert code == 0 and plan["method"] == method and f"plans {words} " in summary
    assert f" on a{'n' if name.endswith('-8g') else ''} {budget['vram'] // 2**30} GB GPU" in summary
    assert budget["total"] <= budget["usable"] and f"seq_len {plan['seq_len']}" in summary
    assert f"--preset {name} " in find_preset(name).read_text()      # its own command, copied right


def test_plan_help_leaves_out_the_keys_only_training_uses_and_still_takes_them(capsys):
    from lowmem.cli import main
    from lowmem.commands import flag_name
    from lowmem.config import all_keys

    assert set(plan_command.TRAINING_ONLY) <= set(all_keys())
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    plan_help = capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    for key in plan_command.TRAINING_ONLY:
        assert flag_name(key) + " " not in plan_help and flag_name(key) + " " in train_help
    assert "--seq-len V" in plan_help and "`lowmem train --help` lists them" in " ".join(plan_help.split())
    code, out = run_plan(["--model", "llama-3.1-8b", "--vram", "24G", "--steps", "5", "--data", "x.jsonl",
                          "lr=1e-4", "--json"], capsys)
    assert code == 0 and json.loads(out)["plan"]["method"] == "lora"


def test_plan_command_lists_builtin_models(capsys):
    code, out = run_plan(["--list-models"], capsys)
    assert code == 0 and "llama-3.1-70b" in out and "70,553,706,496" in out


# ---------------------------------------------------------------- a measured CUDA context

def test_a_context_measured_on_this_gpu_replaces_the_assumed_constant(monkeypatch, tmp_path, capsys, request):
    """A run on CUDA records the context it measured (lowmem.memstats.gpu_facts); later plans use it."""
    from lowmem import memory, planner
    from lowmem.kernels import device

    h100 = device.DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    monkeypatch.setattr(device, "device_info", lambda index=0: h100)
    planner.measured_context.cache_clear()
    request.addfinalizer(planner.measured_context.cache_clear)   # later tests read this machine again
    cfg = config(vram=parse_size("24G"))
    spec = builtin_spec("llama-3.1-8b")
    assumed = make_plan(cfg, spec, device="cuda")
    assert assumed.context_bytes is None
    _, out = run_plan(["--model", "llama-3.1-8b", "--vram", "24G"], capsys)
    assert "CUDA context 512.00MiB assumed" in out

    device.record_context_bytes(h100, 300 * 2**20)
    planner.measured_context.cache_clear()
    measured = make_plan(cfg, spec, device="cuda")
    assert measured.context_bytes == 300 * 2**20
    b0, b1 = assumed.breakdown, measured.breakdown
    allocated = b1.total - b1.overhead
    assert b1.overhead == 300 * 2**20 + int(memory.ALLOCATOR_FRAGMENTATION * allocated)
    assert b0.overhead == memory.CUDA_CONTEXT_BYTES + int(memory.ALLOCATOR_FRAGMENTATION
                                                          * (b0.total - b0.overhead))
    _, out = run_plan(["--model", "llama-3.1-8b", "--vram", "24G"], capsys)
    assert "CUDA context 300.00MiB, measured by a run on this machine's GPU" in out
    # A CPU plan has no context at all, measured or not.
    assert make_plan(RunConfig(device="cpu"), builtin_spec("smollm2-135m")).breakdown.overhead == 0


def test_cpu_runs_report_no_gpu_facts():
    from lowmem import memstats

    assert memstats.gpu_facts("cpu") == {}
    assert "outside" not in memstats.measure("cpu")


def test_plan_says_whether_it_counts_the_kernels_and_the_loss_term_follows(monkeypatch, capsys):
    """`lowmem plan` on CUDA says 'kernels on' or 'kernels off'; with them off, the whole loss's
    term is the reference's 12·N·V again and the chosen plan never predicts less."""
    _, on = run_plan(["--model", "llama-3.1-8b", "--vram", "16G", "--seq-len", "4096", "--json"], capsys)
    _, on_text = run_plan(["--model", "llama-3.1-8b", "--vram", "16G", "--seq-len", "4096"], capsys)
    monkeypatch.setenv("LOWMEM_KERNELS", "0")
    _, off = run_plan(["--model", "llama-3.1-8b", "--vram", "16G", "--seq-len", "4096", "--json"], capsys)
    _, off_text = run_plan(["--model", "llama-3.1-8b", "--vram", "16G", "--seq-len", "4096"], capsys)
    assert "; kernels on" in on_text and "; kernels off, references' memory counted (LOWMEM_KERNELS=0)" in off_text
    on, off = json.loads(on), json.loads(off)
    per_micro_batch = lambda p: p["plan"]["breakdown"]["total"] / p["plan"]["micro_batch"]
    assert per_micro_batch(on) < per_micro_batch(off)


def test_a_cuda_run_reports_whether_its_kernels_run(monkeypatch, tmp_path):
    """The `start` event's `kernels`: "on", or the reason the references run instead."""
    from lowmem import memstats
    from lowmem.kernels import device, runtime

    h100 = device.DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(device, "device_info", lambda index=0: h100)
    monkeypatch.setattr(device, "context_bytes", lambda index=0: 400 * 2**20)
    monkeypatch.setattr(runtime, "unavailable_reason", lambda index: None)
    facts = memstats.gpu_facts("cuda")
    assert facts["kernels"] == "on" and facts["context_bytes"] == 400 * 2**20
    monkeypatch.setattr(runtime, "unavailable_reason", lambda index: "no usable NVIDIA driver (x)")
    assert memstats.gpu_facts("cuda")["kernels"] == "no usable NVIDIA driver (x)"
    monkeypatch.setenv("LOWMEM_KERNELS", "0")
    assert memstats.gpu_facts("cuda")["kernels"] == "LOWMEM_KERNELS=0"
    monkeypatch.setattr(device, "device_info", lambda index=0: (_ for _ in ()).throw(RuntimeError("probe")))
    with pytest.warns(UserWarning, match="GPU probe failed"):
        assert memstats.gpu_facts("cuda") == {"kernels": "LOWMEM_KERNELS=0"}


def test_a_loram_plan_says_where_its_dense_model_is_pruned_and_what_that_needs(monkeypatch, capsys):
    monkeypatch.setattr("lowmem.planner.available_ram", lambda: 64 * 2**30)
    _, out = run_plan(["--model", "llama-3.1-70b", "--vram", "24G"], capsys)        # criterion auto
    line = next(l for l in out.splitlines() if l.strip().startswith("prepare"))
    assert ("loram.criterion=auto chose taylor; taylor scores computed one dense block at a time on the GPU "
            "(10.79GiB of the GPU, within the budget, and 5.66GiB of host RAM), then pruned while the weights load, "
            "one dense "
            "block at a time (3.62GiB beside the pruned model)") in line
    _, out = run_plan(["--model", "llama-3.1-70b", "--vram", "24G", "loram.criterion=taylor",
                       "loram.align_steps=10"], capsys)
    line = next(l for l in out.splitlines() if l.strip().startswith("prepare"))
    assert "taylor scoring and alignment need" in line and "this machine's available RAM (64.00GiB); lowmem train will refuse" in line
    assert "(without loram.align_steps, taylor scores one dense block at a time and prunes while loading)" in line
    monkeypatch.setattr("lowmem.planner.available_ram", lambda: 2**30)
    _, out = run_plan(["--model", "llama-3.1-70b", "--vram", "12G", "--method", "loram", "loram.criterion=taylor",
                       "loram.ratio=0.9"], capsys)
    line = next(l for l in out.splitlines() if l.strip().startswith("prepare"))
    assert "taylor scores computed one dense block at a time need" in line and "lowmem train will refuse " \
        "(loram.criterion=magnitude needs no scoring: it prunes while loading, one dense block" in line
    monkeypatch.setattr("lowmem.planner.available_ram", lambda: 64 * 2**30)
    _, out = run_plan(["--model", "llama-3.2-1b", "--vram", "2G", "--method", "loram", "loram.criterion=magnitude",
                       "loram.align_steps=5"], capsys)
    line = next(l for l in out.splitlines() if l.strip().startswith("prepare"))
    assert "magnitude scoring and alignment need" in line and "pruned on the host (64.00GiB RAM available here)" in line
    _, out = run_plan(["--model", "llama-3.1-70b", "--vram", "24G", "loram.criterion=magnitude"], capsys)
    line = next(l for l in out.splitlines() if l.strip().startswith("prepare"))
    assert "pruned by magnitude while the weights load, one dense block at a time (3.62GiB" in line


def test_a_cpu_loram_plan_says_how_it_prepares_and_when_the_ram_is_short(monkeypatch, capsys):
    monkeypatch.setattr("lowmem.planner.available_ram", lambda: 16 * 2**30)

    def prepare_line(*argv):
        _, out = run_plan(["--method", "loram", "--device", "cpu", *argv], capsys)
        return next(l for l in out.splitlines() if l.strip().startswith("prepare"))

    line = prepare_line("--model", "smollm2-135m")
    assert "taylor scores computed one dense block at a time on the host" in line and "GPU" not in line
    line = prepare_line("--model", "smollm2-135m", "loram.align_steps=5")
    assert line.endswith("pruned on the host (16.00GiB RAM available here)")
    line = prepare_line("--model", "llama-3.1-8b", "loram.align_steps=5")
    assert "more than this machine's available RAM (16.00GiB); lowmem train will refuse" in line
    assert "GPU" not in line


def test_plan_json_carries_the_loram_preparation(monkeypatch, capsys):
    monkeypatch.setattr("lowmem.planner.available_ram", lambda: 64 * 2**30)
    _, out = run_plan(["--model", "llama-3.1-70b", "--vram", "24G", "--json"], capsys)
    prepare = json.loads(out)["loram_prepare"]
    assert (prepare["criterion"], prepare["chosen"]) == ("taylor", "auto: its block-by-block scoring fits")
    assert prepare["streamed"] and prepare["where"] == "cuda" and prepare["host_available"] == 64 * 2**30
    assert 0 < prepare["host_bytes"] < prepare["bytes"] < 22 * 2**30
    _, out = run_plan(["--model", "llama-3.1-70b", "--vram", "24G", "--json", "loram.criterion=taylor",
                       "loram.align_steps=10"], capsys)
    prepare = json.loads(out)["loram_prepare"]
    assert (prepare["chosen"], prepare["streamed"], prepare["where"], prepare["host_bytes"]) == ("set", False, None, 0)
    assert prepare["bytes"] > 500 * 2**30
    _, out = run_plan(["--model", "llama-3.1-8b", "--vram", "24G", "--json"], capsys)
    assert "loram_prepare" not in json.loads(out)                       # a LoRA plan


# ---------------------------------------------------------------- host RAM

def long_qlora(**kw) -> RunConfig:
    """Llama-3.1-8B at 8,192 tokens on a 12 GB card: QLoRA fits only with a saver."""
    kw.setdefault("method", "qlora")
    kw.setdefault("vram", parse_size("12G"))
    return config(seq_len=8192, micro_batch=1, grad_accum=8, **kw)


def test_offloading_never_pins_more_than_the_hosts_ram(every_method):
    spec = builtin_spec("llama-3.1-8b")
    pins = {"grad_checkpointing"}
    roomy = make_plan(long_qlora(host_ram=parse_size("128G"), grad_checkpointing=False), spec, pins, device="cuda")
    tight = make_plan(long_qlora(host_ram=parse_size("32G"), grad_checkpointing=False), spec, pins, device="cuda")
    for plan, host in ((roomy, "128G"), (tight, "32G")):
        assert plan.host_ram == parse_size(host) and plan.breakdown.host <= plan.host_usable
    # without checkpointing, offloading moves every saved tensor: QLoRA pins more than 32G,
    # so with 32G the base is pruned until what it pins fits
    assert roomy.method == "qlora" and roomy.offload_activations and roomy.breakdown.host > parse_size("32G")
    assert tight.method == "loram" and tight.offload_activations
    assert any("pins" in r and "set by host_ram" in r for r in tight.reasons)
    assert next(r for r in tight.rejected if r.candidate == "qlora").term == "host"


def test_offloading_comes_with_checkpointing_before_it_comes_alone(every_method):
    plan = make_plan(long_qlora(host_ram=parse_size("128G")), builtin_spec("llama-3.1-8b"), {"method"},
                     device="cuda")
    assert plan.offload_activations and plan.grad_checkpointing
    alone = predict_with(plan, grad_checkpointing=False, loss_chunk=256, spec="llama-3.1-8b")
    assert alone.total <= plan.usable and alone.host <= plan.host_usable   # it fits, and is slower


def test_offloaded_loram_blocks_never_count_below_nothing(every_method):
    """LoRAM's pruned middle blocks save less than its whole first and last ones: the device
    keeps the widest two, and no more is taken off than the blocks saved."""
    from lowmem.memory import activation_bytes, model_spec_for_plan, saved_layer_bytes

    spec = builtin_spec("llama-3.1-70b")
    plan = make_plan(config(vram=parse_size("24G")), spec, device="cuda")
    for ckpt in (False, True):
        p = dataclasses.replace(plan, method="loram", prune_ratio=0.9, offload_activations=True,
                                grad_checkpointing=ckpt, micro_batch=1, seq_len=2048)
        pruned = model_spec_for_plan(spec, p)
        assert pruned.params < spec.params / 5
        device, moved = activation_bytes(pruned, p)
        assert 0 < moved < saved_layer_bytes(pruned, p) and device > 0


def test_a_pinned_accumulation_keeps_the_tokens_per_step(every_method):
    plan = make_plan(config(vram=parse_size("80G"), seq_len=192, micro_batch=8, grad_accum=4),
                     builtin_spec("llama-3.2-1b"), {"grad_accum"}, device="cuda")
    assert plan.grad_accum == 4 and plan.tokens_per_step == 8 * 4 * 192


@pytest.mark.parametrize("sequences", [6, 7, 12])
def test_every_budget_keeps_the_tokens_per_step_when_they_are_not_a_power_of_two(sequences):
    """The micro-batch divides the sequences per step, so a budget that refuses the whole batch
    never rounds a step of 7 sequences up to 4 x 2."""
    target = sequences * 1024
    seen = set()
    for vram in ("80G", "40G", "30G", "26G", "24G", "22G", "20G", "18G"):
        plan = plan_or_none(config(vram=parse_size(vram), method="lora", micro_batch=sequences,
                                   grad_accum=1), "llama-2-7b", {"method"})
        if plan is not None:
            assert plan.tokens_per_step == target, (vram, plan.micro_batch, plan.grad_accum)
            seen.add(plan.micro_batch)
    assert len(seen) >= 2  # the budgets did make the planner split the batch
    plan = make_plan(config(vram=parse_size("80G"), seq_len=1000, micro_batch=1, grad_accum=1,
                            target_tokens_per_step=5100), builtin_spec("llama-3.2-1b"), (), device="cuda")
    assert plan.tokens_per_step == 5000  # the nearest whole number of sequences


def test_a_prime_number_of_sequences_runs_as_a_few_large_micro_batches_not_one_at_a_time():
    """127 and 13 have no divisor but 1 and themselves: a power of two that overshoots by at most an
    eighth (8 x 16 = 128, 2 x 7 = 14) splits the step; none that overshoots more (4 x 4 = 16 for 13)."""
    spec = builtin_spec("llama-2-7b")
    for sequences, expected in ((127, (8, 16)), (13, (2, 7))):
        plan = make_plan(config(vram=parse_size("30G"), method="lora", seq_len=256, micro_batch=sequences,
                                grad_accum=1), spec, {"method"}, device="cuda")
        assert (plan.micro_batch, plan.grad_accum) == expected, (sequences, plan.micro_batch, plan.grad_accum)


def test_the_reasons_say_which_choices_were_pinned(every_method):
    spec = builtin_spec("llama-3.1-8b")
    qlora = make_plan(config(vram=parse_size("24G"), method="qlora"), spec, {"method"}, device="cuda")
    assert qlora.reasons[0].startswith("qlora: the method you pinned, and it fits")
    cfg = config(vram=parse_size("24G"), method="loram",
                 loram=dataclasses.replace(RunConfig().loram, ratio=0.5))
    loram = make_plan(cfg, spec, {"method", "loram.ratio"}, device="cuda")
    assert any(r.startswith("the base is pruned by 50% (loram.ratio, pinned)") for r in loram.reasons)
    free = make_plan(config(vram=parse_size("6G")), spec, device="cuda")
    assert free.method == "loram" and any(r.startswith("nothing unpruned fits") for r in free.reasons)
    # A pin that does nothing where the plan runs is said to.
    cpu = make_plan(config(vram=parse_size("24G"), offload=True), spec, {"offload"}, device="cpu")
    assert "warning: offload: set, but on the CPU the activations are in host memory already: it saves nothing" \
        in cpu.reasons
    gpu = make_plan(config(vram=parse_size("24G"), offload=True), spec, {"offload"}, device="cuda")
    assert not any(r.startswith("warning: offload: set, but") for r in gpu.reasons)


def test_a_better_method_refused_for_the_host_is_listed_as_such(every_method):
    cfg = long_qlora(host_ram=parse_size("32G"), offload=True, grad_checkpointing=False)
    plan = make_plan(cfg, builtin_spec("llama-3.1-8b"), {"offload", "grad_checkpointing"}, device="cuda")
    assert plan.method == "loram" and plan.breakdown.host <= plan.host_usable
    qlora = next(r for r in plan.rejected if r.candidate == "qlora")
    assert qlora.term == "host" and qlora.over == qlora.total - plan.host_usable > 0
    assert "pinned host RAM" in qlora.describe()


def test_when_only_the_host_is_short_the_error_says_what_to_change(every_method):
    cfg = long_qlora(host_ram=parse_size("32G"), offload=True, grad_checkpointing=False)
    with pytest.raises(BudgetError) as err:
        make_plan(cfg, builtin_spec("llama-3.1-8b"), {"method", "offload", "grad_checkpointing"}, device="cuda")
    message = str(err.value)
    assert "within the host's RAM" in message and "over the 30.40GiB usable (32.00GiB set by host_ram" in message
    assert "unpin grad_checkpointing (qlora with grad_checkpointing=on fits" in message
    assert re.search(r"a host with \d+(\.\d)?G of RAM free", message)
    assert "--vram" not in message   # more device memory would not help


def test_on_the_cpu_offloading_saves_nothing_and_is_never_chosen():
    spec = builtin_spec("smollm2-135m")
    cfg = config(vram=parse_size("1500M"), seq_len=4096, micro_batch=1, grad_accum=8, device="cpu")
    plan = make_plan(cfg, spec, device="cpu")
    assert not plan.offload_activations
    on = predict_with(plan, offload_activations=True)
    off = predict_with(plan, offload_activations=False)
    assert on.total == off.total and on.host == 0
    assert predict_with(plan, offload_activations=True, device="cuda").host > 0


def predict_with(plan: Plan, spec: str = "smollm2-135m", **changes) -> MemoryBreakdown:
    from lowmem.memory import predict

    return predict(builtin_spec(spec), dataclasses.replace(plan, **changes))


def test_a_method_over_on_both_the_device_and_the_host_is_still_listed(every_method):
    """Offloading pinned on: QLoRA needs more device memory than 9G and pins more than the host
    has; it is rejected for the device, not left out of the table."""
    cfg = long_qlora(vram=parse_size("9G"), host_ram=parse_size("32G"), offload=True, grad_checkpointing=False)
    plan = make_plan(cfg, builtin_spec("llama-3.1-8b"), {"offload", "grad_checkpointing"}, device="cuda")
    listed = {r.candidate: r for r in plan.rejected}
    assert {"full", "galore", "lora", "qlora"} <= set(listed)
    assert listed["qlora"].term != "host" and listed["qlora"].over > 0


def test_when_device_and_host_are_both_short_the_fix_names_both(every_method):
    cfg = long_qlora(vram=parse_size("9G"), host_ram=parse_size("32G"), offload=True, grad_checkpointing=False)
    with pytest.raises(BudgetError) as err:
        make_plan(cfg, builtin_spec("llama-3.1-8b"), {"method", "offload", "grad_checkpointing"}, device="cuda")
    message = str(err.value)
    assert "and it pins 49.18GiB of host RAM" in message
    vram, host = re.search(r"--vram (\d+(?:\.\d)?)G or more on a host with (\d+(?:\.\d)?)G of RAM free",
                           message).groups()
    # the suggestion fits: that card on that host
    fitted = make_plan(dataclasses.replace(cfg, vram=parse_size(f"{vram}G"), host_ram=parse_size(f"{host}G")),
                       builtin_spec("llama-3.1-8b"), {"method", "offload", "grad_checkpointing"}, device="cuda")
    assert fitted.method == "qlora"


def test_a_galore_rank_as_large_as_the_model_is_refused(every_method):
    """Projected to the hidden size, GaLore keeps every direction: the run would save nothing."""
    spec = builtin_spec("llama-3.2-1b")
    with pytest.raises(ConfigError, match=rf"galore.rank=5000 is not below .* hidden size {spec.hidden}.*"
                                          rf"0 = hidden/4 = {spec.hidden // 4}"):
        make_plan(config(method="galore", galore=GaloreConfig(rank=5000)), spec, {"method"}, device="cuda")
    plan = make_plan(config(method="galore", galore=GaloreConfig(rank=64)), spec, {"method"}, device="cuda")
    assert plan.galore_rank == 64


def test_packing_is_planned_with_the_memory_its_attention_mask_takes(capsys):
    """Packed batches attend through a block-diagonal mask: a budget that fits the padded
    plan with a large micro-batch gives the packed one a smaller micro-batch (or checkpointing)."""
    spec = builtin_spec("llama-3.1-8b")
    for cfg in (config(vram=parse_size("44G"), method="lora", seq_len=4096),
                config(vram=None, method="lora", seq_len=4096, device="cpu")):
        padded = make_plan(cfg, spec, {"method"}, device="cuda")
        packed = make_plan(cfg.replace(packing=True), spec, {"method"}, device="cuda")
        assert packed.masked_attention and not padded.masked_attention
        assert Plan.from_dict(packed.to_dict()).masked_attention
        if cfg.vram is None:   # the same knobs, the mask on top
            assert packed.breakdown.activations > padded.breakdown.activations
        else:
            assert packed.tokens_per_step == padded.tokens_per_step
            assert (packed.micro_batch, packed.grad_checkpointing) != (padded.micro_batch, padded.grad_checkpointing)
            assert packed.breakdown.total <= packed.usable
    code, out = run_plan(["--model", "llama-3.1-8b", "--vram", "44G", "packing=true"], capsys)
    assert code == 0 and "packed (a block-diagonal attention mask per layer)" in out


def test_a_full_plan_without_a_budget_counts_the_bf16_moments_the_run_keeps():
    """On CUDA a full run's AdamW moments are bf16, as its weights: the plan without --vram said
    32-bit and predicted 60 GiB of states for an 8B model instead of 30."""
    from lowmem import memory

    spec = builtin_spec("llama-3.1-8b")
    config = RunConfig(model="llama-3.1-8b", method="full", seq_len=2048, micro_batch=1, grad_checkpointing=True)
    unbudgeted = make_plan(config, spec, {"method"}, device="cuda")
    budgeted = make_plan(config.replace(vram=200 * 2**30), spec,
                         {"method", "seq_len", "micro_batch", "grad_checkpointing"}, device="cuda")
    assert unbudgeted.optimizer_state_bits == budgeted.optimizer_state_bits == 16
    states = memory.optimizer_bytes(spec, unbudgeted)
    assert states == memory.optimizer_bytes(spec, budgeted) and abs(states - 2 * 2 * spec.params) < 2**20
    assert make_plan(config, spec, {"method"}, device="cpu").optimizer_state_bits == 32
    assert make_plan(config.replace(method="lora"), spec, {"method"}, device="cuda").optimizer_state_bits == 32


def test_a_setting_of_a_method_the_plan_does_not_use_is_named_in_why():
    spec = builtin_spec("llama-3.1-8b")
    config = RunConfig(model="llama-3.1-8b", seq_len=2048, vram=parse_size("24G"), device="cuda",
                       loram=lowmem.config.LoramConfig(ratio=0.3))
    plan = make_plan(config, spec, {"loram.ratio", "l4q.bits", "lora.rank"}, device="cuda")
    assert plan.method == "lora"
    assert plan.reasons[-1] == ("warning: l4q.bits, loram.ratio: set, but a lora run does not use them "
                                "(method=l4q or method=loram would)")
    full = make_plan(config.replace(vram=None, method="full"), spec, {"method", "lora.rank"}, device="cuda")
    assert full.reasons[-1] == "warning: lora.rank: set, but a full run does not use it (method=l4q or method=lora or " \
                               "method=loram or method=qlora would)"
    assert not any("set, but" in r for r in make_plan(config, spec, {"lora.rank"}, device="cuda").reasons)
    galore = make_plan(config.replace(vram=None, method="galore"), spec, {"method", "lora.rank"}, device="cuda")
    assert galore.reasons[-1].endswith("; did you mean galore.rank?")
    # A preset's keys for other methods are the preset's business: only the keys typed are warned of.
    assert not any("set, but" in r for r in make_plan(config.replace(vram=None, method="galore"), spec,
                                                      {"method", "lora.rank"}, device="cuda",
                                                      typed={"method"}).reasons)


def test_a_seq_len_past_the_models_context_is_warned_about():
    spec = builtin_spec("llama-7b")                      # 2048 positions
    config = RunConfig(model="llama-7b", seq_len=4096, vram=parse_size("80G"))
    warning = ("warning: seq_len 4096 is past llama-7b's context of 2048 tokens (max_position_embeddings): "
               "it never learned positions beyond it")
    assert make_plan(config, spec, {"seq_len"}, device="cuda").reasons[-1] == warning
    assert make_plan(config.replace(vram=None), spec, {"seq_len"}, device="cuda").reasons[-1] == warning
    assert not any("context" in r for r in make_plan(config.replace(seq_len=2048), spec, {"seq_len"},
                                                      device="cuda").reasons)


def test_loram_that_would_prune_nothing_is_refused_and_per_block_ratios_count_at_ratio_0():
    from lowmem import memory

    spec = builtin_spec("smollm2-135m")                  # 30 blocks
    config = RunConfig(method="loram", device="cpu", loram=lowmem.config.LoramConfig(keep_first=15, keep_last=15))
    with pytest.raises(ConfigError, match=r"loram.keep_first=15 and loram.keep_last=15 keep all 30 blocks of "
                                          r"smollm2-135m whole, so LoRAM would prune nothing"):
        make_plan(config, spec, {"method"})
    with pytest.raises(ConfigError, match=r"loram.ratio=0 prunes nothing, so LoRAM would train LoRA on the whole "
                                          r"model: method=lora does that"):
        make_plan(RunConfig(method="loram", device="cpu", loram=lowmem.config.LoramConfig(ratio=0.0)), spec,
                  {"method", "loram.ratio"})
    assert make_plan(RunConfig(method="loram", device="cpu", loram=lowmem.config.LoramConfig(
        ratio=0.0, layer_ratios=(0.9, 0.9))), spec, {"method", "loram.ratio"}).prune_layer_ratios == (0.9, 0.9)
    per_block = plan_from_config(RunConfig(method="loram", device="cpu",
                                           loram=lowmem.config.LoramConfig(ratio=0.0, layer_ratios=(0.9, 0.9))))
    assert per_block.label == "loram 0% (per block) fp32"
    trained = memory.model_spec_for_plan(spec, per_block)      # the shapes the trainer prunes to
    assert trained.params == spec.pruned(0.0, 1, 1, (0.9, 0.9)).params < spec.params
    assert memory.predict(spec, per_block).weights < memory.predict(spec, dataclasses.replace(
        per_block, prune_layer_ratios=())).weights


def test_where_accumulating_costs_memory_a_smaller_step_is_suggested_and_the_cost_explained(every_method):
    """GaLore's per-layer updates accumulate projected gradients: the search keeps the tokens
    per step by accumulating, which is larger, so the suggestion of fewer sequences per step
    comes from the failure message; a plan that accumulates says what it keeps."""
    spec = builtin_spec("llama-3.1-8b")
    cfg = RunConfig(vram=parse_size("27.4G"), method="galore")
    with pytest.raises(BudgetError) as refused:
        make_plan(cfg, spec, {"method"}, device="cuda")
    mb, accum, tokens = map(int, re.search(r"micro_batch=(\d+) grad_accum=(\d+) \(galore, [\d.]+GiB; (\d+) tokens "
                                          r"per step, not \d+\)", str(refused.value)).groups())
    fitted = make_plan(cfg.replace(micro_batch=mb, grad_accum=accum), spec,
                       {"method", "micro_batch", "grad_accum"}, device="cuda")
    assert fitted.tokens_per_step == tokens < cfg.micro_batch * cfg.grad_accum * cfg.seq_len
    accumulating = make_plan(cfg.replace(vram=parse_size("40G"), micro_batch=1, grad_accum=8), spec,
                             {"method", "micro_batch", "grad_accum"}, device="cuda")
    kept = [r for r in accumulating.reasons if r.startswith("grad_accum 8: between micro-batches GaLore keeps")]
    alone = gradient_bytes(spec, dataclasses.replace(accumulating, grad_accum=1))
    assert alone * 4 < accumulating.breakdown.grads
    assert len(kept) == 1 and kept[0].endswith(f"{format_size(accumulating.breakdown.grads)} of gradients, where "
                                               f"grad_accum 1 holds one weight's at a time, at most {format_size(alone)}")
    assert not [r for r in fitted.reasons if "between micro-batches" in r]


def test_a_refusal_at_a_length_past_the_models_context_says_so_too():
    spec = builtin_spec("smollm2-135m")
    past = RunConfig(vram=parse_size("1G"), seq_len=spec.max_position + 808)
    with pytest.raises(BudgetError, match=rf"\. And seq_len {past.seq_len} is past .* context of "
                                          rf"{spec.max_position} tokens"):
        make_plan(past, spec, device="cuda")
    with pytest.raises(BudgetError) as within:
        make_plan(past.replace(seq_len=spec.max_position, vram=parse_size("600M")), spec, device="cuda")
    assert "is past" not in str(within.value)


def test_the_ram_available_is_read_once_a_minute(monkeypatch):
    """One plan, one figure: its host budget and its LoRAM preparation cite the same reading."""
    import psutil

    import lowmem.planner as planner

    monkeypatch.undo()                    # the real reading, not the suite's 64 GiB
    readings = iter([5 * 2**30, 7 * 2**30])
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("VM", (), {"available": next(readings)})())
    monkeypatch.setattr(planner, "_AVAILABLE", [])
    clock = [100.0]
    monkeypatch.setattr(planner, "_clock", lambda: clock[0])
    assert planner.available_ram() == 5 * 2**30
    clock[0] += 59
    assert planner.available_ram() == 5 * 2**30
    clock[0] += 2
    assert planner.available_ram() == 7 * 2**30


def test_a_refusal_that_more_host_ram_would_shrink_says_how_much(every_method):
    """The smallest plan the host can hold does not offload; with more RAM free, offloading needs
    less of the card: the message gives both, and the second fits as said."""
    spec = builtin_spec("llama-3.1-8b")
    cfg = RunConfig(vram=parse_size("1G"), host_ram=parse_size("1G"), seq_len=8192)
    with pytest.raises(BudgetError) as refused:
        make_plan(cfg, spec, device="cuda")
    vram, host = re.search(r"--vram ([\d.]+)G or more on a host with ([\d.]+)G of RAM free for offloaded "
                           r"activations \(", str(refused.value)).groups()
    plain = float(re.search(r"Changes that fit: .*?--vram ([\d.]+)G or more;", str(refused.value)).group(1))
    assert float(vram) < plain
    fitted = make_plan(cfg.replace(vram=parse_size(f"{vram}G"), host_ram=parse_size(f"{host}G")), spec, device="cuda")
    assert fitted.offload_activations


def test_a_choice_a_preset_pinned_says_so():
    spec = builtin_spec("smollm2-135m")
    cfg = RunConfig(vram=parse_size("4G"), method="lora", micro_batch=2, grad_accum=1)
    by_preset = make_plan(cfg, spec, {"method", "micro_batch"}, device="cuda", typed=set())
    assert "micro_batch 2: pinned by the preset" in by_preset.reasons
    assert by_preset.reasons[0].startswith("lora: the method the preset pinned, and it fits")
    typed = make_plan(cfg, spec, {"method", "micro_batch"}, device="cuda", typed={"method", "micro_batch"})
    assert "micro_batch 2: pinned" in typed.reasons and typed.reasons[0].startswith("lora: the method you pinned")
