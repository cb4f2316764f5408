"""`lowmem plan`: the plan that fits a memory budget, with its predicted memory.

    lowmem plan --model llama-3.1-70b --vram 24G
    lowmem plan --model ./my-model --vram 12G --method qlora seq_len=4096
    lowmem plan --model llama-3.1-8b --vram 24G --json
    lowmem plan --model llama-3.1-8b --vram 24G --measure    # and run it on random weights here

No weights are read: the model's shapes come from a built-in entry, a
config.json or GGUF metadata. Every config key can be pinned as a flag, in a
preset or as key=value; the planner fills in the rest. With --measure the plan
runs a few training steps on this machine, on random weights of those shapes
(lowmem.measure), and the measured peak is printed beside the prediction.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from typing import Any

from lowmem.commands import add_config_flags, config_from_args
from lowmem.config import format_size, parse_overrides, read_yaml_layer, find_preset
from lowmem.errors import LowmemError
from lowmem.memory import MemoryBreakdown
from lowmem.planner import Plan, make_plan, safety_margin
from lowmem.spec import ModelSpec, builtin_entries, builtin_spec, spec_for

_TERM_NOTES = {
    "weights": "the model's parameters",
    "adapters": "LoRA matrices (fp32)",
    "grads": "gradients alive at the peak",
    "optimizer": "optimizer states",
    "activations": "saved for backward",
    "logits": "loss: logits, log-probs, grads",
    "temporaries": "dequant, block backward, cuBLAS",
    "overhead": "CUDA context + fragmentation",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "plan", help="choose the plan that fits a memory budget and show its predicted memory",
        description="Choose the best plan that fits --vram (quality first, then speed) and show "
                    "its predicted memory, term by term. Reads no weights. Every key you set (a flag, "
                    "key=value, or a preset's) is pinned: the planner keeps it and chooses the rest, so "
                    "leave micro_batch, grad_checkpointing, offload, loss_chunk or method out to let it "
                    "choose them; the defaults listed are what it starts from.")
    parser.add_argument("--json", action="store_true",
                        help="print the plan as JSON (an error too, as {\"error\", \"kind\"}, exit status 2)")
    parser.add_argument("--list-models", action="store_true",
                        help="list the built-in model names and exit")
    parser.add_argument("--measure", action="store_true",
                        help="then run the plan for a few steps on random weights of the model's shapes "
                             "(nothing is downloaded) and print the measured peak beside the prediction; "
                             "on CUDA the allocator is capped at --vram less the CUDA context, so a plan "
                             "that does not fit fails here instead of in a real run")
    parser.add_argument("--measure-steps", type=int, default=3, metavar="N",
                        help="optimizer steps --measure runs (default 3; the first creates the states)")
    add_config_flags(parser, TRAINING_ONLY,
                     "Keys that only `lowmem train` uses (data, steps, lr and the schedule, evaluation, "
                     "checkpoints, logging, the run's name and folder) are accepted, so a train command "
                     "or preset plans as it is, and left out here: `lowmem train --help` lists them.")
    parser.set_defaults(func=run)


# Config keys that decide nothing the plan holds: `lowmem plan` takes them and lists them not.
TRAINING_ONLY = ("data", "eval_data", "eval_fraction", "runs_dir", "name", "steps", "lr", "schedule",
                 "warmup_steps", "min_lr_ratio", "weight_decay", "adam_betas", "max_grad_norm", "eval_every",
                 "eval_max_examples", "eval_generate", "max_new_tokens", "save_every", "save_minutes",
                 "keep_checkpoints", "log_every")


def typed_keys(args: argparse.Namespace) -> set[str]:
    """Config keys the user typed: by flag or by key=value."""
    keys = {k[4:] for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return keys | set(parse_overrides(args.overrides or ())[0])


def pinned_keys(args: argparse.Namespace) -> set[str]:
    """Config keys the user set: by flag, by key=value, or in the preset."""
    keys = typed_keys(args)
    if getattr(args, "preset", None):
        path = find_preset(args.preset)
        keys |= set(read_yaml_layer(path.read_text(), str(path))[0])
    return keys


NO_CUDA_HERE = ("planned for a CUDA GPU, which this machine lacks: `lowmem train` here would "
                "train on the CPU, as device=cpu plans")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def planning_device(requested: str) -> str:
    """A budget is a GPU's unless the config says cpu: plan for CUDA even on a CPU-only machine."""
    return "cpu" if requested == "cpu" else "cuda"


def run(args: argparse.Namespace) -> int:
    if args.list_models:
        print(list_models())
        return 0
    spec = None
    try:
        config = config_from_args(args)
        spec = spec_for(config.model)
        pinned = pinned_keys(args)
        plan = make_plan(config, spec, pinned, device=planning_device(config.device), typed=typed_keys(args))
        notes = []
        if "seq_len" not in pinned and spec.name != "smollm2-135m":
            notes.append(f"seq_len {config.seq_len} is the default, sized for the embedded demo's short "
                         f"examples: give seq_len= the token length of your data's longest examples, "
                         f"as activations grow with it")
        if config.device == "auto" and plan.device == "cuda" and not _has_cuda():
            notes.append(NO_CUDA_HERE)
        plan = dataclasses.replace(plan, reasons=(*plan.reasons, *notes))
        prepare = loram_prepare(plan, spec, config)
        if not args.json:       # the plan first: a measurement that cannot run still leaves it said
            print(render(plan, spec, margin=safety_margin(config), prepare=prepare), flush=True)
        measured = measure_plan(plan, spec, config, args.measure_steps) if args.measure else None
    except LowmemError as e:
        if args.json:    # a reader of --json gets JSON, whatever went wrong
            print(json.dumps({**({"model": spec.to_dict()} if spec else {}),
                              "error": str(e), "kind": type(e).__name__}, indent=2))
            return 2   # as without --json (every lowmem error exits 2)
        raise
    if args.json:
        out = plan_json(plan, spec, prepare)
        if measured is not None:
            out["measured"] = measured
        print(json.dumps(out, indent=2))
    elif measured is not None:
        print("\n" + render_measured(measured))
    return 0 if measured is None or measured["fits"] else 1


def measure_plan(plan: Plan, spec: ModelSpec, config, steps: int) -> dict[str, Any]:
    """Run `plan` here on random weights (lowmem.measure); the Measurement as a dict, with
    `fits` (False when the steps ran out of memory under the cap) and `oom` (the message)."""
    import torch

    from lowmem.errors import ConfigError
    from lowmem.measure import allocator_cap, measure

    if steps < 1:
        raise ConfigError(f"--measure-steps: expected at least 1, got {steps}")
    if plan.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--measure runs the plan on this machine's GPU, and torch sees none; "
                          "measure a CPU plan with device=cpu")
    cap = None
    if plan.device == "cuda" and plan.vram:
        try:
            cap = allocator_cap(plan.vram)
        except ValueError as e:
            raise ConfigError(f"--measure: {e}") from None
    try:
        m = measure(spec, plan, config, steps=steps, cap=cap)
    except RuntimeError as e:   # torch.cuda.OutOfMemoryError is one; cuBLAS reports its own allocations
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        if not isinstance(e, torch.cuda.OutOfMemoryError) and not any(
                s in message for s in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED")):
            raise
        return {"fits": False, "oom": message, "cap": cap, "steps": steps,
                "predicted_allocated": plan.breakdown.allocated if plan.breakdown else None}
    out = {"fits": True, "steps": steps, **m.to_dict()}
    out["losses"] = [x if math.isfinite(x) else None for x in m.losses]   # JSON has no NaN
    if cap is not None and m.reserved + m.context > plan.vram:
        # The context grows after the cap is set (cuBLAS and kernel modules load on first use).
        out.update(fits=False, oom=f"the allocator's peak {format_size(m.reserved)} and the CUDA context "
                                   f"{format_size(m.context)} together exceed --vram {format_size(plan.vram)}")
    return out


def render_measured(m: dict[str, Any]) -> str:
    """The measured section under the plan: the allocated peak against the prediction."""
    if not m["fits"] and "allocated" not in m:
        under = f" under a {format_size(m['cap'])} cap" if m["cap"] else ""
        return (f"measured  OUT OF MEMORY within {_steps(m['steps'])}{under}: this plan does not fit this GPU "
                f"({m['oom']})")
    device = "CUDA" if m["reserved"] is not None else "CPU, live tensor bytes"
    error = m["error"]
    lines = [f"measured  {_steps(m['steps'])} on random weights ({device}, {m['seconds_per_step']:.2f} s/step, "
             f"losses {', '.join('nan' if x is None else f'{x:.3f}' for x in m['losses'])})",
             f"  allocated peak  {format_size(m['allocated'])}, predicted {format_size(m['predicted_allocated'])} "
             f"({abs(error):.1%} {'over' if error >= 0 else 'under'} the measurement)"]
    if m["reserved"] is not None:
        lines.append(f"  reserved peak   {format_size(m['reserved'])} + CUDA context {format_size(m['context'])}"
                     + (f", under a {format_size(m['cap'])} cap" if m["cap"] else ""))
    elif m.get("peak_op"):
        lines.append(f"  the peak came at {m['peak_op']}")
    if m.get("pinned") and m["predicted"]["host"]:
        lines.append(f"  pinned host peak {format_size(m['pinned'])}, predicted {format_size(m['predicted']['host'])}")
    if not m["fits"]:
        lines.append(f"  DOES NOT FIT: {m['oom']}")
    if error < -UNDER_ESTIMATE_WARNING:
        lines.append(f"  warning: the prediction is more than {UNDER_ESTIMATE_WARNING:.0%} under the measured peak; "
                     f"a run at the edge of its budget could run out of memory. Please report this output.")
    return "\n".join(lines)


def _steps(n: int) -> str:
    return f"{n} step" + ("" if n == 1 else "s")


#: How far under a measured peak a prediction may be before --measure warns (the planner keeps
#: a 5% safety margin; tests/test_measure.py holds the memory model to 2%).
UNDER_ESTIMATE_WARNING = 0.02


def plan_json(plan: Plan, spec: ModelSpec, prepare: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"model": spec.to_dict(), "plan": plan.to_dict()}
    if plan.vram is not None and plan.breakdown is not None:
        out["budget"] = {"vram": plan.vram, "safety_margin": plan.safety_margin,
                         "usable": plan.usable, "total": plan.breakdown.total,
                         "spare": plan.usable - plan.breakdown.total,
                         "host_ram": plan.host_ram, "host_usable": plan.host_usable,
                         "host_pinned": plan.breakdown.host}
    if prepare is not None:
        out["loram_prepare"] = prepare
    return out


def loram_prepare(plan: Plan, spec: ModelSpec, config) -> dict[str, Any] | None:
    """For a LoRAM plan: how `lowmem train` would prepare its pruned base on this machine
    (lowmem.loram.Preparation as a dict); None for other plans."""
    if plan.method != "loram":
        return None
    from lowmem.loram import preparation   # torch: only for a LoRAM plan

    return preparation(config, plan, spec, _host_available()).to_dict()


# ---------------------------------------------------------------- text

def render(plan: Plan, spec: ModelSpec, margin: float | None = None, prepare: dict[str, Any] | None = None) -> str:
    """The plan, its breakdown table, the budget line and the rejected candidates."""
    b = plan.breakdown
    assert b is not None
    lines = [f"model     {spec.name}: {spec.params:,} parameters, {spec.layers} layers, hidden "
             f"{spec.hidden}, vocab {spec.vocab} ({spec.source or 'built-in'})",
             f"device    {plan.device} ({plan.compute_dtype} compute){_context_note(plan)}{_kernels_note(plan)}"
             f"{'; not this machine, which has no CUDA GPU (device=cpu plans for it)' if NO_CUDA_HERE in plan.reasons else ''}",
             ""]
    lines.append(f"plan      {plan.label}")
    for key, value in _plan_rows(plan, spec, prepare):
        lines.append(f"  {key:<18}{value}")
    lines += ["", f"predicted peak ({b.phase} phase)"]
    width = max(len(format_size(getattr(b, t))) for t in MemoryBreakdown.TERMS)
    for term in MemoryBreakdown.TERMS:
        size = getattr(b, term)
        share = 100 * size / b.total if b.total else 0.0
        lines.append(f"  {term:<13}{format_size(size):>{width}}  {share:5.1f}%  {_TERM_NOTES[term]}")
    lines.append(f"  {'total':<13}{format_size(b.total):>{width}}")
    if b.host:
        lines.append(f"  (host: {format_size(b.host)} of pinned CPU memory for offloaded activations)")
    lines.append("")
    if plan.vram is None:
        lines.append("budget    none given (--vram): this is the config as it stands, unchecked")
    else:
        usable = plan.usable or 0
        lines.append(f"budget    {format_size(b.total)} of {format_size(usable)} usable "
                     f"({format_size(plan.vram)} - {plan.safety_margin:.0%} safety margin): fits, "
                     f"{format_size(usable - b.total)} spare")
        if b.host and plan.host_usable is not None:
            lines.append(f"host      {format_size(b.host)} pinned of {format_size(plan.host_usable)} usable "
                         f"({format_size(plan.host_ram)} host RAM - {plan.safety_margin:.0%} safety margin): "
                         f"fits, {format_size(plan.host_usable - b.host)} spare")
    if plan.rejected:
        lines += ["", "rejected  (better candidates that did not fit)"]
        lines += [f"  {r.describe()}" for r in plan.rejected]
    if plan.reasons:
        lines += ["", "why"]
        lines += [f"  - {r}" for r in plan.reasons]
    return "\n".join(lines)


def _context_note(plan: Plan) -> str:
    if plan.device != "cuda":
        return ""
    from lowmem.memory import CUDA_CONTEXT_BYTES

    if plan.context_bytes:
        return f"; CUDA context {format_size(plan.context_bytes)}, measured by a run on this machine's GPU"
    return f"; CUDA context {format_size(CUDA_CONTEXT_BYTES)} assumed (no run has measured this GPU yet)"


def _kernels_note(plan: Plan) -> str:
    """Whether the prediction counts lowmem.kernels' temporaries or the references'."""
    if plan.device != "cuda":
        return ""
    from lowmem.kernels.runtime import planning_reason

    reason = planning_reason()
    return "; kernels on" if reason is None else f"; kernels off, references' memory counted ({reason})"


# "Train Small, Infer Large" (LoRAM), its reduction factor for QLoRAM on LLaMA-3.1-70B.
LORAM_PAPER_FACTOR = 15.81


def _plan_rows(plan: Plan, spec: ModelSpec, prepare: dict[str, Any] | None = None) -> list[tuple[str, str]]:
    rows = [("method", plan.method)]
    base = plan.base_format + (" (double quantization)" if plan.base_format == "nf4" and plan.double_quant else "")
    rows.append(("base weights", base))
    if plan.prune_ratio or any(plan.prune_layer_ratios):
        pruned = spec.pruned(plan.prune_ratio, plan.prune_keep_first, plan.prune_keep_last,
                             plan.prune_layer_ratios)
        bits = 4 if plan.base_format == "nf4" else 16
        factor = spec.params / pruned.params * 16 / bits
        rows.append(("pruning", f"{plan.prune_ratio:.0%} of heads and MLP channels in blocks "
                                f"{plan.prune_keep_first}..{spec.layers - plan.prune_keep_last - 1}"
                                + (f" (blocks 0..{len(plan.prune_layer_ratios) - 1} at loram.layer_ratios)"
                                   if plan.prune_layer_ratios else "") + ": "
                                f"{pruned.params:,} parameters; reduction {factor:.2f}x "
                                f"(params ratio x 16/{bits} bits, as the LoRAM paper counts; "
                                f"the paper: {LORAM_PAPER_FACTOR}x for LLaMA-3.1-70B pruned 85% in NF4)"))
        if prepare is not None:
            rows.append(("prepare", _loram_prepare_note(plan, spec, prepare)))
    if plan.lora_rank:
        rows.append(("adapters", f"LoRA rank {plan.lora_rank}, alpha {plan.lora_alpha:g}, "
                                 f"on {','.join(plan.lora_targets)}"))
    if plan.quant_bits:
        rows.append(("export", f"{plan.quant_bits}-bit, group {plan.quant_group}"))
    opt = plan.optimizer + f" ({plan.optimizer_state_bits}-bit states)"
    if plan.optimizer_state_bits == 16:       # lowmem.optim.BF16AdamW
        opt += ", bf16 weights updated in fp32 and rounded stochastically"
    if plan.galore_rank:
        opt += f", GaLore rank {plan.galore_rank}" + (", per-layer updates" if plan.galore_per_layer else "")
    rows.append(("optimizer", opt))
    rows.append(("batch", f"micro_batch {plan.micro_batch} x grad_accum {plan.grad_accum} x seq_len "
                          f"{plan.seq_len} = {plan.tokens_per_step:,} tokens per step"
                          + (", packed (a block-diagonal attention mask per layer)" if plan.masked_attention
                             else f", as long as the {spec.sliding_window}-token attention window or longer "
                                  f"(a banded mask per layer)" if 0 < spec.sliding_window <= plan.seq_len else "")))
    rows.append(("memory savers", f"checkpointing {'on' if plan.grad_checkpointing else 'off'}, "
                                  f"offload {'on' if plan.offload_activations else 'off'}, "
                                  f"loss {'chunks of ' + str(plan.loss_chunk) if plan.loss_chunk else 'whole'}"))
    return rows


def _host_available() -> int:
    from lowmem.planner import available_ram

    return available_ram()


def _loram_prepare_note(plan: Plan, spec: ModelSpec, prepare: dict[str, Any]) -> str:
    """Where `lowmem train` will load and prune the dense model, and what that needs."""
    from lowmem.loram import Preparation

    prep = Preparation(**prepare)
    host = format_size(prep.host_available)
    auto = f"loram.criterion=auto chose {prep.criterion}; " if prep.chosen != "set" else ""
    beside = f"one dense block at a time ({format_size(prep.stream_bytes)} beside the pruned model)"
    if prep.streamed and prep.criterion == "magnitude":
        return f"{auto}pruned by magnitude while the weights load, {beside}"
    if prep.streamed:
        scored = f"{auto}taylor scores computed one dense block at a time"
        then = f"then pruned while the weights load, {beside}"
        if prep.where == "cuda":
            return (f"{scored} on the GPU ({format_size(prep.bytes)} of the GPU, within the budget, and "
                    f"{format_size(prep.host_bytes)} of host RAM), {then}")
        if prep.where == "cpu":
            return (f"{scored} on the host ({format_size(prep.bytes)} for the scoring and "
                    f"{format_size(prep.host_bytes)} besides, of {host} RAM available here), {then}")
        return f"{auto}{prep.shortfall(plan)}; lowmem train will refuse ({prep.alternative()})"
    what = f"{auto}{prep.what} need {format_size(prep.bytes)}"
    if prep.where == "cuda":
        return f"{what}: pruned on the GPU, within the budget"
    if prep.where == "cpu":
        moved = ", then moved to the GPU" if plan.device == "cuda" else ""
        return f"{what}: pruned on the host ({host} RAM available here){moved}"
    return f"{auto}{prep.shortfall(plan)}; lowmem train will refuse ({prep.alternative()})"


def list_models() -> str:
    lines = [f"{'name':<18}{'params':>16}  {'layers':>6} {'hidden':>6} {'heads':>5} {'kv':>3} "
             f"{'vocab':>7}  aliases"]
    for name, entry in builtin_entries().items():
        spec = builtin_spec(name)
        lines.append(f"{name:<18}{spec.params:>16,}  {spec.layers:>6} {spec.hidden:>6} {spec.heads:>5} "
                     f"{spec.kv_heads:>3} {spec.vocab:>7}  {', '.join(entry.get('aliases', []))}")
    return "\n".join(lines)
