"""lowmem.kernels.adam8bit: the reference's rounding and its second moment against fp32 Adam, the
kernel's own CUDA source run in the CPU emulator against the reference, the fallback rule, and
(marked `gpu`) the kernel on a GPU."""

import math
import warnings

import pytest
import torch

from lowmem.galore import GaLoreAdamW8bit, dequantized_moments
from lowmem.kernels import adam8bit as k8
from lowmem.kernels import runtime
from tests.kernel_emulator import fixtures

pytestmark = pytest.mark.usefixtures("one_thread")

B1, B2, EPS = 0.9, 0.999, 1e-8
QMAPS = GaLoreAdamW8bit([("w", torch.nn.Parameter(torch.zeros(1)))], rank=None).qmaps   # signed, unsigned


def test_codes_round_to_a_neighbouring_code_unbiased_or_to_the_nearest():
    qmap = QMAPS[0]
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))       # a block and a partial one
    codes, absmax = torch.zeros(300, dtype=torch.uint8), torch.zeros(2)
    k8.quantize_(x.clone(), codes, absmax, qmap, None)
    assert torch.equal(absmax, torch.stack([x[:256].abs().max(), x[256:].abs().max()]))
    scaled = x / torch.cat([absmax[0].expand(256), absmax[1].expand(44)])
    assert torch.equal(codes.long(), (scaled[:, None] - qmap).abs().argmin(1))       # nearest
    draws = 2000
    unit = x[:256]                               # one block, quantized 2000 times over
    codes, absmax = torch.zeros(256 * draws, dtype=torch.uint8), torch.zeros(draws)
    k8.quantize_(unit.repeat(draws), codes, absmax, qmap, torch.rand(256 * draws, generator=torch.Generator().manual_seed(1)))
    got = qmap[codes.long()].view(draws, 256)
    scaled = (unit / unit.abs().max()).clamp(qmap[0], 1)
    upper = torch.searchsorted(qmap, scaled).clamp(1, 255)
    low, high = qmap[upper - 1], qmap[upper]
    assert ((got == low) | (got == high)).all()                           # one of its two neighbours
    # unbiased: the mean of the draws is the value, within 4 standard errors (σ ≤ gap/2)
    assert ((got.mean(0) - scaled).abs() <= 4 * (high - low) / (2 * draws**0.5) + 1e-7).all()


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_the_second_moment_follows_fp32_adam_when_most_of_a_block_quiets_down(device):
    """One value in each block of 256 keeps large gradients; the others' fall fivefold after step
    500. Rounded to nearest, their V cannot fall (a step moves it by 0.1%, under half a code gap)
    and stays far above fp32 Adam's; rounded stochastically it follows it. On CUDA this runs
    the kernel."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n = 4096
    loud = torch.arange(n, device=device) % k8.BLOCK == 0
    qmaps = tuple(q.to(device) for q in QMAPS)
    runs = {mode: [torch.zeros(n, dtype=torch.uint8, device=device) for _ in range(2)]
            + [torch.zeros(n // k8.BLOCK, device=device) for _ in range(2)] for mode in ("nearest", "stochastic")}
    v = torch.zeros(n, device=device)
    noise = torch.Generator(device=device).manual_seed(0)
    data = torch.Generator(device=device).manual_seed(1)
    for step in range(1, 1001):
        g = torch.randn(n, device=device, generator=data) * torch.where(loud, 10.0, 5.0 if step <= 500 else 1.0)
        v.mul_(B2).addcmul_(g, g, value=1 - B2)
        for mode, (s1, s2, a1, a2) in runs.items():
            k8.adam8bit_step_(g, torch.zeros(n, device=device), s1, s2, a1, a2, qmaps, step, 1e-3, (B1, B2), EPS,
                              0.0, noise, stochastic=mode == "stochastic")
    ratio = {mode: float(dequantized_moments(dict(state1=s1, state2=s2, absmax1=a1, absmax2=a2), qmaps)[1][~loud].mean()
                         / v[~loud].mean()) for mode, (s1, s2, a1, a2) in runs.items()}
    assert ratio["nearest"] > 1.5                       # the ratchet this rounding removes
    assert abs(ratio["stochastic"] - 1) < 0.03, ratio


def test_values_a_thousandfold_apart_in_a_block_keep_adams_update_size():
    """Gradient scales log-uniform over 1e-3..1 inside each block, so V spans a millionfold: the
    smallest sit below the lowest nonzero code. Rounded stochastically to a zero code, such a V
    beside a nonzero M made the next update M/ε (update RMS 2000-9000x Adam's); a value above
    zero takes at least the lowest nonzero code, and the update stays Adam's size."""
    n = 4096
    gen = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.empty(n).uniform_(math.log(1e-3), 0, generator=gen))
    s1, s2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    a1, a2 = torch.zeros(n // k8.BLOCK), torch.zeros(n // k8.BLOCK)
    m, v = torch.zeros(n), torch.zeros(n)
    noise = torch.Generator().manual_seed(1)
    for step in range(1, 1001):
        g = torch.randn(n, generator=gen) * scale * (5.0 if step <= 500 else 1.0)
        m.mul_(B1).add_(g, alpha=1 - B1)
        v.mul_(B2).addcmul_(g, g, value=1 - B2)
        k8.adam8bit_step_(g, torch.zeros(n), s1, s2, a1, a2, QMAPS, step, 1e-3, (B1, B2), EPS, 0.0, noise)

    def update_rms(m_, v_):
        return float(((m_ / (1 - B1**1000)) / ((v_ / (1 - B2**1000)).sqrt() + EPS)).pow(2).mean().sqrt())

    m8, v8 = dequantized_moments(dict(state1=s1, state2=s2, absmax1=a1, absmax2=a2), QMAPS)
    assert (v8 > 0).all()
    assert abs(update_rms(m8, v8) / update_rms(m, v) - 1) < 0.2
    assert abs(float(v8.mean() / v.mean()) - 1) < 0.03


def test_the_reference_is_adam_written_out_with_its_roundings():
    """One step from zero moments: M and V are β-weighted g and g², the weight moves by
    lr·M̂/(√V̂+ε) after decay, and the codes are the nearest (M) and the noise's pick (V)."""
    g = torch.randn(700, generator=torch.Generator().manual_seed(2))
    w = torch.randn(700, generator=torch.Generator().manual_seed(3))
    codes1, codes2 = torch.zeros(700, dtype=torch.uint8), torch.zeros(700, dtype=torch.uint8)
    absmax1, absmax2 = torch.zeros(3), torch.zeros(3)
    noise = torch.rand(700, generator=torch.Generator().manual_seed(4))
    before = w.clone()
    k8.adam8bit_step_reference(g, w, codes1, codes2, absmax1, absmax2, QMAPS, 1, 1e-2, (B1, B2), EPS, 0.1,
                               noise, None)
    m, v = (1 - B1) * g.double(), (1 - B2) * g.double() ** 2
    expected = before.double() * (1 - 1e-2 * 0.1) - 1e-2 * (m / (1 - B1)) / ((v / (1 - B2)).sqrt() + EPS)
    torch.testing.assert_close(w.double(), expected, rtol=0, atol=1e-6)
    for codes, absmax, qmap, want, u in ((codes1, absmax1, QMAPS[0], m, None), (codes2, absmax2, QMAPS[1], v, noise)):
        blocks = [want[i:i + 256] for i in range(0, 700, 256)]
        assert torch.allclose(absmax.double(), torch.stack([b.abs().max() for b in blocks]), rtol=1e-6)
        again = torch.zeros(700, dtype=torch.uint8)
        k8.quantize_(want.float(), again, torch.zeros(3), qmap, u)
        assert torch.equal(codes, again)


def test_dispatch_runs_the_reference_on_the_cpu_without_a_warning():
    args = [torch.randn(300), torch.randn(300)] + [torch.zeros(300, dtype=torch.uint8) for _ in range(2)] \
        + [torch.zeros(2) for _ in range(2)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        k8.adam8bit_step_(*args, QMAPS, 1, 1e-3, (B1, B2), EPS, 0.0, torch.Generator().manual_seed(0))
    assert (args[2] != 0).any() and (args[4] > 0).all()


def test_calls_outside_the_kernel_are_named():
    assert k8._unsupported(torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16)) is None
    assert "float16" in k8._unsupported(torch.zeros(4, dtype=torch.float16), torch.zeros(4))
    assert "non-contiguous" in k8._unsupported(torch.zeros(4), torch.zeros(8)[::2])


# ---------------------------------------------------------------- the kernel's source, emulated on the CPU

emulator, emulated = fixtures(k8)


def _state(n, seed):
    """Codes and absmaxes of moments a few steps in (not zero), and a gradient and weight."""
    gen = torch.Generator().manual_seed(seed)
    blocks = math.ceil(n / k8.BLOCK)
    m, v = torch.randn(n, generator=gen) * 0.1, torch.rand(n, generator=gen) * 0.01
    v[::7] *= 1e-7                  # below the lowest nonzero code: never rounded to zero
    codes1, codes2 = torch.zeros(n, dtype=torch.uint8), torch.zeros(n, dtype=torch.uint8)
    absmax1, absmax2 = torch.zeros(blocks), torch.zeros(blocks)
    k8.quantize_(m, codes1, absmax1, QMAPS[0], None)
    k8.quantize_(v, codes2, absmax2, QMAPS[1], None)
    return codes1, codes2, absmax1, absmax2, torch.randn(n, generator=gen), torch.randn(n, generator=gen) * 0.02


DTYPES = [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
          (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("weight_dtype,grad_dtype", DTYPES, ids=lambda d: str(d).rsplit(".", 1)[-1])
@pytest.mark.parametrize("n,stochastic,decay", [(1, True, 0.0), (300, True, 0.1), (1000, False, 0.1), (4096, True, 0.0)])
def test_emulated_kernel_equals_the_reference(emulated, n, stochastic, decay, weight_dtype, grad_dtype):
    """Three steps each way from the same state and noise: the weights agree to an fp32 ulp of
    the update (bf16: exactly, but for a weight whose update sits on a rounding boundary), the
    absmaxes to a relative 1e-6, and the codes exactly but for one in a thousand, one code apart
    (a moment within an ulp of the midpoint or the noise)."""
    codes1, codes2, absmax1, absmax2, grad, weight = _state(n, seed=n)
    ours = [t.clone() for t in (codes1, codes2, absmax1, absmax2)] + [weight.to(weight_dtype)]
    theirs = [t.clone() for t in ours]
    for step in (3, 4, 5):
        g = (grad * step).to(grad_dtype)
        g[::7] *= 1e-4                  # and their gradients small, so V stays there
        noise = torch.Generator().manual_seed(step)
        v_noise = torch.rand(n, generator=noise) if stochastic else None
        w_noise = torch.randint(0, 1 << 16, (n,), dtype=torch.int32, generator=noise) \
            if weight_dtype == torch.bfloat16 else None
        common = (QMAPS, step, 1e-3, (B1, B2), EPS, decay, v_noise, w_noise)
        k8.adam8bit_step_cuda(g, ours[4], *ours[:4], *common)
        k8.adam8bit_step_reference(g, theirs[4], *theirs[:4], *common)
    kernel, grid, block, shared, source = emulated.launches[-1]
    assert (kernel, grid, block, shared) == (
        f"adam8bit_step_{runtime.DTYPE_NAMES[weight_dtype]}_{runtime.DTYPE_NAMES[grad_dtype]}",
        (math.ceil(n / 256), 1, 1), (256, 1, 1), 0)
    for i in (0, 1):
        differ = ours[i] != theirs[i]
        assert differ.sum() <= max(1, n // 1000)
        assert ((ours[i].int() - theirs[i].int()).abs() <= 1).all()
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[3], theirs[3], rtol=1e-6, atol=0)
    # The weights: within two ulps of their dtype, but where a moment's code came out one apart,
    # which moves that step's update by a fraction of lr (1e-3).
    spacing = 2**-7 if weight_dtype == torch.bfloat16 else 2**-22
    off = (ours[4].float() - theirs[4].float()).abs()
    close = off <= 2 * spacing * theirs[4].float().abs() + 1e-8
    assert close.sum() >= n - (1 + n // 100) and off.max() <= 0.5e-3, (off.max(), (~close).sum())


@pytest.mark.gpu
@pytest.mark.parametrize("weight_dtype,grad_dtype", DTYPES, ids=lambda d: str(d).rsplit(".", 1)[-1])
def test_on_cuda_the_kernel_equals_the_reference(weight_dtype, grad_dtype):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n = 3 * 2**20 + 100
    state = [t.cuda() for t in _state(n, seed=7)]
    ours = [t.clone() for t in state[:4]] + [state[5].to(weight_dtype)]
    theirs = [t.clone() for t in ours]
    qmaps = tuple(q.cuda() for q in QMAPS)
    g = state[4].to(grad_dtype)
    v_noise = torch.rand(n, device="cuda")
    w_noise = torch.randint(0, 1 << 16, (n,), dtype=torch.int32, device="cuda") if weight_dtype == torch.bfloat16 else None
    common = (qmaps, 3, 1e-3, (B1, B2), EPS, 0.1, v_noise, w_noise)
    k8.adam8bit_step_cuda(g, ours[4], *ours[:4], *common)
    k8.adam8bit_step_reference(g, theirs[4], *theirs[:4], *common)
    for i in (0, 1):
        assert (ours[i] != theirs[i]).float().mean() <= 1e-3
    torch.testing.assert_close(ours[2], theirs[2], rtol=1e-6, atol=0)
    torch.testing.assert_close(ours[4].float(), theirs[4].float(), rtol=2**-7, atol=1e-6)
