"""`lowmem monitor RUN_DIR`: attach the dashboard to a run, or replay a finished one.

On a terminal it opens the dashboard (lowmem.tui); with `--no-tui`, a stdout
that is not a terminal, or CI set, it prints one plain line per event and
follows the run until it is over.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TextIO

# Closing messages for the dashboard's outcomes.
OUTCOMES = {
    "detach": "detached: the run goes on. Attach again with: lowmem monitor {run_dir}",
    "stop": "stop requested: the trainer saves a checkpoint, then stops.",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "monitor", help="watch a run's memory and loss (attach to a live run or replay a finished one)",
        description="Open the dashboard on a run directory. Keys: p pause/resume, s save, q quit, ? help.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory, e.g. runs/NAME")
    parser.add_argument("--no-tui", action="store_true",
                        help="print one plain line per event instead of the dashboard (the default when "
                             "stdout is not a terminal, or CI is set): a finished run is replayed and the "
                             "command exits; a live one is followed to its end. Exit status: 0 when the run "
                             "reached its `done` (finished, or stopped or interrupted with a checkpoint to "
                             "resume: its reason says which), 1 after an error or a trainer that is gone, "
                             "2 when RUN_DIR is not a run directory or an option is wrong")
    parser.add_argument("--poll", type=float, default=0.5, metavar="S",
                        help="seconds between reads of events.jsonl (default: 0.5)")
    parser.set_defaults(func=run)


def use_dashboard(no_tui: bool, stream: TextIO | None = None) -> bool:
    """The dashboard only on an interactive terminal that was not told otherwise."""
    stream = stream or sys.stdout  # looked up now: tests and pipes replace sys.stdout
    return not no_tui and stream.isatty() and not os.environ.get("CI")


def run(args: argparse.Namespace) -> int:
    from lowmem.tui.reader import check_run_dir

    if not 0 < args.poll < 3600:     # nan and inf too
        from lowmem.errors import ConfigError

        raise ConfigError(f"--poll: expected a positive number of seconds, under an hour, got {args.poll}")
    run_dir = check_run_dir(args.run_dir, require_run_files=True)
    if use_dashboard(args.no_tui):
        from lowmem.tui import run_dashboard

        outcome = run_dashboard(run_dir, poll_s=args.poll)
        if outcome in OUTCOMES:
            print(OUTCOMES[outcome].format(run_dir=run_dir))
        return 1 if outcome == "closed" else 0      # "closed": crashed, or the trainer is gone
    return print_progress(run_dir, poll_s=args.poll)


def print_progress(run_dir: Path, *, poll_s: float = 0.5, out: TextIO | None = None,
                   check_trainer: bool = True) -> int:
    """Print every event as a plain line until the run is over: 0 if it ended well, 1 if not."""
    out = out or sys.stdout
    from lowmem.tui.describe import plain_line
    from lowmem.tui.reader import follow
    from lowmem.tui.state import RunState

    state = RunState()
    try:
        for update in follow(run_dir, poll_s, check_trainer=check_trainer):
            state.apply(update)
            for problem in update.problems + ([update.quiet] if update.quiet else []):
                print(f"warning: {problem}", file=out, flush=True)
            for event in update.events:
                line = plain_line(event)
                if line is not None:
                    print(line, file=out, flush=True)
            if update.trainer_gone and state.error is None:
                print("error: trainer process ended without finishing (no `done` event)", file=out, flush=True)
    except KeyboardInterrupt:
        print(OUTCOMES["detach"].format(run_dir=run_dir), file=out, flush=True)
        return 0
    return 0 if state.done is not None and state.error is None else 1
