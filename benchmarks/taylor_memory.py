"""Taylor scoring one dense block at a time: predicted vs measured peak, on the CPU.

For each case a model of a built-in model's shapes (its first --layers blocks, random
weights) is saved to a temporary folder, then scored by
lowmem.prune.taylor_scores_streamed on random calibration batches (blocks 1.. scored,
as keep_first=1 leaves block 0 whole), under lowmem.measure.LiveTensorBytes. The
measured peak of live tensors is printed beside memory.loram_taylor_stream_bytes
(device + host: both are the CPU here) and the relative error.

    python benchmarks/taylor_memory.py                       # the default cases
    python benchmarks/taylor_memory.py --case llama-3.2-1b:3:256:1:2:128
        (model:layers:seq_len:micro_batch:batches:loss_chunk)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

CASES = ("smollm2-135m:4:256:2:4:0", "smollm2-135m:4:256:2:4:128", "smollm2-135m:6:512:4:2:256",
         "qwen2.5-0.5b:3:256:2:3:128", "llama-3.2-1b:3:256:1:2:128", "llama-3.2-1b:4:512:1:2:0")


def run(case: str) -> str:
    import torch

    from lowmem import memory
    from lowmem.config import load_config
    from lowmem.measure import LiveTensorBytes, random_model, with_layers
    from lowmem.planner import make_plan
    from lowmem.prune import taylor_scores_streamed
    from lowmem.spec import builtin_spec

    model, layers, seq, mb, nb, chunk = case.split(":")
    layers, seq, mb, nb, chunk = int(layers), int(seq), int(mb), int(nb), int(chunk)
    spec = with_layers(builtin_spec(model), layers)
    config = load_config(overrides=[f"model={model}", "device=cpu", "method=loram", f"seq_len={seq}",
                                    f"micro_batch={mb}", f"loss_chunk={chunk}"])
    plan = make_plan(config, spec, pinned={"method", "seq_len", "micro_batch", "loss_chunk"}, device="cpu")
    lora = make_plan(load_config(overrides=[f"model={model}", "device=cpu", "method=lora"]), spec, device="cpu")
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(0, spec.vocab, (mb, seq), generator=g) for _ in range(nb)]
    batches = [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x} for x in ids]
    device, host = memory.loram_taylor_stream_bytes(spec, plan, nb)
    with tempfile.TemporaryDirectory() as folder:
        random_model(spec, lora, "cpu").save_pretrained(folder)
        with LiveTensorBytes("cpu") as live:
            start = time.perf_counter()
            taylor_scores_streamed(folder, batches, "cpu", torch.float32, range(1, layers), loss_chunk=chunk)
            seconds = time.perf_counter() - start
    mib = 2**20
    return (f"{model:<14}{layers:>3}{seq:>6}{mb:>4}{nb:>4}{chunk:>6}{(device + host) / mib:>12.1f}"
            f"{live.growth / mib:>11.1f}{100 * ((device + host) / live.growth - 1):>+8.1f}%  "
            f"{seconds:6.1f} s  {live.peak_op}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--case", action="append", help="model:layers:seq_len:micro_batch:batches:loss_chunk")
    args = ap.parse_args()
    print(f"{'model':<14}{'L':>3}{'seq':>6}{'mb':>4}{'nb':>4}{'chunk':>6}{'pred MiB':>12}{'meas MiB':>11}"
          f"{'error':>9}  {'time':>8}  peak op")
    for case in args.case or CASES:
        print(run(case), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
