"""Low-bit fine-tuning quality on the embedded model and dataset (issue 4's proof).

Rows, all from the same config (seed, data order, steps, LoRA rank/alpha/targets, lr):

  (a) LoRA on the fp32 base                        trained by lowmem.trainer.train
  (b) QLoRA: LoRA on an NF4 base                   trained by lowmem.trainer.train
  (c) QLoRA adapter merged into the fp32 base,      `lowmem export --quantized --bits B`
      then round-to-nearest B-bit (B = 4, 3)        (min-max groups of `--group`)
  (d) L4Q at B bits (B = 4, 3)                     trained by lowmem.trainer.train, then exported
  (+) LoRA merged then RTN B-bit, as a second baseline for (d)
  (0) no training: the base model in fp32, in NF4, and RTN 4-bit / 3-bit (what
      quantization alone costs; no trainer needed)
  (w) weight error only: ‖Ŵ − W‖/‖W‖ over every targeted linear for NF4 (with and
      without double quantization) and RTN 4/3-bit (seconds; no forward pass)

(c), (d) and (+) are scored on the exported low-bit model loaded back from its
packed file (lowmem.quant.export.load_quantized_export), dense tensors in fp32
so that only the quantization of the linears differs between rows; (a) and (b)
are the trainer's own final evaluation. Metrics: held-out answer-token loss and
exact match of greedy answers (lowmem.evaluate). The L4Q paper's claim to
check: (d) beats (c) at the same bits.

    python benchmarks/quant_quality.py [--steps 50] [--group 128] [--out benchmarks/results/quant.md]
                                       [--rows w,0,a,b,c,d,+] [key=value ...]

Extra `key=value` arguments are lowmem config overrides applied to every run
(e.g. `lr=1e-3 eval_max_examples=40`). Needs a trainer that knows `method:
qlora` and `method: l4q` (rows 0 and w do not).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent


def train_run(method: str, runs_dir: Path, steps: int, overrides: list[str], log) -> tuple[Path, dict, float]:
    """Train one run with lowmem's own loop; returns (run_dir, its final eval event, seconds)."""
    from lowmem.config import load_config
    from lowmem.events import read_events
    from lowmem.planner import plan_from_config
    from lowmem.trainer import new_run_dir, train, write_run_files

    config = load_config(None, {"method": method.split("@")[0], "steps": steps, "runs_dir": str(runs_dir),
                                "name": method.replace("@", "-")},
                         [*overrides, *([f"l4q.bits={method.split('@')[1]}"] if "@" in method else [])])
    plan = plan_from_config(config)
    run_dir = new_run_dir(config)
    write_run_files(run_dir, config, plan)
    start = time.perf_counter()
    train(config, plan, run_dir, out=lambda line: log(f"    {line}"))
    seconds = time.perf_counter() - start
    after = [e for e in read_events(run_dir) if e.get("kind") == "eval" and e.get("label") == "after"]
    if not after:
        raise RuntimeError(f"{run_dir}: the run ended without its final evaluation")
    return run_dir, after[-1], seconds


def score_export(run_dir: Path, out: Path, bits: int | None, group: int | None, log) -> dict:
    """Export `run_dir` packed low-bit, load the file back, evaluate it like the trainer does."""
    from lowmem.config import config_from_dict
    from lowmem.data import load_datasets
    from lowmem.evaluate import evaluate
    from lowmem.quant.export import export_run, load_quantized_export

    import yaml

    config = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), str(run_dir))
    export_run(run_dir, quantized=out, bits=bits, group=group, dtype=torch.float32,
               log=lambda line: log(f"    {line}"))
    model, tokenizer = load_quantized_export(out, "cpu", torch.float32, materialize=True)
    data = load_datasets(config, tokenizer)
    return evaluate(model, tokenizer, data.heldout, "cpu", generate_answers=config.eval_generate,
                    max_new_tokens=config.max_new_tokens)


def score_base(overrides: list[str], group: int, work: Path, log) -> list[tuple[str, dict]]:
    """The untrained base: fp32, NF4 (as QLoRA loads it), RTN 4-bit and 3-bit (from the packed file)."""
    from lowmem.config import load_config
    from lowmem.data import load_datasets
    from lowmem.evaluate import evaluate
    from lowmem.model import load_model, resolve_model_dir
    from lowmem.quant.export import load_quantized_export, quantize_model, save_quantized
    from lowmem.quant.nf4 import load_nf4_model

    config = load_config(None, {}, overrides)
    targets = config.lora.targets
    model, tokenizer, _ = load_model(config.model, "cpu", torch.float32, log=log)
    data = load_datasets(config, tokenizer)

    def score(m) -> dict:
        return evaluate(m, tokenizer, data.heldout, "cpu", generate_answers=config.eval_generate,
                        max_new_tokens=config.max_new_tokens)

    results = [("(0) base, fp32", score(model))]
    for bits in (4, 3):
        out = work / f"base-rtn{bits}"
        save_quantized(model, quantize_model(model, bits=bits, group=group, targets=targets), out,
                       dense_dtype=torch.float32)
        results.append((f"(0) base, RTN {bits}-bit", score(load_quantized_export(out, materialize=True)[0])))
    del model
    nf4 = load_nf4_model(resolve_model_dir(config.model, log), "cpu", torch.float32, targets)
    results.insert(1, ("(0) base, NF4 (double quant)", score(nf4)))
    return results


def weight_errors(overrides: list[str], group: int) -> list[str]:
    """Mean and max relative Frobenius error ‖Ŵ − W‖/‖W‖ of the targeted linears, per format."""
    from lowmem.config import load_config
    from lowmem.model import resolve_model_dir
    from lowmem.quant import intk
    from lowmem.quant.nf4 import NF4Linear
    from lowmem.quant.skeleton import read_tensors, shard_files

    config = load_config(None, {}, overrides)
    formats = {"NF4, double quant": lambda w: NF4Linear(w).dequantized_weight(),
               "NF4, fp32 absmax": lambda w: NF4Linear(w, double_quant=False).dequantized_weight()}
    for bits in (4, 3):
        def rtn(w, bits=bits):
            step, offset = intk.minmax_params(w, bits, group)
            return intk.dequantize(intk.codes(w, step, offset, bits, group), step, offset, group)
        formats[f"RTN {bits}-bit, groups of {group}"] = rtn
    errors: dict[str, list[float]] = {name: [] for name in formats}
    for key, w in read_tensors(shard_files(resolve_model_dir(config.model, print))):
        if key.endswith(".weight") and key.split(".")[-2] in config.lora.targets:
            w = w.float()
            for name, fn in formats.items():
                errors[name].append(float((fn(w) - w).norm() / w.norm()))
    return [f"| {name} | {sum(e) / len(e):.4f} | {max(e):.4f} | {len(e)} |" for name, e in errors.items()]


def row(label: str, result: dict, note: str = "") -> str:
    em = result.get("exact_match")
    em_text = "-" if em is None else f"{em:.1%}"
    return f"| {label} | {result['loss']:.4f} | {em_text} | {note} |"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=50, help="optimizer steps per training run (default 50)")
    ap.add_argument("--group", type=int, default=128, help="weights per scale for RTN and L4Q (default 128)")
    ap.add_argument("--rows", default="w,0,a,b,c,d,+", help="which rows to produce (default: all)")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "quant.md", help="markdown table to write")
    ap.add_argument("--keep", type=Path, default=None, help="keep run directories and exports here")
    ap.add_argument("overrides", nargs="*", metavar="key=value", help="lowmem config overrides for every run")
    args = ap.parse_args()
    rows = set(args.rows.split(","))
    overrides = list(args.overrides)
    train_overrides = [*overrides, f"l4q.group={args.group}"]   # a key the trainer's config must know
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="quant-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    log = lambda line: print(line, flush=True)  # noqa: E731
    weights: list[str] = []
    lines: dict[str, list[str]] = {tag: [] for tag in ("0", "a", "b", "c", "d", "+")}
    try:
        if "w" in rows:
            log("weight errors of NF4 and RTN ...")
            weights = weight_errors(overrides, args.group)
        if "0" in rows:
            log("scoring the untrained base: fp32, NF4, RTN 4-bit, RTN 3-bit ...")
            lines["0"] = [row(label, result) for label, result in score_base(overrides, args.group, work, log)]
        runs: dict[str, Path] = {}
        for method, wanted in (("lora", "a" in rows or "+" in rows), ("qlora", "b" in rows or "c" in rows),
                               ("l4q@4", "d" in rows), ("l4q@3", "d" in rows)):
            if not wanted:
                continue
            log(f"training {method} ({args.steps} steps) ...")
            run_dir, after, seconds = train_run(method, work / "runs", args.steps, train_overrides, log)
            runs[method] = run_dir
            if method == "lora" and "a" in rows:
                lines["a"].append(row("(a) LoRA, fp32 base", after, f"{seconds:.0f} s training"))
            elif method == "qlora" and "b" in rows:
                lines["b"].append(row("(b) QLoRA, NF4 base", after, f"{seconds:.0f} s training"))
            elif method.startswith("l4q"):
                bits = int(method.split("@")[1])
                log(f"exporting and scoring {method} ...")
                exported = score_export(run_dir, work / f"export-{method.replace('@', '-')}", None, None, log)
                lines["d"].append(row(f"(d) L4Q {bits}-bit", exported,
                                 f"{seconds:.0f} s training; training-time eval: loss {after['loss']:.4f}"))
        for source, tag in (("qlora", "c"), ("lora", "+")):
            if tag not in rows or source not in runs:
                continue
            for bits in (4, 3):
                log(f"exporting and scoring {source} merged + RTN {bits}-bit ...")
                result = score_export(runs[source], work / f"export-{source}-rtn{bits}", bits, args.group, log)
                name = "QLoRA" if source == "qlora" else "LoRA"
                lines[tag].append(row(f"({tag}) {name} merged, RTN {bits}-bit", result))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    from lowmem.config import load_config

    config = load_config(None, {}, overrides)
    command = " ".join(["python benchmarks/quant_quality.py", *sys.argv[1:]])
    trained = f"{args.steps} steps per training run, " if rows - {"0", "w"} else ""
    table = "\n".join([
        f"# Quantization quality ({date.today().isoformat()})", "",
        f"Command: `{command}`", "",
        f"Model `{config.model}`, data `{config.data}`, CPU, {trained}groups of {args.group} weights per "
        f"scale (asymmetric: a step size and an offset per group); exported models scored from their "
        f"packed files, dense tensors in fp32.", "",
    ])
    if weights:
        table += "\n".join(["", "## Weight error of the targeted linears", "",
                             "| format | mean ‖Ŵ−W‖/‖W‖ | max | linears |", "|---|---|---|---|", *weights, ""])
    if any(lines.values()):
        table += "\n".join(["", "## Held-out quality", "",
                             "| row | held-out loss | exact match | notes |", "|---|---|---|---|",
                             *[line for tag in lines for line in lines[tag]], ""])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
