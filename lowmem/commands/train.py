"""`lowmem train`: plan, then fine-tune, writing a run directory; or resume one.

On a terminal the trainer runs in its own process and the dashboard watches
its run directory; closing the dashboard asks whether to stop (checkpoint
first) or detach. `--no-tui`, a stdout that is not a terminal, or CI keep the
training in this process with plain progress lines.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from lowmem.commands import add_config_flags, config_from_args
from lowmem.config import default_lr, parse_overrides
from lowmem.errors import CheckpointError, ConfigError, ModelError


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="fine-tune a model (default: the embedded SmolLM2-135M demo)",
        description="Fine-tune a model. With no options this runs the embedded demo: LoRA on "
                    "SmolLM2-135M-Instruct over the built-in task dataset, with held-out "
                    "evaluation before and after. Options override a preset, key=value overrides "
                    "override options.")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="continue a stopped run exactly from its newest valid checkpoint (a run stopped "
                        "before its first checkpoint starts over); steps=N trains it longer, its "
                        "learning-rate schedule stretched to the new length. A resume may change only "
                        "steps, eval_every, eval_max_examples, eval_generate, max_new_tokens, save_every, "
                        "save_minutes, keep_checkpoints and log_every")
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved config and exit (before planning: with --vram, `lowmem plan` "
                        "shows the method and settings the planner picks, and an unset lr follows that "
                        "method)")
    p.add_argument("--no-tui", action="store_true",
                   help="plain progress lines instead of the dashboard (the default when stdout "
                        "is not a terminal, or CI is set)")
    add_config_flags(p)
    p.set_defaults(func=run)

    # The trainer process behind the dashboard: runs a prepared run directory.
    # Without help= argparse leaves it out of `lowmem --help`.
    w = sub.add_parser("worker")
    w.add_argument("run_dir")
    w.add_argument("--resume", action="store_true")
    # When the dashboard started it: control requests from then on are for this worker,
    # though sent while it still imported torch (a stop pressed at once).
    w.add_argument("--since", type=float, default=None)
    # The run directory's lock, locked by `lowmem train` and inherited: this worker holds it on.
    w.add_argument("--lock-fd", type=int, default=None)
    w.set_defaults(func=run_worker)


def _requested(args) -> dict:
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    values, _ = parse_overrides(args.overrides or ())
    return {**flags, **values}


def with_absolute_paths(config):
    """`config` with its local model and data paths absolute, as the run directory records them:
    a run resumed, exported or answered with from another directory finds them still."""
    import dataclasses

    changes = {}
    for key in ("model", "data", "eval_data"):
        value = getattr(config, key)
        if value and value != "embedded" and Path(value).expanduser().exists():
            changes[key] = str(Path(value).expanduser().resolve())
    return dataclasses.replace(config, **changes)


def preflight(config) -> None:
    """Fail on a missing model or bad data before a run directory is made."""
    from lowmem.data import check_learnable, split_records
    from lowmem.model import load_tokenizer, resolve_model_dir

    train_records, _ = split_records(config)
    model_dir = resolve_model_dir(config.model)
    if not any(model_dir.glob("*.safetensors")) and not any(model_dir.glob("pytorch_model*.bin")):
        raise ModelError(f"{model_dir} has a config.json but no weights (*.safetensors or pytorch_model*.bin)")
    check_learnable(config, load_tokenizer(model_dir), train_records)


def run(args) -> int:
    from lowmem.commands.monitor import use_dashboard
    from lowmem.commands.plan import pinned_keys, typed_keys
    from lowmem.planner import make_plan
    from lowmem.spec import spec_for
    from lowmem.trainer import new_run_dir, resumed_config, train_command, write_run_files

    if args.resume:
        if args.preset:
            raise ConfigError("--preset cannot be combined with --resume: a run keeps its own config")
        run_dir = Path(args.resume)
        config = resumed_config(run_dir, _requested(args))
        if args.print_config:
            print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
            return 0
        from lowmem.checkpoint import RunLock, find_resumable, list_checkpoints, write_run_file
        from lowmem.trainer import PENDING_CONFIG, holds_nothing_trained, read_run_files

        # Held from the checks to the end of training (the dashboard's trainer takes it over):
        # a second `lowmem train` on this run cannot rewrite config.yaml under this one.
        with RunLock(run_dir) as lock:
            # Everything that can refuse, before anything in the run directory changes.
            read_run_files(run_dir)
            if not list_checkpoints(run_dir):
                if not holds_nothing_trained(run_dir):
                    raise CheckpointError(f"{run_dir} has no checkpoint to continue from, but holds trained "
                                          f"weights (adapter/ or model/): start a new run to train further")
                # It stopped before its first checkpoint (Ctrl-C while loading or evaluating, a
                # crash): nothing trained was kept, so it starts over, in the same directory, with
                # its events from the start that ended.
                print(f"{run_dir} has no checkpoint: it stopped before one was written; starting it over",
                      file=sys.stderr)
                for stale in ("events.jsonl", "control"):
                    (run_dir / stale).unlink(missing_ok=True)
                resume = False
            else:
                folder = find_resumable(run_dir, warn=lambda m: None)  # fail here, not in a background process
                done_steps = json.loads((folder / "state.json").read_text())["step"]
                ended = done_steps >= config.steps and finished(run_dir, done_steps)
                longer = train_command(f"--resume {run_dir} steps={done_steps * 2}")
                if config.steps < done_steps:
                    raise ConfigError(f"steps={config.steps} is fewer than the {done_steps} {run_dir} has trained; "
                                      + (f"it finished there; to train it longer: {longer}" if ended else
                                         f"give steps={done_steps} to finish it there, or more to go on"))
                if ended:
                    raise ConfigError(f"{run_dir} already finished its {done_steps} steps; to train it longer: "
                                      f"{longer}")
                # Extending the run (steps=...) is recorded so the run directory stays the truth. A run
                # stopped after its last step's checkpoint but before its end (the final evaluation,
                # the adapter) resumes into that end.
                resume = True
            # A resume's config waits beside config.yaml until the trainer has taken the resume on.
            write_run_file(run_dir / (PENDING_CONFIG if resume else "config.yaml"),
                           yaml.safe_dump(config.to_dict(), sort_keys=False))
            if not use_dashboard(args.no_tui):
                return train_here(run_dir, resume)
            trainer = start_trainer(run_dir, resume, lock)
        return watch(run_dir, trainer)

    config = config_from_args(args)
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return 0
    preflight(config)
    from lowmem.model import EMBEDDED_NAMES

    if config.data == "embedded" and config.model.strip().lower() not in EMBEDDED_NAMES:
        print("note: no --data: this run trains on lowmem's embedded demo tasks, not on your data "
              "(give --data FILE.jsonl)", file=sys.stderr)
    config = with_absolute_paths(config)
    pinned = pinned_keys(args)
    spec = spec_for(config.model)
    plan = make_plan(config, spec, pinned, typed=typed_keys(args))
    if "lr" not in pinned and default_lr(plan.method) != config.lr:
        # The planner chose another method than the config's: its learning rate goes with it.
        print(f"lr {default_lr(plan.method):g}: the default for {plan.method} (set lr to choose)", file=sys.stderr)
        config = config.replace(lr=default_lr(plan.method))
    run_dir = new_run_dir(config)
    from lowmem.checkpoint import RunLock
    from lowmem.events import LOCK

    with RunLock(run_dir) as lock:
        if any(entry.name != LOCK for entry in run_dir.iterdir()):
            raise ConfigError(f"{run_dir}: another `lowmem train` started a run here just now; "
                              f"choose another --name")
        write_run_files(run_dir, config, plan)
        print(f"run directory: {run_dir}", file=sys.stderr)
        if not use_dashboard(args.no_tui):
            return train_here(run_dir, resume=False)
        trainer = start_trainer(run_dir, False, lock)
    return watch(run_dir, trainer)


def finished(run_dir: Path, step: int) -> bool:
    """Whether the run wrote its end at `step`: a `done` event that says it finished there."""
    from lowmem.events import finished_steps

    return step in finished_steps(run_dir)


def start_trainer(run_dir: Path, resume: bool, lock) -> tuple[subprocess.Popen, float]:
    """The trainer in its own process, for the dashboard to watch, and when it was started. It
    takes over `lock` (the descriptor is passed down), so the run is never free in between."""
    log = open(run_dir / "trainer.log", "a")
    launched = time.time()
    cmd = ([sys.executable, "-m", "lowmem", "worker", str(run_dir), "--since", repr(launched)]
           + (["--resume"] if resume else []) + (["--lock-fd", str(lock.fd)] if lock.fd is not None else []))
    # Its own session: a detached run must survive the terminal that started it.
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True, pass_fds=() if lock.fd is None else (lock.fd,))
    log.close()
    return proc, launched


def watch(run_dir: Path, trainer: tuple[subprocess.Popen, float]) -> int:
    """The dashboard on the trainer `start_trainer` started, until the run ends or the user
    leaves it; the trainer's exit status, or 0 on detaching."""
    from lowmem.commands.monitor import OUTCOMES
    from lowmem.tui import run_dashboard

    proc, launched = trainer
    # Events from before the launch are an earlier session's (a resume): the dashboard waits
    # for this trainer's `start` rather than showing the old `done`.
    outcome = run_dashboard(run_dir, since=launched)
    if outcome == "detach":
        print(OUTCOMES["detach"].format(run_dir=run_dir))
        return 0
    if outcome == "stop":
        print(OUTCOMES["stop"])
    try:
        code = proc.wait()
    except KeyboardInterrupt:
        # The trainer has its own session, so the Ctrl-C did not reach it: say where it is.
        going = "is stopping" if outcome == "stop" else "goes on"
        print(f"no longer waiting: the trainer (pid {proc.pid}) {going}; watch it with: "
              f"lowmem monitor {run_dir}", file=sys.stderr)
        return 130
    return _closing(run_dir, launched, code)


def _closing(run_dir: Path, launched: float, code: int) -> int:
    """What the trainer said last, once the dashboard has closed on it (its console was the
    dashboard): where the weights went, the held-out summary, how to continue; or, for a trainer
    that died without a word, that it did and what is kept. Returns the exit status."""
    from lowmem.checkpoint import list_checkpoints
    from lowmem.events import read_events
    from lowmem.trainer import run_dir_line, train_command
    from lowmem.tui.reader import is_history

    done = next((e for e in reversed(read_events(run_dir))
                 if e.get("kind") == "done" and not is_history(e, launched)), None)
    if done is not None:
        for line in done.get("closing") or ():
            print(line)
        print(run_dir_line(run_dir, done.get("peak_rss")))
    elif code != 0:
        how = f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals() \
            else f"exit status {code}"
        saved = list_checkpoints(run_dir)
        kept = (f"its newest checkpoint is {saved[-1]}; continue with: " if saved else
                "no checkpoint was written; start it over with: ")
        print(f"the trainer ended without finishing ({how}); {kept}{train_command(f'--resume {run_dir}')}",
              file=sys.stderr)
    print(f"trainer output: {run_dir / 'trainer.log'}")
    return 128 - code if code < 0 else code      # killed by signal N: 128 + N, as a shell says


def _console(message: str) -> None:
    """print, unless whatever read the output has gone (`lowmem train | head`): the run goes on
    without a console, its events.jsonl and checkpoints as they were, rather than die of it."""
    try:
        print(message, flush=True)
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())    # and Python's own flush at exit finds nowhere to fail
        os.close(devnull)


def train_here(run_dir: Path, resume: bool, since: float | None = None) -> int:
    from lowmem.trainer import read_run_files, train

    config, plan = read_run_files(run_dir, resume)
    try:
        done = train(config, plan, run_dir, resume=resume, since=since, out=_console)
    except KeyboardInterrupt:     # stopped while loading or evaluating: the trainer said how to go on
        return 130
    return 130 if done["reason"] == "interrupted" else 0


def run_worker(args) -> int:
    from lowmem.checkpoint import RunLock

    run_dir = Path(args.run_dir)
    if args.lock_fd is None:
        return train_here(run_dir, args.resume, args.since)
    with RunLock(run_dir, fd=args.lock_fd):      # the run `lowmem train` held for this trainer
        return train_here(run_dir, args.resume, args.since)
