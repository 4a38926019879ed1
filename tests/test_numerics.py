"""Numerics of both losses on every backend that runs here, against the naive reference in float64.

float32: relative error (Frobenius norm) of loss and every gradient <= 1e-5.
bf16/fp16: error <= 2 x (plain PyTorch's error computing the naive loss in that dtype) + 1e-6.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import BACKEND_CASES
from surgery_kernels import linear_cross_entropy, linear_kl_div
from surgery_kernels.reference import linear_cross_entropy_ref, linear_kl_div_ref

F32_TOL = 1e-5


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.double().cpu(), ref.double().cpu()
    assert torch.isfinite(x).all(), "non-finite values"
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_ce_inputs(n, h, v, *, device, dtype, bias=False, ignore_frac=0.0, signed=False, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g) * scale
    weight = torch.randn(v, h, generator=g) / h**0.5
    b = torch.randn(v, generator=g) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    if ignore_frac:
        target[torch.rand(n, generator=g) < ignore_frac] = -100
    tw = (torch.rand(n, generator=g) * 2 - 1) * 2 if signed else None
    to = lambda t: None if t is None else t.to(device=device, dtype=dtype).requires_grad_()
    return dict(hidden=to(hidden), weight=to(weight), bias=to(b), target=target.to(device),
                token_weight=None if tw is None else tw.to(device))


def grads_of(out, tensors, upstream=None):
    live = [t for t in tensors if t is not None]
    gs = torch.autograd.grad(out, live, grad_outputs=upstream)
    return list(gs)


def ce_results(backend, device, inp, reduction="mean", chunk_size=None, upstream_seed=1, **opts):
    """(ours, float64 reference, naive in the input dtype), each as [value, *grads]."""
    params = [inp["hidden"], inp["weight"], inp["bias"]]
    common = dict(bias=inp["bias"], token_weight=inp["token_weight"], reduction=reduction, **opts)
    ours = linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], backend=backend, chunk_size=chunk_size,
                                **common)
    up = None
    if reduction == "none":
        up = torch.randn(ours.shape, generator=torch.Generator().manual_seed(upstream_seed)).to(device)
    res = [ours.detach()] + grads_of(ours, params, up.to(ours.dtype) if up is not None else None)
    ref = linear_cross_entropy_ref(inp["hidden"], inp["weight"], inp["target"], compute_dtype=torch.float64,
                                   **common)
    refs = [ref.detach()] + grads_of(ref, params, up.double() if up is not None else None)
    naive = linear_cross_entropy_ref(inp["hidden"], inp["weight"], inp["target"], **common)
    naives = [naive.detach()] + grads_of(naive, params, up.to(naive.dtype) if up is not None else None)
    per_token = lambda dt: linear_cross_entropy_ref(inp["hidden"], inp["weight"], inp["target"], compute_dtype=dt,
                                                    **dict(common, reduction="none")).detach()
    live = (inp["target"] != -100).sum()
    return res, refs, naives, value_budget(per_token, reduction, live, inp["hidden"].dtype)


def value_budget(per_token, reduction, live, dtype):
    """Plain PyTorch's error budget for a scalar loss in low precision: the mean (or sum) of the
    absolute per-token errors of the naive computation in that dtype against float64.

    A scalar's own error is a sum of per-token errors of random sign: comparing ours to twice the
    naive scalar's error fails about 30% of the time for two equally accurate computations, as the
    naive sum can cancel by chance. The per-token budget is what the naive computation can be
    trusted to, without the luck."""
    if reduction == "none" or dtype in (torch.float32, torch.float64):
        return None
    with torch.no_grad():
        budget = (per_token(None).double() - per_token(torch.float64)).abs().sum()
    return (budget / live.clamp_min(1) if reduction == "mean" else budget).item()


def assert_close(res, refs, naives, dtype, what="", value_budget=None):
    """float32/64: relative error <= 1e-5. bf16/fp16: relative error <= 2 x plain PyTorch's own
    + 1e-6; for a scalar loss, absolute error <= 2 x ``value_budget`` + 1e-6 relative."""
    names = ["value", "d_hidden", "d_weight", "d_bias"]
    for name, x, r, nv in zip(names, res, refs, naives):
        err = rel_err(x, r)
        if dtype in (torch.float32, torch.float64):
            tol = F32_TOL
        elif name == "value" and value_budget is not None:
            err = abs(x.double().item() - r.double().item())
            tol = 2 * value_budget + 1e-6 * abs(r.double().item())
        else:
            tol = 2 * rel_err(nv, r) + 1e-6
        assert err <= tol, f"{what} {name}: error {err:.3g} > {tol:.3g}"


CE_CASES = {
    # odd, non-power-of-two sizes; chunk_size that does not divide N
    "odd-shapes": dict(n=123, h=64, v=507, opts={}),
    "bias": dict(n=77, h=32, v=301, bias=True, opts={}),
    "ignore-some": dict(n=64, h=32, v=257, ignore_frac=0.3, opts={}),
    "signed-weights": dict(n=96, h=32, v=300, signed=True, ignore_frac=0.1, opts={}),
    "ascent-cap": dict(n=96, h=32, v=300, signed=True, scale=3.0, opts=dict(ascent_cap=6.0)),
    "softcap": dict(n=80, h=48, v=333, bias=True, scale=4.0, opts=dict(softcap=5.0)),
    "softcap-ascent-cap": dict(n=80, h=48, v=333, signed=True, scale=4.0, opts=dict(softcap=3.0, ascent_cap=2.0)),
    "one-token": dict(n=1, h=16, v=129, opts={}),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(CE_CASES), ids=list(CE_CASES))
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_ce_float32(bd, case, reduction):
    backend, device = bd
    c = dict(CE_CASES[case])
    opts = c.pop("opts")
    inp = make_ce_inputs(**c, device=device, dtype=torch.float32)
    res, refs, naives, budget = ce_results(backend, device, inp, reduction, chunk_size=17, **opts)
    assert_close(res, refs, naives, torch.float32, f"{backend}/{case}/{reduction}", budget)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", ["bias", "signed-weights", "softcap"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_ce_low_precision(bd, case, dtype):
    backend, device = bd
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; low precision is tested on the GPU")
    c = dict(CE_CASES[case])
    opts = c.pop("opts")
    c.update(n=256, h=128, v=1000)
    inp = make_ce_inputs(**c, device=device, dtype=dtype)
    res, refs, naives, budget = ce_results(backend, device, inp, "mean", chunk_size=100, **opts)
    assert_close(res, refs, naives, dtype, f"{backend}/{case}/{dtype}", budget)


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_ce_extreme_logits(bd):
    """Logits of about +-1e4 and one-hot-peaked rows: finite, and as accurate as plain float32 PyTorch."""
    backend, device = bd
    inp = make_ce_inputs(50, 32, 200, device=device, dtype=torch.float32, scale=1e4 / 3, signed=True)
    with torch.no_grad():
        z = inp["hidden"] @ inp["weight"].t()
    assert z.abs().max() > 5e3
    for reduction in ["mean", "none"]:
        res, refs, naives, budget = ce_results(backend, device, inp, reduction, chunk_size=16)
        names = ["value", "d_hidden", "d_weight"]
        for name, x, r, nv in zip(names, res, refs, naives):
            assert rel_err(x, r) <= 2 * rel_err(nv, r) + 1e-6, f"{name} ({reduction})"


@pytest.mark.parametrize("path", ["", "fused-backward"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_ce_ascent_cap_at_the_float32_boundary(bd, path, monkeypatch):
    """ascent_cap a float64 just below an ascent token's float32 ce, rounding to that very ce: the
    cap is compared in float32 on every backend, where the ce does not exceed it, so the token
    counts, with its gradient, from the forward's fused pass (sum) as from the backward's (none).
    The cpu backend compared the cap in float64 for the gradient and in float32 for the loss: it
    counted the token and zeroed its gradient. Each path's cap is taken from that path's own ce (the
    Triton row kernel's and its fused forward's may differ by an ulp)."""
    backend, device = bd
    if path:
        if backend != "triton":
            pytest.skip("the fused recompute backward is the triton backend's")
        from surgery_kernels.backends import triton_fused

        monkeypatch.setattr(triton_fused, "BACKWARD", "fused")
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 8, generator=g).to(device).requires_grad_()
    weight = torch.randn(16, 8, generator=g).to(device)
    target = torch.tensor([1, 2, 3, 4], device=device)
    tw = torch.tensor([-1.0, 1.0, 1.0, 1.0], device=device)

    def run(weights, **kw):
        loss = linear_cross_entropy(hidden, weight, target, token_weight=weights, backend=backend, **kw).sum()
        return loss.item(), torch.autograd.grad(loss, hidden)[0]

    counted = run(tw, reduction="sum")
    capped = run(torch.tensor([0.0, 1.0, 1.0, 1.0], device=device), reduction="sum")
    assert abs(counted[0] - capped[0]) > 0.1 and counted[1][0].norm() > 0.1
    for reduction in ("sum", "none"):
        _, ce = linear_cross_entropy(hidden, weight, target, token_weight=tw, reduction=reduction,
                                     return_values=True, backend=backend)
        cap = ce[0].item() * (1 - 2**-30)
        assert cap < ce[0].item() and torch.tensor(cap, dtype=torch.float32).item() == ce[0].item()
        loss, grad = run(tw, ascent_cap=cap, reduction=reduction)
        assert loss == pytest.approx(counted[0], rel=1e-6), reduction
        torch.testing.assert_close(grad, counted[1], rtol=1e-5, atol=1e-6, msg=lambda m: f"{reduction}: {m}")


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_ce_all_ignored(bd, reduction):
    """No live token: loss 0 and zero gradients, never NaN."""
    backend, device = bd
    inp = make_ce_inputs(33, 16, 100, device=device, dtype=torch.float32, bias=True)
    inp["target"].fill_(-100)
    out = linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], bias=inp["bias"], reduction=reduction,
                               backend=backend)
    assert torch.equal(out.detach().cpu(), torch.zeros_like(out).cpu())
    for g in grads_of(out, [inp["hidden"], inp["weight"], inp["bias"]], torch.ones_like(out) if out.dim() else None):
        assert torch.equal(g.cpu(), torch.zeros_like(g).cpu())


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_ce_custom_ignore_index_and_leading_dims(bd):
    """(B, T, H) hidden with (B, T) targets, ignore_index=0: values come back shaped (B, T)."""
    backend, device = bd
    inp = make_ce_inputs(2 * 19, 24, 150, device=device, dtype=torch.float32)
    h3 = inp["hidden"].detach().reshape(2, 19, 24).requires_grad_()
    t2 = inp["target"].reshape(2, 19)
    t2[:, :3] = 0
    out = linear_cross_entropy(h3, inp["weight"], t2, ignore_index=0, reduction="none", backend=backend)
    assert out.shape == (2, 19)
    ref = linear_cross_entropy_ref(h3, inp["weight"], t2, ignore_index=0, reduction="none",
                                   compute_dtype=torch.float64)
    assert rel_err(out.detach(), ref.detach()) <= F32_TOL
    assert torch.all(out[:, :3] == 0)


def make_kl_inputs(n, h, h_ref, v, *, device, dtype, bias=False, mask_frac=0.0, weighted=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    to = lambda t, grad=True: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(grad)
    hidden = torch.randn(n, h, generator=g)
    weight = torch.randn(v, h, generator=g) / h**0.5
    ref_hidden = torch.randn(n, h_ref, generator=g)
    ref_weight = torch.randn(v, h_ref, generator=g) / h_ref**0.5
    b = torch.randn(v, generator=g) if bias else None
    rb = torch.randn(v, generator=g) if bias else None
    mask = (torch.rand(n, generator=g) >= mask_frac) if mask_frac else None
    tw = torch.rand(n, generator=g) * 2 if weighted else None
    return dict(hidden=to(hidden), weight=to(weight), bias=to(b), ref_hidden=to(ref_hidden, False),
                ref_weight=to(ref_weight, False), ref_bias=to(rb, False),
                mask=None if mask is None else mask.to(device), token_weight=None if tw is None else tw.to(device))


def kl_results(backend, device, inp, reduction="mean", chunk_size=None, **opts):
    params = [inp["hidden"], inp["weight"], inp["bias"]]
    args = (inp["hidden"], inp["weight"], inp["ref_hidden"], inp["ref_weight"])
    common = dict(bias=inp["bias"], ref_bias=inp["ref_bias"], mask=inp["mask"], token_weight=inp["token_weight"],
                  reduction=reduction, **opts)
    ours = linear_kl_div(*args, backend=backend, chunk_size=chunk_size, **common)
    up = None
    if reduction == "none":
        up = torch.randn(ours.shape, generator=torch.Generator().manual_seed(3)).to(device)
    res = [ours.detach()] + grads_of(ours, params, up.to(ours.dtype) if up is not None else None)
    ref = linear_kl_div_ref(*args, compute_dtype=torch.float64, **common)
    refs = [ref.detach()] + grads_of(ref, params, up.double() if up is not None else None)
    naive = linear_kl_div_ref(*args, **common)
    naives = [naive.detach()] + grads_of(naive, params, up.to(naive.dtype) if up is not None else None)
    per_token = lambda dt: linear_kl_div_ref(*args, compute_dtype=dt, **dict(common, reduction="none")).detach()
    live = inp["mask"].sum() if inp["mask"] is not None else torch.tensor(inp["hidden"].shape[0])
    return res, refs, naives, value_budget(per_token, reduction, live, inp["hidden"].dtype)


KL_CASES = {
    "forward": dict(n=97, h=32, h_ref=32, v=301, opts=dict(direction="forward")),
    "reverse": dict(n=97, h=32, h_ref=32, v=301, opts=dict(direction="reverse")),
    # the reference model has another hidden size (distillation), bias on both sides, a mask
    "forward-T2-mask-bias-Href": dict(n=70, h=32, h_ref=48, v=257, bias=True, mask_frac=0.3,
                                      opts=dict(direction="forward", temperature=2.0)),
    "reverse-T0.7-weighted": dict(n=70, h=40, h_ref=24, v=257, weighted=True, mask_frac=0.2,
                                  opts=dict(direction="reverse", temperature=0.7)),
    "one-token": dict(n=1, h=16, h_ref=16, v=129, opts=dict(direction="reverse")),
    # Gemma-2-style final logit softcap; caps of 1.5-3 put these logits (|z| up to ~5) well into
    # tanh's saturation, where d cap / dz = 1 - tanh^2 is far from 1
    "forward-softcap-both-T2-bias": dict(n=70, h=32, h_ref=24, v=257, bias=True, mask_frac=0.3,
                                         opts=dict(direction="forward", temperature=2.0, softcap=2.0,
                                                   ref_softcap=3.0)),
    "reverse-softcap-both-weighted": dict(n=70, h=32, h_ref=32, v=257, bias=True, weighted=True,
                                          opts=dict(direction="reverse", softcap=1.5, ref_softcap=1.5)),
    "forward-softcap-trained-only": dict(n=45, h=32, h_ref=32, v=301, opts=dict(direction="forward", softcap=2.5)),
    "reverse-softcap-ref-only-T0.7": dict(n=45, h=32, h_ref=32, v=301,
                                          opts=dict(direction="reverse", temperature=0.7, ref_softcap=2.0)),
}


@pytest.mark.parametrize("reduction", ["sum", "none"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_vocabulary_over_several_row_blocks(bd, reduction):
    """A vocabulary that the row loops cross in several blocks, the last one ragged: the cpu
    backend sums each row in blocks of 1024 columns, the Triton row kernels in blocks of 512 under
    the interpreter (4096 and more on a GPU); the other cases' V <= 507 fit one block, where a loop
    that stopped after its first block, or a sum kept from the last block only, passed. CE with
    softcap, signed weights, bias and ascent_cap; KL both ways with softcap and temperature."""
    backend, device = bd
    v = 2100  # 2 blocks of 1024 + 52 columns; 4 blocks of 512 + 52
    inp = make_ce_inputs(24, 16, v, device=device, dtype=torch.float32, bias=True, signed=True, ignore_frac=0.1,
                         scale=3.0)
    res, refs, naives, budget = ce_results(backend, device, inp, reduction, chunk_size=11, softcap=6.0,
                                           ascent_cap=10.0)
    assert_close(res, refs, naives, torch.float32, f"{backend}/ce/{reduction}", budget)
    for direction in ("forward", "reverse"):
        inp = make_kl_inputs(24, 16, 12, v, device=device, dtype=torch.float32, bias=True, mask_frac=0.2,
                             weighted=True)
        res, refs, naives, budget = kl_results(backend, device, inp, reduction, chunk_size=11, direction=direction,
                                               temperature=0.8, softcap=4.0, ref_softcap=5.0)
        assert_close(res, refs, naives, torch.float32, f"{backend}/kl {direction}/{reduction}", budget)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("case", list(KL_CASES), ids=list(KL_CASES))
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_kl_float32(bd, case, reduction):
    backend, device = bd
    c = dict(KL_CASES[case])
    opts = c.pop("opts")
    inp = make_kl_inputs(**c, device=device, dtype=torch.float32)
    res, refs, naives, budget = kl_results(backend, device, inp, reduction, chunk_size=19, **opts)
    assert_close(res, refs, naives, torch.float32, f"{backend}/{case}/{reduction}", budget)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_kl_softcap_small_against_temperature(bd, direction):
    """softcap 0.1 at T = 10: near-uniform distributions, where float32 itself cannot give 1e-5
    (the logit gradient q - p cancels); every backend within 2x plain float32 PyTorch's error.
    Rebuilding the capped logits from log q + lse, as the chunked backend first did, gave 20x."""
    backend, device = bd
    inp = make_kl_inputs(64, 32, 32, 300, device=device, dtype=torch.float32, bias=True)
    res, refs, naives, _ = kl_results(backend, device, inp, "sum", chunk_size=19, direction=direction,
                                      temperature=10.0, softcap=0.1, ref_softcap=0.15)
    for name, x, r, nv in zip(["value", "d_hidden", "d_weight", "d_bias"], res, refs, naives):
        assert rel_err(x, r) <= 2 * rel_err(nv, r) + 1e-6, f"{backend} {name}: {rel_err(x, r):.3g}, plain " \
                                                           f"{rel_err(nv, r):.3g}"


@pytest.mark.parametrize("seed,temperature", [(0, 0.05), (0, 0.2), (1, 0.2)])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_reverse_kl_peaked_and_far_from_the_reference(bd, seed, temperature):
    """Reverse KL where the trained softmax is nearly one-hot and the KL is in the thousands: the
    gradient q * (log q - log p - kl) cancels at the peak, so kl must be the sum of the very terms
    it is subtracted from; its closed form from the row's statistics rounds differently, which gave
    the Triton row kernel 4700x (seed 0, T 0.05) and 20x (seed 1, T 0.2) plain PyTorch's error.
    Every implementation's error here is the rounding of tempered logits in the thousands, and
    varies 0.5-3x between them with the order of operations (seeds 0-2, T 0.05-0.25: torch, cpu,
    triton against plain float32): within 4x plain float32's."""
    backend, device = bd
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(4, 12, generator=g) * 30).to(device).requires_grad_()
    weight = (torch.randn(200, 12, generator=g) / 12**0.5).to(device).requires_grad_()
    ref_hidden = (torch.randn(4, 12, generator=g) * 30).to(device)
    opts = dict(direction="reverse", temperature=temperature, reduction="sum")
    out = linear_kl_div(hidden, weight, ref_hidden, weight, backend=backend, **opts)
    ref = linear_kl_div_ref(hidden, weight, ref_hidden, weight, compute_dtype=torch.float64, **opts)
    naive = linear_kl_div_ref(hidden, weight, ref_hidden, weight, **opts)
    assert ref.item() > 500
    for name, x, r, nv in zip(["d_hidden", "d_weight"], torch.autograd.grad(out, [hidden, weight]),
                              torch.autograd.grad(ref, [hidden, weight]),
                              torch.autograd.grad(naive, [hidden, weight])):
        assert rel_err(x, r) <= 4 * rel_err(nv, r) + 1e-5, f"{backend} {name}: {rel_err(x, r):.3g}, plain " \
                                                           f"{rel_err(nv, r):.3g}"


@pytest.mark.parametrize("caps", [None, (3.0, 4.0)], ids=["", "softcap"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_kl_low_precision(bd, direction, dtype, caps):
    backend, device = bd
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter computes bf16 tl.dot wrongly; low precision is tested on the GPU")
    inp = make_kl_inputs(256, 128, 96, 1000, device=device, dtype=dtype, bias=True, mask_frac=0.2)
    softcap, ref_softcap = caps or (None, None)
    res, refs, naives, budget = kl_results(backend, device, inp, "mean", chunk_size=100, direction=direction,
                                           temperature=1.5, softcap=softcap, ref_softcap=ref_softcap)
    assert_close(res, refs, naives, dtype, f"{backend}/{direction}/{dtype}", budget)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_kl_zero_when_models_agree_and_shared_weight(bd, direction):
    """ref_weight may be the very tensor passed as weight: KL is 0 where the models agree, the
    gradient flows only through the trained side, and it matches the reference."""
    backend, device = bd
    inp = make_kl_inputs(40, 32, 32, 200, device=device, dtype=torch.float32)
    w = inp["weight"]
    same = linear_kl_div(inp["hidden"], w, inp["hidden"].detach(), w, direction=direction, reduction="none",
                         backend=backend)
    assert same.detach().abs().max().item() < 1e-6
    g = torch.autograd.grad(same.sum(), [inp["hidden"], w])
    assert max(x.abs().max().item() for x in g) < 1e-6
    out = linear_kl_div(inp["hidden"], w, inp["ref_hidden"], w, direction=direction, backend=backend)
    ref = linear_kl_div_ref(inp["hidden"], w, inp["ref_hidden"], w, direction=direction, compute_dtype=torch.float64)
    assert out.item() > 0
    for x, r in zip([out] + list(torch.autograd.grad(out, [inp["hidden"], w])),
                    [ref] + list(torch.autograd.grad(ref, [inp["hidden"], w]))):
        assert rel_err(x.detach(), r.detach()) <= F32_TOL


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_minus_inf_bias_bans_vocabulary(bd, direction):
    """A -inf bias (banned or padded vocabulary entries) over the first 130 columns — every
    kernel's first block, every thread's first columns — and over the last 20: CE and KL with
    both sides banning them match float64, the KL taking 0 * log 0 = 0 (not NaN); the banned
    columns get no gradient. Banned only on the reference side, forward KL(p || q) stays finite
    and the reverse one is +inf (q > 0 where p = 0): the true KL."""
    backend, device = bd
    banned = torch.zeros(301, dtype=torch.bool)
    banned[:130] = banned[-20:] = True
    inp = make_ce_inputs(77, 32, 301, device=device, dtype=torch.float32, bias=True)
    with torch.no_grad():
        inp["bias"][banned.to(device)] = float("-inf")
    inp["target"] = torch.randint(130, 281, (77,), generator=torch.Generator().manual_seed(2)).to(device)
    for reduction in ("sum", "none"):
        res, refs, naives, budget = ce_results(backend, device, inp, reduction, chunk_size=19)
        assert_close(res, refs, naives, torch.float32, f"{backend}/ce/{reduction}", budget)
        assert torch.equal(res[3][banned.to(device)].cpu(), torch.zeros(int(banned.sum())))
    inp = make_kl_inputs(70, 32, 48, 301, device=device, dtype=torch.float32, bias=True)
    with torch.no_grad():
        inp["bias"][banned.to(device)] = float("-inf")
        inp["ref_bias"][banned.to(device)] = float("-inf")
    for reduction in ("sum", "none"):
        res, refs, naives, budget = kl_results(backend, device, inp, reduction, chunk_size=19, direction=direction)
        assert_close(res, refs, naives, torch.float32, f"{backend}/kl/{direction}/{reduction}", budget)
        assert torch.equal(res[3][banned.to(device)].cpu(), torch.zeros(int(banned.sum())))
    with torch.no_grad():
        inp["bias"][banned.to(device)] = 0.0
        kl = linear_kl_div(inp["hidden"], inp["weight"], inp["ref_hidden"], inp["ref_weight"], bias=inp["bias"],
                           ref_bias=inp["ref_bias"], direction=direction, reduction="none", backend=backend)
        ref = linear_kl_div_ref(inp["hidden"], inp["weight"], inp["ref_hidden"], inp["ref_weight"],
                                bias=inp["bias"], ref_bias=inp["ref_bias"], direction=direction, reduction="none",
                                compute_dtype=torch.float64)
    if direction == "forward":
        assert rel_err(kl, ref) <= F32_TOL
    else:
        assert torch.isinf(ref).all() and torch.isinf(kl).all() and (kl > 0).all()


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_banned_target_of_a_capped_or_zero_weight_token_adds_nothing(bd):
    """A token whose target the head bans (-inf bias: ce = inf) adds nothing when its weight is 0
    or ascent_cap stops it (the README: such a token gives "neither loss nor gradient") — not
    0 * inf = NaN, as it did for every backend and reduction: the loss, values and gradients are
    those of the other tokens (float64 reference over them alone; the mean still counts every live
    token). A zero-weight token's KL of inf (reverse KL where only the reference bans a column)
    adds nothing either."""
    backend, device = bd
    inp = make_ce_inputs(40, 32, 97, device=device, dtype=torch.float32, bias=True, signed=True, seed=3)
    banned = torch.tensor([5, 17, 23, 31])  # targets 5 and 17: ascent tokens, capped; 23, 31: weight 0
    keep = torch.ones(40, dtype=torch.bool)
    keep[banned] = False
    col = next(c for c in range(97) if c not in inp["target"][keep.to(device)].tolist())  # no other token's target
    with torch.no_grad():
        inp["bias"][col] = float("-inf")
    inp["target"][banned] = col
    tw = inp["token_weight"].clone()
    tw[banned[:2]] = -1.0
    tw[banned[2:]] = 0.0
    params = [inp["hidden"], inp["weight"], inp["bias"]]
    for reduction in ("mean", "sum", "none"):
        out = linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], bias=inp["bias"], token_weight=tw,
                                   ascent_cap=30.0, reduction=reduction, backend=backend)
        rest = linear_cross_entropy_ref(inp["hidden"][keep.to(device)], inp["weight"], inp["target"][keep.to(device)],
                                        bias=inp["bias"], token_weight=tw[keep.to(device)], ascent_cap=30.0,
                                        reduction="sum" if reduction == "mean" else reduction,
                                        compute_dtype=torch.float64)
        if reduction == "mean":
            rest = rest / 40
        if reduction == "none":
            assert torch.equal(out.detach()[banned.to(device)].cpu(), torch.zeros(4))
            out, rest = out.sum(), rest.sum()
        assert torch.isfinite(out) and abs(out.item() - rest.item()) <= F32_TOL * max(1.0, abs(rest.item())), reduction
        grads, refs = grads_of(out, params), grads_of(rest, params)
        assert torch.equal(grads[0][banned.to(device)].cpu(), torch.zeros(4, 32)), reduction
        for g, r in zip(grads, refs):
            assert torch.isfinite(g).all() and rel_err(g, r) <= F32_TOL, reduction
    kin = make_kl_inputs(12, 32, 48, 97, device=device, dtype=torch.float32, bias=True)
    with torch.no_grad():
        kin["ref_bias"][7] = float("-inf")  # q > 0 where p = 0: reverse KL(q || p) = inf for every token
    w = torch.ones(12, device=device)
    w[::3] = 0.0
    kl = linear_kl_div(kin["hidden"], kin["weight"], kin["ref_hidden"], kin["ref_weight"], bias=kin["bias"],
                       ref_bias=kin["ref_bias"], direction="reverse", token_weight=w, reduction="none", backend=backend)
    assert torch.equal(kl.detach()[::3].cpu(), torch.zeros(4)) and torch.isposinf(kl.detach()[w != 0]).all()
    # ... nor a gradient: only zero-weight tokens, so the loss and the gradients are 0 (not NaN:
    # q * (log q - log p - kl) * 0 with kl = inf), on the fused path and the recomputing one
    w = w * torch.arange(12, device=device).remainder(3).eq(0)
    for reduction in ("sum", "none"):
        kl = linear_kl_div(kin["hidden"], kin["weight"], kin["ref_hidden"], kin["ref_weight"], bias=kin["bias"],
                           ref_bias=kin["ref_bias"], direction="reverse", token_weight=w, reduction=reduction,
                           backend=backend)
        grads = grads_of(kl.sum(), [kin["hidden"], kin["weight"], kin["bias"]])
        assert kl.sum().item() == 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads), reduction
    # A NaN stays NaN, weight 0 or not, as in plain PyTorch (0 * NaN) and the reference
    tw = torch.zeros(40, device=device)
    with torch.no_grad():
        h = inp["hidden"].detach().clone()
        h[3] = float("nan")
    out = linear_cross_entropy(h, inp["weight"].detach(), inp["target"], token_weight=tw, reduction="sum",
                               backend=backend)
    ref = linear_cross_entropy_ref(h, inp["weight"].detach(), inp["target"], token_weight=tw, reduction="sum")
    assert out.isnan() and ref.isnan()


# The backends that keep the target out of the row sum; cuda and triton still form lse - z_t and
# p_t - 1, with plain PyTorch's error on memorized tokens.
EXACT_ON_MEMORIZED = ("torch", "cpu")


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("bd", [c for c in BACKEND_CASES if c.values[0][0] in EXACT_ON_MEMORIZED])
def test_memorized_tokens_are_exact(bd, softcap):
    """Memorized tokens (1 - p_target from 1e-6 down to 1e-9: the forget set's at the start of
    gradient ascent): ce = lse - z_t and the target's gradient p_t - 1 cancel, and plain PyTorch
    errs by 5-100% in float32 there. These backends keep the target out of the row sum R (ce =
    log1p(R / e_t), gradient -R / S) and stay at float32's rounding of float64's values."""
    backend, device = bd
    g = torch.Generator().manual_seed(0)
    n, v = 48, 256
    z = torch.randn(n, v, generator=g) * 0.5
    t = torch.randint(0, v, (n,), generator=g)
    z[torch.arange(n), t] += torch.linspace(20.0, 26.0, n)
    w = torch.eye(v)  # the logits are the hidden states: their gradient is the logit gradient

    def run(dtype, loss):
        h = z.to(device, dtype, copy=True).requires_grad_()
        ce = loss(h, w.to(device, dtype), t.to(device))
        ce.sum().backward()
        return ce.detach().double().cpu(), h.grad.double().cpu()

    ref_ce, ref_g = run(torch.float64, lambda h, w, t: linear_cross_entropy_ref(h, w, t, softcap=softcap,
                                                                                 reduction="none"))
    plain_ce, plain_g = run(torch.float32, lambda h, w, t: linear_cross_entropy_ref(h, w, t, softcap=softcap,
                                                                                     reduction="none"))
    ce, grad = run(torch.float32, lambda h, w, t: linear_cross_entropy(h, w, t, softcap=softcap, reduction="none",
                                                                        backend=backend))

    def rel(a, b):
        return ((a - b).abs() / b.abs()).max().item()

    def rows(a, b):
        return ((a - b).norm(dim=1) / b.norm(dim=1)).max().item()

    assert rel(plain_ce, ref_ce) > 1e-2 and rows(plain_g, ref_g) > 1e-2  # the regime: plain float32 fails
    tol = 2e-6 if softcap is None else 2e-5  # softcap: float32's tanh of logits ~20
    assert rel(ce, ref_ce) <= tol, rel(ce, ref_ce)
    assert rows(grad, ref_g) <= tol, rows(grad, ref_g)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_kl_one_sided_ban_under_an_underflowing_probability(bd, direction):
    """A column one side bans (-inf) where the weighting side's probability is > 0 but below
    float32's range (log-probability -120): the true KL is +inf (the float64 reference's). The
    torch backend gave 0 (0 * log 0, from the underflowed probability) — a finite wrong value;
    it now gives +inf. The fused row kernels (cpu below a log-probability of about -87, cuda and
    triton below about -104) give NaN there, documented: never a finite value."""
    backend, device = bd
    ban = torch.tensor([0.0, -math.inf, 0.0], device=device)
    tiny = torch.tensor([0.0, -120.0, 0.0], device=device)  # the weighting side's logit of that column
    b, rb = (ban, tiny) if direction == "forward" else (tiny, ban)
    h, w = torch.ones(2, 1, device=device), torch.zeros(3, 1, device=device)
    kw = dict(bias=b, ref_bias=rb, direction=direction, reduction="none")
    assert torch.isposinf(linear_kl_div_ref(h, w, h, w, compute_dtype=torch.float64, **kw)).all()
    kl = linear_kl_div(h, w, h, w, backend=backend, **kw)
    assert not torch.isfinite(kl).any(), kl
    if backend == "torch":
        assert torch.isposinf(kl).all()


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_nan_propagates(bd):
    """A NaN hidden row makes that token's CE and KL NaN (either KL side, both directions), a NaN
    bias entry (one logit column) every token's, as in plain PyTorch: never silently finite (the
    -inf handling must not swallow NaN)."""
    backend, device = bd
    nan = float("nan")
    inp = make_ce_inputs(21, 16, 130, device=device, dtype=torch.float32, bias=True)
    h, w, b, t = (inp[k].detach() for k in ("hidden", "weight", "bias", "target"))
    with torch.no_grad():
        hn = h.clone()
        hn[3] = nan
        ce = linear_cross_entropy(hn, w, t, bias=b, reduction="none", backend=backend)
        assert ce[3].isnan() and torch.isfinite(ce[torch.arange(21, device=device) != 3]).all()
        bn = b.clone()
        bn[5] = nan
        assert linear_cross_entropy(h, w, t, bias=bn, reduction="none", backend=backend).isnan().all()
    inp = make_kl_inputs(21, 16, 24, 130, device=device, dtype=torch.float32, bias=True)
    h, w, b, rh, rw, rb = (inp[k].detach() for k in ("hidden", "weight", "bias", "ref_hidden", "ref_weight",
                                                     "ref_bias"))
    others = torch.arange(21, device=device) != 3
    for direction in ("forward", "reverse"):
        for side in ("hidden", "ref_hidden"):
            args = dict(hidden=h.clone(), ref_hidden=rh.clone())
            args[side][3] = nan
            with torch.no_grad():
                kl = linear_kl_div(args["hidden"], w, args["ref_hidden"], rw, bias=b, ref_bias=rb, direction=direction,
                                   reduction="none", backend=backend)
            assert kl[3].isnan() and torch.isfinite(kl[others]).all(), (direction, side)
        bn = b.clone()
        bn[5] = nan
        with torch.no_grad():
            assert linear_kl_div(h, w, rh, rw, bias=bn, ref_bias=rb, direction=direction, reduction="none",
                                 backend=backend).isnan().all(), direction
        hh = h.clone().requires_grad_()
        hn = h.clone()
        hn[3] = nan
        loss = linear_kl_div(hh + (hn - h), w, rh, rw, bias=b, ref_bias=rb, direction=direction, backend=backend)
        loss.backward()
        assert loss.isnan() and hh.grad[3].isnan().any(), direction


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_kl_all_masked(bd):
    backend, device = bd
    inp = make_kl_inputs(20, 16, 16, 64, device=device, dtype=torch.float32, bias=True)
    mask = torch.zeros(20, dtype=torch.bool, device=device)
    out = linear_kl_div(inp["hidden"], inp["weight"], inp["ref_hidden"], inp["ref_weight"], bias=inp["bias"],
                        mask=mask, backend=backend)
    assert out.item() == 0.0
    for g in torch.autograd.grad(out, [inp["hidden"], inp["weight"], inp["bias"]]):
        assert torch.equal(g.cpu(), torch.zeros_like(g).cpu())


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_values_only_under_no_grad(bd):
    """Under no_grad the functions compute values only (evaluation log-likelihoods without logits)."""
    backend, device = bd
    inp = make_ce_inputs(31, 16, 90, device=device, dtype=torch.float32, ignore_frac=0.2)
    with torch.no_grad():
        out = linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], reduction="none", backend=backend)
    assert not out.requires_grad
    ref = linear_cross_entropy_ref(inp["hidden"], inp["weight"], inp["target"], reduction="none",
                                   compute_dtype=torch.float64)
    assert rel_err(out, ref.detach()) <= F32_TOL


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_frozen_weight_only_hidden_grad(bd):
    """LoRA-style: a frozen head (no grad on weight) still gives the right d_hidden."""
    backend, device = bd
    inp = make_ce_inputs(45, 16, 120, device=device, dtype=torch.float32, signed=True)
    w = inp["weight"].detach()
    out = linear_cross_entropy(inp["hidden"], w, inp["target"], token_weight=inp["token_weight"], backend=backend)
    ref = linear_cross_entropy_ref(inp["hidden"], w, inp["target"], token_weight=inp["token_weight"],
                                   compute_dtype=torch.float64)
    (g,) = torch.autograd.grad(out, [inp["hidden"]])
    (gr,) = torch.autograd.grad(ref, [inp["hidden"]])
    assert rel_err(g, gr) <= F32_TOL


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("head", ["trained", "frozen"])
@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_token_weight_gradient(bd, head, reduction):
    """A token_weight that requires grad gets d loss / d w_i as plain PyTorch's ``(w * ce)`` would
    give it (against the float64 reference): CE with signed weights, ignored tokens and ascent_cap
    (capped tokens get 0), KL with masked tokens; with the other gradients wanted (the one-pass
    path) and alone (hidden and weight frozen: the values-only forward)."""
    backend, device = bd
    grad = head == "trained"
    ce = make_ce_inputs(64, 16, 120, device=device, dtype=torch.float32, signed=True, ignore_frac=0.2, scale=3.0)
    kl = make_kl_inputs(64, 16, 16, 120, device=device, dtype=torch.float32, mask_frac=0.3, weighted=True)
    # A weight of exactly 0 on a token past the cap: not ascent, so not capped; its gradient is its CE.
    ce_ref = linear_cross_entropy_ref(ce["hidden"], ce["weight"], ce["target"], reduction="none",
                                      compute_dtype=torch.float64)
    zero = ((ce_ref > 5.0) & (ce["target"] != -100)).nonzero()[0, 0]
    ce["token_weight"][zero] = 0.0
    # An upstream gradient other than 1 (per token for "none"): the token-weight gradient scales with it.
    up = torch.tensor(2.5, device=device)
    if reduction == "none":
        up = torch.randn(64, generator=torch.Generator().manual_seed(5)).to(device)
    for name, inp, call, ref_call, opts in (
            ("ce", ce, linear_cross_entropy, linear_cross_entropy_ref, dict(ascent_cap=5.0)),
            ("kl", kl, linear_kl_div, linear_kl_div_ref, dict(direction="reverse", mask=kl["mask"]))):
        tw = inp["token_weight"].clone().requires_grad_()
        h, w = inp["hidden"].detach().requires_grad_(grad), inp["weight"].detach().requires_grad_(grad)
        args = (h, w, inp["target"]) if name == "ce" else (h, w, inp["ref_hidden"], inp["ref_weight"])
        out = call(*args, token_weight=tw, reduction=reduction, backend=backend, **opts)
        ref = ref_call(*args, token_weight=tw, reduction=reduction, compute_dtype=torch.float64, **opts)
        wanted = [tw] + ([h, w] if grad else [])
        got = torch.autograd.grad(out, wanted, grad_outputs=up)
        exp = torch.autograd.grad(ref, wanted, grad_outputs=up.double())
        for what, g, e in zip(["d_token_weight", "d_hidden", "d_weight"], got, exp):
            assert rel_err(g, e) <= F32_TOL, f"{name} {what}"
        if name == "ce":  # some tokens are capped and get no gradient, others do
            capped = (tw < 0) & (linear_cross_entropy_ref(*args, reduction="none", compute_dtype=torch.float64) > 5.0)
            assert capped.any() and (got[0][capped] == 0).all() and (got[0][~capped] != 0).any()
            assert got[0][zero] != 0


@pytest.mark.parametrize("head", ["trained", "frozen"])
def test_token_weight_grad_accumulates_over_retained_backwards(head):
    """Three backward() calls through one mean loss with retain_graph accumulate three times the
    token-weight gradient in its .grad (it is scaled out of place, so the first call's result,
    which becomes .grad, is not the tensor a later call reads)."""
    inp = make_ce_inputs(40, 16, 90, device="cpu", dtype=torch.float32, signed=True, ignore_frac=0.2)
    h0 = inp["hidden"].detach().requires_grad_(head == "trained")
    h = h0 * 1.0  # not a leaf: its gradient is copied into h0.grad, leaving the saved one intact
    tw = inp["token_weight"].clone().requires_grad_()
    loss_of = lambda: linear_cross_entropy(h, inp["weight"].detach(), inp["target"], token_weight=tw, backend="torch")
    (once,) = torch.autograd.grad(loss_of(), [tw])
    loss = loss_of()
    for _ in range(3):
        loss.backward(retain_graph=True)
    assert torch.allclose(tw.grad, 3 * once, rtol=1e-6, atol=0)


def test_gradcheck_float64():
    """torch.autograd.gradcheck of both losses, every reduction, on a tiny float64 case (token_weight
    included)."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(11, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(11, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randint(0, 11, (7,), generator=g)
    t[2] = -100
    tw = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    rh = torch.randn(7, 3, dtype=torch.float64, generator=g)
    rw = torch.randn(11, 3, dtype=torch.float64, generator=g)
    mask = torch.tensor([1, 1, 0, 1, 1, 0, 1], dtype=torch.bool)
    for red in ["mean", "sum", "none"]:
        assert torch.autograd.gradcheck(
            lambda h, w, b, tw: linear_cross_entropy(h, w, t, bias=b, token_weight=tw, softcap=2.5, reduction=red,
                                                     backend="torch", chunk_size=3), (h, w, b, tw))
        for direction, caps in [("forward", (None, None)), ("reverse", (None, None)), ("forward", (1.5, 2.0)),
                                ("reverse", (1.2, None))]:
            assert torch.autograd.gradcheck(
                lambda h, w, b, tw: linear_kl_div(h, w, rh, rw, bias=b, mask=mask, token_weight=tw,
                                                  direction=direction, temperature=1.3, softcap=caps[0],
                                                  ref_softcap=caps[1], reduction=red, backend="torch", chunk_size=3),
                (h, w, b, tw))


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_autocast(bd):
    """Under torch.autocast the GEMMs run in the autocast dtype, as nn.Linear would; float32
    parameters receive float32 gradients."""
    backend, device = bd
    inp = make_ce_inputs(64, 32, 200, device=device, dtype=torch.float32, bias=True)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], bias=inp["bias"], backend=backend)
    grads = torch.autograd.grad(out, [inp["hidden"], inp["weight"], inp["bias"]])
    assert all(g.dtype == torch.float32 for g in grads)
    cast = [x.detach().bfloat16().requires_grad_() for x in (inp["hidden"], inp["weight"], inp["bias"])]
    expect = linear_cross_entropy(cast[0], cast[1], inp["target"], bias=cast[2], backend=backend)
    assert torch.equal(out.detach(), expect.detach())
    for g, e in zip(grads, torch.autograd.grad(expect, cast)):
        assert torch.equal(g, e.float())


@pytest.mark.parametrize("bd", BACKEND_CASES)
def test_autocast_mixed_dtypes(bd):
    """Under torch.autocast the inputs may differ in dtype, as nn.Linear's may (bf16 hidden states
    from an autocast layer, a float32 head): they are cast first, so CE and KL equal the calls on
    the cast tensors, and each gradient comes back in its input's dtype. float64 is not cast (as
    autocast leaves it alone): float64 with a float32 weight is a TypeError naming autocast."""
    backend, device = bd
    inp = make_ce_inputs(48, 32, 200, device=device, dtype=torch.float32, bias=True)
    h16 = inp["hidden"].detach().bfloat16().requires_grad_()
    w, b, t = inp["weight"], inp["bias"], inp["target"]
    ref_h = torch.randn(48, 24, device=device, dtype=torch.bfloat16)
    ref_w = torch.randn(200, 24, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        ce = linear_cross_entropy(h16, w, t, bias=b, backend=backend)
        kl = linear_kl_div(h16, w, ref_h, ref_w, bias=b, backend=backend)
    cast = [x.detach().bfloat16().requires_grad_() for x in (w, b)]
    expect = (linear_cross_entropy(h16, cast[0], t, bias=cast[1], backend=backend),
              linear_kl_div(h16, cast[0], ref_h, ref_w.bfloat16(), bias=cast[1], backend=backend))
    for out, exp in zip((ce, kl), expect):
        grads = torch.autograd.grad(out, (h16, w, b))
        assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
        assert torch.equal(out.detach(), exp.detach())
        for g, e in zip(grads, torch.autograd.grad(exp, (h16, *cast))):
            assert torch.equal(g, e.to(g.dtype))
    h64 = inp["hidden"].detach().double()
    with torch.autocast(device, dtype=torch.bfloat16):
        out64 = linear_cross_entropy(h64, w.detach().double(), t, backend=backend)
        with pytest.raises(TypeError, match=r"autocast.*weight is torch.bfloat16 but hidden is torch.float64"):
            linear_cross_entropy(h64, w, t, backend=backend)
    assert out64.dtype == torch.float64
    assert torch.allclose(out64, linear_cross_entropy_ref(h64, w.detach().double(), t), rtol=1e-12)


def test_chunk_size_does_not_change_the_result():
    inp = make_ce_inputs(100, 16, 300, device="cpu", dtype=torch.float64, signed=True, bias=True)
    outs = []
    for cs in [1, 7, 100, None]:
        out = linear_cross_entropy(inp["hidden"], inp["weight"], inp["target"], bias=inp["bias"],
                                   token_weight=inp["token_weight"], backend="torch", chunk_size=cs)
        outs.append([out.detach()] + list(torch.autograd.grad(out, [inp["hidden"], inp["weight"], inp["bias"]])))
    for o in outs[1:]:
        for a, b in zip(o, outs[0]):
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("bd", BACKEND_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_return_values(bd, reduction):
    """return_values=True: (loss, values) with values the unweighted per-token CE / KL (0 where
    ignored or masked; an ascent-capped token keeps its CE) against float64, no gradient through
    them; the loss and its gradients exactly those of the call without values."""
    backend, device = bd
    inp = make_ce_inputs(50, 16, 97, device=device, dtype=torch.float32, signed=True, ignore_frac=0.2, scale=3.0)
    args = (inp["hidden"], inp["weight"], inp["target"])
    opts = dict(bias=inp["bias"], token_weight=inp["token_weight"], reduction=reduction, ascent_cap=4.0,
                backend=backend)
    loss, values = linear_cross_entropy(*args, return_values=True, **opts)
    plain = linear_cross_entropy(*args, **opts)
    ref = linear_cross_entropy_ref(*args, reduction="none", compute_dtype=torch.float64)
    assert values.shape == inp["target"].shape and values.dtype == torch.float32 and not values.requires_grad
    assert rel_err(values, ref.detach()) <= F32_TOL
    assert bool((values[inp["target"] == -100] == 0).all())
    capped = (inp["token_weight"] < 0) & (values > 4.0)
    assert bool(capped.any()) and bool((values[capped] > 4.0).all())  # capped: no loss, value kept
    up = torch.ones_like(loss) if reduction != "none" else torch.linspace(-1, 1, loss.numel()).to(device)
    params = [inp["hidden"], inp["weight"]]
    assert torch.equal(loss, plain)
    for a, b in zip(torch.autograd.grad(loss, params, up), torch.autograd.grad(plain, params, up)):
        assert torch.equal(a, b)

    kin = make_kl_inputs(3 * 17, 16, 12, 97, device=device, dtype=torch.float32, mask_frac=0.3, weighted=True)
    kargs = (kin["hidden"].reshape(3, 17, 16), kin["weight"], kin["ref_hidden"].reshape(3, 17, 12), kin["ref_weight"])
    mask = kin["mask"].reshape(3, 17)
    kl, kvals = linear_kl_div(*kargs, mask=mask, token_weight=kin["token_weight"].reshape(3, 17), reduction=reduction,
                              direction="reverse", backend=backend, return_values=True)
    kref = linear_kl_div_ref(*kargs, mask=mask, reduction="none", direction="reverse", compute_dtype=torch.float64)
    assert kvals.shape == (3, 17) and not kvals.requires_grad
    assert rel_err(kvals, kref.detach()) <= F32_TOL and bool((kvals[~mask] == 0).all())
    assert kl.requires_grad
