"""Loading a dense model: one tensor at a time (lowmem.model.load_streamed) vs transformers'
from_pretrained, peak RSS of each in its own process, on the embedded model.

On a GPU the streamed side's host holds one tensor on its way; from_pretrained holds the
whole model in host RAM first. On the CPU (here) the streamed side holds no second copy.
Each side then runs one forward, so that every weight is resident (an fp32 checkpoint's
tensors may stay unread pages of the mapped file until used). Both sides' tensors are
compared.

    python benchmarks/load_stream.py                  # bf16
    python benchmarks/load_stream.py --dtype float32
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

SIDE = """
import json, resource, sys, torch
from lowmem.model import load_streamed, resolve_model_dir
side, dtype, out = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3]
folder = resolve_model_dir("smollm2-135m", log=lambda *_: None)
if side == "from_pretrained":
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype, local_files_only=True,
                                                 attn_implementation="sdpa")
else:
    model = load_streamed(folder, "cpu", dtype, log=lambda *_: None)
# One forward touches every weight: from_pretrained may leave an fp32 checkpoint's tensors as
# unread pages of the mapped file, resident only once used.
with torch.no_grad():
    model(torch.ones(1, 8, dtype=torch.long))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
torch.save(model.state_dict(), out)
print(json.dumps({"peak_rss": peak}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    args = parser.parse_args()
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        peaks, states = {}, {}
        for side in ("streamed", "from_pretrained"):
            out = f"{tmp}/{side}.pt"
            result = subprocess.run([sys.executable, "-c", SIDE, side, args.dtype, out],
                                    capture_output=True, text=True, check=True)
            peaks[side] = json.loads(result.stdout.strip().splitlines()[-1])["peak_rss"]
            states[side] = torch.load(out)
    a, b = states["streamed"], states["from_pretrained"]
    same = sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    print(f"embedded SmolLM2-135M in {args.dtype}, peak RSS of loading and one forward:")
    for side, peak in peaks.items():
        print(f"  {side:16} {peak / 2**20:8.1f} MiB")
    print(f"  from_pretrained / streamed: {peaks['from_pretrained'] / peaks['streamed']:.2f}x; "
          f"identical tensors: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
