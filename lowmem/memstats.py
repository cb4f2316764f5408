"""Memory in use right now, as the `mem` field of a step event (bytes).

On CUDA: allocated, reserved and peak allocated from PyTorch's caching
allocator; free and total of the device (cudaMemGetInfo through
lowmem.kernels.device); and `outside`, what the device holds beyond PyTorch's
reservation (the CUDA context, loaded kernels, other processes). On the CPU:
the process's resident set and its peak. A key is absent when the figure is
unknown on this device.
"""

from __future__ import annotations

import resource
import sys

import torch


def _peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def measure(device: str) -> dict[str, int]:
    import psutil

    mem = {"rss": psutil.Process().memory_info().rss, "peak_rss": _peak_rss()}
    if device == "cuda":
        mem.update(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                   peak=torch.cuda.max_memory_allocated())
        free, total = device_memory(torch.cuda.current_device())
        mem.update(device_free=free, device_total=total, outside=max(0, total - free - mem["reserved"]))
    return mem


def device_memory(index: int) -> tuple[int, int]:
    """(free, total) bytes of CUDA device `index`: cuda-python's probe, PyTorch's where it cannot run."""
    from lowmem.kernels.device import memory_info

    try:
        return memory_info(index)
    except Exception:   # a figure for the dashboard: PyTorch's own probe is as good
        return torch.cuda.mem_get_info(index)


def gpu_facts(device: str) -> dict:
    """For a run's `start` event on CUDA: the GPU's name, the measured CUDA context size, and
    whether lowmem.kernels run ("on", or why not).

    The context size (device memory outside PyTorch's allocator once cuBLAS is
    loaded) is also kept for the planner (lowmem.kernels.device). {} on the CPU;
    only `kernels` where cuda-python cannot probe.
    """
    if device != "cuda":
        return {}
    import warnings

    from lowmem.kernels import device as probes
    from lowmem.kernels import runtime

    index = torch.cuda.current_device()
    facts = {"kernels": runtime.planning_reason(index) or "on"}
    try:
        info = probes.device_info(index)
        context = probes.context_bytes(index)
    except Exception as e:   # informational: a probe that fails must not stop a training run
        warnings.warn(f"lowmem: the GPU probe failed, the run goes on without it: {e}", stacklevel=2)
        return facts
    probes.record_context_bytes(info, context)
    return {"gpu": info.describe(), "context_bytes": context, **facts}
