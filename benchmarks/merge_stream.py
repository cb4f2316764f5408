"""`lowmem export`: writing while the base streams vs from a loaded model, side by side.

A rank-16 adapter on all seven linears of the embedded SmolLM2-135M (B random, as
training leaves it nonzero) is merged into the base and written in bf16 (--output
merged), or merged, quantized round-to-nearest at 4 bits in groups of 128 and written
packed (quantized) or dequantized in bf16 (dequantized); each side in its own process
(so its peak RSS is its own):

  streamed   lowmem.quant.export.merge_streamed / quantize_streamed: one base tensor
             at a time (what `lowmem export` does)
  loaded     the whole base loaded in fp32, the adapter applied, then save_merged, or
             quantize_model and save_quantized / save_dequantized (what it did before)

Both outputs must hold the same tensors; the script checks it and prints peak RSS
(ru_maxrss) and time per side, and the ratio loaded / streamed.

    python benchmarks/merge_stream.py [--output merged|quantized|dequantized] [--rank 16]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(folder: Path, rank: int) -> None:
    import torch

    from lowmem.lora import apply_lora, lora_modules, save_adapter
    from lowmem.model import load_model

    model, _, model_dir = load_model("smollm2-135m", log=lambda m: None)
    torch.manual_seed(0)
    apply_lora(model, rank, 2.0 * rank, TARGETS)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.normal_(std=0.01)
    save_adapter(model, folder, rank=rank, alpha=2.0 * rank, targets=TARGETS, dropout=0.0, rslora=False,
                 base_model=str(model_dir))


def run_side(side: str, output: str, adapter: Path, out: Path) -> dict:
    import torch

    from lowmem.lora import load_adapter
    from lowmem.model import load_model, resolve_model_dir
    from lowmem.quant.export import (merge_streamed, quantize_model, quantize_streamed, run_updates,
                                     save_dequantized, save_merged, save_quantized)

    model_dir = resolve_model_dir("smollm2-135m", log=lambda m: None)
    quiet = {"log": lambda m: None}
    start = time.perf_counter()
    if side == "streamed" and output == "merged":
        merge_streamed(model_dir, adapter, out, dtype=torch.bfloat16, **quiet)
    elif side == "streamed":
        updates, bits, group, _ = run_updates(adapter, "lora", 4, 128)
        quantize_streamed(model_dir, updates, out, bits=bits, group=group, source=adapter,
                          dequantize=output == "dequantized", **quiet)
    else:
        model, tokenizer, _ = load_model(str(model_dir), "cpu", torch.float32, **quiet)
        load_adapter(model, adapter)
        model.eval()
        if output == "merged":
            save_merged(model, out, tokenizer=tokenizer, dtype=torch.bfloat16)
        elif output == "quantized":
            save_quantized(model, quantize_model(model, bits=4, group=128), out, tokenizer=tokenizer)
        else:
            save_dequantized(model, quantize_model(model, bits=4, group=128), out, tokenizer=tokenizer)
    return {"side": side, "seconds": time.perf_counter() - start,
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--output", choices=["merged", "quantized", "dequantized"], default="merged")
    ap.add_argument("--side", help=argparse.SUPPRESS)
    ap.add_argument("--adapter", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.output, Path(args.adapter), Path(args.out))))
        return 0
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        make_adapter(tmp / "adapter", args.rank)
        results = {}
        for side in ("streamed", "loaded"):
            proc = subprocess.run([sys.executable, __file__, "--side", side, "--output", args.output,
                                   "--adapter", str(tmp / "adapter"), "--out", str(tmp / side)],
                                  capture_output=True, text=True, check=True)
            results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        a, b = tensors(tmp / "streamed"), tensors(tmp / "loaded")
        same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    mib = 2**20
    what = {"merged": "merged and written in bf16", "quantized": "merged, 4-bit groups of 128, packed",
            "dequantized": "merged, 4-bit groups of 128, dequantized to bf16"}[args.output]
    print(f"SmolLM2-135M, rank-{args.rank} adapter on {len(TARGETS)} linears, {what}")
    for side, r in results.items():
        print(f"  {side:<9} peak RSS {r['peak_rss'] / mib:8.1f} MiB   {r['seconds']:6.2f} s")
    ratio = results["loaded"]["peak_rss"] / results["streamed"]["peak_rss"]
    print(f"  loaded / streamed peak RSS: {ratio:.2f}x; identical tensors: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
