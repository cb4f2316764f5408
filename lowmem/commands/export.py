"""`lowmem export`: a run's fine-tuned model as low-bit packed weights, dequantized, or merged."""

from __future__ import annotations

import signal
from pathlib import Path

from lowmem.errors import ConfigError

DTYPES = {"bf16": "bfloat16", "fp32": "float32"}


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="write a run's model: low-bit (--quantized), dequantized, or adapter merged",
        description="Export the model of a run directory. --quantized writes "
                    "the adapter merged into packed low-bit integers with per-group scales (an L4Q run "
                    "uses its learned step sizes; a LoRA/QLoRA/LoRAM run is round-to-nearest "
                    "quantized); `lowmem generate --model OUT` runs it. --dequantized writes the same "
                    "weights as a Hugging Face model folder; --merged writes the adapter merged into "
                    "the full-precision base (a LoRAM run's recovered adapter: the full model). A full or "
                    "GaLore run's own model (RUN/model) is quantized round-to-nearest by --quantized and "
                    "--dequantized. Every output is written reading the base one tensor at a time, so it "
                    "needs little memory at any size. Layouts: docs/quantization.md.")
    p.add_argument("run_dir", help="run directory (runs/NAME), or one of its folders: adapter-step-N or "
                                   "model-step-N (an earlier end a longer run kept), checkpoints/step-N")
    p.add_argument("--quantized", metavar="OUT", help="folder for the packed low-bit model (lowmem-intk)")
    p.add_argument("--dequantized", metavar="OUT", help="folder for the quantized weights as a HF model")
    p.add_argument("--merged", metavar="OUT", help="folder for the adapter merged into the base (HF model, "
                                                    "written while the base streams: little memory)")
    p.add_argument("--bits", type=int, choices=(2, 3, 4, 8), default=None,
                   help="round-to-nearest bits for a LoRA/QLoRA/LoRAM/full/GaLore run (default: 4; an L4Q run uses "
                        "its own)")
    p.add_argument("--group", type=int, default=None,
                   help="weights per scale for a LoRA/QLoRA/LoRAM/full/GaLore run (default: 128; an L4Q run uses "
                        "its own)")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16",
                   help="dtype of the unquantized tensors and of --dequantized/--merged weights (default: bf16)")
    p.set_defaults(func=run)


def run(args) -> int:
    import torch

    from lowmem.quant.export import export_run

    if not (args.quantized or args.dequantized or args.merged):
        raise ConfigError("export: nothing to write; give --quantized OUT, --dequantized OUT and/or --merged OUT")
    if (args.bits is not None or args.group is not None) and not (args.quantized or args.dequantized):
        raise ConfigError("export: --bits and --group choose the quantization of --quantized/--dequantized; "
                          "--merged writes unquantized weights")
    if args.group is not None and args.group < 1:
        raise ConfigError(f"--group: expected a positive number of weights, got {args.group}")
    as_path = lambda v: None if v is None else Path(v)  # noqa: E731
    from lowmem.quant.export import check_outputs

    check_outputs({"--quantized": as_path(args.quantized), "--dequantized": as_path(args.dequantized),
                   "--merged": as_path(args.merged)})
    # SIGTERM (kill, a scheduler) ends the export as Ctrl-C does: its half-written folder is removed.
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        export_run(Path(args.run_dir), quantized=as_path(args.quantized),
                   dequantized=as_path(args.dequantized), merged=as_path(args.merged), bits=args.bits,
                   group=args.group, dtype=getattr(torch, DTYPES[args.dtype]))
    except ValueError as e:   # e.g. --bits 3 for a run that trained 4-bit step sizes
        raise ConfigError(f"export: {e}") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0


def _terminate(signum, frame) -> None:
    raise SystemExit(128 + signum)
