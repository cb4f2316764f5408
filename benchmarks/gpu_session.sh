#!/usr/bin/env bash
# What lowmem still has to run on a GPU, one section per device-tool call (10 minutes a
# call, 30 minutes a session), most important first. From the repository root:
#
#   ../shared/gpu/wheels.sh                        # here, once: bitsandbytes into .whl/
#   run(command="bash benchmarks/gpu_session.sh check tests", carry=[".whl"], timeout_s=600)
#   run(command="bash benchmarks/gpu_session.sh plans", carry=[".whl"], timeout_s=600)
#   run(command="bash benchmarks/gpu_session.sh kernels profile", carry=[".whl"], timeout_s=600)
#
# Sections:
#   check    the environment: torch, CUDA, bitsandbytes, NVRTC, why kernels would be off;
#            the kernel modules compiled for this GPU and launched once against the reference
#   tests    pytest -m gpu: the kernels against their references, loss and L4Q peaks, offloading,
#            NF4, GaLore, the memory model against max_memory_allocated per method, and the
#            pinned host memory of offloading against memory.pinned_host_bytes
#            (tests/test_kernels*.py, test_l4q, test_offload, test_quant_nf4, test_galore, test_measure,
#            test_loram, test_memory)
#   plans    the planner's peak against max_memory_allocated: each method's plan for
#            Llama-3.1-8B at --vram 24G and 16G, and the 70B QLoRAM plan at 24G, each under an
#            allocator capped at the card size (benchmarks/plan_vs_measured.py)
#   kernels  kernel vs reference time and peak memory at 8B/70B shapes (benchmarks/kernel_speed.py)
#   profile  one QLoRA and one L4Q step at 8B shapes (4 blocks) under torch.profiler, kernels
#            on then off (benchmarks/profile_step.py): which op the next kernel should be
#
# Logs go to $OUT (the device tool brings back up to 8 files); elsewhere to ./gpu-out.
# Copy the figures into BENCHMARKS.md with the command, the device and the date.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore

# The GPU image has torch, transformers and cuda-python but not bitsandbytes: install the
# carried wheels, then make `lowmem` importable from this checkout without building it
# (its subpackages live in kernels/, quant/, tui/, presets/: link them into place).
# Python must not put this checkout's own lowmem/ (which lacks those subpackages) ahead
# of the linked one: `python3 -P`, and pytest's --import-mode=append.
site=/tmp/lowmem-site
if compgen -G ".whl/*.whl" >/dev/null && ! PYTHONPATH="$site" python3 -P -c "import bitsandbytes" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" .whl/*.whl || exit 1
fi
rm -rf "$site/lowmem" && mkdir -p "$site/lowmem"     # relinked every call: the checkout may have moved
for f in lowmem/*; do ln -sfn "$PWD/$f" "$site/lowmem/$(basename "$f")"; done
for sub in kernels quant tui presets; do ln -sfn "$PWD/$sub" "$site/lowmem/$sub"; done
export PYTHONPATH="$site"
PY="python3 -P"
export LOWMEM_CACHE=${LOWMEM_CACHE:-/tmp/lowmem-cache}

check() {
    $PY - <<'PY'
import torch, platform
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
print("device", torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0),
      f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.1f} GiB")
try:
    import bitsandbytes
    print("bitsandbytes", bitsandbytes.__version__)
except Exception as e:
    print("bitsandbytes MISSING:", e)
from lowmem.kernels import runtime, device
print("kernels:", runtime.planning_reason() or "on")
print("device_info:", device.device_info(0))
print("context bytes:", device.context_bytes(0))
from lowmem.kernels import cross_entropy, l4q
logits = torch.randn(37, 3001, device="cuda", dtype=torch.bfloat16)
targets = torch.randint(0, 3001, (37,), device="cuda")
got = cross_entropy.cross_entropy_cuda(logits, targets)
want = cross_entropy.cross_entropy_reference(logits, targets)
print("cross_entropy bf16: max |kernel - reference| =", float((got - want).abs().max()))
from lowmem.galore import GaLoreAdamW8bit
from lowmem.kernels import adam8bit
qmaps = tuple(q.cuda() for q in GaLoreAdamW8bit([("w", torch.nn.Parameter(torch.zeros(1)))], rank=None).qmaps)
n = 1000
runs = []
for _ in range(2):   # kernel, reference: the same state and noise
    torch.manual_seed(0)
    state = [torch.zeros(n, dtype=torch.uint8, device="cuda") for _ in range(2)] + \
            [torch.zeros(4, device="cuda") for _ in range(2)]
    weight = torch.randn(n, device="cuda").to(torch.bfloat16)
    grad, v_noise = torch.randn(n, device="cuda"), torch.rand(n, device="cuda")
    w_noise = torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device="cuda")
    step = adam8bit.adam8bit_step_cuda if not runs else adam8bit.adam8bit_step_reference
    step(grad, weight, *state, qmaps, 1, 1e-3, (0.9, 0.999), 1e-8, 0.0, v_noise, w_noise)
    runs.append((weight.float(), state))
print("adam8bit bf16: max |kernel - reference| weight =", float((runs[0][0] - runs[1][0]).abs().max()),
      "codes differing:", int((runs[0][1][0] != runs[1][1][0]).sum() + (runs[0][1][1] != runs[1][1][1]).sum()))
PY
}

tests() {
    timeout 540 $PY -m pytest -m gpu -q -p no:cacheprovider --import-mode=append tests/test_kernels.py \
        tests/test_kernels_cross_entropy.py tests/test_kernels_adam8bit.py tests/test_l4q.py tests/test_offload.py \
        tests/test_quant_nf4.py tests/test_galore.py tests/test_measure.py tests/test_loram.py \
        tests/test_memory.py 2>&1
}

plans() {
    local json="$OUT/plans.jsonl" rc=0
    timeout 250 $PY benchmarks/plan_vs_measured.py --model llama-3.1-8b --vram 24G \
        --method qlora,lora,l4q,galore --seq-len 2048 --json "$json" || rc=1
    timeout 150 $PY benchmarks/plan_vs_measured.py --model llama-3.1-8b --vram 16G \
        --method qlora,l4q --seq-len 4096 --json "$json" || rc=1
    timeout 150 $PY benchmarks/plan_vs_measured.py --model llama-3.1-70b --vram 24G \
        --method loram --seq-len 512 --json "$json" || rc=1
    return $rc
}

kernels() {
    timeout 400 $PY benchmarks/kernel_speed.py 2>&1
}

profile() {
    local rc=0
    timeout 150 $PY benchmarks/profile_step.py --layers 4 --seq-len 2048 --compare-kernels 2>&1 || rc=1
    timeout 150 $PY benchmarks/profile_step.py --method l4q --layers 4 --seq-len 2048 --compare-kernels 2>&1 || rc=1
    return $rc
}

[ $# -gt 0 ] || set -- check
status=0
for section in "$@"; do
    case "$section" in
        check|tests|plans|kernels|profile)
            echo "== $section ($(date -u +%FT%TZ))"
            "$section" 2>&1 | tee "$OUT/$section.log"
            [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
        *) echo "unknown section '$section' (check, tests, plans, kernels, profile)" >&2; exit 2 ;;
    esac
done
exit $status
