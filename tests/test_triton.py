"""Backend ``triton``: every semantic of the API on small shapes, against the float64 reference.

On the CPU this runs under the Triton interpreter (CI: ``TRITON_INTERPRET=1 python -m pytest
tests/test_triton.py``; the variable must be set before triton is imported). The interpreter's
cost grows with programs x ops, so shapes stay tiny; they are chosen so that every masked path
runs: N = 37 gives two row blocks of 32 (the second ragged), H = 48 is not a multiple of the
k-block (32), V = 300 gives two vocabulary splits (256 + 44 columns) and three vocabulary
blocks of 128 (the last ragged), H' = 80 makes the reference side's width differ. H and H' are
multiples of 16 like the numerics suite's, so on the GPU both files share compiled variants
(Triton specializes on divisibility by 16).

With a GPU the same cases run on CUDA (marked ``cuda``) in float32 and bfloat16, plus a case
with N*H above 2**31 for the 64-bit offsets.

Errors are norm-wise relative to the float64 reference: float32 <= 1e-5; bf16/fp16 no worse than
2x plain PyTorch's own error in that dtype + 1e-6.
"""

from __future__ import annotations

import pytest
import torch

from conftest import RecordCreated, assert_no_host_sync, loss_calls
from surgery_kernels import linear_cross_entropy, linear_kl_div
from surgery_kernels.backends import availability
from surgery_kernels.reference import linear_cross_entropy_ref, linear_kl_div_ref

N, H, V, RH = 37, 48, 300, 80

try:
    import triton
    import triton.language as tl

    from surgery_kernels.backends.triton_kernels import common as kernels_common

    @triton.jit
    def _tile_ids_backwards(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
        """common.tile_ids with the programs taken last to first (test_vocabulary_splits_in_any_order)."""
        return kernels_common.tile_ids(n_row_blocks * n_col_blocks - 1 - pid, n_row_blocks, n_col_blocks, GROUP)
except ImportError:  # no triton: every test here skips
    pass


def _device_params():
    params = []
    if availability("triton", "cpu").ok:
        params.append(pytest.param("cpu", id="interp"))
    if torch.cuda.is_available() and availability("triton", "cuda").ok:
        params.append(pytest.param("cuda", id="cuda", marks=pytest.mark.cuda))
    return params


DEVICES = _device_params()
if not DEVICES:
    pytestmark = pytest.mark.skip(reason="backend triton unavailable: needs a GPU, or TRITON_INTERPRET=1 on CPU")

# float32 everywhere; bfloat16 on the GPU (and once under the interpreter, which computes it with
# float32 dots: its bf16 tl.dot is wrong, triton issue 11584).
CASES = [pytest.param(d.values[0], torch.float32, id=f"{d.id}-fp32", marks=d.marks) for d in DEVICES] + [
    pytest.param(d.values[0], torch.bfloat16, id=f"{d.id}-bf16", marks=d.marks) for d in DEVICES]

# The gradient path (triton_kernels.rows) keeps WORKSPACE_BYTES of logits per call: every test
# here runs it with room for 16 float32 rows of V = 300 (CE: 16 rows in fp32, 32 in bf16; KL: 8
# and 16), so N = 37 spans several chunks, the last one ragged. test_workspace_size_changes_nothing
# compares with the default.
SMALL_WORKSPACE = 16 * V * 4


@pytest.fixture(autouse=True)
def _small_workspace(monkeypatch):
    if DEVICES:
        from surgery_kernels.backends.triton_kernels import rows
        monkeypatch.setattr(rows, "WORKSPACE_BYTES", SMALL_WORKSPACE)


@pytest.fixture
def fused_backward(monkeypatch):
    """The fused backward kernels (ce.py / kl.py, float32 atomics) instead of the default path."""
    from surgery_kernels.backends import triton_fused
    monkeypatch.setattr(triton_fused, "BACKWARD", "fused")


def _rel(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    den = ref.norm()
    return float((x - ref).norm() / den) if den > 0 else float((x - ref).norm())


def _assert_close(name, ours, plain, ref, dtype):
    """ours/plain/ref: tensors (values or a gradient) from our backend, plain PyTorch in dtype, float64."""
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = _rel(ours, ref)
    if dtype == torch.float32:
        assert err <= 1e-5, f"{name}: relative error {err:.3g} > 1e-5"
    else:
        bound = 2 * _rel(plain, ref) + 1e-6
        assert err <= bound, f"{name}: relative error {err:.3g} > 2 x plain PyTorch's + 1e-6 = {bound:.3g}"


def _grads(out, inputs, upstream=None):
    if upstream is None:
        upstream = torch.ones_like(out)
    live = [x for x in inputs if x is not None and x.requires_grad]
    return out, torch.autograd.grad(out, live, upstream)


def _leaf(x, grad=True):
    return x.detach().clone().requires_grad_(grad)


def _ce_inputs(device, dtype, n=N, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, H, generator=g)
    w = torch.randn(V, H, generator=g) * 0.4
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    return [None if x is None else x.to(device) for x in (h, w, b, t)]


def _compare(results, dtype):
    """results: [(value, grads)] of ours, plain PyTorch in ``dtype`` and the float64 reference;
    each compared by ``_assert_close``. Returns ours."""
    (o, go), (p, gp), (r, gr) = results
    _assert_close("value", o, p, r, dtype)
    for i, (a, b_, c) in enumerate(zip(go, gp, gr)):
        _assert_close(f"grad {i}", a, b_, c, dtype)
    return o, go


def _check_ce(device, dtype, h, w, t, *, bias=None, grad=(True, True, True), upstream=None, **kw):
    """Run ours (backend triton, dtype), plain PyTorch (dtype) and float64; compare value and grads."""
    results = []
    for impl, dt in (("ours", dtype), ("plain", dtype), ("ref", torch.float64)):
        # every side sees the same dtype-rounded inputs: the reference upcasts them, it does not
        # start again from the float32 originals (that would measure input rounding, not the loss)
        cast = lambda x: x.to(dtype).to(dt)
        hh, ww = _leaf(cast(h), grad[0]), _leaf(cast(w), grad[1])
        bb = None if bias is None else _leaf(cast(bias), grad[2])
        opts = {k: (cast(v) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
        if impl == "ours":
            out = linear_cross_entropy(hh, ww, t, bias=bb, backend="triton", **opts)
        else:
            out = linear_cross_entropy_ref(hh, ww, t, bias=bb, compute_dtype=dt if impl == "ref" else None, **opts)
        up = None if upstream is None else upstream.to(out.dtype)
        results.append(_grads(out, (hh, ww, bb), up) if any(grad) else (out, ()))
    return _compare(results, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_ce_plain(device, dtype, reduction):
    h, w, _, t = _ce_inputs(device, dtype)
    _check_ce(device, dtype, h, w, t, reduction=reduction)


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_bias_ignore_signed_weights(device, dtype):
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    t[[2, 11, 36]] = -100
    tw = torch.linspace(-1.5, 2.0, N, device=device)
    _check_ce(device, dtype, h, w, t, bias=b, token_weight=tw)


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_ascent_cap(device, dtype):
    h, w, _, t = _ce_inputs(device, dtype)
    tw = torch.where(torch.arange(N, device=device) % 2 == 0, -1.0, 0.5)
    ce = linear_cross_entropy_ref(h.double(), w.double(), t, reduction="none")
    # a cap between the ascent tokens' ce values: some are capped, some are not
    cap = float(ce[tw < 0].median())
    capped = (tw < 0) & (ce > cap)
    assert 0 < int(capped.sum()) < int((tw < 0).sum())
    _check_ce(device, dtype, h, w, t, token_weight=tw, ascent_cap=cap)


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_softcap_with_bias(device, dtype):
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    # softcap 2 is well below the logits' spread, so tanh's curvature matters
    _check_ce(device, dtype, h, w, t, bias=b, softcap=2.0, reduction="sum")


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_large_softcap(device, dtype):
    """softcap far above the logits (tanh's argument near 0): tanh's exp formula had an absolute
    error of ~1 ulp of 1 there, which softcap multiplied (2.6e-5 of the loss at 1e4, beyond the
    1e-5 float32 contract); near 0 the kernels take tanh's Taylor polynomial."""
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    for softcap in (1e4, 1e6):
        _check_ce(device, dtype, h, w, t, bias=b, softcap=softcap, token_weight=torch.linspace(-1, 1, N, device=device))


@pytest.mark.parametrize("device", [d.values[0] for d in DEVICES])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_scale_kernel_multiplies_in_float32(device, dtype):
    """common.scale_ (the in-place upstream scaling of 16-bit gradients on the GPU): the product in
    float32 with the scale read on the device, rounded once — 65536 does not overflow float16, and
    a scale of 1/3 is not rounded to 16 bits first."""
    from surgery_kernels.backends.triton_kernels.common import scale_

    g = (torch.randn(5000, generator=torch.Generator().manual_seed(0)) * 1e-3).to(device=device, dtype=dtype)
    for s in (65536.0, 1 / 3, -2.5):
        got = g.clone()
        scale_(got, torch.tensor(s, device=device))
        assert torch.equal(got, (g.float() * s).to(dtype)), s


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_none_random_upstream(device, dtype):
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    t[[0, 5]] = -100
    tw = torch.randn(N, generator=torch.Generator().manual_seed(3)).to(device)
    up = torch.randn(N, generator=torch.Generator().manual_seed(4)).to(device)
    out, _ = _check_ce(device, dtype, h, w, t, bias=b, token_weight=tw, softcap=5.0, reduction="none", upstream=up)
    assert out.shape == (N,) and bool((out[[0, 5]] == 0).all())


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_ignore_index_is_a_class(device, dtype):
    # ignore_index inside [0, V): tokens with that target are skipped, the class itself is not
    h, w, _, t = _ce_inputs(device, dtype)
    t[[1, 2, 3]] = 7
    _check_ce(device, dtype, h, w, t, ignore_index=7)


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_all_ignored(device, dtype):
    h, w, _, t = _ce_inputs(device, dtype)
    t = torch.full_like(t, -100)
    hh, ww = _leaf(h.to(dtype)), _leaf(w.to(dtype))
    out = linear_cross_entropy(hh, ww, t, backend="triton")
    out.backward()
    assert float(out.detach()) == 0.0
    assert bool((hh.grad == 0).all()) and bool((ww.grad == 0).all())


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_single_token(device, dtype):
    h, w, b, t = _ce_inputs(device, dtype, n=1, bias=True)
    _check_ce(device, dtype, h, w, t, bias=b)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("grad", [(True, False, False), (False, True, True)], ids=["dhidden", "dweight-dbias"])
def test_ce_partial_grads(device, dtype, grad):
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    _check_ce(device, dtype, h, w, t, bias=b, grad=grad)


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_no_grad_values(device, dtype):
    # evaluation: per-token log-likelihoods under no_grad, leading dims kept
    h, w, _, t = _ce_inputs(device, dtype)
    with torch.no_grad():
        out = linear_cross_entropy(h[:36].reshape(4, 9, H).to(dtype), w.to(dtype), t[:36].reshape(4, 9),
                                   reduction="none", backend="triton")
    ref = linear_cross_entropy_ref(h[:36].double(), w.double(), t[:36], reduction="none")
    plain = linear_cross_entropy_ref(h[:36].to(dtype), w.to(dtype), t[:36], reduction="none")
    assert out.shape == (4, 9)
    _assert_close("value", out.reshape(-1), plain, ref, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
def test_ce_huge_logits_stay_finite(device, dtype):
    # logits of order 1e4 and a near-onehot softmax: no overflow in the online log-sum-exp
    h, w, _, t = _ce_inputs(device, dtype)
    _check_ce(device, dtype, h * 300.0, w, t, reduction="sum")


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("banned", [(0, 128), (256, 300)], ids=["first-block", "last-split"])
@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_ce_minus_inf_bias_bans_a_vocabulary_block(device, dtype, banned, path, monkeypatch):
    """A -inf bias (banned or padded vocabulary entries) over a whole vocabulary block — the first
    block of the first split, or the whole second split — leaves the online log-sum-exp finite:
    values (no_grad, fused forward) and gradients (both backward paths) match float64."""
    from surgery_kernels.backends import triton_fused

    monkeypatch.setattr(triton_fused, "BACKWARD", path)
    h, w, b, _ = _ce_inputs(device, dtype, bias=True)
    b[banned[0]:banned[1]] = float("-inf")
    t = torch.randint(128, 256, (N,), generator=torch.Generator().manual_seed(1)).to(device)  # never banned
    with torch.no_grad():
        out = linear_cross_entropy(h.to(dtype), w.to(dtype), t, bias=b.to(dtype), reduction="none", backend="triton")
    ref = linear_cross_entropy_ref(h.to(dtype).double(), w.to(dtype).double(), t, bias=b.to(dtype).double(),
                                   reduction="none")
    plain = linear_cross_entropy_ref(h.to(dtype), w.to(dtype), t, bias=b.to(dtype), reduction="none")
    _assert_close("no_grad value", out, plain, ref, dtype)
    _check_ce(device, dtype, h, w, t, bias=b, grad=(True, True, False), reduction="sum")


@pytest.mark.parametrize("device,dtype", CASES)
def test_fused_backward(device, dtype, fused_backward):
    """The fused backward kernels (tiles recomputed on chip, float32 atomics), kept for comparison:
    every CE option and a reverse tempered KL (under the interpreter bf16 runs with float32 dots)."""
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    t[[3, 20]] = -100
    _check_ce(device, dtype, h, w, t, bias=b, softcap=4.0, ascent_cap=5.0,
              token_weight=torch.linspace(-1, 1, N, device=device))
    h, w, b, rh, rw, rb = _kl_inputs(device)
    _check_kl(device, dtype, h, w, b, rh, rw, rb, mask=torch.arange(N, device=device) % 5 != 0,
              direction="reverse", temperature=1.5)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", ["ce", "kl"])
@pytest.mark.parametrize("backward", ["chunked", "fused"])
def test_no_host_synchronization(device, dtype, op, reduction, backward, monkeypatch, target_check_as_on_cuda):
    """Forward+backward with every option (conftest.loss_calls) runs no op that would make the host
    wait for the GPU: no launch argument, grid or path is read from a tensor's values. N = 20 spans
    two chunks of the small workspace (three for KL). Under the interpreter the target check takes
    its CUDA branch (target_check_as_on_cuda); on a GPU the first call of each variant autotunes
    (timed runs that synchronize, once per shape), so those calls run first, unchecked."""
    from surgery_kernels.backends import triton_fused

    monkeypatch.setattr(triton_fused, "BACKWARD", backward)
    if device == "cuda":
        for call in loss_calls(op, "triton", device, dtype, reduction, n=20, h=H, v=V):
            call()
    assert_no_host_sync(loss_calls(op, "triton", device, dtype, reduction, n=20, h=H, v=V), device)


def _kl_inputs(device, n=N, seed=1, rh=RH, bias=True):
    g = torch.Generator().manual_seed(seed)
    xs = (torch.randn(n, H, generator=g), torch.randn(V, H, generator=g) * 0.4,
          torch.randn(V, generator=g) if bias else None,
          torch.randn(n, rh, generator=g), torch.randn(V, rh, generator=g) * 0.4,
          torch.randn(V, generator=g) if bias else None)
    return [None if x is None else x.to(device) for x in xs]


def _ce_and_kl_grads(dtype, ce_inputs, kl_inputs, tw, **ce_opts):
    """Gradients (dh, dw, db) of a weighted CE with bias and softcap 4 (plus ``ce_opts``), then of
    a reverse KL with both biases, backend triton, every input cast to ``dtype``."""
    h, w, b, t = ce_inputs
    hh, ww, bb = (_leaf(x.to(dtype)) for x in (h, w, b))
    ce = torch.autograd.grad(linear_cross_entropy(hh, ww, t, bias=bb, token_weight=tw, softcap=4.0, backend="triton",
                                                  **ce_opts), (hh, ww, bb))
    hk, wk, bk_, rh, rw, rb = kl_inputs
    hh, ww, bb = (_leaf(x.to(dtype)) for x in (hk, wk, bk_))
    kl = torch.autograd.grad(linear_kl_div(hh, ww, rh.to(dtype), rw.to(dtype), bias=bb, ref_bias=rb.to(dtype),
                                           direction="reverse", backend="triton"), (hh, ww, bb))
    return ce + kl


def _check_kl(device, dtype, h, w, b, rh, rw, rb, *, upstream=None, shared_head=False, **kw):
    results = []
    for impl, dt in (("ours", dtype), ("plain", dtype), ("ref", torch.float64)):
        cast = lambda x: x.to(dtype).to(dt)  # the reference upcasts the same rounded inputs
        hh, ww = _leaf(cast(h)), _leaf(cast(w))
        bb = None if b is None else _leaf(cast(b))
        refs = [None if x is None else cast(x) for x in (rh, rw, rb)]
        if shared_head:
            refs[1] = ww
        opts = {k: (cast(v) if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
        if impl == "ours":
            out = linear_kl_div(hh, ww, refs[0], refs[1], bias=bb, ref_bias=refs[2], backend="triton", **opts)
        else:
            out = linear_kl_div_ref(hh, ww, refs[0], refs[1], bias=bb, ref_bias=refs[2],
                                    compute_dtype=dt if impl == "ref" else None, **opts)
        up = None if upstream is None else upstream.to(out.dtype)
        results.append(_grads(out, (hh, ww, bb), up))
    return _compare(results, dtype)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("path", ["chunked", "fused"])
@pytest.mark.parametrize("caps", [{}, dict(softcap=3.0, ref_softcap=4.0)], ids=["", "softcap"])
def test_kl_minus_inf_bias_on_both_sides(device, dtype, direction, path, caps, monkeypatch):
    """Both sides ban the first vocabulary block and the second split with a -inf bias: 0 * log 0
    = 0 there (not NaN) in the values and in both backward paths, as in float64. With softcaps
    the banned logits become -softcap (finite, tanh's gradient 0 there)."""
    from surgery_kernels.backends import triton_fused

    monkeypatch.setattr(triton_fused, "BACKWARD", path)
    h, w, b, rh, rw, rb = _kl_inputs(device)
    for lo, hi in ((0, 128), (256, 300)):
        b[lo:hi] = rb[lo:hi] = float("-inf")
    _check_kl(device, dtype, h, w, b, rh, rw, rb, direction=direction, reduction="sum", **caps)
    _check_kl(device, dtype, h, w, b, rh, rw, rb, direction=direction, reduction="none",
              upstream=torch.linspace(-1, 2, N, device=device), **caps)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("path", ["chunked", "fused"])
def test_kl_softcap(device, dtype, direction, path, monkeypatch):
    """Softcapped logits (Gemma-2's final_logit_softcapping) on both sides, then on the trained side
    alone, at temperature 1.5: these logits reach ~3x the caps, so tanh saturates. Values and the
    gradients of both backward paths as in float64."""
    from surgery_kernels.backends import triton_fused

    monkeypatch.setattr(triton_fused, "BACKWARD", path)
    h, w, b, rh, rw, rb = _kl_inputs(device)
    mask = torch.arange(N, device=device) % 6 != 2
    _check_kl(device, dtype, h, w, b, rh, rw, rb, mask=mask, direction=direction, temperature=1.5, softcap=3.0,
              ref_softcap=4.5, reduction="sum")
    _check_kl(device, dtype, h, w, b, rh, rw, rb, direction=direction, temperature=1.5, softcap=3.0,
              reduction="none", upstream=torch.linspace(-1, 2, N, device=device))


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_kl_directions_temperature_mask(device, dtype, direction, temperature):
    h, w, b, rh, rw, rb = _kl_inputs(device)
    mask = torch.arange(N, device=device) % 5 != 0
    _check_kl(device, dtype, h, w, b, rh, rw, rb, mask=mask, direction=direction, temperature=temperature)


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_none_random_upstream_token_weight(device, dtype, direction):
    h, w, b, rh, rw, rb = _kl_inputs(device)
    mask = torch.arange(N, device=device) % 4 != 1
    tw = torch.rand(N, generator=torch.Generator().manual_seed(5)).to(device) * 2
    up = torch.randn(N, generator=torch.Generator().manual_seed(6)).to(device)
    out, _ = _check_kl(device, dtype, h, w, b, rh, rw, rb, mask=mask, token_weight=tw, direction=direction,
                       reduction="none", upstream=up)
    assert bool((out[~mask] == 0).all())


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_shared_head_sum(device, dtype, direction):
    # LoRA without an adapted head: ref_weight is the very tensor passed as weight; it gets
    # the trained side's gradient only
    h, w, _, _, _, _ = _kl_inputs(device, bias=False)
    rh = h + 0.3 * torch.randn(N, H, generator=torch.Generator().manual_seed(7)).to(device)
    _check_kl(device, dtype, h, w, None, rh, None, None, shared_head=True, direction=direction, reduction="sum")


@pytest.mark.parametrize("device,dtype", CASES)
def test_kl_identical_models_is_zero(device, dtype):
    h, w, b, _, _, _ = _kl_inputs(device)
    hh, ww, bb = _leaf(h.to(dtype)), _leaf(w.to(dtype)), _leaf(b.to(dtype))
    for direction in ("forward", "reverse"):
        out = linear_kl_div(hh, ww, hh.detach(), ww.detach(), bias=bb, ref_bias=bb.detach(), direction=direction,
                            backend="triton")
        grads = torch.autograd.grad(out, (hh, ww, bb))
        assert abs(float(out)) < 1e-6
        assert all(float(g.abs().max()) < 1e-6 for g in grads)


@pytest.mark.parametrize("device,dtype", CASES)
def test_kl_all_masked_and_single_token(device, dtype):
    h, w, b, rh, rw, rb = _kl_inputs(device)
    hh, ww = _leaf(h.to(dtype)), _leaf(w.to(dtype))
    out = linear_kl_div(hh, ww, rh.to(dtype), rw.to(dtype), mask=torch.zeros(N, dtype=torch.bool, device=device),
                        backend="triton")
    out.backward()
    assert float(out) == 0.0 and bool((hh.grad == 0).all()) and bool((ww.grad == 0).all())
    h1, w1, b1, rh1, rw1, rb1 = _kl_inputs(device, n=1)
    _check_kl(device, dtype, h1, w1, b1, rh1, rw1, rb1, direction="reverse", temperature=0.7)


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_grad_filter_flag(device, monkeypatch, fused_backward):
    from surgery_kernels.backends.triton_kernels import common

    h, w, _, t = _ce_inputs(device, torch.float32)
    exact = _check_ce(device, torch.float32, h, w, t)[1]
    # a threshold below every nonzero |softmax - onehot| changes nothing
    monkeypatch.setattr(common, "GRAD_FILTER_EPS", 1e-30)
    hh, ww = _leaf(h), _leaf(w)
    gh, gw = torch.autograd.grad(linear_cross_entropy(hh, ww, t, backend="triton"), (hh, ww))
    assert _rel(gh, exact[0]) < 1e-6 and _rel(gw, exact[1]) < 1e-6
    # |softmax - onehot| <= 1 < 2: every tile is filtered, so the flag reaches the kernel
    monkeypatch.setattr(common, "GRAD_FILTER_EPS", 2.0)
    hh, ww = _leaf(h), _leaf(w)
    gh, gw = torch.autograd.grad(linear_cross_entropy(hh, ww, t, backend="triton"), (hh, ww))
    assert bool((gh == 0).all()) and bool((gw == 0).all())


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_float64_goes_to_the_torch_backend(device):
    """float64 (a reference computation) runs the chunked torch backend, as cpu and cuda do: the
    same values and gradients, bit for bit, CE (mean, with grads) and KL ("none", values)."""
    h, w, b, t = _ce_inputs(device, torch.float64, bias=True)
    out = {}
    for backend in ("triton", "torch"):
        hh, ww = _leaf(h.double()), _leaf(w.double())
        loss = linear_cross_entropy(hh, ww, t, bias=b.double(), backend=backend)
        kl = linear_kl_div(hh, ww, h.double().flip(0), w.double(), reduction="none", backend=backend)
        out[backend] = (loss, kl, *torch.autograd.grad(loss, (hh, ww)))
    assert out["triton"][0].dtype == torch.float64
    for a, c in zip(out["triton"], out["torch"]):
        assert torch.equal(a, c)


def test_availability_reasons(monkeypatch):
    from surgery_kernels.backends import triton_fused

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    a = triton_fused.availability("triton", "cpu")
    assert not a.ok and "TRITON_INTERPRET=1" in a.reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_fused.availability("triton", "cpu").ok
    assert not triton_fused.availability("triton", "mps").ok


@pytest.mark.cuda
def test_cuda_offsets_above_2_31(monkeypatch):
    """N * H > 2**31 (the hidden row offsets overflow int32). Only the last rows carry weight; the
    forward runs on all rows. A 64 MiB workspace (38 chunks here, not this file's 130k). Needs
    ~17 GB of GPU memory."""
    if not (torch.cuda.is_available() and availability("triton", "cuda").ok):
        pytest.skip("needs a GPU")
    from surgery_kernels.backends.triton_kernels import rows
    monkeypatch.setattr(rows, "WORKSPACE_BYTES", 64 << 20)
    hdim, v, tail = 1024, 300, 64
    n = (1 << 31) // hdim + 4096
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(n, hdim, device="cuda", generator=g).requires_grad_()
    w = (torch.randn(v, hdim, device="cuda", generator=g) * 0.05).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda", generator=g)
    tw = torch.zeros(n, device="cuda")
    tw[-tail:] = torch.linspace(-1, 1, tail, device="cuda")
    out = linear_cross_entropy(h, w, t, token_weight=tw, reduction="none", backend="triton")
    gh, gw = torch.autograd.grad(out.sum(), (h, w))
    h64, w64 = h[-tail:].detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = linear_cross_entropy_ref(h64, w64, t[-tail:], token_weight=tw[-tail:].double(), reduction="none")
    rgh, rgw = torch.autograd.grad(ref.sum(), (h64, w64))
    assert _rel(out[-tail:], ref) <= 1e-5
    assert _rel(gh[-tail:], rgh) <= 1e-5 and _rel(gw, rgw) <= 1e-5
    assert bool((gh[:-tail] == 0).all())


def test_gpu_launch_path_under_interpreter(monkeypatch, fused_backward):
    """The GPU launch code (autotuner objects, grid lambdas, config meta-parameters) run under the
    interpreter with one config per kernel, so a slip there shows before a GPU run."""
    if not availability("triton", "cpu").ok:
        pytest.skip("needs TRITON_INTERPRET=1")
    import triton

    from surgery_kernels.backends.triton_kernels import ce as ce_k
    from surgery_kernels.backends.triton_kernels import common
    from surgery_kernels.backends.triton_kernels import kl as kl_k

    def one(kernel, cfg, acc=None):
        tuned = triton.autotune([cfg], key=["V", "H"], restore_value=acc)(kernel)
        return {True: tuned, False: tuned}

    acc = ["dh_ptr", "dw_ptr", "db_ptr"]
    monkeypatch.setattr(common, "INTERPRET", False)
    cfg = common.FP32_CONFIGS[0]
    monkeypatch.setattr(ce_k, "ce_fwd_tuned", one(ce_k.ce_fwd_kernel, cfg))
    monkeypatch.setattr(ce_k, "ce_bwd_tuned", one(ce_k.ce_bwd_kernel, cfg, acc))
    monkeypatch.setattr(kl_k, "kl_fwd_tuned", one(kl_k.kl_fwd_kernel, cfg))
    monkeypatch.setattr(kl_k, "kl_bwd_tuned", one(kl_k.kl_bwd_kernel, cfg, acc))
    h, w, b, t = _ce_inputs("cpu", torch.float32, bias=True)
    _check_ce("cpu", torch.float32, h, w, t, bias=b, softcap=3.0, token_weight=torch.linspace(-1, 1, N))
    h, w, b, rh, rw, rb = _kl_inputs("cpu")
    _check_kl("cpu", torch.float32, h, w, b, rh, rw, rb, direction="reverse", temperature=1.5)


@pytest.mark.parametrize("device", [d for d in DEVICES])
@pytest.mark.parametrize("op", ["ce", "ce-none", "kl", "kl-none"])
def test_never_creates_an_n_by_v_tensor(device, op):
    """The fused path holds no logits at all: every tensor an aten op creates is at most the bytes
    of a float32 input, gradient or (64 splits, N) statistic, below the N x V float32 logits.
    Counted in bytes because the interpreter copies arguments as byte tensors."""
    n, h, v = 40, 8, 300
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = torch.randn(v, h, generator=g).to(device).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    ref_h, ref_w = torch.randn(n, h, generator=g).to(device), torch.randn(v, h, generator=g).to(device)
    red = "none" if op.endswith("none") else "mean"
    with RecordCreated() as rec:
        if op.startswith("ce"):
            out = linear_cross_entropy(hidden, weight, target, reduction=red, backend="triton")
        else:
            out = linear_kl_div(hidden, weight, ref_h, ref_w, reduction=red, backend="triton")
        out.backward(torch.ones_like(out))
    biggest = rec.largest_bytes()
    assert biggest[0] <= 4 * max(n * h, v * h, 64 * n) < 4 * n * v, f"created {biggest[0]} bytes in {biggest[1]}"


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_opcheck(device):
    """Each primitive is a torch.library custom op: schema, fake (meta) implementation and
    dispatch agree (torch.library.opcheck), so torch.compile sees opaque ops."""
    for op, args in _primitive_calls(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("path", ["chunked", "fused"])
@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_softcap_derivative_in_saturation(device, path, monkeypatch):
    """|z / softcap| in 5-8: softcap' = 1 - tanh^2 formed from a rounded tanh keeps few digits
    there (plain float32 PyTorch: 8 % on d_bias, 5e-4 on d_hidden); the kernels take it from
    exp(-2|x|) directly, 4e / (1 + e)^2. They formed it from their tanh before (16 %, 1.1e-3)."""
    from surgery_kernels.backends import triton_fused

    monkeypatch.setattr(triton_fused, "BACKWARD", path)
    g = torch.Generator().manual_seed(0)
    n, h, v, cap = 32, 16, 200, 30.0
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g)
    weight = weight / weight.norm(dim=1, keepdim=True)
    bias = torch.where(torch.rand(v, generator=g) < 0.5, 1.0, -1.0) * (150 + 90 * torch.rand(v, generator=g))
    target = torch.randint(0, v, (n,), generator=g)

    def grads(dtype, fn, **kw):
        leaves = [x.to(device=device, dtype=dtype).clone().requires_grad_() for x in (hidden, weight, bias)]
        fn(leaves[0], leaves[1], target.to(device), bias=leaves[2], softcap=cap, reduction="sum", **kw).backward()
        return [x.grad.double().cpu() for x in leaves]

    ref = grads(torch.float64, linear_cross_entropy_ref)
    plain = grads(torch.float32, linear_cross_entropy_ref)
    ours = grads(torch.float32, linear_cross_entropy, backend="triton")
    err = lambda x, r: ((x - r).norm() / r.norm()).item()
    elementwise = lambda x, r: ((x - r).abs() / r.abs()).max().item()
    assert elementwise(plain[2], ref[2]) > 1e-2  # the regime: plain float32 keeps few digits
    assert elementwise(ours[2], ref[2]) <= 1e-4
    for x, r, p in zip(ours, ref, plain):
        assert err(x, r) <= 0.01 * err(p, r)


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_primitives_run_on_their_inputs_gpu(device, monkeypatch):
    """Triton launches on the current device: every primitive makes hidden's GPU current first
    (inputs on cuda:1 with cuda:0 current would otherwise run on the wrong GPU)."""
    import contextlib

    from surgery_kernels.backends import triton_fused as tf

    class Stub:
        device = torch.device("cuda", 1)

    guard = tf._device_of(Stub())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    seen = []
    monkeypatch.setattr(tf, "_device_of", lambda t: seen.append(t.device) or contextlib.nullcontext())
    calls = _primitive_calls(device)
    seen.clear()
    for op, args in calls:
        op(*args)
    assert len(calls) == 6 and seen == [torch.device(device)] * 6


@pytest.mark.cuda
def test_inputs_on_another_gpu_than_the_current_one():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(64, 32, generator=g), torch.randn(300, 32, generator=g)
    t = torch.randint(0, 300, (64,), generator=g)
    torch.cuda.set_device(0)
    for op in ("ce", "kl"):
        hd, wd = h.to("cuda:1").requires_grad_(), w.to("cuda:1").requires_grad_()
        out = linear_cross_entropy(hd, wd, t.to("cuda:1"), backend="triton") if op == "ce" else \
            linear_kl_div(hd, wd, hd.detach() * 0.5, wd.detach(), backend="triton")
        ref = linear_cross_entropy_ref(h, w, t) if op == "ce" else linear_kl_div_ref(h, w, h * 0.5, w)
        out.backward()
        assert out.device == torch.device("cuda:1")
        assert abs(out.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5


def _primitive_calls(device):
    """(op, args) for each of the six Triton primitives, on small inputs."""
    from surgery_kernels.backends import triton_fused as tf

    g = torch.Generator().manual_seed(0)
    n, h, v = 19, 16, 150
    hid, w, b = (torch.randn(*s, generator=g).to(device) for s in ((n, h), (v, h), (v,)))
    t = torch.randint(0, v, (n,), generator=g).to(device)
    coeff = torch.randn(n, generator=g).to(device)
    mask = (torch.arange(n) % 3 != 0).to(device)
    rh, rw = torch.randn(n, 8, generator=g).to(device), torch.randn(v, 8, generator=g).to(device)
    ce, lse = tf._ce_forward(hid, w, b, t, -100, 3.0)
    kl, qlse, plse = tf._kl_forward(hid, w, b, rh, rw, None, mask, "reverse", 1.5, None, None)
    cases = [
        (tf._ce_forward, (hid, w, b, t, -100, 3.0)),
        (tf._ce_backward, (hid, w, b, t, lse, coeff, -100, 3.0, [True, True, True], None)),
        (tf._ce_forward_backward, (hid, w, None, t, coeff, -100, None, 2.0, [True, False, False], 8)),
        (tf._kl_forward, (hid, w, b, rh, rw, None, mask, "reverse", 1.5, 3.0, None)),
        (tf._kl_backward, (hid, w, b, rh, rw, None, qlse, plse, kl, coeff, "reverse", 1.5, None, None,
                           [False, True, True], 8)),
        (tf._kl_forward_backward, (hid, w, None, rh, rw, None, mask, coeff, "forward", 1.0, 2.0, 4.0,
                                   [True, True, False], None)),
    ]
    return cases


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_vocab_chunked_dweight(device, monkeypatch, fused_backward):
    """16-bit weights: dW accumulates in float32 one vocabulary chunk at a time. With chunks of
    256 rows (V = 300: two chunks, the second ragged) CE and KL gradients equal the one-chunk ones
    and stay within the bf16 bound against float64."""
    from surgery_kernels.backends.triton_kernels import common

    dt = torch.bfloat16
    h, w, b, t = _ce_inputs(device, dt, bias=True)
    tw = torch.linspace(-1, 1, N, device=device)
    hk, wk, bk_, rhk, rwk, rbk = _kl_inputs(device)

    def grads():
        return _ce_and_kl_grads(dt, (h, w, b, t), (hk, wk, bk_, rhk, rwk, rbk), tw)

    whole = grads()
    monkeypatch.setattr(common, "DW_CHUNK_ELEMENTS", 256 * max(H, RH))
    assert len(common.vocab_chunks(V, H)) == 2
    chunked = grads()
    # The interpreter adds in a fixed order: bit-for-bit. A GPU's atomics add in a varying order,
    # which can flip the bf16 rounding of an element by one ulp (2**-8): compare loosely there
    # and rely on the float64 checks below.
    tol = 1e-6 if device == "cpu" else 1e-2
    for a, c in zip(whole, chunked):
        print("REL", _rel(c, a)); assert torch.isfinite(c).all() and _rel(c, a) <= tol
    _check_ce(device, dt, h, w, t, bias=b, token_weight=tw, softcap=4.0)
    _check_kl(device, dt, hk, wk, bk_, rhk, rwk, rbk, direction="reverse")


def test_autotuning_keeps_accumulated_sums(monkeypatch, fused_backward):
    """Autotuning the backward in the middle of a call (the last dW chunk has a new width, so a new
    tuning key) must leave the dH sums of the earlier chunks alone. Runs the GPU launch path under
    the interpreter with two configs per kernel and a CPU stand-in for do_bench."""
    if not availability("triton", "cpu").ok:
        pytest.skip("needs TRITON_INTERPRET=1")
    import time

    import triton

    from surgery_kernels.backends.triton_kernels import ce as ce_k
    from surgery_kernels.backends.triton_kernels import common

    def cpu_bench(fn, quantiles=None, **kw):
        t0 = time.perf_counter()
        fn()
        fn()  # twice: a config that accumulated into unrestored buffers would show
        t = (time.perf_counter() - t0) * 1e3
        return [t, t, t] if quantiles else t

    two = [common.FP32_CONFIGS[0], triton.Config(dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=32, GROUP=4))]
    dt = torch.bfloat16
    h, w, b, t = _ce_inputs("cpu", dt, bias=True)
    tw = torch.linspace(-1, 1, N)

    def grads():
        hh, ww, bb = _leaf(h.to(dt)), _leaf(w.to(dt)), _leaf(b.to(dt))
        return torch.autograd.grad(linear_cross_entropy(hh, ww, t, bias=bb, token_weight=tw, backend="triton"),
                                   (hh, ww, bb))

    exact = grads()
    monkeypatch.setattr(common, "DW_CHUNK_ELEMENTS", 256 * H)  # chunks of 256 and 44 rows: two tuning keys
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(common, "FP32_CONFIGS", two)
    monkeypatch.setattr(ce_k, "ce_fwd_tuned", common.autotuned(ce_k.ce_fwd_kernel, two, ["V", "H"],
                                                               do_bench=cpu_bench))
    monkeypatch.setattr(ce_k, "ce_bwd_tuned", common.autotuned(ce_k.ce_bwd_kernel, two, ["V", "H"],
                                                               ["dh_ptr", "dw_ptr", "db_ptr"], do_bench=cpu_bench))
    # DOT_FP32 follows INTERPRET: keep the interpreter's float32 dots for bf16
    monkeypatch.setattr(common, "dot_precision", lambda dtype: "ieee")
    real_launch = common.launch

    def launch(kernel, tuned, args, flags, **kw):
        return real_launch(kernel, tuned, args, dict(flags, DOT_FP32=True), **kw)

    monkeypatch.setattr(common, "launch", launch)
    tuned = grads()
    for a, c in zip(exact, tuned):
        assert _rel(c, a) <= 1e-6


@pytest.mark.parametrize("device,dtype", CASES)
def test_workspace_size_changes_nothing(device, dtype, monkeypatch):
    """Chunks of 16/32 rows (this file's workspace) against one chunk of all 37 (the default
    workspace): the same gradients, up to the order of additions into dW."""
    from surgery_kernels.backends.triton_kernels import rows

    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    hk, wk, bk_, rhk, rwk, rbk = _kl_inputs(device)
    tw = torch.linspace(-1, 1, N, device=device)

    def grads():
        return _ce_and_kl_grads(dtype, (h, w, b, t), (hk, wk, bk_, rhk, rwk, rbk), tw, ascent_cap=5.0)

    chunked = grads()
    assert rows.chunk_rows(N, V, 4, 1, None) == 16 and rows.chunk_rows(N, V, 4, 2, None) == 8
    monkeypatch.setattr(rows, "WORKSPACE_BYTES", 256 << 20)
    assert rows.chunk_rows(N, V, 4, 2, None) == N
    whole = grads()
    # bf16: dW's float32 sums in another order (2 chunks against 1), each rounded once
    tol = 1e-6 if dtype == torch.float32 else 4e-3
    for a, c in zip(whole, chunked):
        print("REL", _rel(c, a)); assert torch.isfinite(c).all() and _rel(c, a) <= tol


@pytest.mark.parametrize("sides", [1, 2], ids=["ce", "kl"])
def test_tail_workspace_plan(sides, monkeypatch):
    """The tail layout's plan (rows.tail_plan; rows.Workspace on meta tensors: no memory): chunks
    tile [0, N) in order; chunk [s, e)'s logits, side after side on 64-element boundaries, lie
    after dhidden's row e (beyond the rows it writes) and inside a buffer no longer than the
    chunks need, at most N*H + WORKSPACE_BYTES; never more chunks than the separate layout. The
    Workspace takes it only when it makes fewer chunks (not at a single chunk: no extra bytes
    tied to dhidden for nothing), and at the Llama-2-7B head it gives the counts of the docstring."""
    from surgery_kernels.backends.triton_kernels import rows

    dt = torch.bfloat16
    for n, h, v, mib in ((16384, 4096, 32000, 64), (16384, 4096, 32000, 128), (16384, 4096, 32000, 256),
                         (37, 48, 300, None), (1000, 300, 7, None), (5, 4096, 128256, 64), (3000, 17, 50021, 1),
                         (2048, 4096, 32000, 256), (40, 8, 300, 0)):
        budget = SMALL_WORKSPACE if mib is None else mib << 20
        monkeypatch.setattr(rows, "WORKSPACE_BYTES", budget)
        extra = max(budget // 2, sides * (v + rows.ALIGN))
        bounds, offsets, end = rows.tail_plan(n, h, v, sides, budget // 2)
        assert [s for s, _ in bounds] == [0] + [e for _, e in bounds[:-1]] and bounds[-1][1] == n
        last = 0
        for (s, e), starts in zip(bounds, offsets):
            assert len(starts) == sides and starts[0] >= e * h and all(o % rows.ALIGN == 0 for o in starts)
            assert all(a + (e - s) * v <= b for a, b in zip(starts, starts[1:]))
            last = max(last, starts[-1] + (e - s) * v)
        assert end == max(last, n * h) <= n * h + extra
        separate = -(-n // rows.chunk_rows(n, v, 2, sides, None))
        assert len(bounds) <= separate
        monkeypatch.setattr(rows, "TAIL_WORKSPACE", True)
        ws = rows.Workspace(torch.empty(n, h, dtype=dt, device="meta"), v, [dt] * sides, None, True)
        assert ws.tail == (len(bounds) < separate)
        if ws.tail:
            assert ws.bounds == bounds and ws.flat.numel() == end and ws.dh._base is ws.flat
            for i, (s, e) in enumerate(bounds):
                views = ws.logits(i)
                assert [x.storage_offset() for x in views] == offsets[i]
                assert all(x.shape == (e - s, v) and x._base is ws.flat for x in views)
        if (n, mib) == (16384, 64):
            assert (len(bounds), separate) == ((10, 16) if sides == 1 else (19, 32)) and ws.tail
        if (n, mib) in ((16384, 256), (2048, 256)) and sides == 1:
            assert len(bounds) == separate and not ws.tail
        monkeypatch.setattr(rows, "TAIL_WORKSPACE", False)
        assert not rows.Workspace(torch.empty(n, h, dtype=dt, device="meta"), v, [dt] * sides, None, True).tail
    # not taken: a chunk_size, dhidden not wanted, KL sides of two dtypes
    monkeypatch.setattr(rows, "TAIL_WORKSPACE", True)
    monkeypatch.setattr(rows, "WORKSPACE_BYTES", 2 * 10 * 2)
    hidden = torch.empty(64, 8, dtype=dt, device="meta")
    assert rows.Workspace(hidden, 10, [dt], None, True).tail
    assert not rows.Workspace(hidden, 10, [dt], 2, True).tail
    assert not rows.Workspace(hidden, 10, [dt], None, False).tail
    assert not rows.Workspace(hidden, 10, [dt, torch.float32], None, True).tail


@pytest.mark.parametrize("device,dtype", CASES)
def test_tail_workspace(device, dtype, monkeypatch):
    """TAIL_WORKSPACE with room for 4 rows of logits per side (N = 37, H = 96, V = 120, so dhidden
    holds several rows of logits: 5 to 6 chunks instead of 10): the CE with ignored tokens, signed
    weights, softcap and reduction "none" under a random upstream gradient, the masked KL in both
    directions, against float64 like every case here; then the gradients of both ops against the
    separate layout's, up to the order of additions into dW."""
    from surgery_kernels.backends.triton_kernels import rows

    n, hd, v = 37, 96, 120
    g = torch.Generator().manual_seed(7)
    h, rh = torch.randn(n, hd, generator=g).to(device), torch.randn(n, hd // 2, generator=g).to(device)
    w, rw = (torch.randn(v, hd, generator=g) * 0.4).to(device), (torch.randn(v, hd // 2, generator=g) * 0.4).to(device)
    b, rb = torch.randn(v, generator=g).to(device), torch.randn(v, generator=g).to(device)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    tw = torch.linspace(-1, 1, n, device=device)
    monkeypatch.setattr(rows, "WORKSPACE_BYTES", 4 * v * dtype.itemsize)

    def grads(dt=dtype, ref=False):
        """ref: plain PyTorch (materialized logits) in dt, from the same dtype-rounded inputs."""
        hh, ww, bb = (_leaf(x.to(dtype).to(dt)) for x in (h, w, b))
        ce_fn, kl_fn = (linear_cross_entropy_ref, linear_kl_div_ref) if ref else (linear_cross_entropy, linear_kl_div)
        kw = {} if ref else {"backend": "triton"}
        ce = torch.autograd.grad(ce_fn(hh, ww, t, bias=bb, token_weight=tw.to(dt), softcap=4.0, ascent_cap=5.0, **kw),
                                 (hh, ww, bb))
        with monkeypatch.context() as mp:
            mp.setattr(rows, "WORKSPACE_BYTES", 2 * rows.WORKSPACE_BYTES)
            kl = torch.autograd.grad(kl_fn(hh, ww, rh.to(dtype).to(dt), rw.to(dtype).to(dt), bias=bb,
                                           ref_bias=rb.to(dtype).to(dt), direction="reverse", **kw), (hh, ww, bb))
        return ce + kl

    separate = grads()
    # float32: the two layouts may differ by float32's own error (GEMMs over other row counts
    # round differently; the reverse KL's gradient amplifies it): at most twice plain PyTorch's.
    f64, plain = grads(torch.float64, ref=True), grads(torch.float32, ref=True)
    plain_err = [_rel(p_, r_) for p_, r_ in zip(plain, f64)]
    monkeypatch.setattr(rows, "TAIL_WORKSPACE", True)
    for sides in (1, 2):
        with monkeypatch.context() as mp:
            mp.setattr(rows, "WORKSPACE_BYTES", sides * rows.WORKSPACE_BYTES)
            ws = rows.Workspace(h.to(dtype), v, [dtype] * sides, None, True)
            assert ws.tail and 5 <= len(ws.bounds) <= 6
    t2 = t.clone()
    t2[[0, 5]] = -100
    up = torch.randn(n, generator=torch.Generator().manual_seed(4)).to(device)
    _check_ce(device, dtype, h, w, t2, bias=b, token_weight=tw, softcap=5.0, reduction="none", upstream=up)
    mask = torch.arange(n, device=device) % 5 != 0
    with monkeypatch.context() as mp:
        mp.setattr(rows, "WORKSPACE_BYTES", 2 * rows.WORKSPACE_BYTES)
        for direction in ("forward", "reverse"):
            _check_kl(device, dtype, h, w, b, rh, rw, rb, mask=mask, direction=direction)
    tail = grads()
    for a, c, e in zip(separate, tail, plain_err):
        tol = max(1e-6, 2 * e) if dtype == torch.float32 else 4e-3
        assert torch.isfinite(c).all() and _rel(c, a) <= tol


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_dweight_accumulated_in_the_input_dtype(device, monkeypatch):
    """DW_ACCUM="input": bf16 dW summed in bf16 over the chunks (no float32 accumulator): the
    same gradient up to bf16 rounding per chunk, dH unchanged. The default is "float32"; one
    chunk sums in bf16 either way (one GEMM, one rounding, as plain PyTorch)."""
    from surgery_kernels.backends.triton_kernels import rows

    dt = torch.bfloat16
    h, w, _, t = _ce_inputs(device, dt)
    tw = torch.linspace(-1, 2, N, device=device)

    def grads():
        hh, ww = _leaf(h.to(dt)), _leaf(w.to(dt))
        return torch.autograd.grad(linear_cross_entropy(hh, ww, t, token_weight=tw, backend="triton"), (hh, ww))

    assert rows.DW_ACCUM == "float32"
    f32 = grads()
    monkeypatch.setattr(rows, "DW_ACCUM", "input")
    inp = grads()
    assert torch.equal(inp[0], f32[0])
    assert 0 < _rel(inp[1], f32[1]) <= 2 ** -6
    assert rows.accumulate_in_input_dtype(torch.float32, 100)  # float32 weights: always in place
    monkeypatch.setattr(rows, "DW_ACCUM", "float32")
    assert rows.accumulate_in_input_dtype(dt, 1) and not rows.accumulate_in_input_dtype(dt, 2)
    monkeypatch.setattr(rows, "DW_ACCUM", "bf16")
    with pytest.raises(ValueError, match="SURGERY_TRITON_DW_ACCUM"):
        grads()


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_default_dweight_exact_when_signed_chunks_cancel(device, monkeypatch):
    """The default float32 dW accumulator keeps the weight gradient within 2x plain PyTorch's bf16
    error where ascent and descent chunks nearly cancel (one signed call, ascent rows first as the
    surgery objective makes them, weights -1 and +1.1 on like rows, 16 chunks of 3 tokens); dW
    summed in bf16 per chunk ("input") errs relative to the partial sums instead, more here."""
    from surgery_kernels.backends.triton_kernels import rows

    dt, half = torch.bfloat16, 24
    g = torch.Generator().manual_seed(0)
    shared = torch.randn(H, generator=g) * 3  # a common direction, as LLM hidden states have
    h = (torch.randn(half, H, generator=g) + shared).to(dt).repeat(2, 1).to(device)
    w = (torch.randn(V, H, generator=g) * 0.4).to(dt).to(device)
    t = torch.randint(0, V, (half,), generator=g).repeat(2).to(device)
    tw = torch.cat([torch.full((half,), -1.0 / half), torch.full((half,), 1.1 / half)]).to(device)
    monkeypatch.setattr(rows, "WORKSPACE_BYTES", 3 * V * dt.itemsize)

    def dw(impl):
        ww = _leaf(w.double() if impl == "ref" else w)
        hh = h.double() if impl == "ref" else h
        if impl == "ours":
            loss = linear_cross_entropy(hh, ww, t, token_weight=tw, reduction="sum", backend="triton")
        else:
            loss = linear_cross_entropy_ref(hh, ww, t, token_weight=tw.to(hh.dtype), reduction="sum")
        return torch.autograd.grad(loss, ww)[0]

    ref, plain = dw("ref"), dw("plain")
    ours = dw("ours")
    monkeypatch.setattr(rows, "DW_ACCUM", "input")
    in_bf16 = dw("ours")
    assert _rel(ours, ref) <= 2 * _rel(plain, ref), (_rel(ours, ref), _rel(plain, ref))
    assert _rel(in_bf16, ref) > _rel(ours, ref)


@pytest.mark.parametrize("device", [d for d in DEVICES])
@pytest.mark.parametrize("op", ["ce", "kl"])
@pytest.mark.parametrize("tail", [False, True], ids=["separate", "tail"])
def test_gradient_path_holds_one_chunk_of_logits(device, op, tail, monkeypatch):
    """The gradient path's driver (run directly: the custom ops hide their insides from dispatch
    modes) creates nothing larger than one chunk of logits or the float32 dW accumulator, both
    below the N x V logits; in the tail layout nothing larger than dhidden and a chunk's worth of
    logits after it (there N = 200, H = 100, V = 150, so that dhidden's free rows hold whole rows
    of logits and the tail is taken: 6 chunks instead of 25)."""
    from surgery_kernels.backends.triton_kernels import rows

    n, h, v, chunk = (200, 100, 150, 8) if tail else (40, 8, 300, 16)
    sides = 1 if op == "ce" else 2
    if tail:
        monkeypatch.setattr(rows, "TAIL_WORKSPACE", True)
        monkeypatch.setattr(rows, "WORKSPACE_BYTES", 4 * chunk * v * sides)
        assert rows.Workspace(torch.empty(n, h, device="meta"), v, [torch.float32] * sides, None, True).tail
    g = torch.Generator().manual_seed(0)
    hidden, weight, ref_h, ref_w = (torch.randn(*s, generator=g).to(device) for s in ((n, h), (v, h), (n, h), (v, h)))
    target = torch.randint(0, v, (n,), generator=g).to(device)
    coeff = torch.randn(n, generator=g).to(device)
    with RecordCreated() as rec:
        if op == "ce":
            out = rows.ce(hidden, weight, None, target, coeff, ignore_index=-100, softcap=None, ascent_cap=None,
                          needs=(True, True, False), chunk_size=None if tail else chunk, stats=True)
        else:
            out = rows.kl(hidden, weight, None, ref_h, ref_w, None, None, coeff, direction="forward", temperature=1.0,
                          softcap=None, ref_softcap=None, needs=(True, True, False),
                          chunk_size=None if tail else chunk, stats=True)
    assert out[-3] is not None and out[-2] is not None
    biggest = rec.largest_bytes()
    bound = 4 * max(n * h + chunk * v * sides if tail else chunk * v, v * h)
    assert biggest[0] <= bound < 4 * n * v, f"created {biggest[0]} bytes in {biggest[1]}"
    if tail:
        assert out[-3]._base is not None and n * h < out[-3]._base.numel() <= n * h + chunk * v * sides


def test_row_kernel_autotuning_restores_the_chunk(monkeypatch):
    """The row kernels overwrite their chunk of logits with the gradient, so each tuning run must
    start from the logits (restore_value): the GPU launch path with the library's autotuner over
    two row configs, a CPU stand-in for do_bench that runs every config twice, gives the untuned
    gradients."""
    if not availability("triton", "cpu").ok:
        pytest.skip("needs TRITON_INTERPRET=1")
    import time

    import triton

    from surgery_kernels.backends.triton_kernels import common, rows

    def cpu_bench(fn, quantiles=None, **kw):
        t0 = time.perf_counter()
        fn()
        fn()
        t = (time.perf_counter() - t0) * 1e3
        return [t, t, t] if quantiles else t

    h, w, b, t = _ce_inputs("cpu", torch.float32, bias=True)
    hk, wk, bk_, rhk, rwk, rbk = _kl_inputs("cpu")
    tw = torch.linspace(-1, 1, N)

    def grads():
        return _ce_and_kl_grads(torch.float32, (h, w, b, t), (hk, wk, bk_, rhk, rwk, rbk), tw)

    exact = grads()
    two = [triton.Config({"BLOCK": 128}), triton.Config({"BLOCK": 256})]
    monkeypatch.setattr(common, "INTERPRET", False)
    monkeypatch.setattr(rows, "ce_rows_tuned", rows.row_autotuner(rows.ce_rows_kernel, two, do_bench=cpu_bench))
    monkeypatch.setattr(rows, "kl_rows_tuned", rows.row_autotuner(rows.kl_rows_kernel, two, do_bench=cpu_bench))
    tuned = grads()
    for a, c in zip(exact, tuned):
        assert _rel(c, a) <= 1e-6


@pytest.mark.parametrize("device", [d for d in DEVICES])
def test_float16(device):
    """fp16 inputs: logits, logit gradient and the dW sums in fp16 (2 chunks here), statistics in
    float32, within 2x plain PyTorch's fp16 error."""
    dt = torch.float16
    h, w, b, t = _ce_inputs(device, dt, bias=True)
    t[[4, 9]] = -100
    _check_ce(device, dt, h, w, t, bias=b, softcap=4.0, token_weight=torch.linspace(-1, 2, N, device=device))
    h, w, b, rh, rw, rb = _kl_inputs(device)
    _check_kl(device, dt, h, w, b, rh, rw, rb, direction="forward", temperature=1.5)


@pytest.mark.parametrize("device", [d for d in DEVICES])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_no_tokens(device, reduction):
    """N = 0: values empty (or 0), gradients zero (not the uninitialized sums of no chunk)."""
    h, w, b, t = _ce_inputs(device, torch.float32, n=0, bias=True)
    hk, wk, bk_, rhk, rwk, rbk = _kl_inputs(device, n=0)
    for dt in (torch.float32, torch.bfloat16):
        hh, ww, bb = _leaf(h.to(dt)), _leaf(w.to(dt)), _leaf(b.to(dt))
        out = linear_cross_entropy(hh, ww, t, bias=bb, reduction=reduction, backend="triton")
        grads = torch.autograd.grad(out, (hh, ww, bb), torch.ones_like(out))
        hh, ww, bb = _leaf(hk.to(dt)), _leaf(wk.to(dt)), _leaf(bk_.to(dt))
        out = linear_kl_div(hh, ww, rhk.to(dt), rwk.to(dt), bias=bb, ref_bias=rbk.to(dt), reduction=reduction,
                            backend="triton")
        grads += torch.autograd.grad(out, (hh, ww, bb), torch.ones_like(out))
        for g in grads:
            assert bool((g == 0).all())


@pytest.mark.parametrize("device,dtype", CASES)
@pytest.mark.parametrize("ignore_index", [1_000_000, -(1 << 40)])
def test_ignore_index_outside_the_vocabulary(device, dtype, ignore_index):
    """An ignore_index far outside [0, V): ignored tokens' target logit is never read (the row
    kernel would read far outside the chunk), in the one-pass and the recomputing backward."""
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    t[[0, 7, 36]] = ignore_index
    tw = torch.linspace(-1, 1, N, device=device)
    up = torch.randn(N, generator=torch.Generator().manual_seed(8)).to(device)
    _check_ce(device, dtype, h, w, t, bias=b, token_weight=tw, ignore_index=ignore_index)
    out, _ = _check_ce(device, dtype, h, w, t, bias=b, token_weight=tw, ignore_index=ignore_index,
                       reduction="none", upstream=up)
    assert bool((out[[0, 7, 36]] == 0).all())


@pytest.mark.parametrize("device,dtype", [c for c in CASES if "bf16" in c.id])
def test_float32_dweight_accumulator(device, dtype, monkeypatch):
    """16-bit weights over several chunks (the default DW_ACCUM "float32"): dW (and dbias) summed
    in a float32 accumulator, CE with bias and softcap, reverse KL with both biases, against float64."""
    from surgery_kernels.backends.triton_kernels import rows

    assert not rows.accumulate_in_input_dtype(dtype, 2)
    h, w, b, t = _ce_inputs(device, dtype, bias=True)
    _check_ce(device, dtype, h, w, t, bias=b, softcap=4.0, token_weight=torch.linspace(-1, 2, N, device=device))
    h, w, b, rh, rw, rb = _kl_inputs(device)
    _check_kl(device, dtype, h, w, b, rh, rw, rb, direction="reverse", temperature=0.8,
              mask=torch.arange(N, device=device) % 3 != 0)


def test_gpu_benchmark_script_smoke(tmp_path):
    """benchmarks/triton_gpu.py (the Triton GPU table, run by gpu_check.sh on a GPU) on the CPU
    under the interpreter with tiny shapes: every row of ours runs (the numbers mean nothing
    here), the providers that need a GPU or a missing package say why, and the files are written."""
    if not availability("triton", "cpu").ok:
        pytest.skip("needs TRITON_INTERPRET=1")
    import json

    from benchmarks import triton_gpu

    rc = triton_gpu.main(["--device", "cpu", "--n", "40", "--h", "32", "--v", "300", "--dtype", "bf16",
                          "--output", str(tmp_path)])
    rows = json.loads((tmp_path / "triton_gpu.json").read_text())["rows"]
    assert rc == 0
    ours = [r for r in rows if r["provider"].startswith(("triton", "floor")) or r["op"] == "dW alone"]
    assert len(ours) >= 20 and all(r["ms"] is not None for r in ours), [r for r in ours if r["ms"] is None]
    assert all(r["ms"] is not None or r["note"].startswith("cannot run") for r in rows)
    assert "| dW alone |" in (tmp_path / "triton_gpu.md").read_text()


def test_float32_products_follow_the_tf32_setting():
    """The fused kernels' float32 tl.dot is IEEE unless the caller allowed TF32 for float32
    matmuls, as the gradient path's cuBLAS GEMMs do: then both use it (a forward and a
    forward+backward of one call give the same values either way)."""
    from surgery_kernels.backends.triton_kernels import common

    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert common.dot_precision(torch.float32) == "ieee"
        torch.set_float32_matmul_precision("high")
        assert common.dot_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)
    assert common.dot_precision(torch.bfloat16) == "tf32"


def test_vocabulary_splits_in_any_order(monkeypatch):
    """The fused forward splits the vocabulary over programs (V = 300: 256 + 44 columns), and
    exactly one split may write a token's target logit: on a GPU the programs run in any order.
    The interpreter runs them in program order, so this runs them backwards too, with targets on
    both sides of the split boundary: a split that also claimed the next split's first column
    (target 256) wrote it as 0 after the owner, once the order put it last."""
    if "cpu" not in [d.values[0] for d in DEVICES]:
        pytest.skip("program order is the interpreter's to change")
    from surgery_kernels.backends.triton_kernels import ce as ce_kernels

    h, w, _, t = _ce_inputs("cpu", torch.float32)
    t[:6] = torch.tensor([255, 256, 0, 299, 256, 255])
    ref = linear_cross_entropy_ref(h, w, t, reduction="none", compute_dtype=torch.float64)
    for order in ("forwards", "backwards"):
        if order == "backwards":
            monkeypatch.setattr(ce_kernels, "tile_ids", _tile_ids_backwards)
        with torch.no_grad():
            ours = linear_cross_entropy(h, w, t, reduction="none", backend="triton")
        assert _rel(ours, ref) <= 1e-5, order

