"""Memory in use right now, as the `mem` field of a step event (bytes).

On CUDA: allocated, reserved and peak allocated from PyTorch's caching
allocator, and free/total of the device. On the CPU: the process's resident
set and its peak. A key is absent when the figure is unknown on this device.
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
        free, total = torch.cuda.mem_get_info()
        mem.update(device_free=free, device_total=total)
    return mem
