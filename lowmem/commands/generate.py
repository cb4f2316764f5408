"""`lowmem generate`: answer a prompt with a base model, optionally with an adapter."""

from __future__ import annotations

from pathlib import Path

from lowmem.errors import ModelError


def register(sub) -> None:
    p = sub.add_parser("generate", help="answer a prompt with a model and an optional adapter",
                       description="Answer a prompt greedily. --adapter takes an adapter folder "
                                   "(PEFT layout) or a run directory (its final adapter, else the "
                                   "newest checkpoint's).")
    p.add_argument("prompt", help="the user message")
    p.add_argument("--model", default=None,
                   help="base model: local directory, .gguf, smollm2-135m, or a folder written by "
                        "`lowmem export --quantized` (default: the adapter's run model, else smollm2-135m)")
    p.add_argument("--adapter", help="adapter folder or run directory")
    p.add_argument("--system", default=None, help="system message (default: none)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="answer length cap (default: 128)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.set_defaults(func=run)


def find_adapter(path: Path) -> tuple[Path, str | None]:
    """(adapter folder, base model recorded by the run or None)."""
    import yaml

    from lowmem.checkpoint import find_resumable
    from lowmem.lora import ADAPTER_CONFIG, read_adapter_config

    if (path / ADAPTER_CONFIG).is_file():
        return path, read_adapter_config(path).get("base_model_name_or_path")
    if (path / "config.yaml").is_file():
        model = yaml.safe_load((path / "config.yaml").read_text()).get("model")
        if (path / "adapter" / ADAPTER_CONFIG).is_file():
            return path / "adapter", model
        folder = find_resumable(path) / "adapter"
        if (folder / ADAPTER_CONFIG).is_file():
            return folder, model
    raise ModelError(f"{path}: no adapter here (expected {ADAPTER_CONFIG}, or a run directory with one)")


def run(args) -> int:
    from lowmem.evaluate import generate
    from lowmem.lora import load_adapter
    from lowmem.model import load_model
    from lowmem.planner import resolve_device

    device = resolve_device(args.device)
    adapter, base = (find_adapter(Path(args.adapter)) if args.adapter else (None, None))
    import torch

    from lowmem.quant.export import is_quantized_export, load_quantized_export

    ref = args.model or base or "smollm2-135m"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if is_quantized_export(ref):
        if adapter is not None:
            raise ModelError(f"{ref} is a quantized export with its adapter merged in; drop --adapter")
        model, tokenizer = load_quantized_export(ref, device, dtype)
        if tokenizer is None:
            raise ModelError(f"{ref} has no tokenizer files; export from a run whose model has them")
    else:
        model, tokenizer, _ = load_model(ref, device, dtype)
    if adapter is not None:
        load_adapter(model, adapter)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.prompt})
    print(generate(model, tokenizer, [messages], device, args.max_new_tokens)[0])
    return 0
