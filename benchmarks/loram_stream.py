"""LoRAM's base, pruned while it loads vs loaded whole and then pruned: peak memory, side by side.

Each side runs in its own process (so its peak RSS is its own) on the embedded
SmolLM2-135M in fp32, the given criterion and ratio (first and last block kept
whole), NF4 for the pruned linears (QLoRAM) unless --no-nf4:

  streamed   magnitude: lowmem.prune.load_pruned_model, one dense block at a time;
             taylor: lowmem.prune.taylor_index_map_streamed (scores one dense block
             at a time, forward then backward), then load_pruned_model with that map
             (what a new LoRAM run does without alignment)
  whole      lowmem.model.load_model, lowmem.prune.prune, quant.nf4.quantize_linears
             (what a LoRAM run with alignment does)

Taylor scores come from --batches calibration micro-batches of --micro-batch ×
--seq-len random token ids (memory and time do not depend on which tokens).
Both sides must give the same index map; the script checks it and prints peak RSS
(ru_maxrss), time per side and the ratio whole / streamed, and, beside the
measured figures, what lowmem.memory predicts each side needs.

    python benchmarks/loram_stream.py [--criterion taylor] [--ratio 0.5] [--no-nf4]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def calibration(args) -> list:
    import torch

    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, 49152, (args.micro_batch, args.seq_len), generator=g) for _ in range(args.batches)]
    return [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]


def run_side(side: str, args) -> dict:
    import torch

    from lowmem.model import load_model, resolve_model_dir
    from lowmem.prune import load_pruned_model, prune, taylor_index_map_streamed

    model_dir = resolve_model_dir("smollm2-135m", log=lambda m: None)
    batches = calibration(args) if args.criterion == "taylor" else None
    nf4 = TARGETS if not args.no_nf4 else ()
    start = time.perf_counter()
    if side == "streamed":
        index_map = None
        if args.criterion == "taylor":
            index_map = taylor_index_map_streamed(model_dir, batches, args.ratio, device="cpu", dtype=torch.float32)
        model = load_pruned_model(model_dir, "cpu", torch.float32, args.ratio, index_map=index_map, nf4_targets=nf4)
        index_map = model.loram_index_map
    else:
        model, _, _ = load_model(str(model_dir), "cpu", torch.float32, log=lambda m: None)
        index_map = prune(model, args.ratio, criterion=args.criterion, batches=batches)
        if nf4:
            from lowmem.quant.nf4 import quantize_linears

            quantize_linears(model, nf4, torch.float32)
    seconds = time.perf_counter() - start
    return {"side": side, "seconds": seconds, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "index_map": index_map.to_json()}


def predicted(args) -> dict:
    """What lowmem.memory says each side needs, on top of the process itself."""
    import dataclasses

    from lowmem import memory
    from lowmem.config import RunConfig
    from lowmem.planner import plan_from_config
    from lowmem.spec import builtin_spec

    spec = builtin_spec("smollm2-135m")
    plan = dataclasses.replace(plan_from_config(RunConfig(method="loram", device="cpu")), prune_ratio=args.ratio,
                               micro_batch=args.micro_batch, seq_len=args.seq_len, loss_chunk=0)
    if args.criterion == "taylor":
        device, host = memory.loram_taylor_stream_bytes(spec, plan, args.batches)
        streamed = device + host
    else:
        streamed = memory.loram_stream_bytes(spec, plan)
    return {"streamed": streamed, "whole": memory.loram_prepare_bytes(spec, plan, args.criterion)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--criterion", choices=["magnitude", "taylor"], default="magnitude")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--no-nf4", action="store_true")
    ap.add_argument("--batches", type=int, default=4, help="taylor: calibration micro-batches (default 4)")
    ap.add_argument("--micro-batch", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--side", choices=["streamed", "whole"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.side:
        print(json.dumps(run_side(args.side, args)))
        return 0
    results = {}
    for side in ("streamed", "whole"):
        cmd = [sys.executable, __file__, "--side", side] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        results[side] = json.loads(out.strip().splitlines()[-1])
    same = results["streamed"]["index_map"] == results["whole"]["index_map"]
    calib = (f", {args.batches} calibration batches of {args.micro_batch}x{args.seq_len} tokens"
             if args.criterion == "taylor" else "")
    print(f"SmolLM2-135M fp32, {args.criterion}{calib}, ratio {args.ratio:.0%}, "
          f"{'NF4' if not args.no_nf4 else 'dense'} pruned linears; same index map: {same}")
    need = predicted(args)
    print(f"{'side':<10}{'peak RSS MiB':>14}{'time s':>9}{'predicted MiB':>15}")
    for side in ("streamed", "whole"):
        r = results[side]
        print(f"{side:<10}{r['peak_rss'] / 2**20:>14.1f}{r['seconds']:>9.2f}{need[side] / 2**20:>15.1f}")
    ratio = results["whole"]["peak_rss"] / results["streamed"]["peak_rss"]
    print(f"whole / streamed peak RSS: {ratio:.2f}x  (predicted: the preparation's own bytes, "
          f"without the process's baseline or the pruned model)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
