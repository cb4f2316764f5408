"""GaLore's subspace refresh on the CPU: what torch.linalg.svd of one gradient grows the process
by, beside what the plan counts for it (lowmem.memory.svd_refresh_bytes).

The solver's own copy and workspace are not tensors, so `lowmem plan --measure` on the CPU
(which counts tensors) does not see them; only the resident set does. Each shape runs in a
fresh process: its peak resident set after the SVD, less before (the gradient already made
and the solver set up on a small matrix), is the growth.

    python benchmarks/svd_refresh.py
    python benchmarks/svd_refresh.py --shape 14336x4096 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys

SHAPES = ("16384x256", "65536x512", "16384x1024", "8192x2048", "2048x8192", "2048x2048", "4096x4096")

CHILD = """
import resource, sys, torch
from lowmem.galore import new_projection
torch.linalg.svd(torch.randn(300, 200), full_matrices=False)
m, n = map(int, sys.argv[1].split("x"))
g = torch.randn(m, n, dtype=getattr(torch, sys.argv[2])).add_(1)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
new_projection(g, 8, g.dtype)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


def main(argv: list[str] | None = None) -> None:
    from lowmem import memory
    from lowmem.config import load_config
    from lowmem.planner import make_plan
    from lowmem.spec import builtin_spec

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", action="append", help="MxN, repeatable (default: a tall-to-wide range)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="the gradient's dtype (bf16: the plan adds its fp32 copy)")
    args = parser.parse_args(argv)
    config = load_config(overrides=["method=galore", "device=cpu"])
    plan = make_plan(config, builtin_spec("smollm2-135m"), device="cpu")
    plan = dataclasses.replace(plan, base_format="bf16" if args.dtype == "bfloat16" else "fp32")
    print(f"{'shape':>11} {'grew':>10} {'counted':>10} {'grew/counted':>12}")
    for shape in args.shape or SHAPES:
        out = subprocess.run([sys.executable, "-c", CHILD, shape, args.dtype], capture_output=True, text=True,
                             check=True).stdout
        grew = int(out.split()[-1])
        counted = memory.svd_refresh_bytes(tuple(map(int, shape.split("x"))), plan)
        print(f"{shape:>11} {grew / 2**20:>8.1f}Mi {counted / 2**20:>8.1f}Mi {grew / counted:>12.2f}", flush=True)


if __name__ == "__main__":
    main()
