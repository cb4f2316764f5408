"""`lowmem train`: plan, then fine-tune, writing a run directory; or resume one."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from lowmem.commands import add_config_flags, config_from_args
from lowmem.config import parse_overrides
from lowmem.errors import ConfigError


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model (default: the embedded SmolLM2-135M demo)",
        description="Fine-tune a model. With no options this runs the embedded demo: LoRA on "
                    "SmolLM2-135M-Instruct over the built-in task dataset, with held-out "
                    "evaluation before and after. Options override a preset, key=value overrides "
                    "override options.")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run exactly from its newest valid checkpoint")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_config_flags(p)
    p.set_defaults(func=run)


def _requested(args) -> dict:
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    values, _ = parse_overrides(args.overrides or ())
    return {**flags, **values}


def preflight(config) -> None:
    """Fail on a missing model or bad data before a run directory is made."""
    from lowmem.data import read_records
    from lowmem.model import resolve_model_dir

    for path in (config.data, config.eval_data):
        if path and path != "embedded":
            read_records(Path(path))
    resolve_model_dir(config.model)


def run(args) -> int:
    from lowmem.planner import Plan, plan_from_config
    from lowmem.trainer import new_run_dir, resumed_config, train, write_run_files

    if args.resume:
        if args.preset:
            raise ConfigError("--preset cannot be combined with --resume: a run keeps its own config")
        run_dir = Path(args.resume)
        config = resumed_config(run_dir, _requested(args))
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        plan_path = run_dir / "plan.yaml"
        plan = Plan.from_dict(yaml.safe_load(plan_path.read_text()))
        # Extending the run (steps=...) is recorded so the run directory stays the truth.
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
        done = train(config, plan, run_dir, resume=True)
    else:
        config = config_from_args(args)
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        preflight(config)
        plan = plan_from_config(config)
        run_dir = new_run_dir(config)
        write_run_files(run_dir, config, plan)
        print(f"run directory: {run_dir}", file=sys.stderr)
        done = train(config, plan, run_dir)
    return 130 if done["reason"] == "interrupted" else 0
