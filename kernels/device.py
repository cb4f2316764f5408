"""Device probes through cuda-python: name, compute capability, free and total memory.

`device_info` asks the driver (`cuDeviceGetName`, `cuDeviceGetAttribute`,
`cuDeviceTotalMem`) and creates no CUDA context, so a process that only looks
(the dashboard, `lowmem plan`) costs the GPU nothing. `memory_info` is
`cudaMemGetInfo`, which needs a context: call it from a process that uses the
GPU anyway (the trainer), or accept the few hundred MiB a context takes.

`context_bytes` is the planner's overhead measurement: device memory in use
outside PyTorch's caching allocator (the CUDA context and the kernels loaded
into it, plus anything other processes hold on the same GPU).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lowmem.kernels.runtime import (
    KernelError, KernelUnavailable, _bindings, _check_driver, driver_version, write_atomic,
)


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    capability: tuple[int, int]
    total: int                       # bytes

    @property
    def arch(self) -> str:
        return f"sm_{self.capability[0]}{self.capability[1]}"

    def describe(self) -> str:
        return f"{self.name} ({self.arch}, {self.total / 2**30:.1f} GiB)"


def device_count() -> int:
    """CUDA devices the driver sees; 0 when there is no driver or no cuda-python."""
    try:
        driver_version()
        return int(_check_driver(_bindings("driver").cuDeviceGetCount(), "cuDeviceGetCount"))
    except KernelError:
        return 0


@functools.lru_cache(maxsize=None)
def device_info(index: int = 0) -> DeviceInfo:
    """Name, compute capability and total memory of device `index`, without creating a context."""
    driver_version()                                   # cuInit, or KernelUnavailable
    driver = _bindings("driver")
    count = int(_check_driver(driver.cuDeviceGetCount(), "cuDeviceGetCount"))
    if not 0 <= index < count:
        raise KernelUnavailable(f"no CUDA device {index}: the driver sees {count}")
    dev = _check_driver(driver.cuDeviceGet(index), "cuDeviceGet")
    raw = _check_driver(driver.cuDeviceGetName(256, dev), "cuDeviceGetName")
    name = raw.split(b"\0", 1)[0].decode(errors="replace").strip() if isinstance(raw, bytes) else str(raw)
    attr = driver.CUdevice_attribute
    major = _check_driver(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, dev),
                          "cuDeviceGetAttribute")
    minor = _check_driver(driver.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, dev),
                          "cuDeviceGetAttribute")
    total = _check_driver(driver.cuDeviceTotalMem(dev), "cuDeviceTotalMem")
    return DeviceInfo(index, name, (int(major), int(minor)), int(total))


def memory_info(index: int = 0) -> tuple[int, int]:
    """(free, total) bytes of device `index` from cudaMemGetInfo.

    Creates the device's primary context if this process has none (PyTorch
    shares it). The thread's current context is restored afterwards through the
    driver: cuda-python's runtime keeps its own idea of the current device, apart
    from PyTorch's, so restoring *its* previous device could leave a context
    current that PyTorch does not expect on a machine with several GPUs.
    """
    driver_version()
    try:
        from cuda.bindings import driver, runtime
    except ImportError as e:
        raise KernelUnavailable(f"cuda-python is not installed ({e})") from e

    def ok(result, what):
        err, *values = result
        if err != runtime.cudaError_t.cudaSuccess:
            raise KernelError(f"{what} failed: {getattr(err, 'name', err)}")
        return values[0] if len(values) == 1 else tuple(values)

    current = _check_driver(driver.cuCtxGetCurrent(), "cuCtxGetCurrent")
    ok(runtime.cudaSetDevice(index), "cudaSetDevice")
    try:
        free, total = ok(runtime.cudaMemGetInfo(), "cudaMemGetInfo")
    finally:
        driver.cuCtxSetCurrent(current)
    return int(free), int(total)


def load_cublas(index: int = 0) -> None:
    """Load what any training step loads outside PyTorch's allocator before it is measured:
    cuBLAS and its kernels, through a small bf16 matmul, forward on this thread and
    backward on autograd's thread for the device (each has its own cuBLAS handle)."""
    with torch.cuda.device(index):
        a = torch.ones(64, 64, device=f"cuda:{index}", dtype=torch.bfloat16, requires_grad=True)
        (a @ a).sum().backward()
        torch.cuda.synchronize(index)


def context_bytes(index: int = 0, warm_up: bool = True) -> int:
    """Device memory in use outside PyTorch's allocator: total − free − reserved.

    With `warm_up`, cuBLAS and its kernels are loaded first (load_cublas), as they are in
    any training step. What other processes hold on the
    same GPU is included: on a shared GPU it is part of what a run cannot use.
    """
    if warm_up:
        load_cublas(index)
    torch.cuda.synchronize(index)
    free, total = memory_info(index)
    return max(0, total - free - torch.cuda.memory_reserved(index))


# ---------------------------------------------------------------- measured context sizes

def _measurements_file() -> Path:
    from lowmem.model import cache_dir

    return cache_dir() / "devices.json"


def _device_key(info: DeviceInfo) -> str:
    return f"{info.name} | torch {torch.__version__}"


def recorded_context_bytes(info: DeviceInfo) -> int | None:
    """The context size a run measured on this device model with this torch, if one did."""
    try:
        value = json.loads(_measurements_file().read_text()).get(_device_key(info), {}).get("context_bytes")
    except (OSError, ValueError, AttributeError):
        return None
    return int(value) if isinstance(value, int) and value > 0 else None


def record_context_bytes(info: DeviceInfo, nbytes: int) -> None:
    """Keep a measured context size for the planner; a failure to write only loses the figure."""
    path = _measurements_file()
    try:
        data = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data[_device_key(info)] = {"context_bytes": int(nbytes), "capability": list(info.capability),
                               "measured": time.strftime("%Y-%m-%d")}
    write_atomic(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def local_context_bytes(index: int = 0) -> tuple[int, DeviceInfo] | None:
    """(measured context bytes, device) for this machine's device `index`, when a run recorded one.

    Creates no CUDA context: the driver names the device, the figure comes from the cache.
    """
    try:
        info = device_info(index)
    except KernelError:
        return None
    nbytes = recorded_context_bytes(info)
    return None if nbytes is None else (nbytes, info)
