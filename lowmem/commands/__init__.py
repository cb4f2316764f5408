"""The `lowmem` subcommands, one module each.

A command module has `register(subparsers)`, which adds its parser and sets
`func` to a `run(args) -> int` function. `lowmem/cli.py` lists the modules.
Config keys become flags through `add_config_flags` so that every flag is a
key and every key a flag (STYLE.md, guideline 11).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable

from lowmem.config import RunConfig, all_keys, format_size, load_config

_DEFAULTS = RunConfig()


def _default_text(key: str) -> str:
    obj: Any = _DEFAULTS
    for part in key.split("."):
        obj = getattr(obj, part)
    if isinstance(obj, tuple) and obj:
        return ",".join(str(v) for v in obj)
    if obj is None or obj == "" or obj == ():
        return "none"
    return str(obj)


def flag_name(key: str) -> str:
    return "--" + key.replace(".", "-").replace("_", "-")


def add_config_flags(parser: argparse.ArgumentParser, unlisted: Iterable[str] = (), why: str = "") -> None:
    """One flag per config key, plus --preset and trailing key=value overrides. Keys in
    `unlisted` are accepted but left out of the help, which says `why` instead."""
    parser.add_argument("--preset", help="preset name (see `lowmem presets`) or path to a YAML file")
    group = parser.add_argument_group("config keys (also settable in YAML or as key=value)", why or None)
    unlisted = set(unlisted)
    for key, f in all_keys().items():
        meta = f.metadata
        text = meta["help"]
        if meta.get("choices"):
            text += f" [{'|'.join(map(str, meta['choices']))}]"
        if meta.get("unit"):
            text += f" ({meta['unit']})"
        if not meta.get("derived"):     # unset, a derived key follows others: its help says how
            text += f" (default: {_default_text(key)})"
        if key in unlisted:
            text = argparse.SUPPRESS
        kwargs: dict[str, Any] = {"dest": "cfg:" + key, "default": None, "help": text, "metavar": "V"}
        if str(f.type) == "bool":
            kwargs.update(action=argparse.BooleanOptionalAction)
            kwargs.pop("metavar")
        group.add_argument(flag_name(key), **kwargs)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, applied last (e.g. lora.rank=32 lr=1e-4)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    flags = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return load_config(args.preset, flags, args.overrides or (), note=lambda m: print(m, file=sys.stderr))


__all__ = ["add_config_flags", "config_from_args", "flag_name", "format_size"]
