"""LoRAM's base, pruned while it loads vs loaded whole and then pruned: peak memory, side by side.

Each side runs in its own process (so its peak RSS is its own) on the embedded
SmolLM2-135M in fp32, magnitude criterion, the given ratio (first and last block
kept whole), NF4 for the pruned linears (QLoRAM) unless --no-nf4:

  streamed   lowmem.prune.load_pruned_model: one dense block at a time
  whole      lowmem.model.load_model, lowmem.prune.prune, quant.nf4.quantize_linears
             (what a LoRAM run does with the taylor criterion or alignment)

Both must give the same index map; the script checks it and prints peak RSS
(ru_maxrss) and load time per side, and the ratio whole / streamed.

    python benchmarks/loram_stream.py [--ratio 0.5] [--no-nf4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def run_side(side: str, ratio: float, nf4: bool) -> dict:
    import torch

    from lowmem.model import load_model, resolve_model_dir
    from lowmem.prune import load_pruned_model, prune

    model_dir = resolve_model_dir("smollm2-135m", log=lambda m: None)
    start = time.perf_counter()
    if side == "streamed":
        model = load_pruned_model(model_dir, "cpu", torch.float32, ratio, nf4_targets=TARGETS if nf4 else ())
        index_map = model.loram_index_map
    else:
        model, _, _ = load_model(str(model_dir), "cpu", torch.float32, log=lambda m: None)
        index_map = prune(model, ratio, criterion="magnitude")
        if nf4:
            from lowmem.quant.nf4 import quantize_linears

            quantize_linears(model, TARGETS, torch.float32)
    seconds = time.perf_counter() - start
    return {"side": side, "seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "index_map": index_map.to_json()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--no-nf4", action="store_true")
    ap.add_argument("--side", choices=["streamed", "whole"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args.ratio, not args.no_nf4)))
        return 0
    results = {}
    for side in ("streamed", "whole"):
        cmd = [sys.executable, __file__, "--side", side, "--ratio", str(args.ratio)] + (["--no-nf4"] if args.no_nf4 else [])
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    same = results["streamed"]["index_map"] == results["whole"]["index_map"]
    print(f"SmolLM2-135M fp32, magnitude, ratio {args.ratio:.0%}, {'NF4' if not args.no_nf4 else 'dense'} pruned "
          f"linears; same index map: {same}")
    print(f"{'side':<10}{'peak RSS MiB':>14}{'load s':>9}")
    for side in ("streamed", "whole"):
        r = results[side]
        print(f"{side:<10}{r['peak_rss'] / 2**20:>14.1f}{r['seconds']:>9.2f}")
    ratio = results["whole"]["peak_rss"] / results["streamed"]["peak_rss"]
    print(f"whole / streamed peak RSS: {ratio:.2f}x")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
