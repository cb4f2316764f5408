"""`lowmem`: the command line. Each subcommand lives in `lowmem/commands/`."""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys

from lowmem import __version__
from lowmem.errors import LowmemError

COMMANDS = ("train", "plan", "monitor", "presets", "generate", "export")

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
    for command in sub.choices.values():
        command.allow_abbrev = False    # `--save 10` must not quietly mean --save-every
    return parser


def _command_parser(parser: argparse.ArgumentParser, name: str | None) -> argparse.ArgumentParser | None:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices.get(name)


_WORDS = ("true", "yes", "on", "1", "false", "no", "off", "0")


def _normalise(command: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Spellings argparse gets wrong, made plain: a value that starts with `-` (`--vram -1G`
    reached argparse as an option), and a value on a true/false flag (`--offload=false`, and
    `--offload false` where a lone word would be taken for a key=value override)."""
    options = command._option_string_actions
    takes_overrides = any(a.dest == "overrides" for a in command._actions)
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":                  # what follows is for the command as written
            return out + argv[i:]
        action = options.get(token)
        if (action is not None and action.nargs is None and i + 1 < len(argv)
                and argv[i + 1].startswith("-") and argv[i + 1] not in options and argv[i + 1] != "--"):
            out.append(f"{token}={argv[i + 1]}")
            i += 2
            continue
        flag, eq, value = token.partition("=")
        if (not eq and isinstance(action, argparse.BooleanOptionalAction) and not token.startswith("--no-")
                and i + 1 < len(argv) and argv[i + 1].lower() in _WORDS and takes_overrides):
            eq, value = "=", argv[i + 1]     # `--offload false`: not an override named "false"
            i += 1
        if eq and isinstance(options.get(flag), argparse.BooleanOptionalAction) and not flag.startswith("--no-"):
            word = value.strip().lower()
            if word in _WORDS[:4]:
                token = flag
            elif word in _WORDS[4:]:
                token = "--no-" + flag[2:]
        out.append(token)
        i += 1
    return out


def _unknown_option(command: argparse.ArgumentParser, option: str) -> str:
    """`unknown option --stpes (did you mean --steps?)`; `--lora.rank` and `--lora_rank` are
    pointed at `--lora-rank`."""
    flag = option.split("=", 1)[0]
    known = [o for o in command._option_string_actions if o.startswith("--")]
    dashed = "--" + flag[2:].replace(".", "-").replace("_", "-")
    starting = [o for o in known if o.startswith(flag)]
    close = ([dashed] if dashed in known else starting if 1 <= len(starting) <= 3
             else difflib.get_close_matches(flag, known, n=1, cutoff=0.7))
    from lowmem.config import all_keys

    section = flag[2:].replace("-", "_")
    keys = [key for key in all_keys() if key.startswith(section + ".")]
    if keys and dashed not in known:       # `--lora 8`: a section of keys, set as key=value
        hint = ", ".join(f"{key}=…" for key in keys[:3]) + (", ..." if len(keys) > 3 else "")
        return (f"lowmem {command.prog.split()[-1]}: unknown option {flag}: {section} is a section of keys, "
                f"given as key=value ({hint})")
    hint = (f" (did you mean {' or '.join(close)}?)" if close
            else f"; `lowmem {command.prog.split()[-1]} --help` lists them")
    return f"lowmem {command.prog.split()[-1]}: unknown option {flag}{hint}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # Third-party chatter (deprecation notes, progress bars) is not for our users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # lowmem never downloads
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # The plans allow 5% of the peak for the caching allocator's fragmentation, which holds with
    # expandable segments (10-15% without, memory.ALLOCATOR_FRAGMENTATION). Read when CUDA first
    # allocates, so set here, before it does; a setting of the user's is kept. Linux only: torch
    # has them nowhere else, and says so.
    if sys.platform.startswith("linux") and not any(
            os.environ.get(k) for k in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")):
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"
    # No progress bars from loading or converting weights over the dashboard and the logs: lowmem
    # says what it does in lines of its own. transformers and tqdm (which transformers' GGUF
    # conversion calls directly) read these when imported; importing them here instead would cost
    # every command a second or more.
    if "transformers" in sys.modules:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    else:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    if "tqdm" not in sys.modules:
        os.environ.setdefault("TQDM_DISABLE", "1")
    parser = build_parser()
    # --debug goes before the command or anywhere after it.
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    name = next((a for a in argv if not a.startswith("-")), None)     # the command, as typed
    command = _command_parser(parser, name)
    if command is not None:
        argv = _normalise(command, argv)
    elif name is not None:
        close = difflib.get_close_matches(name, COMMANDS, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "`lowmem --help` says what each does"
        print(f"lowmem: unknown command '{name}' ({hint}); commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    args, extra = parser.parse_known_args(argv)
    if extra and isinstance(getattr(args, "overrides", None), list):
        # argparse takes one run of key=value positionals; later runs, between options, come back
        # unparsed: they are overrides too, in the order given.
        # Anything key=value that is not an option: the config names a mistyped key (lora-rank=4).
        overrides = [a for a in extra if "=" in a and not a.startswith("-")]
        args.overrides += overrides
        extra = [a for a in extra if a not in overrides]
    options = [a for a in extra if a.startswith("--")]
    if options and command is not None:
        print(_unknown_option(command, options[0]), file=sys.stderr)
        return 2
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
    except BrokenPipeError:
        # The reader went away (`lowmem presets | head`): nothing more to say, and nowhere to.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
