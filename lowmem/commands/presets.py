"""`lowmem presets`: list the shipped presets, or print one."""

from __future__ import annotations

from lowmem.config import find_preset, list_presets, preset_summary


def register(sub) -> None:
    p = sub.add_parser("presets", help="list presets, or show one",
                       description="List the shipped presets (a model family x budget x goal), "
                                   "or print one with `lowmem presets show NAME`.")
    p.add_argument("action", nargs="?", default="list", metavar="list|show|NAME",
                   help="list them (default), or show one: `show NAME`, or just NAME")
    p.add_argument("name", nargs="?", help="preset to show")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.action == "list" and args.name:
        from lowmem.errors import ConfigError

        raise ConfigError(f"lowmem presets list {args.name}: `list` takes no name; show one with "
                          f"`lowmem presets show {args.name}`")
    if args.action not in ("list", "show"):
        if args.name:
            from lowmem.errors import ConfigError

            raise ConfigError(f"lowmem presets {args.action} {args.name}: expected `list`, `show NAME` or NAME")
        args.action, args.name = "show", args.action      # `lowmem presets smoke` shows smoke
    if args.action == "show":
        if not args.name:
            print("usage: lowmem presets show NAME")
            return 2
        path = find_preset(args.name)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            from lowmem.errors import ConfigError

            raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8") from None
        print(text, end="")
        # Shown as it is, then checked as `train --preset` reads it: a file of one's own that
        # would be refused says why (a shipped preset that leaves the model to give is fine).
        from lowmem.config import load_config
        from lowmem.errors import ConfigError

        try:
            load_config(str(path))
        except ConfigError as e:
            if "this preset leaves" not in str(e):
                raise
        return 0
    presets = list_presets()
    width = max(map(len, presets), default=0)
    for name, path in presets.items():
        print(f"{name:<{width}}  {preset_summary(path)}")
    print("\nuse one with: lowmem train --preset NAME   (show it: lowmem presets show NAME)")
    return 0
