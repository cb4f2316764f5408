"""`lowmem`: the command line. Each subcommand lives in `lowmem/commands/`."""

from __future__ import annotations

import argparse
import importlib
import os
import re
import sys

from lowmem import __version__
from lowmem.errors import LowmemError

COMMANDS = ("train", "plan", "monitor", "presets", "generate", "export")

#: A config override given as a positional argument: dotted.key=value.
OVERRIDE = re.compile(r"^[A-Za-z_][\w.]*=")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lowmem",
        description="Fine-tune language models on one GPU that does not have enough memory.",
        epilog="Run `lowmem COMMAND --help` for a command's options.")
    parser.add_argument("--version", action="version", version=f"lowmem {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"lowmem.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Third-party chatter (deprecation notes, progress bars) is not for our users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lowmem never downloads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = build_parser()
    # --debug goes before the command or anywhere after it.
    debug = "--debug" in argv
    args, extra = parser.parse_known_args([a for a in argv if a != "--debug"])
    if extra and isinstance(getattr(args, "overrides", None), list):
        # argparse takes one run of key=value positionals; later runs, between options, come back
        # unparsed: they are overrides too, in the order given.
        overrides = [a for a in extra if OVERRIDE.match(a)]
        args.overrides += overrides
        extra = [a for a in extra if a not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except LowmemError as e:
        if debug:
            raise
        print(f"{type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
