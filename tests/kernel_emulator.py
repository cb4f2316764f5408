"""Run a lowmem.kernels CUDA source on the CPU: a test aid for machines without a GPU.

The kernel source is compiled by the host C++ compiler behind a small shim that
supplies what the kernels use of CUDA: `threadIdx`/`blockIdx`/`blockDim` (one OS
thread per CUDA thread, one block at a time), `__syncthreads` (a barrier), shared
memory, `__shfl_xor_sync` (through a block-wide buffer; our kernels call it with
the whole block), the `_rn` arithmetic intrinsics (IEEE single precision, no
contraction) and `fmaf` (a true fused multiply-add, as on the GPU). It is not
CUDA: warps do not run in lockstep, there is no memory model beyond the barrier,
and nothing is fast. What it checks is the kernels' arithmetic, indexing, grid
and shared-memory layout, and the launch arguments lowmem's Python side packs.

`Emulator(bundle(module)).launch` has the signature of lowmem.kernels.runtime.launch,
so a test can substitute it (and `check_tensor_on_cpu` for the module's
`check_tensor`) and run the real dispatch code on CPU tensors.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

from lowmem.kernels import runtime

SHIM = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>
#define LOWMEM_EMULATE 1
struct dim3 { unsigned x = 1, y = 1, z = 1; };
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static float* emu_dynamic_smem;
static std::barrier<>* emu_barrier;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static
using std::max;
using std::min;
inline void __syncthreads() { emu_barrier->arrive_and_wait(); }
static float emu_shuffle[1024];
inline float __shfl_xor_sync(unsigned, float x, int lane_mask) {
    const unsigned t = threadIdx.x;
    emu_shuffle[t] = x;
    __syncthreads();
    const float y = emu_shuffle[t ^ (unsigned)lane_mask];
    __syncthreads();
    return y;
}
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float f16_to_f32(unsigned short h) { _Float16 x; std::memcpy(&x, &h, 2); return (float)x; }
inline unsigned short f32_to_f16(float v) { _Float16 x = (_Float16)v; unsigned short h; std::memcpy(&h, &x, 2); return h; }
"""

HARNESS = r"""
template <typename... A, std::size_t... I>
static void emu_call(void (*k)(A...), void** p, std::index_sequence<I...>) {
    k(*static_cast<std::remove_reference_t<A>*>(p[I])...);
}
template <typename... A>
static void emu_call(void (*k)(A...), void** p) { emu_call(k, p, std::index_sequence_for<A...>{}); }

extern "C" int emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                          unsigned long shared_bytes, void** params) {
    void (*invoke)(void**) = nullptr;
%(table)s
    if (!invoke) return 1;
    blockDim = dim3{bx, 1, 1};
    gridDim = dim3{gx, gy, gz};
    std::vector<float> dynamic(shared_bytes / sizeof(float) + 1);
    emu_dynamic_smem = dynamic.data();
    for (unsigned z = 0; z < gz; ++z)
    for (unsigned y = 0; y < gy; ++y)
    for (unsigned x = 0; x < gx; ++x) {
        std::barrier<> barrier(bx);
        emu_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < bx; ++t)
            threads.emplace_back([=] { threadIdx = dim3{t, 0, 0}; blockIdx = dim3{x, y, z}; invoke(params); });
        for (auto& th : threads) th.join();
    }
    return 0;
}
"""


def bundle(module) -> runtime.Source:
    """Every variant of a kernel module (its SOURCES, each CUDA_SOURCE plus one instantiation) in one source."""
    common = module.CUDA_SOURCE
    assert all(s.code.startswith(common) for s in module.SOURCES)
    return runtime.Source(module.__name__.rsplit(".", 1)[-1], common + "".join(s.code[len(common):] for s in module.SOURCES),
                          tuple(k for s in module.SOURCES for k in s.kernels))


def check_tensor_on_cpu(t, name, **kw):
    """runtime.check_tensor, except that CPU tensors pass: every other problem is still raised."""
    try:
        runtime.check_tensor(t, name, **kw)
    except runtime.KernelError as e:
        problems = str(e).split(f"{name} ", 1)[1].split("; ")
        if any("CUDA device" not in p and "other arguments on" not in p for p in problems):
            raise


def fixtures(module):
    """The pytest fixtures (`emulator`, `emulated`) of a test file for kernel `module`:

        emulator, emulated = fixtures(lowmem.kernels.l4q)

    `emulator` builds the module's bundle once per test file (skipped without a host
    compiler); `emulated` points the module's `launch` and `check_tensor` at it for one test.
    """
    import pytest

    @pytest.fixture(scope="module")
    def emulator(tmp_path_factory):
        if compiler() is None:
            pytest.skip("no host C++ compiler for the kernel emulator")
        return Emulator(bundle(module), tmp_path_factory.mktemp("emulator"))

    @pytest.fixture
    def emulated(emulator, monkeypatch):
        monkeypatch.setattr(module, "launch", emulator.launch)
        monkeypatch.setattr(module, "check_tensor", check_tensor_on_cpu)
        emulator.launches.clear()
        return emulator

    return emulator, emulated


def compiler() -> str | None:
    return shutil.which("g++") or shutil.which("clang++")


class Emulator:
    """`source` compiled for the host; `launch` runs its kernels on CPU tensors."""

    def __init__(self, source: runtime.Source, workdir: Path):
        cxx = compiler()
        if cxx is None:
            raise RuntimeError("no host C++ compiler (g++ or clang++) to build the kernel emulator")
        code = source.code.replace("extern __shared__ float smem[];", "float* smem = emu_dynamic_smem;")
        table = "\n".join(f'    if (!std::strcmp(name, "{k}")) invoke = [](void** p) {{ emu_call({k}, p); }};'
                          for k in source.kernels)
        path = Path(workdir) / f"{source.name}_emulated.cpp"
        path.write_text(SHIM + code + HARNESS % {"table": table})
        lib = path.with_suffix(".so")
        result = subprocess.run([cxx, "-std=c++20", "-O1", "-ffp-contract=off", "-fno-fast-math", "-shared",
                                 "-fPIC", "-pthread", "-w", str(path), "-o", str(lib)],
                                capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the kernel emulator did not build:\n{result.stderr[-4000:]}")
        self.lib = ctypes.CDLL(str(lib))
        self.lib.emu_launch.restype = ctypes.c_int
        self.launches: list[tuple[str, tuple, tuple, int, str]] = []   # kernel, grid, block, shared, source

    def launch(self, source, kernel, grid, block, args, shared_mem=0, device=None) -> None:
        """runtime.launch's contract, on CPU tensors: the same packing of arguments into pointers."""
        assert block[1] == block[2] == 1, "the emulator runs one-dimensional blocks"
        runtime.check_launch(kernel, grid, block, shared_mem)
        values, pointers = runtime.pack_arguments(args)
        assert kernel in source.kernels, f"{kernel} is launched from {source.name}, which does not define it"
        self.launches.append((kernel, tuple(grid), tuple(block), shared_mem, source.name))
        status = self.lib.emu_launch(kernel.encode(), *[ctypes.c_uint(g) for g in grid], ctypes.c_uint(block[0]),
                                     ctypes.c_ulong(shared_mem), pointers)
        if status != 0:
            raise runtime.KernelError(f"the emulator has no kernel {kernel}")
