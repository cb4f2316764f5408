"""Compile CUDA C++ with NVRTC, cache it on disk, launch it on PyTorch's current stream.

Built on cuda-python's low-level bindings (`cuda.bindings.nvrtc` and
`cuda.bindings.driver`), which have kept one API since cuda-python 12.6:

* `compile_source(source, arch, fmt)` runs NVRTC. It needs the NVRTC library
  only, not a GPU: the `nvidia-cuda-nvrtc` wheel provides it on any machine,
  which is how CI compiles every kernel to PTX for sm_80 and sm_90.
* Compiled code is cached under `<cache>/kernels/` (lowmem's cache folder,
  `lowmem.model.cache_dir`), one file per source hash, compile options, architecture
  and NVRTC version; a later process loads the file instead of compiling.
* `launch(...)` loads the module once per device into the device's primary
  context (the one PyTorch uses), checks nothing itself (callers check their
  tensors with `check_tensor`), and enqueues the kernel on
  `torch.cuda.current_stream()`, so it orders with PyTorch's own work.

Two kinds of failure, kept apart on purpose:

* `KernelUnavailable`: this machine cannot run kernels (no cuda-python, no
  NVRTC library, no driver, a driver older than NVRTC's output). Callers then
  run the PyTorch reference and `warn_fallback` says so once.
* `KernelError`: our own mistake (a kernel that does not compile, a tensor of
  the wrong shape or dtype). It is raised, never papered over.

`LOWMEM_KERNELS=0` turns kernels off (the references run, without a warning).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, TypeVar

import torch

T = TypeVar("T")

#: NVRTC options every kernel is compiled with. No --use_fast_math: the
#: references are IEEE fp32 and the kernels must round the same way.
BASE_OPTIONS = ("-std=c++17", "--restrict")


class KernelError(RuntimeError):
    """A kernel failed to compile or was called with arguments it cannot take."""


class KernelUnavailable(KernelError):
    """This machine cannot compile or run CUDA kernels; the reason says why and what to install."""


class KernelFallbackWarning(UserWarning):
    """A CUDA tensor went through a PyTorch reference because its kernel could not run."""


@dataclass(frozen=True)
class Source:
    """CUDA C++ source and the `extern "C"` kernels it defines."""

    name: str                               # a file-name-safe label, e.g. "l4q"
    code: str
    kernels: tuple[str, ...]
    options: tuple[str, ...] = field(default=BASE_OPTIONS)

    def digest(self) -> str:
        """Hash of the code and options: part of every cache key."""
        h = hashlib.sha256(self.code.encode())
        h.update("\0".join(self.options).encode())
        return h.hexdigest()[:16]


# ---------------------------------------------------------------- element types shared by the kernels

#: The dtypes kernels read and write, by the short name used in kernel names.
DTYPE_NAMES = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16"}
#: The CUDA struct (below) that loads and stores each dtype as float.
DTYPE_STRUCTS = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}

#: CUDA C++ that every kernel source starts with: `X::T` is the storage type, `X::load(p, i)`
#: reads element i as float, `X::store(p, i, v)` rounds v to nearest even and writes it.
#: Header-free on purpose: NVRTC needs no CUDA toolkit include directory.
DTYPE_CODE = r"""
typedef unsigned short u16;
struct F32 {
    typedef float T;
    static __device__ __forceinline__ float load(const T* p, long long i) { return p[i]; }
    static __device__ __forceinline__ void store(T* p, long long i, float v) { p[i] = v; }
};
struct BF16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const T* p, long long i) {
        return __uint_as_float(((unsigned)p[i]) << 16);
    }
    static __device__ __forceinline__ void store(T* p, long long i, float v) {
        unsigned u = __float_as_uint(v);
        if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = 0x7fc0; return; }   // NaN, as PyTorch writes it
        u += 0x7fffu + ((u >> 16) & 1u);                                     // round to nearest even
        p[i] = (u16)(u >> 16);
    }
};
#ifndef LOWMEM_EMULATE   // the host emulator of tests/kernel_emulator.py brings its own conversions
__device__ __forceinline__ float f16_to_f32(u16 h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ u16 f32_to_f16(float v) { u16 h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v)); return h; }
#endif
struct F16 {
    typedef u16 T;
    static __device__ __forceinline__ float load(const T* p, long long i) { return f16_to_f32(p[i]); }
    static __device__ __forceinline__ void store(T* p, long long i, float v) { p[i] = f32_to_f16(v); }
};

"""


# ---------------------------------------------------------------- cuda-python, loaded lazily

def _bindings(module: str):
    try:
        if module == "nvrtc":
            from cuda.bindings import nvrtc as mod
        else:
            from cuda.bindings import driver as mod
    except ImportError as e:
        raise KernelUnavailable(f"cuda-python is not installed ({e}); `pip install 'cuda-python>=13'`") from e
    return mod


def _error_name(result) -> str:
    return getattr(result, "name", str(result))


@functools.lru_cache(maxsize=1)
def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library cuda-python found; KernelUnavailable without one."""
    nvrtc = _bindings("nvrtc")
    try:
        err, major, minor = nvrtc.nvrtcVersion()
    except Exception as e:  # cuda.pathfinder raises its own error types when the library is absent
        raise KernelUnavailable(f"no NVRTC library found ({e}); `pip install nvidia-cuda-nvrtc` "
                                "or install the CUDA toolkit") from e
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelUnavailable(f"NVRTC did not start: {_error_name(err)}")
    return int(major), int(minor)


def _check_driver(result, what: str):
    """Unpack a cuda.bindings.driver return tuple, raising on a CUresult other than success."""
    driver = _bindings("driver")
    err, *values = result
    if err != driver.CUresult.CUDA_SUCCESS:
        _, text = driver.cuGetErrorString(err)
        text = text.decode() if isinstance(text, bytes) else str(text)
        raise KernelError(f"{what} failed: {_error_name(err)} ({text})")
    return values[0] if len(values) == 1 else tuple(values)


@functools.lru_cache(maxsize=1)
def supported_archs() -> tuple[int, ...]:
    """The compute capabilities (as 75, 80, 90, ...) this NVRTC can compile for."""
    nvrtc = _bindings("nvrtc")
    nvrtc_version()                       # KernelUnavailable without the library
    err, archs = nvrtc.nvrtcGetSupportedArchs()
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelUnavailable(f"NVRTC did not list its architectures: {_error_name(err)}")
    return tuple(int(a) for a in archs)


@functools.lru_cache(maxsize=1)
def driver_version() -> tuple[int, int]:
    """(major, minor) of the CUDA version the installed driver supports; KernelUnavailable without one."""
    driver = _bindings("driver")
    try:
        _check_driver(driver.cuInit(0), "cuInit")
        version = _check_driver(driver.cuDriverGetVersion(), "cuDriverGetVersion")
    except Exception as e:   # no libcuda (cuda.pathfinder's error) or a failing cuInit
        raise KernelUnavailable(f"no usable NVIDIA driver ({e})") from e
    return version // 1000, (version % 1000) // 10


# ---------------------------------------------------------------- compiling

def cache_dir() -> Path:
    from lowmem.model import cache_dir as lowmem_cache

    return lowmem_cache() / "kernels"


def _nvrtc_log(nvrtc, prog) -> str:
    _, size = nvrtc.nvrtcGetProgramLogSize(prog)
    log = b" " * size
    nvrtc.nvrtcGetProgramLog(prog, log)
    return log.rstrip(b"\0 ").decode(errors="replace")


def _arch_option(arch: str, fmt: str) -> str:
    if not (arch.startswith("sm_") and arch[3:].rstrip("a").isdigit()):
        raise KernelError(f"architecture must look like sm_90, got {arch!r}")
    if fmt == "ptx":
        return "--gpu-architecture=compute_" + arch[3:]
    if fmt == "cubin":
        return "--gpu-architecture=" + arch
    raise KernelError(f"format must be 'ptx' or 'cubin', got {fmt!r}")


def compile_source(source: Source, arch: str, fmt: str = "cubin", *, cache: bool = True) -> bytes:
    """NVRTC output for `arch` ("sm_90"): PTX text or a cubin, from the disk cache when present.

    Raises KernelUnavailable without NVRTC, KernelError with NVRTC's log when the
    source does not compile.
    """
    option = _arch_option(arch, fmt)
    major, minor = nvrtc_version()
    path = cache_dir() / f"{source.name}-{arch}-nvrtc{major}.{minor}-{source.digest()}.{fmt}"
    if cache and path.is_file():
        return path.read_bytes()
    nvrtc = _bindings("nvrtc")
    err, prog = nvrtc.nvrtcCreateProgram(source.code.encode(), f"{source.name}.cu".encode(), 0, [], [])
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise KernelError(f"NVRTC could not create program {source.name}: {_error_name(err)}")
    try:
        options = [o.encode() for o in (*source.options, option)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(options), options)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelError(f"NVRTC could not compile {source.name} for {arch}:\n{_nvrtc_log(nvrtc, prog)}")
        get_size, get = ((nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX) if fmt == "ptx"
                         else (nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN))
        _, size = get_size(prog)
        code = b" " * size
        (err,) = get(prog, code)
        if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise KernelError(f"NVRTC produced no {fmt} for {source.name}: {_error_name(err)}")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    if cache:
        write_atomic(path, code)
    return code


def write_atomic(path: Path, data: bytes) -> None:
    """Write via a private temporary file and rename, so a reader never sees half a file.

    For caches: an unwritable cache directory costs a recompile (or a
    remeasurement) next time, never the run.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError:
        pass


# ---------------------------------------------------------------- loading and launching

_modules: dict[tuple[str, int], dict[str, object]] = {}
_contexts: dict[int, object] = {}      # device index -> the primary context the modules live in
_lock = threading.Lock()


def device_arch(index: int) -> str:
    """"sm_90" for a device of compute capability 9.0."""
    from lowmem.kernels.device import device_info

    return device_info(index).arch


def _functions(source: Source, index: int) -> dict[str, object]:
    """The kernels of `source`, loaded into device `index`'s primary context (once per process)."""
    key = (source.digest(), index)
    with _lock:
        if key in _modules:
            return _modules[key]
        driver = _bindings("driver")
        arch = device_arch(index)
        image = compile_source(source, arch, "cubin")
        torch.cuda.init()
        with torch.cuda.device(index):
            # PyTorch made the primary context current for this thread; load into it.
            dev = _check_driver(driver.cuDeviceGet(index), "cuDeviceGet")
            ctx = _check_driver(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
            _check_driver(driver.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
            buffer = ctypes.create_string_buffer(image)   # NUL-terminated: PTX needs it, cubins ignore it
            try:
                module = _check_driver(driver.cuModuleLoadData(ctypes.addressof(buffer)), "cuModuleLoadData")
            except KernelError as e:
                nv, drv = nvrtc_version(), driver_version()
                raise KernelUnavailable(
                    f"the driver (CUDA {drv[0]}.{drv[1]}) could not load {source.name} compiled by "
                    f"NVRTC {nv[0]}.{nv[1]} for {arch}: {e}. Install the nvidia-cuda-nvrtc and "
                    f"cuda-python releases of the driver's major version ({drv[0]}.x)") from e
            functions = {name: _check_driver(driver.cuModuleGetFunction(module, name.encode()),
                                             f"cuModuleGetFunction({name})")
                         for name in source.kernels}
        _contexts[index] = ctx
        _modules[key] = functions
        return functions


def _ctype(value) -> ctypes._SimpleCData:
    if isinstance(value, torch.Tensor):
        return ctypes.c_void_p(value.data_ptr())
    if value is None:
        return ctypes.c_void_p(0)
    if isinstance(value, bool):
        return ctypes.c_int(int(value))
    if isinstance(value, int):
        if not -2**31 <= value < 2**31:
            raise KernelError(f"integer kernel argument {value} does not fit a 32-bit int")
        return ctypes.c_int(value)
    if isinstance(value, float):
        return ctypes.c_float(value)
    raise KernelError(f"cannot pass {type(value).__name__} to a kernel: tensors, None, int or float only")


def check_launch(kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int], shared_mem: int) -> None:
    """Raise KernelError for a launch configuration outside CUDA's limits (48 KiB of dynamic shared
    memory without opting in, which no kernel here does)."""
    if len(grid) != 3 or min(grid) < 1 or grid[0] >= 2**31 or max(grid[1:]) > 65535:
        raise KernelError(f"{kernel}: grid {tuple(grid)} is outside CUDA's limits")
    if len(block) != 3 or min(block) < 1 or block[0] * block[1] * block[2] > 1024:
        raise KernelError(f"{kernel}: block {tuple(block)} is outside CUDA's limits")
    if not 0 <= shared_mem <= 48 * 1024:
        raise KernelError(f"{kernel}: {shared_mem} bytes of dynamic shared memory; at most 48 KiB")


def pack_arguments(args: Iterable) -> tuple[list, ctypes.Array]:
    """The kernel-parameter array cuLaunchKernel reads: one pointer per argument value.

    Returns the values too: they must stay alive until the launch call returns.
    """
    values = [_ctype(a) for a in args]
    return values, (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])


def launch(source: Source, kernel: str, grid: tuple[int, int, int], block: tuple[int, int, int],
           args: Iterable, shared_mem: int = 0, device: torch.device | None = None) -> None:
    """Enqueue `kernel` of `source` on PyTorch's current stream of `device`.

    `args` map to the kernel's parameters in order: a tensor becomes its data
    pointer, None a null pointer, an int a 32-bit int, a float a 32-bit float.
    The kernel's C signature must agree; `check_tensor` the tensors first.
    """
    driver = _bindings("driver")
    device = torch.device(device) if device is not None else torch.device("cuda", torch.cuda.current_device())
    index = device.index if device.index is not None else torch.cuda.current_device()
    check_launch(kernel, grid, block, shared_mem)
    function = _functions(source, index)[kernel]
    values, pointers = pack_arguments(args)
    with torch.cuda.device(index):
        # Backward kernels run on autograd's own thread: make the context the module lives in
        # current there too, rather than rely on an earlier PyTorch call having done it.
        _check_driver(driver.cuCtxSetCurrent(_contexts[index]), "cuCtxSetCurrent")
        stream = driver.CUstream(torch.cuda.current_stream(index).cuda_stream)
        # cuLaunchKernel copies the argument values before it returns.
        _check_driver(driver.cuLaunchKernel(function, *grid, *block, shared_mem, stream,
                                            ctypes.addressof(pointers), 0), f"launching {kernel}")


# ---------------------------------------------------------------- argument checks

def check_tensor(t: torch.Tensor | None, name: str, *, dtypes: Iterable[torch.dtype],
                 shape: tuple[int, ...] | None = None, device: torch.device | None = None,
                 kernel: str = "kernel", optional: bool = False) -> None:
    """Raise KernelError unless `t` is a contiguous CUDA tensor of one of `dtypes`, `shape`, on `device`.

    A kernel reads raw pointers: a wrong shape or a strided view would read or
    write the wrong memory, so every tensor argument is checked before a launch.
    """
    if t is None:
        if optional:
            return
        raise KernelError(f"{kernel}: {name} is required")
    dtypes = tuple(dtypes)
    problems = []
    if t.device.type != "cuda":
        problems.append(f"is on {t.device}, not a CUDA device")
    elif device is not None and t.device != device:
        problems.append(f"is on {t.device}, the other arguments on {device}")
    if t.dtype not in dtypes:
        problems.append(f"has dtype {t.dtype}, expected {' or '.join(str(d) for d in dtypes)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        problems.append(f"has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if not t.is_contiguous():
        problems.append("is not contiguous")
    if problems:
        raise KernelError(f"{kernel}: {name} " + "; ".join(problems))


# ---------------------------------------------------------------- the fallback rule

_warned: set[str] = set()
_disabled: dict[int, str] = {}


def kernels_enabled() -> bool:
    """False when LOWMEM_KERNELS=0 (or off/false/no) asks for the references everywhere."""
    return os.environ.get("LOWMEM_KERNELS", "1").strip().lower() not in ("0", "off", "false", "no")


def warn_fallback(what: str, reason: str) -> None:
    """Warn once per process and `what` that a CUDA path runs its PyTorch reference."""
    if what in _warned:
        return
    _warned.add(what)
    warnings.warn(f"lowmem.kernels: {what} runs its PyTorch reference on the GPU: {reason}",
                  KernelFallbackWarning, stacklevel=3)


@functools.lru_cache(maxsize=None)
def unavailable_reason(index: int) -> str | None:
    """None when kernels can run on CUDA device `index`, else why not (checked once)."""
    try:
        nv = nvrtc_version()
        drv = driver_version()
        arch = device_arch(index)
        archs = supported_archs()
    except KernelError as e:      # KernelUnavailable included
        return str(e)
    if int(arch[3:].rstrip("a")) not in archs:
        return (f"NVRTC {nv[0]}.{nv[1]} cannot compile for this GPU ({arch}); it targets sm_"
                f"{min(archs)} to sm_{max(archs)}. An older nvidia-cuda-nvrtc and cuda-python (12.x) "
                f"still target it")
    if drv[0] < nv[0]:
        return (f"the driver supports CUDA {drv[0]}.{drv[1]}, older than the code NVRTC {nv[0]}.{nv[1]} "
                f"produces; install the nvidia-cuda-nvrtc and cuda-python releases of CUDA {drv[0]}.x")
    return None


def planning_reason(index: int = 0) -> str | None:
    """Why a CUDA run on device `index` of this machine would not get its kernels, or None: what
    the planner assumes (runs train on device 0) and what a run reports in its `start` event.

    "LOWMEM_KERNELS=0" when they are turned off; `unavailable_reason(index)` when this
    machine has a CUDA device. A machine without a CUDA device is planning for
    another one, which is assumed to have a driver for lowmem's NVRTC. Creates no
    CUDA context.
    """
    if not kernels_enabled():
        return "LOWMEM_KERNELS=0"
    if not torch.cuda.is_available():
        return None
    return unavailable_reason(index)


def disable(index: int, reason: str) -> None:
    """Stop using kernels on device `index` for the rest of the process (a launch found it unable)."""
    _disabled[index] = reason


def _device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def use_kernel(t: torch.Tensor, what: str) -> bool:
    """Whether `what` should run its kernel for tensors like `t`.

    False on the CPU and when LOWMEM_KERNELS=0; False with one warning when `t`
    is on a GPU that cannot run kernels (see `unavailable_reason`).
    """
    if t.device.type != "cuda" or not kernels_enabled():
        return False
    index = _device_index(t)
    reason = _disabled.get(index) or unavailable_reason(index)
    if reason is not None:
        warn_fallback(what, reason)
        return False
    return True


def dispatch(what: str, t: torch.Tensor, kernel: Callable[[], T], reference: Callable[[], T],
             unsupported: str | None = None) -> T:
    """`kernel()` where kernels run for tensors like `t`, else `reference()`: the fallback rule.

    `unsupported` is why this call is outside what the kernel covers (a shape or
    dtype), or None. A launch that finds the machine unable (KernelUnavailable)
    turns kernels off for the device; every fallback on a GPU warns once per `what`.
    """
    if use_kernel(t, what):
        if unsupported is not None:
            warn_fallback(what, unsupported)
        else:
            try:
                return kernel()
            except KernelUnavailable as e:
                disable(_device_index(t), str(e))
                warn_fallback(what, str(e))
    return reference()
