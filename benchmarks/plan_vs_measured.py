"""The planner's predicted peak against the peak a plan's steps really reach.

Each case is a plan; `lowmem.measure` builds a model of the plan's shapes with random
weights on the device (nothing is downloaded), runs the trainer's own steps and reads
the peak: `torch.cuda.max_memory_allocated()` on a GPU, the live tensor bytes
(`lowmem.measure.LiveTensorBytes`) on the CPU. Every case runs in its own process, so
one case's memory never shows in another's.

    python benchmarks/plan_vs_measured.py                  # CPU: every method at SmolLM2-135M shapes, 4 blocks
    python benchmarks/plan_vs_measured.py --model llama-3.1-8b --vram 24G        # GPU: the plan
        # `lowmem plan` picks for each method, run under an allocator capped at the card's size
    python benchmarks/plan_vs_measured.py --model llama-3.1-8b --method lora,qlora --seq-len 512,2048 \\
        --set grad_checkpointing=false                     # pinned plans, no budget
    python benchmarks/plan_vs_measured.py --json out.jsonl # also one JSON line per case

Printed per case: the plan, the predicted moment of the peak (phase), predicted and
measured allocated peak, the error (predicted − measured) / measured (positive: the
planner over-estimates, which costs speed; negative: it under-estimates, which can cost
an out-of-memory error), and on CUDA the reserved peak against the predicted total less
the CUDA context. On the CPU also the op at which the peak was reached.

Exit status: 0 when every case ran and no prediction is under the measured peak by more
than --tolerance (default 2%); 1 otherwise.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time

MiB = 2**20
METHODS = ("lora", "qlora", "l4q", "loram", "galore", "full")


def case_config(case: dict):
    """(RunConfig, pinned keys) for one case: its `key=value` settings over the defaults,
    read and checked as `lowmem train` reads them."""
    from lowmem.config import load_config

    overrides = [f"model={case['model']}", f"device={case['device']}", f"method={case['method']}",
                 f"seq_len={case['seq_len']}", f"micro_batch={case['micro_batch']}", "grad_accum=1",
                 *(f"{k}={v}" for k, v in case["set"].items())]
    if case.get("vram"):
        overrides.append(f"vram={case['vram']}")
    pinned = {"method", "seq_len", *case["set"]}
    if not case.get("vram"):
        pinned |= {"micro_batch", "grad_accum"}
    return load_config(overrides=overrides), pinned


def run_case(case: dict) -> dict:
    """Measure one case in this process; returns a JSON-able record."""
    from lowmem.measure import allocator_cap, measure, with_layers
    from lowmem.planner import make_plan
    from lowmem.spec import builtin_spec

    spec = with_layers(builtin_spec(case["model"]), case.get("layers"))
    config, pinned = case_config(case)
    plan = make_plan(config, spec, pinned=pinned, device=case["device"])
    cap = allocator_cap(plan.vram) if case["device"] == "cuda" and plan.vram else None
    m = measure(spec, plan, config, steps=case.get("steps", 3), cap=cap)
    return {"case": case, "plan": plan.label, "micro_batch": plan.micro_batch, "grad_accum": plan.grad_accum,
            "grad_checkpointing": plan.grad_checkpointing, "loss_chunk": plan.loss_chunk,
            "offload": plan.offload_activations, "spec": spec.name, **m.to_dict()}


def cases(args) -> list[dict]:
    device = args.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = [dict(kv.split("=", 1) for kv in args.set)] if args.set else [{}]
    if args.model is None:   # the CPU matrix
        args.model = "smollm2-135m"
        if args.layers is None:
            args.layers = 4
        if not args.set:
            settings = [{"grad_checkpointing": g, "loss_chunk": c} for g in (True, False) for c in (0, 128)]
    out = []
    for method, seq, extra in itertools.product(args.method.split(","), args.seq_len.split(","), settings):
        out.append(dict(model=args.model, layers=args.layers, device=device, method=method, seq_len=int(seq),
                        micro_batch=args.micro_batch, vram=args.vram, steps=args.steps,
                        set={k: str(v).lower() if isinstance(v, bool) else v for k, v in extra.items()}))
    return out


def describe(r: dict) -> str:
    c = r["case"]
    settings = ", ".join(f"{k}={v}" for k, v in c["set"].items() if k not in ("grad_checkpointing", "loss_chunk"))
    return (f"{r['plan']:<18} {c['seq_len']:>5} {r['micro_batch']}x{r['grad_accum']:<3} "
            f"{'ckpt' if r['grad_checkpointing'] else '    '} chunk {r['loss_chunk']:<4} "
            f"{'offload' if r['offload'] else '       '} {settings}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a built-in model name (default: the CPU matrix at smollm2-135m shapes)")
    ap.add_argument("--layers", type=int, help="keep the first N blocks (default: all; 4 for the CPU matrix)")
    ap.add_argument("--method", default=",".join(METHODS), help="comma-separated methods")
    ap.add_argument("--seq-len", default="512", help="comma-separated sequence lengths")
    ap.add_argument("--micro-batch", type=int, default=1)
    ap.add_argument("--vram", help="a budget (e.g. 24G): the planner picks each method's plan, and on CUDA "
                                   "the allocator is capped at it")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="a config setting pinned in every case (repeatable)")
    ap.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per case (the first creates the states)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="largest allowed under-estimate (default 0.02)")
    ap.add_argument("--json", help="append one JSON line per case to this file")
    ap.add_argument("--one", help=argparse.SUPPRESS)   # internal: run one case (JSON) in this process
    args = ap.parse_args()

    if args.one:
        print(json.dumps(run_case(json.loads(args.one))))
        return 0
    failures = 0
    print(f"{'plan':<18} {'seq':>5} {'mb x ga':<7} {'':4} {'loss':<10} {'':7} {'phase':<12} "
          f"{'predicted':>10} {'measured':>10} {'error':>7}  peak at / reserved")
    for case in cases(args):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--one", json.dumps(case)], capture_output=True,
                              text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if proc.returncode != 0:
            failures += 1
            last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            print(f"{case['method']:<18} {case['seq_len']:>5} FAILED: {last}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(r) + "\n")
        if r["error"] < -args.tolerance:
            failures += 1
        tail = r["peak_op"] or ""
        if r["reserved"] is not None:
            expect = r["predicted"]["total"] - r["context"]
            tail = (f"reserved {r['reserved'] / MiB:,.0f} MiB vs {expect / MiB:,.0f} predicted "
                    f"(context {r['context'] / MiB:,.0f} MiB{', cap ' + format(r['cap'] / MiB, ',.0f') if r['cap'] else ''})")
        print(f"{describe(r)} {r['predicted']['phase']:<12} {r['predicted_allocated'] / MiB:>9,.1f}M "
              f"{r['allocated'] / MiB:>9,.1f}M {r['error']:>+7.1%}  {tail}  [{time.perf_counter() - t0:.0f} s]",
              flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
