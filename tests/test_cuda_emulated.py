"""The CUDA row kernels (``csrc/cuda/ce_rows.cuh``, ``kl_rows.cuh``) run on the CPU.

CI has no GPU, so the very same device code is compiled with the host compiler against a small
emulation of the CUDA execution model (``tests/cuda_emu``: every CUDA thread a std::thread,
barriers for ``__syncthreads``, a warp exchange for ``__shfl_xor_sync``) and checked row by row
against a float64 reference computed from the same stored logits. This covers what the kernels
decide — statistics, values, the in-place gradient, ignore_index, bounded ascent, softcap, both
KL directions, temperature, each KL side's softcap, the unaligned head / 16-byte body / tail of a row, several rows per
block (grid-stride) — but not the GPU's memory model, speed, or the ATen GEMMs around the
kernels; the ``cuda``-marked tests cover those on a GPU.
"""

from __future__ import annotations

import ctypes
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
DTYPES = [pytest.param(d, id=str(d).removeprefix("torch.")) for d in DTYPE_CODE]
IGNORE = -100


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    lib = tmp_path_factory.mktemp("cuda_emu") / "libemu_rows.so"
    cmd = [cxx, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas",
           f"-I{EMU / 'include'}", f"-I{ROOT / 'csrc' / 'cuda'}", str(EMU / "emu_rows.cpp"), "-o", str(lib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    so = ctypes.CDLL(str(lib))
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    so.emu_ce_rows.argtypes = [p] * 6 + [i64, i64, i64, i32, f32, i32, f32, i32, i32, i32]
    so.emu_kl_rows.argtypes = [p] * 9 + [i64, i64, i32, f32, i32, f32, i32, f32, i32, i32, i32]
    return so


def _ptr(t: torch.Tensor | None):
    return None if t is None else t.data_ptr()


def _rows(values: torch.Tensor, dtype: torch.dtype, offset: int) -> torch.Tensor:
    """(R, V) logits stored in `dtype`, starting `offset` elements into a fresh buffer (offset 1:
    a base that is not 16-byte aligned)."""
    r, v = values.shape
    buf = torch.zeros(r * v + offset, dtype=dtype)
    out = buf[offset:].view(r, v)
    out.copy_(values)
    return out


def _check_grad(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, coeff: torch.Tensor):
    """`got`: float32 math rounded once to `dtype`. Relative: 1e-5 plus half an ulp of `dtype`.
    Absolute floor, where the gradient cancels (p_target ~ 1, q ~ p): a few float32 ulps of the
    exponent's argument (x - m) - log d, which is O(log V), times the largest |coeff|; and fp16's
    smallest subnormal. It does not grow with the logits' size: probabilities come from the row
    max, not from a rounded lse."""
    rtol = 1e-5 + (0.0 if dtype == torch.float32 else torch.finfo(dtype).eps / 2)
    eps32 = torch.finfo(torch.float32).eps
    v = ref.shape[1]
    atol = max(4 * eps32 * (1 + math.log(v)) * coeff.abs().max().item(), 2.0 ** -24)
    torch.testing.assert_close(got.double(), ref, rtol=rtol, atol=atol)


def _check_stat(got: torch.Tensor, ref: torch.Tensor, v: int, spread: float = 0.0):
    """float32 statistics: relative 1e-5; absolute floor of a few float32 ulps of the terms that
    are added -- log d = O(log V) and, for KL, the size `spread` of the log-ratio -- but not of
    the logits themselves (the row max cancels exactly)."""
    eps32 = torch.finfo(torch.float32).eps
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=8 * eps32 * (1 + math.log(v) + spread))


# ---------------------------------------------------------------------------- cross-entropy


def ce_reference(z, bias, target, softcap):
    """float64: lse, ce and d ce / d z_raw per row, from the stored logits z (R, V)."""
    x = z.double() + (bias.double() if bias is not None else 0)
    if softcap is not None:
        t = torch.tanh(x / softcap)
        s, dcap = softcap * t, 1 - t * t
    else:
        s, dcap = x, torch.ones_like(x)
    lse = torch.logsumexp(s, dim=1)
    live = target != IGNORE
    safe = torch.where(live, target, 0)
    ce = torch.where(live, lse - s.gather(1, safe[:, None])[:, 0], 0.0)
    g = torch.exp(s - lse[:, None])
    g[torch.arange(len(target)), safe] -= 1
    return lse, ce, g * dcap, live


def _ce_case(v, dtype, *, bias, softcap, seed, rows=5):
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, v, generator=g, dtype=torch.float64) * 4
    b = (torch.randn(v, generator=g) * 2).to(dtype) if bias else None
    target = torch.randint(0, v, (rows,), generator=g)
    target[min(1, rows - 1)] = IGNORE
    coeff = torch.randn(rows, generator=g, dtype=torch.float32)
    coeff[0] = -abs(coeff[0].item()) - 0.1  # an ascent token
    return values, b, target, coeff


def _run_ce(emu, z, bias, target, *, coeff=None, backward=False, softcap=None, ascent_cap=None, threads=0, grid=2):
    """Runs the CE row kernel in place on z; returns (ce, lse), left NaN in backward mode."""
    r, v = z.shape
    ce = torch.full((r,), float("nan"))
    lse = torch.full((r,), float("nan"))
    outs = (None, None) if backward else (ce, lse)
    rc = emu.emu_ce_rows(_ptr(z), _ptr(bias), _ptr(target), _ptr(coeff), _ptr(outs[0]), _ptr(outs[1]), r, v, IGNORE,
                         softcap is not None, softcap or 0.0, ascent_cap is not None, ascent_cap or 0.0,
                         DTYPE_CODE[z.dtype], threads, grid)
    assert rc == 0
    return ce, lse


# V: one element (all head/tail), 13 (no full vector in fp32 rows after an offset), 507 (odd),
# 4100 (256-thread blocks); offset 1 makes every row start off a 16-byte boundary.
CE_SHAPES = [pytest.param(v, off, id=f"V{v}-off{off}") for v, off in [(1, 0), (13, 1), (507, 0), (507, 1), (4100, 1)]]
CE_OPTS = [pytest.param(False, None, id="plain"), pytest.param(True, 30.0, id="bias-softcap30")]


@pytest.mark.parametrize("bias,softcap", CE_OPTS)
@pytest.mark.parametrize("v,offset", CE_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_rows(emu, dtype, v, offset, bias, softcap):
    values, b, target, coeff = _ce_case(v, dtype, bias=bias, softcap=softcap, seed=v + offset)
    z = _rows(values, dtype, offset)
    lse_ref, ce_ref, grad, live = ce_reference(z, b, target, softcap)

    # values only: statistics written, logits left alone
    z0 = z.clone()
    ce, lse = _run_ce(emu, z, b, target, softcap=softcap)
    _check_stat(lse, lse_ref, v)
    _check_stat(ce, ce_ref, v)
    assert torch.equal(z, z0)

    # forward + gradient, bounded ascent: the ascent token is capped at a cap below its ce
    cap = max(ce_ref[0].item() * 0.5, 1e-3) if v > 1 else 1.0
    c_eff = torch.where(live, coeff, 0.0).double()
    capped = (coeff < 0) & (ce_ref > cap)
    c_eff = torch.where(capped, 0.0, c_eff)
    ce, lse = _run_ce(emu, z, b, target, coeff=coeff, softcap=softcap, ascent_cap=cap)
    _check_stat(lse, lse_ref, v)
    _check_stat(ce, ce_ref, v)
    _check_grad(z, c_eff[:, None] * grad, dtype, coeff)

    # backward: statistics recomputed, not stored; coeff taken as given (no ascent cap)
    z.copy_(z0)
    ce, lse = _run_ce(emu, z, b, target, coeff=coeff, backward=True, softcap=softcap)
    assert ce.isnan().all() and lse.isnan().all(), "backward mode must not write the statistics"
    _check_grad(z, torch.where(live, coeff, 0.0).double()[:, None] * grad, dtype, coeff)


def test_ce_rows_ascent_cap_at_the_tokens_own_ce(emu):
    """An ascent token whose ce equals the cap exactly is not past it: it keeps its gradient; one
    float32 ulp below its ce it is capped (gradient 0). The other rows are untouched either way."""
    values, b, target, coeff = _ce_case(507, torch.float32, bias=True, softcap=None, seed=11)
    coeff[1:] = coeff[1:].abs()  # one ascent token, row 0
    z0 = _rows(values, torch.float32, 0)
    lse_ref, ce_ref, grad, live = ce_reference(z0, b, target, None)
    ce, _ = _run_ce(emu, z0.clone(), b, target, softcap=None)
    c_eff = torch.where(live, coeff, 0.0).double()
    for cap, kept in ((ce[0].item(), True), (torch.nextafter(ce[0], torch.tensor(-math.inf)).item(), False)):
        z = z0.clone()
        _run_ce(emu, z, b, target, coeff=coeff, ascent_cap=cap)
        expect = c_eff.clone()
        if not kept:
            expect[0] = 0.0
        assert (z[0].abs().sum() > 0) == kept, cap
        _check_grad(z, expect[:, None] * grad, torch.float32, coeff)


@pytest.mark.parametrize("threads", [128, 256, 512])
def test_ce_rows_block_sizes(emu, threads):
    """Every block size on one shape, including blocks far wider than the row (V = 13 < 512)."""
    for v in (13, 1000):
        values, b, target, coeff = _ce_case(v, torch.bfloat16, bias=True, softcap=None, seed=threads + v, rows=7)
        z = _rows(values, torch.bfloat16, 1)
        lse_ref, ce_ref, grad, live = ce_reference(z, b, target, None)
        ce, lse = _run_ce(emu, z, b, target, coeff=coeff, threads=threads, grid=3)
        _check_stat(lse, lse_ref, v)
        _check_stat(ce, ce_ref, v)
        _check_grad(z, torch.where(live, coeff, 0.0).double()[:, None] * grad, torch.bfloat16, coeff)


def test_ce_rows_large_vocab_512_threads(emu):
    """V >= 16384 takes 512-thread blocks; an odd V keeps a tail."""
    v = 16411
    values, b, target, coeff = _ce_case(v, torch.float16, bias=True, softcap=None, seed=3, rows=3)
    z = _rows(values, torch.float16, 0)
    lse_ref, ce_ref, grad, live = ce_reference(z, b, target, None)
    ce, lse = _run_ce(emu, z, b, target, coeff=coeff, grid=2)
    _check_stat(lse, lse_ref, v)
    _check_stat(ce, ce_ref, v)
    _check_grad(z, torch.where(live, coeff, 0.0).double()[:, None] * grad, torch.float16, coeff)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_rows_extreme_and_invalid(emu, dtype):
    """Logits of +-1e4 stay finite; all-ignored rows give 0 and zero gradient; a target outside
    [0, V) gives NaN and no gradient, without reading outside the row."""
    v = 300
    values = torch.full((4, v), -1e4, dtype=torch.float64)
    values[:, 7] = 1e4
    target = torch.tensor([7, 8, IGNORE, v + 5])
    coeff = torch.tensor([1.0, -1.0, 1.0, 1.0])
    z = _rows(values, dtype, 1)
    top = z[0, 7].item()  # 1e4 as stored (9984 in bfloat16)
    ce, lse = _run_ce(emu, z, None, target, coeff=coeff)
    assert torch.equal(lse, torch.full((4,), top))
    assert ce[0].item() == 0.0 and ce[1].item() == 2 * top and ce[2].item() == 0.0 and ce[3].isnan()
    grad = torch.zeros(4, v, dtype=torch.float64)
    grad[1, 7], grad[1, 8] = -1.0, 1.0  # coeff -1 * (onehot(7) - onehot(8))
    assert torch.equal(z.double(), grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ce_rows_minus_inf_bias(emu, dtype):
    """A -inf bias on the first 1000 columns (banned vocabulary): every thread's first values are
    -inf, which must add nothing to the running sum (exp(-inf - -inf) is NaN); values and gradient
    as float64, zero gradient on the banned columns."""
    v = 4100
    values, b, target, coeff = _ce_case(v, dtype, bias=True, softcap=None, seed=5)
    b[:1000] = float("-inf")
    target = torch.where(target == IGNORE, target, 1000 + target % (v - 1000))
    z = _rows(values, dtype, 1)
    lse_ref, ce_ref, grad, live = ce_reference(z, b, target, None)
    ce, lse = _run_ce(emu, z, b, target, coeff=coeff)
    _check_stat(lse, lse_ref, v)
    _check_stat(ce, ce_ref, v)
    _check_grad(z, torch.where(live, coeff, 0.0).double()[:, None] * grad, dtype, coeff)
    assert torch.equal(z[:, :1000].double(), torch.zeros(5, 1000, dtype=torch.float64))


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_propagate_nan(emu, dtype):
    """One NaN logit in a row (also where it is not the thread's first value, or in a row of -inf
    and NaN only): that row's CE, lse, KL (both directions, either side, with and without softcap)
    and gradient are NaN, the other rows untouched — the -inf handling must not swallow NaN."""
    v, rows = 4100, 4
    g = torch.Generator().manual_seed(3)
    values = torch.randn(rows, v, generator=g, dtype=torch.float64) * 3
    values[1, 2077] = float("nan")
    values[3] = float("-inf")
    values[3, 5] = float("nan")
    target = torch.tensor([1, 2, 3, 4])
    coeff = torch.ones(rows)
    z = _rows(values, dtype, 1)
    ce, lse = _run_ce(emu, z, None, target, coeff=coeff)
    assert ce[[1, 3]].isnan().all() and lse[[1, 3]].isnan().all() and z[1].isnan().any()
    assert torch.isfinite(ce[[0, 2]]).all() and torch.isfinite(z[[0, 2]].float()).all()
    for reverse, nan_side, cap in [(r, s, c) for r in (False, True) for s in (0, 1) for c in (None, 2.0)]:
        base = torch.randn(rows, v, generator=g, dtype=torch.float64)
        sides = [base.clone(), base + 0.1 * torch.randn(rows, v, generator=g, dtype=torch.float64)]
        sides[nan_side][1, 2077] = float("nan")
        z, zr = _rows(sides[0], dtype, 0), _rows(sides[1], dtype, 1)
        kl, lse, rlse = _run_kl(emu, z, zr, None, None, mask=torch.ones(rows, dtype=torch.bool), coeff=coeff,
                                reverse=reverse, temperature=1.0, softcap=cap, ref_softcap=cap)
        assert kl[1].isnan() and torch.isfinite(kl[[0, 2, 3]]).all(), (reverse, nan_side, cap)
        assert z[1].isnan().any() and torch.isfinite(z[[0, 2, 3]].float()).all(), (reverse, nan_side, cap)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_rows_minus_inf_bias(emu, dtype, reverse):
    """Both sides ban the same columns with a -inf bias: those columns have probability 0 on
    both and add 0 to the KL (0 * log 0 = 0) instead of NaN; the gradient there is 0."""
    v, rows = 4100, 4
    g = torch.Generator().manual_seed(7 + reverse)
    base = torch.randn(rows, v, generator=g, dtype=torch.float64) * 3
    z = _rows(base + torch.randn(rows, v, generator=g, dtype=torch.float64), dtype, 1)
    zr = _rows(base, dtype, 0)
    b = torch.zeros(v, dtype=dtype)
    b[:1000] = float("-inf")
    rb = b.clone()
    mask = torch.ones(rows, dtype=torch.bool)
    coeff = torch.randn(rows, generator=g, dtype=torch.float32)
    lse_ref, rlse_ref, kl_ref, _, grad = kl_reference(z, zr, b, rb, mask, reverse, 1.0)
    assert torch.isfinite(kl_ref).all() and torch.isfinite(grad).all()
    kl, lse, rlse = _run_kl(emu, z, zr, b, rb, mask=mask, coeff=coeff, reverse=reverse, temperature=1.0)
    spread = (z.double() - zr.double()).abs().max().item()
    _check_stat(lse, lse_ref, v)
    _check_stat(kl, kl_ref, v, spread)
    _check_grad(z, coeff.double()[:, None] * grad, dtype, coeff)


@pytest.mark.parametrize("backward", [False, True], ids=["forward", "backward"])
def test_ce_rows_logits_near_1e4(emu, backward):
    """Logits 1e4 + O(1): lse ~ 1e4 has a float32 ulp of ~1e-3, so exp(z - lse) would be off by
    ~1e-3 relative; softmax from the row max stays exact to float32."""
    v = 999
    g = torch.Generator().manual_seed(11)
    z = _rows(1e4 + torch.randn(4, v, generator=g, dtype=torch.float64) * 3, torch.float32, 1)
    target = torch.randint(0, v, (4,), generator=g)
    coeff = torch.tensor([1.0, -0.5, 2.0, 1.0])
    lse_ref, ce_ref, grad, _ = ce_reference(z, None, target, None)
    ce, lse = _run_ce(emu, z, None, target, coeff=coeff, backward=backward)
    if not backward:
        _check_stat(ce, ce_ref, v)
        torch.testing.assert_close(lse.double(), lse_ref, rtol=1e-7, atol=0)
    _check_grad(z, coeff.double()[:, None] * grad, torch.float32, coeff)


# ---------------------------------------------------------------------------- KL


def _capped(z, bias, softcap):
    """float64: s = z + bias, then softcap * tanh(s / softcap), and d s / d z (1 without softcap)."""
    x = z.double() + (bias.double() if bias is not None else 0)
    if softcap is None:
        return x, torch.ones_like(x)
    t = torch.tanh(x / softcap)
    return softcap * t, 1 - t * t


def kl_reference(z, zr, bias, ref_bias, mask, reverse, temperature, softcap=None, ref_softcap=None):
    """float64: lse, ref_lse, kl (masked) and d kl / d z (unmasked) per row; each side softcapped
    (its own cap) before the division by T, the reference side without gradient."""
    s, dcap = _capped(z, bias, softcap)
    a = s / temperature
    r = _capped(zr, ref_bias, ref_softcap)[0] / temperature
    lse, rlse = torch.logsumexp(a, 1), torch.logsumexp(r, 1)
    logq, logp = a - lse[:, None], r - rlse[:, None]
    q, p = logq.exp(), logp.exp()
    # 0 * log 0 = 0 where the weighting side has a -inf logit
    kl = (q * torch.where(logq != -math.inf, logq - logp, 0.0)).sum(1) if reverse else \
        (p * torch.where(logp != -math.inf, logp - logq, 0.0)).sum(1)
    grad = q * torch.where(logq != -math.inf, logq - logp - kl[:, None], 0.0) / temperature if reverse else \
        (q - p) / temperature
    return lse, rlse, torch.where(mask, kl, 0.0), kl, grad * dcap


def _run_kl(emu, z, zr, bias, ref_bias, *, mask=None, coeff=None, reverse, temperature, softcap=None,
            ref_softcap=None, threads=0, grid=2):
    """Runs the KL row kernel in place on z; mask None = backward mode (outputs left NaN)."""
    r, v = z.shape
    out = [torch.full((r,), float("nan")) for _ in range(3)]
    ptrs = [None] * 3 if mask is None else [_ptr(t) for t in out]
    rc = emu.emu_kl_rows(_ptr(z), _ptr(zr), _ptr(bias), _ptr(ref_bias), _ptr(mask), _ptr(coeff), *ptrs, r, v,
                         reverse, temperature, softcap is not None, softcap or 0.0, ref_softcap is not None,
                         ref_softcap or 0.0, DTYPE_CODE[z.dtype], threads, grid)
    assert rc == 0
    return out  # kl, lse, ref_lse


# ref offset differing from the trained side's: rows of different alignment (element-wise path).
KL_SHAPES = [pytest.param(v, off, roff, id=f"V{v}-off{off}-refoff{roff}")
             for v, off, roff in [(1, 0, 0), (13, 1, 1), (507, 0, 1), (4100, 1, 1)]]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("v,offset,ref_offset", KL_SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_rows(emu, dtype, v, offset, ref_offset, reverse):
    rows = 5
    g = torch.Generator().manual_seed(v * 2 + reverse)
    temperature = 1.0 if v % 2 else 2.0
    base = torch.randn(rows, v, generator=g, dtype=torch.float64) * 3
    z = _rows(base + torch.randn(rows, v, generator=g, dtype=torch.float64), dtype, offset)
    zr = _rows(base, dtype, ref_offset)
    b = torch.randn(v, generator=g).to(dtype)
    rb = torch.randn(v, generator=g).to(dtype) if v % 2 else None
    mask = torch.tensor([True, False, True, True, True])
    coeff = torch.randn(rows, generator=g, dtype=torch.float32)
    lse_ref, rlse_ref, kl_ref, _, grad = kl_reference(z, zr, b, rb, mask, reverse, temperature)
    spread = ((z.double() + b.double()) - (zr.double() + (rb.double() if rb is not None else 0))).abs().max().item()
    zr0 = zr.clone()

    # values only
    z0 = z.clone()
    kl, lse, rlse = _run_kl(emu, z, zr, b, rb, mask=mask, reverse=reverse, temperature=temperature)
    _check_stat(lse, lse_ref, v)
    _check_stat(rlse, rlse_ref, v)
    _check_stat(kl, kl_ref, v, spread / temperature)
    assert torch.equal(z, z0)

    # forward + gradient (masked rows: kl 0, zero gradient)
    kl, lse, rlse = _run_kl(emu, z, zr, b, rb, mask=mask, coeff=coeff, reverse=reverse, temperature=temperature)
    _check_stat(kl, kl_ref, v, spread / temperature)
    _check_grad(z, torch.where(mask, coeff, 0.0).double()[:, None] * grad, dtype, coeff / temperature)

    # backward: statistics recomputed, not stored; no mask (the coefficient carries it)
    z.copy_(z0)
    kl, lse, rlse = _run_kl(emu, z, zr, b, rb, coeff=coeff, reverse=reverse, temperature=temperature)
    assert kl.isnan().all() and lse.isnan().all() and rlse.isnan().all()
    _check_grad(z, coeff.double()[:, None] * grad, dtype, coeff / temperature)
    assert torch.equal(zr, zr0), "the reference logits are read only"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_kl_rows_identical_models(emu, reverse):
    """Same logits on both sides: KL 0 and zero gradient, to float32 rounding."""
    g = torch.Generator().manual_seed(0)
    z = _rows(torch.randn(3, 777, generator=g, dtype=torch.float64) * 5, torch.float32, 1)
    zr = z.clone()
    kl, lse, rlse = _run_kl(emu, z, zr, None, None, mask=torch.ones(3, dtype=torch.bool), coeff=torch.ones(3),
                            reverse=reverse, temperature=1.0, threads=512)
    assert torch.equal(lse, rlse)
    assert kl.abs().max().item() < 1e-5
    assert z.abs().max().item() < 1e-6


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_kl_rows_logits_near_1e4(emu, reverse):
    """Both sides at 1e4 + O(1): KL and gradient must not inherit the ~1e-3 ulp of lse ~ 1e4."""
    v = 999
    g = torch.Generator().manual_seed(12)
    base = 1e4 + torch.randn(4, v, generator=g, dtype=torch.float64) * 3
    z = _rows(base + torch.randn(4, v, generator=g, dtype=torch.float64) * 0.3, torch.float32, 0)
    zr = _rows(base, torch.float32, 0)
    mask = torch.ones(4, dtype=torch.bool)
    coeff = torch.tensor([1.0, -0.5, 2.0, 1.0])
    _, _, kl_ref, _, grad = kl_reference(z, zr, None, None, mask, reverse, 1.0)
    kl, _, _ = _run_kl(emu, z, zr, None, None, mask=mask, coeff=coeff, reverse=reverse, temperature=1.0)
    spread = (z.double() - zr.double()).abs().max().item()
    _check_stat(kl, kl_ref, v, spread)
    _check_grad(z, coeff.double()[:, None] * grad, torch.float32, coeff)


@pytest.mark.parametrize("temperature", [0.05, 0.2])
def test_kl_rows_reverse_peaked_and_far(emu, temperature):
    """Reverse KL with the trained softmax nearly one-hot and the KL in the thousands: the gradient
    q (log q - log p - kl) cancels at the peak, so the kl it subtracts must be summed from its very
    terms (the closed form from the row statistics rounds otherwise). Against float64 from the same
    stored logits, within 4x the error of plain float32 PyTorch computing the same formula (the
    error of every implementation here is the rounding of tempered logits in the thousands)."""
    # logits of hidden states of size 30 through a random head of 200 (test_numerics' case)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(4, 12, generator=g) * 30
    w = torch.randn(200, 12, generator=g) / 12**0.5
    rh = torch.randn(4, 12, generator=g) * 30
    rows, v = 4, 200
    z, zr = _rows(h @ w.T, torch.float32, 0), _rows(rh @ w.T, torch.float32, 0)
    coeff = torch.tensor([1.0, -0.5, 2.0, 1.0])
    mask = torch.ones(rows, dtype=torch.bool)
    _, _, _, _, grad = kl_reference(z, zr, None, None, mask, True, temperature)
    ref = coeff.double()[:, None] * grad
    logq, logp = torch.log_softmax(z / temperature, 1), torch.log_softmax(zr / temperature, 1)
    q = logq.exp()
    kl = (q * (logq - logp)).sum(1)
    plain = coeff[:, None] * q * (logq - logp - kl[:, None]) / temperature
    _run_kl(emu, z, zr, None, None, mask=mask, coeff=coeff, reverse=True, temperature=temperature)
    budget = 4 * (plain.double() - ref).abs().max().item() + 4 * torch.finfo(torch.float32).eps * (1 + math.log(v))
    assert (z.double() - ref).abs().max().item() <= budget


# (softcap, ref_softcap): each side capped alone and both. The logits (|z + bias| up to ~15) reach
# well into tanh's bend at these caps, so a cap on the wrong side, after T, or without its chain
# rule is far outside the tolerances.
KL_ROW_CAPS = [pytest.param(4.0, None, id="softcap4"), pytest.param(None, 6.0, id="ref_softcap6"),
               pytest.param(4.0, 6.0, id="softcap4-ref_softcap6")]


@pytest.mark.parametrize("softcap,ref_softcap", KL_ROW_CAPS)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kl_rows_softcap(emu, dtype, reverse, softcap, ref_softcap):
    """Values, forward + gradient and backward with softcaps, biases on both sides, temperature 2
    (the cap applies before the division by T), rows of different alignment, a masked row."""
    v, rows, temperature = 507, 5, 2.0
    g = torch.Generator().manual_seed(31 + reverse)
    base = torch.randn(rows, v, generator=g, dtype=torch.float64) * 4
    z = _rows(base + torch.randn(rows, v, generator=g, dtype=torch.float64), dtype, 1)
    zr = _rows(base, dtype, 0)
    b, rb = torch.randn(v, generator=g).to(dtype), torch.randn(v, generator=g).to(dtype)
    mask = torch.tensor([True, True, False, True, True])
    coeff = torch.randn(rows, generator=g, dtype=torch.float32)
    caps = dict(softcap=softcap, ref_softcap=ref_softcap)
    lse_ref, rlse_ref, kl_ref, _, grad = kl_reference(z, zr, b, rb, mask, reverse, temperature, **caps)
    spread = (_capped(z, b, softcap)[0] - _capped(zr, rb, ref_softcap)[0]).abs().max().item() / temperature
    z0, zr0 = z.clone(), zr.clone()

    kl, lse, rlse = _run_kl(emu, z, zr, b, rb, mask=mask, reverse=reverse, temperature=temperature, **caps)
    _check_stat(lse, lse_ref, v)
    _check_stat(rlse, rlse_ref, v)
    _check_stat(kl, kl_ref, v, spread)
    assert torch.equal(z, z0)

    kl, lse, rlse = _run_kl(emu, z, zr, b, rb, mask=mask, coeff=coeff, reverse=reverse, temperature=temperature,
                            **caps)
    _check_stat(kl, kl_ref, v, spread)
    _check_grad(z, torch.where(mask, coeff, 0.0).double()[:, None] * grad, dtype, coeff / temperature)

    z.copy_(z0)
    _run_kl(emu, z, zr, b, rb, coeff=coeff, reverse=reverse, temperature=temperature, **caps)
    _check_grad(z, coeff.double()[:, None] * grad, dtype, coeff / temperature)
    assert torch.equal(zr, zr0), "the reference logits are read only"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_kl_rows_softcap_saturated(emu, reverse):
    """Logits of +-50 (+- a few) under caps of 10 and 12: tanh saturates (d s / d z ~ 1e-3 .. 1e-6),
    the capped logits crowd at +-cap. Values and gradient still as float64 (float32 rows)."""
    v, rows = 999, 4
    g = torch.Generator().manual_seed(13 + reverse)
    sign = torch.where(torch.rand(rows, v, generator=g) < 0.5, -1.0, 1.0).double()
    base = 50 * sign + 4 * torch.randn(rows, v, generator=g, dtype=torch.float64)
    z = _rows(base + 2 * torch.randn(rows, v, generator=g, dtype=torch.float64), torch.float32, 1)
    zr = _rows(base, torch.float32, 0)
    b = torch.randn(v, generator=g)
    mask = torch.ones(rows, dtype=torch.bool)
    coeff = torch.tensor([1.0, -0.5, 2.0, 1.0])
    caps = dict(softcap=10.0, ref_softcap=12.0)
    lse_ref, rlse_ref, kl_ref, _, grad = kl_reference(z, zr, b, None, mask, reverse, 1.0, **caps)
    assert grad.abs().max().item() < 1e-2, "the case must saturate the trained side's tanh"
    spread = (_capped(z, b, 10.0)[0] - _capped(zr, None, 12.0)[0]).abs().max().item()
    kl, lse, rlse = _run_kl(emu, z, zr, b, None, mask=mask, coeff=coeff, reverse=reverse, temperature=1.0, **caps)
    _check_stat(lse, lse_ref, v)
    _check_stat(rlse, rlse_ref, v)
    _check_stat(kl, kl_ref, v, spread)
    _check_grad(z, coeff.double()[:, None] * grad, torch.float32, coeff)
