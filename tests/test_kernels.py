"""lowmem.kernels: NVRTC compilation and its cache, argument checks, the fallback rule, device
probes, and the L4Q references against the straightforward math.

CPU-only here except the tests marked `gpu`, which compare each kernel with its reference
(run them with `python -m pytest -m gpu tests/test_kernels.py` on a machine with CUDA).
"""

import ctypes
import re
import warnings

import pytest
import torch

from lowmem.kernels import SOURCES, device, l4q, runtime
from lowmem.quant import intk
from tests.kernel_emulator import fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")


# ---------------------------------------------------------------- the L4Q math, written out

def _params(out_f, in_f, rank, group, bits, symmetric, dtype=torch.float64, seed=0, clip=0.8):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=g, dtype=dtype)
    a = torch.randn(rank, in_f, generator=g, dtype=torch.float32) * 0.2
    b = torch.randn(out_f, rank, generator=g, dtype=torch.float32) * 0.2
    step, offset = intk.minmax_params(w0.float() + 0.5 * (b @ a), bits, group, symmetric)
    step = step * clip                                  # a narrower range: the extremes clip
    offset = None if offset is None else offset + 0.3 * step
    gamma = 1 / torch.sqrt(intk.group_sizes(in_f, group).float() * intk.bounds(bits)[1])
    return w0, a, b, step, offset, gamma


def _by_hand(w0, a, b, step, offset, gamma, grad, scaling, bits, group):
    """Forward and backward of L4Q one group at a time, in float64, no helper from lowmem."""
    qn, qp = -2 ** (bits - 1), 2 ** (bits - 1) - 1
    w = w0.double() + scaling * (b.double() @ a.double())
    out_f, in_f = w.shape
    wq = torch.empty_like(w)
    grad_w = torch.empty_like(w)
    n_groups = -(-in_f // group)
    d_step = torch.zeros(out_f, n_groups, dtype=torch.float64)
    d_offset = torch.zeros(out_f, n_groups, dtype=torch.float64)
    for j in range(n_groups):
        cols = slice(j * group, min((j + 1) * group, in_f))
        s = step[:, j:j + 1].double()
        beta = 0.0 if offset is None else offset[:, j:j + 1].double()
        v = (w[:, cols] - beta) / s
        q = torch.clamp(torch.round(v), qn, qp)
        wq[:, cols] = q * s + beta
        inside = (v >= qn) & (v <= qp)
        g = grad[:, cols].double()
        grad_w[:, cols] = torch.where(inside, g, torch.zeros_like(g))
        d_step[:, j] = gamma[j] * (g * torch.where(inside, q - v, q)).sum(1)
        d_offset[:, j] = gamma[j] * torch.where(inside, torch.zeros_like(g), g).sum(1)
    return wq, grad_w, d_step, (None if offset is None else d_offset)


CASES = [  # out, in, rank, group, bits, symmetric: odd sizes, short last groups, one-column groups
    (13, 37, 3, 8, 4, False),
    (13, 37, 3, 8, 4, True),
    (9, 64, 5, 16, 2, False),
    (7, 50, 1, 50, 3, False),
    (5, 24, 4, 1, 8, True),
    (17, 130, 8, 128, 4, False),
]


@pytest.mark.parametrize("out_f,in_f,rank,group,bits,symmetric", CASES)
def test_forward_reference_equals_the_math_group_by_group(out_f, in_f, rank, group, bits, symmetric):
    w0, a, b, step, offset, gamma = _params(out_f, in_f, rank, group, bits, symmetric)
    expected, *_ = _by_hand(w0, a, b, step, offset, gamma, torch.zeros(out_f, in_f), 0.5, bits, group)
    got = l4q.fake_quant_reference(w0, a, b, step, offset, 0.5, bits, group, torch.float64)
    assert got.shape == (out_f, in_f) and got.dtype == torch.float64
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    # Every weight sits on its group's grid: (Ŵ − β)/s is an integer code in [Qn, Qp].
    qn, qp = intk.bounds(bits)
    codes = (intk.grouped(got, group) - (0 if offset is None else offset.double().unsqueeze(-1))) \
        / step.double().unsqueeze(-1)
    codes = intk.ungrouped(codes, in_f)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-9)
    assert codes.min() >= qn and codes.max() <= qp


def test_forward_reference_writes_the_requested_dtype_as_a_rounding_of_the_fp32_result():
    w0, a, b, step, offset, _ = _params(11, 40, 4, 16, 4, False, dtype=torch.float32)
    full = l4q.fake_quant_reference(w0, a, b, step, offset, 0.5, 4, 16, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        half = l4q.fake_quant_reference(w0, a, b, step, offset, 0.5, 4, 16, dtype)
        assert half.dtype == dtype and torch.equal(half, full.to(dtype))
    assert not torch.equal(full, l4q.merged_weight(w0, a, b, 0.5))      # it did quantize


@pytest.mark.parametrize("out_f,in_f,rank,group,bits,symmetric", CASES)
def test_backward_reference_equals_the_math_and_masks_the_gradient_in_place(out_f, in_f, rank, group, bits,
                                                                             symmetric):
    w0, a, b, step, offset, gamma = _params(out_f, in_f, rank, group, bits, symmetric)
    grad = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, grad_w, d_step, d_offset = _by_hand(w0, a, b, step, offset, gamma, grad, 0.5, bits, group)
    g = grad.clone()
    got_step, got_offset = l4q.fake_quant_backward_reference(w0, a, b, step, offset, gamma, g, 0.5, bits, group)
    torch.testing.assert_close(g, grad_w, rtol=0, atol=0)               # in place, exactly G ⊙ 1_in
    if group > 1:                                       # (one-weight groups at 0.8 of their range all clip)
        assert (g == 0).any() and (g != 0).any()                        # some weights clipped, most not
    torch.testing.assert_close(got_step, d_step, rtol=1e-12, atol=1e-12)
    if symmetric:
        assert got_offset is None
    else:
        torch.testing.assert_close(got_offset, d_offset, rtol=1e-12, atol=1e-12)


def test_backward_reference_takes_a_half_precision_gradient():
    """On a GPU without kernels the reference gets G in bf16: masking stays exact, sums are fp32."""
    w0, a, b, step, offset, gamma = _params(8, 40, 2, 16, 4, False, dtype=torch.float32)
    grad = torch.randn(8, 40, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    _, grad_w, d_step, d_offset = _by_hand(w0, a, b, step, offset, gamma, grad.float(), 0.5, 4, 16)
    g = grad.clone()
    got_step, got_offset = l4q.fake_quant_backward_reference(w0, a, b, step, offset, gamma, g, 0.5, 4, 16)
    assert g.dtype == torch.bfloat16 and torch.equal(g.double(), grad_w)
    assert got_step.dtype == torch.float32
    torch.testing.assert_close(got_step.double(), d_step, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_offset.double(), d_offset, rtol=1e-5, atol=1e-6)


def test_dispatch_runs_the_reference_on_the_cpu_without_a_warning():
    w0, a, b, step, offset, gamma = _params(6, 20, 2, 8, 4, False, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = l4q.fake_quant(w0, a, b, step, offset, 0.5, 4, 8, torch.float32)
        g1, g2 = torch.ones(6, 20), torch.ones(6, 20)
        s1, o1 = l4q.fake_quant_backward(w0, a, b, step, offset, gamma, g1, 0.5, 4, 8)
    assert torch.equal(got, l4q.fake_quant_reference(w0, a, b, step, offset, 0.5, 4, 8, torch.float32))
    s2, o2 = l4q.fake_quant_backward_reference(w0, a, b, step, offset, gamma, g2, 0.5, 4, 8)
    assert torch.equal(g1, g2) and torch.equal(s1, s2) and torch.equal(o1, o2)


def test_launch_shape_stays_inside_the_shared_memory_limit():
    for group in (1, 31, 32, 64, 128, 256, 1000, 1024):
        for rank in (1, 8, 64, 256, 1024):
            threads, chunk, shared = l4q._launch_shape(group, rank)
            assert threads % 32 == 0 and group <= threads <= 1024
            assert 1 <= chunk <= rank and shared <= 48 * 1024
    assert l4q._launch_shape(128, 16)[1] == 16        # a usual rank is staged in one chunk


# ---------------------------------------------------------------- NVRTC: every kernel compiles

@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", SOURCES, ids=lambda s: s.name)
def test_every_kernel_compiles_to_ptx(source, arch, tmp_path, monkeypatch):
    """CI has no GPU; NVRTC from the nvidia-cuda-nvrtc wheel still compiles, so a broken kernel fails here."""
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    ptx = runtime.compile_source(source, arch, "ptx", cache=False).decode()
    assert f".target {arch}" in ptx
    assert sorted(re.findall(r"\.entry\s+(\w+)", ptx)) == sorted(source.kernels)
    assert ".local" not in ptx, "a kernel spills to local memory"


def test_compiled_code_is_cached_by_source_hash_and_architecture(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    src = runtime.Source("probe", 'extern "C" __global__ void k(float* x) { x[threadIdx.x] *= 2.f; }', ("k",))
    first = runtime.compile_source(src, "sm_80", "ptx")
    files = list((tmp_path / "kernels").iterdir())
    assert len(files) == 1 and "sm_80" in files[0].name and src.digest() in files[0].name
    # A second call reads the file: NVRTC is not asked again.
    monkeypatch.setattr(runtime, "_bindings", lambda m: pytest.fail("compiled again despite the cache"))
    assert runtime.compile_source(src, "sm_80", "ptx") == first
    monkeypatch.undo()
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    runtime.compile_source(src, "sm_90", "ptx")                            # another architecture
    changed = runtime.Source("probe", src.code.replace("2.f", "3.f"), ("k",))
    assert changed.digest() != src.digest()
    runtime.compile_source(changed, "sm_80", "ptx")                        # another source
    assert len(list((tmp_path / "kernels").iterdir())) == 3
    assert not list((tmp_path / "kernels").glob(".*.tmp"))


def test_a_kernel_that_does_not_compile_raises_with_nvrtcs_log(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    bad = runtime.Source("broken", 'extern "C" __global__ void k(float* x) { x[0] = undefined_name; }', ("k",))
    with pytest.raises(runtime.KernelError, match=r"(?s)could not compile broken for sm_90.*undefined_name"):
        runtime.compile_source(bad, "sm_90", "ptx")
    assert not (tmp_path / "kernels").exists() or not list((tmp_path / "kernels").iterdir())


def test_a_bad_architecture_or_format_is_refused():
    src = SOURCES[0]
    with pytest.raises(runtime.KernelError, match="sm_90"):
        runtime.compile_source(src, "hopper", "ptx")
    with pytest.raises(runtime.KernelError, match="'ptx' or 'cubin'"):
        runtime.compile_source(src, "sm_90", "elf")


# ---------------------------------------------------------------- arguments and the fallback rule

def test_check_tensor_names_the_argument_and_every_problem():
    t = torch.zeros(4, 6, dtype=torch.float64).T
    with pytest.raises(runtime.KernelError) as e:
        runtime.check_tensor(t, "lora_A", dtypes=(torch.float32,), shape=(2, 6), kernel="l4q_forward")
    message = str(e.value)
    assert message.startswith("l4q_forward: lora_A")
    for part in ("not a CUDA device", "dtype torch.float64, expected torch.float32", "shape (6, 4), expected (2, 6)",
                 "not contiguous"):
        assert part in message
    with pytest.raises(runtime.KernelError, match="offset is required"):
        runtime.check_tensor(None, "offset", dtypes=(torch.float32,))
    runtime.check_tensor(None, "offset", dtypes=(torch.float32,), optional=True)


def test_kernel_arguments_must_be_tensors_none_or_32_bit_scalars():
    assert runtime._ctype(None).value is None
    assert runtime._ctype(7).value == 7 and runtime._ctype(0.5).value == 0.5
    with pytest.raises(runtime.KernelError, match="32-bit"):
        runtime._ctype(2**31)
    with pytest.raises(runtime.KernelError, match="str"):
        runtime._ctype("x")
    t = torch.zeros(3)
    values, pointers = runtime.pack_arguments([t, None, 5, 2.0])
    assert [ctypes.cast(p, ctypes.POINTER(type(v))).contents.value for p, v in zip(pointers, values)] \
        == [t.data_ptr(), None, 5, 2.0]


def test_launch_configurations_outside_cudas_limits_are_refused():
    runtime.check_launch("k", (2**31 - 1, 65535, 1), (1024, 1, 1), 48 * 1024)
    for grid, block, shared in [((0, 1, 1), (32, 1, 1), 0), ((1, 65536, 1), (32, 1, 1), 0),
                                ((1, 1, 1), (1025, 1, 1), 0), ((1, 1, 1), (32, 32, 2), 0),
                                ((1, 1, 1), (32, 1, 1), 48 * 1024 + 4)]:
        with pytest.raises(runtime.KernelError, match="^k: "):
            runtime.check_launch("k", grid, block, shared)


class _OnGPU:
    """Stands in for a CUDA tensor: `use_kernel` only looks at the device."""
    device = torch.device("cuda", 0)


def test_a_gpu_that_cannot_run_kernels_warns_once_and_uses_the_reference(monkeypatch):
    monkeypatch.setattr(runtime, "_warned", set())
    monkeypatch.setattr(runtime, "_disabled", {})
    monkeypatch.setattr(runtime, "unavailable_reason", lambda index: "no NVRTC library found")
    with pytest.warns(runtime.KernelFallbackWarning, match="L4Q .* reference on the GPU: no NVRTC library"):
        assert runtime.use_kernel(_OnGPU(), "L4Q fake quantization") is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert runtime.use_kernel(_OnGPU(), "L4Q fake quantization") is False     # once only
    monkeypatch.setattr(runtime, "unavailable_reason", lambda index: None)
    assert runtime.use_kernel(_OnGPU(), "L4Q fake quantization") is True
    monkeypatch.setenv("LOWMEM_KERNELS", "0")
    assert runtime.use_kernel(_OnGPU(), "L4Q fake quantization") is False         # asked for, silently
    monkeypatch.delenv("LOWMEM_KERNELS")
    runtime.disable(0, "the driver could not load l4q")
    with pytest.warns(runtime.KernelFallbackWarning, match="could not load"):
        assert runtime.use_kernel(_OnGPU(), "L4Q backward") is False
    assert runtime.use_kernel(torch.zeros(1), "L4Q fake quantization") is False   # CPU: never


def test_dispatch_falls_back_for_an_uncovered_call_and_for_a_device_a_launch_found_unable(monkeypatch):
    monkeypatch.setattr(runtime, "_warned", set())
    monkeypatch.setattr(runtime, "_disabled", {})
    monkeypatch.setattr(runtime, "unavailable_reason", lambda index: None)
    assert runtime.dispatch("op", _OnGPU(), lambda: "kernel", lambda: "reference") == "kernel"
    with pytest.warns(runtime.KernelFallbackWarning, match="op runs .*: group size 2048"):
        assert runtime.dispatch("op", _OnGPU(), lambda: "kernel", lambda: "reference",
                                "group size 2048 is above the kernel's 1024") == "reference"

    def unable():
        raise runtime.KernelUnavailable("the driver could not load l4q")
    with pytest.warns(runtime.KernelFallbackWarning, match="could not load l4q"):
        assert runtime.dispatch("other op", _OnGPU(), unable, lambda: "reference") == "reference"
    assert runtime._disabled == {0: "the driver could not load l4q"}
    assert runtime.dispatch("other op", _OnGPU(), lambda: "kernel", lambda: "reference") == "reference"

    def broken():
        raise runtime.KernelError("l4q_forward: W0 has shape (2, 3), expected (3, 2)")
    monkeypatch.setattr(runtime, "_disabled", {})
    with pytest.raises(runtime.KernelError, match="expected"):          # our bug: raised, not hidden
        runtime.dispatch("op", _OnGPU(), broken, lambda: "reference")



def test_calls_the_l4q_kernels_cannot_take_go_to_the_reference_instead_of_failing():
    """A transposed or empty weight would fail the kernel's argument checks (a KernelError,
    which stops the run); the dispatch must hand such calls to the reference instead."""
    from lowmem.kernels.l4q import _unsupported

    w0 = torch.zeros(8, 16, dtype=torch.bfloat16)
    dtypes = (torch.bfloat16, torch.bfloat16)
    assert _unsupported(w0, dtypes, 16) is None
    assert _unsupported(w0.t(), dtypes, 16) == "the weight is not contiguous"
    assert _unsupported(torch.zeros(0, 16, dtype=torch.bfloat16), dtypes, 16) == "the weight is empty"
    assert "gradient is not contiguous" in _unsupported(w0, dtypes, 16, grad=w0.t().contiguous().t())

@needs_no_gpu
def test_without_a_driver_the_reason_says_so_and_probes_find_no_device():
    reason = runtime.unavailable_reason(0)
    assert reason is not None and "driver" in reason.lower()
    assert device.device_count() == 0
    with pytest.raises(runtime.KernelUnavailable, match="driver"):
        device.device_info(0)


def test_nvrtc_reports_its_version():
    major, minor = runtime.nvrtc_version()
    assert major >= 12 and minor >= 0


def test_context_measurements_are_kept_per_device_model(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWMEM_CACHE", str(tmp_path))
    h100 = device.DeviceInfo(0, "NVIDIA H100 80GB HBM3", (9, 0), 80 * 2**30)
    a100 = device.DeviceInfo(0, "NVIDIA A100-SXM4-40GB", (8, 0), 40 * 2**30)
    assert device.recorded_context_bytes(h100) is None
    device.record_context_bytes(h100, 500 * 2**20)
    device.record_context_bytes(a100, 430 * 2**20)
    assert device.recorded_context_bytes(h100) == 500 * 2**20
    assert device.recorded_context_bytes(a100) == 430 * 2**20
    (tmp_path / "devices.json").write_text("{not json")
    assert device.recorded_context_bytes(h100) is None                     # damaged: measured again


# ---------------------------------------------------------------- the kernels themselves, emulated on the CPU

emulator, emulated = fixtures(l4q)       # the kernels' own source, compiled for the host


EMULATED = [c for c in CASES if c[3] > 1] + [(19, 300, 40, 96, 4, False)]   # rank 40: two rank chunks at g=96


@pytest.mark.parametrize("w_dtype,out_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float16, torch.float32), (torch.float32, torch.float16)])
@pytest.mark.parametrize("out_f,in_f,rank,group,bits,symmetric", EMULATED)
def test_emulated_forward_kernel_equals_the_reference(emulated, out_f, in_f, rank, group, bits, symmetric,
                                                       w_dtype, out_dtype):
    w0, a, b, step, offset, _ = _params(out_f, in_f, rank, group, bits, symmetric, torch.float32)
    w0 = w0.to(w_dtype)
    got = l4q.fake_quant_cuda(w0, a, b, step, offset, 0.5, bits, group, out_dtype)
    ref = l4q.fake_quant_reference(w0, a, b, step, offset, 0.5, bits, group, torch.float32)
    assert got.dtype == out_dtype and got.shape == (out_f, in_f)
    n, worst = _code_mismatches(got.float(), ref, step, offset, group)
    assert n <= 1 and worst <= 1                      # the tolerance the GPU tests state, at these sizes
    if n == 0:
        assert torch.equal(got, ref.to(out_dtype))    # rounding on the way out agrees bit for bit
    kernel, grid, block, shared, source = emulated.launches[-1]
    pair = f"{l4q.DTYPE_NAMES[w_dtype]}_{l4q.DTYPE_NAMES[out_dtype]}"
    assert kernel == f"l4q_forward_{pair}" and source == f"l4q_{pair}"     # only this pair's module is built
    assert grid == (-(-in_f // group), -(-out_f // l4q.ROWS), 1) and block[0] >= group


@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,rank,group,bits,symmetric", EMULATED)
def test_emulated_backward_kernel_equals_the_reference(emulated, out_f, in_f, rank, group, bits, symmetric,
                                                        g_dtype):
    w0, a, b, step, offset, gamma = _params(out_f, in_f, rank, group, bits, symmetric, torch.float32)
    grad = torch.randn(out_f, in_f, generator=torch.Generator().manual_seed(4)).to(g_dtype)
    g_ref, g_ker = grad.clone(), grad.clone()
    s_ref, o_ref = l4q.fake_quant_backward_reference(w0, a, b, step, offset, gamma, g_ref, 0.5, bits, group)
    s_ker, o_ker = l4q.fake_quant_backward_cuda(w0, a, b, step, offset, gamma, g_ker, 0.5, bits, group)
    assert torch.equal(g_ker, g_ref)                  # the STE mask, applied in place
    assert s_ker.dtype == torch.float32 and s_ker.shape == (out_f, -(-in_f // group))
    torch.testing.assert_close(s_ker, s_ref.float(), rtol=1e-5, atol=1e-6)
    if symmetric:
        assert o_ker is None
    else:
        torch.testing.assert_close(o_ker, o_ref.float(), rtol=1e-5, atol=1e-6)


def test_emulated_l4q_layer_trains_like_the_reference(emulated, monkeypatch):
    """The whole autograd function with its weight work in the kernels: same output and gradients."""
    from lowmem.quant.l4q import L4QLinear

    monkeypatch.setattr(runtime, "use_kernel", lambda t, what: True)
    torch.manual_seed(0)
    layer = L4QLinear(torch.nn.Linear(40, 12, bias=True), rank=4, alpha=8, bits=3, group=16)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.1)
    x = torch.randn(2, 5, 40, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    kernel_grads = [t.grad.clone() for t in (x, layer.lora_A, layer.lora_B, layer.quant_step, layer.quant_offset)]
    assert {k.split("_")[1] for k, *_ in emulated.launches} == {"forward", "backward"}

    monkeypatch.setattr(runtime, "use_kernel", lambda t, what: False)
    for t in (x, layer.lora_A, layer.lora_B, layer.quant_step, layer.quant_offset):
        t.grad = None
    y_ref = layer(x)
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    for got, t in zip(kernel_grads, (x, layer.lora_A, layer.lora_B, layer.quant_step, layer.quant_offset)):
        torch.testing.assert_close(got, t.grad, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- GPU: kernels against references

def _gpu_case(out_f, in_f, rank, group, bits, symmetric, w_dtype, seed=0):
    w0, a, b, step, offset, gamma = _params(out_f, in_f, rank, group, bits, symmetric, torch.float32, seed)
    move = lambda t: None if t is None else t.cuda()
    return move(w0.to(w_dtype)), move(a), move(b), move(step), move(offset), move(gamma)


GPU_CASES = CASES + [(4096, 4096, 16, 128, 4, False), (333, 1000, 64, 256, 3, False), (40, 2048, 7, 1024, 4, True)]


def _code_mismatches(kernel, reference, step, offset, group):
    """Elements whose code differs, and by how many steps at most."""
    in_f = kernel.shape[1]
    beta = 0 if offset is None else offset.unsqueeze(-1)
    codes = lambda t: intk.ungrouped((intk.grouped(t.float(), group) - beta) / step.unsqueeze(-1), in_f).round()
    diff = (codes(kernel) - codes(reference)).abs()
    return int((diff > 0).sum()), float(diff.max())


@pytest.mark.gpu
@pytest.mark.parametrize("w_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("out_f,in_f,rank,group,bits,symmetric", GPU_CASES)
def test_forward_kernel_equals_its_reference(out_f, in_f, rank, group, bits, symmetric, w_dtype):
    """Tolerance: the codes agree except, at most 1 in 10⁴ weights, one step apart (a weight within
    an ulp of a rounding boundary; the LoRA dot product is summed in another order)."""
    w0, a, b, step, offset, _ = _gpu_case(out_f, in_f, rank, group, bits, symmetric, w_dtype)
    ref = l4q.fake_quant_reference(w0, a, b, step, offset, 0.5, bits, group, torch.float32)
    got = l4q.fake_quant_cuda(w0, a, b, step, offset, 0.5, bits, group, torch.float32)
    n, worst = _code_mismatches(got, ref, step, offset, group)
    assert n <= max(1, out_f * in_f // 10_000) and worst <= 1
    same = intk.ungrouped(intk.grouped((got == ref).float(), group), in_f).bool()
    assert same.float().mean() >= 1 - 1e-4
    for dtype in (torch.bfloat16, torch.float16):                   # rounding on the way out: bit-exact
        half = l4q.fake_quant_cuda(w0, a, b, step, offset, 0.5, bits, group, dtype)
        assert torch.equal(half, got.to(dtype))


@pytest.mark.gpu
@pytest.mark.parametrize("g_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("out_f,in_f,rank,group,bits,symmetric", GPU_CASES)
def test_backward_kernel_equals_its_reference(out_f, in_f, rank, group, bits, symmetric, g_dtype):
    """Tolerance: the masked gradient equal wherever both sides agree on the mask (all but at most
    1 in 10⁴ weights); the group sums within 1e-4 relative of Σ|G|·Qp·γ, their scale."""
    w0, a, b, step, offset, gamma = _gpu_case(out_f, in_f, rank, group, bits, symmetric, torch.bfloat16)
    grad = torch.randn(out_f, in_f, device="cuda", generator=torch.Generator("cuda").manual_seed(3)).to(g_dtype)
    g_ref, g_ker = grad.clone(), grad.clone()
    s_ref, o_ref = l4q.fake_quant_backward_reference(w0, a, b, step, offset, gamma, g_ref, 0.5, bits, group)
    s_ker, o_ker = l4q.fake_quant_backward_cuda(w0, a, b, step, offset, gamma, g_ker, 0.5, bits, group)
    differ = g_ref != g_ker
    assert int(differ.sum()) <= max(1, out_f * in_f // 10_000)
    assert ((g_ref == 0) | (g_ker == 0))[differ].all()            # only where one side masked it
    qp = intk.bounds(bits)[1]
    scale = intk.grouped(grad.float().abs(), group).sum(-1) * qp * gamma.unsqueeze(0) + 1e-6
    assert ((s_ker - s_ref.float()).abs() <= 1e-4 * scale).all()
    if symmetric:
        assert o_ker is None
    else:
        assert ((o_ker - o_ref.float()).abs() <= 1e-4 * scale).all()


@pytest.mark.gpu
def test_kernels_run_on_pytorchs_current_stream():
    w0, a, b, step, offset, _ = _gpu_case(512, 1024, 16, 128, 4, False, torch.bfloat16)
    expected = l4q.fake_quant_cuda(w0, a, b, step, offset, 0.5, 4, 128, torch.bfloat16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        w1 = w0 * 1                                  # produced on the side stream, consumed by the kernel
        got = l4q.fake_quant_cuda(w1, a, b, step, offset, 0.5, 4, 128, torch.bfloat16)
        got = got.clone()
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, expected)


@pytest.mark.gpu
def test_kernel_path_keeps_one_compute_dtype_weight_temporary():
    """A 4096×4096 L4Q layer in bf16: the kernel path's step peak above the inputs stays near one bf16
    out×in temporary (32 MiB), where the reference holds (9 + 2) bytes per weight in backward."""
    from lowmem.quant.l4q import L4QLinear

    layer = L4QLinear(torch.nn.Linear(4096, 4096, bias=False, dtype=torch.bfloat16, device="cuda"), 16, 32)
    x = torch.randn(2, 64, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    layer(x).sum().backward()                                       # compile and warm up
    peaks = {}
    for mode in ("1", "0"):
        import os
        os.environ["LOWMEM_KERNELS"] = mode
        try:
            layer.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            layer(x).sum().backward()
            torch.cuda.synchronize()
            peaks[mode] = torch.cuda.max_memory_allocated() - base
        finally:
            os.environ.pop("LOWMEM_KERNELS")
    weight = 4096 * 4096
    assert peaks["1"] <= 2 * weight * 1.25 + 8 * 2**20
    assert peaks["0"] >= 9 * weight


@pytest.mark.gpu
def test_device_probes_agree_with_pytorch():
    info = device.device_info(0)
    props = torch.cuda.get_device_properties(0)
    assert info.name == props.name and info.capability == (props.major, props.minor)
    assert info.total == props.total_memory
    free, total = device.memory_info(0)
    torch_free, torch_total = torch.cuda.mem_get_info(0)
    assert total == torch_total and abs(free - torch_free) <= 64 * 2**20
    assert 0 < device.context_bytes(0) < 4 * 2**30


def test_the_planner_expects_kernels_only_where_they_can_run(monkeypatch):
    """memory.kernels_run: CUDA plans count the kernels' smaller temporaries unless LOWMEM_KERNELS=0
    or this machine's GPU cannot run them; a machine without a GPU plans for one that can."""
    from types import SimpleNamespace

    from lowmem import memory

    cuda, cpu = SimpleNamespace(device="cuda"), SimpleNamespace(device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.kernels_run(cuda) and not memory.kernels_run(cpu)
    monkeypatch.setenv("LOWMEM_KERNELS", "0")
    assert not memory.kernels_run(cuda)
    monkeypatch.delenv("LOWMEM_KERNELS")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(runtime, "unavailable_reason", lambda index: "no usable NVIDIA driver")
    assert not memory.kernels_run(cuda)
    monkeypatch.setattr(runtime, "unavailable_reason", lambda index: None)
    assert memory.kernels_run(cuda)


def test_a_driver_older_than_nvrtcs_major_version_makes_kernels_unavailable(monkeypatch):
    monkeypatch.setattr(runtime, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_90")
    runtime.unavailable_reason.cache_clear()
    try:
        monkeypatch.setattr(runtime, "driver_version", lambda: (12, 8))
        reason = runtime.unavailable_reason(0)
        assert "CUDA 12.8" in reason and "NVRTC 13.5" in reason and "12.x" in reason
        runtime.unavailable_reason.cache_clear()
        monkeypatch.setattr(runtime, "driver_version", lambda: (13, 0))
        assert runtime.unavailable_reason(0) is None
    finally:
        runtime.unavailable_reason.cache_clear()


def test_a_gpu_nvrtc_cannot_target_makes_kernels_unavailable(monkeypatch):
    """A V100 (sm_70) under NVRTC 13: the references run, with the reason, instead of a compile error."""
    monkeypatch.setattr(runtime, "nvrtc_version", lambda: (13, 5))
    monkeypatch.setattr(runtime, "driver_version", lambda: (13, 0))
    monkeypatch.setattr(runtime, "supported_archs", lambda: (75, 80, 86, 89, 90, 100, 120))
    runtime.unavailable_reason.cache_clear()
    try:
        monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_70")
        reason = runtime.unavailable_reason(0)
        assert "sm_70" in reason and "sm_75 to sm_120" in reason
        runtime.unavailable_reason.cache_clear()
        monkeypatch.setattr(runtime, "device_arch", lambda index: "sm_90a")
        assert runtime.unavailable_reason(0) is None
    finally:
        runtime.unavailable_reason.cache_clear()


def test_nvrtc_lists_the_architectures_ci_compiles_for():
    assert {80, 90} <= set(runtime.supported_archs())
