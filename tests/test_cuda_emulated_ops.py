"""The CUDA ops (``csrc/cuda/ops_cuda.cpp``) end to end on the CPU: chunk loop, ATen GEMMs,
gradient accumulation and argument checks, with the row kernels under host emulation.

``tests/cuda_emu/ops_emu.cpp`` compiles ops_cuda.cpp unchanged for CPU tensors (stand-in c10/cuda
headers, the emulated launchers of ``emu_rows.cpp``) as ``torch.ops.surgery_emu.*`` with
csrc/ops.cpp's schemas. Results are compared with the chunked ``torch`` backend's primitives in
float64 (float32 inputs: relative error <= 1e-5) and, for bf16/fp16, against 2x the error of the
same primitives run in that dtype. Not covered here: cuBLAS, streams, the GPU memory model (the
``cuda``-marked tests in test_cuda_ops.py cover those on a GPU).
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import pytest
import torch

from surgery_kernels.backends import chunked

ROOT = Path(__file__).resolve().parents[1]
EMU = ROOT / "tests" / "cuda_emu"
IGNORE = -100
F32_TOL = 1e-5


@pytest.fixture(scope="module")
def ops():
    from torch.utils import cpp_extension

    # one cache entry per checkout (worktrees share TORCH_EXTENSIONS_DIR)
    tag = hashlib.sha1(str(ROOT).encode()).hexdigest()[:8]
    cpp_extension.load(
        name=f"surgery_cuda_emu_{tag}",
        sources=[str(EMU / "ops_emu.cpp"), str(EMU / "emu_rows.cpp")],
        extra_include_paths=[str(EMU / "include"), str(ROOT / "csrc"), str(ROOT / "csrc" / "cuda")],
        # C++20 for the emulator's std::barrier: torch before 2.13 builds extensions as C++17
        extra_cflags=["-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-Wno-unknown-pragmas"],
        extra_ldflags=["-pthread"],
        is_python_module=False,
    )
    return torch.ops.surgery_emu


def rel_err(x, ref) -> float:
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    d = ref.norm().item()
    return (x - ref).norm().item() / (d if d > 0 else 1.0)


def _grads(hidden, weight, bias, needs=(True, True, True)):
    return (torch.empty_like(hidden) if needs[0] else None,
            torch.empty(weight.shape) if needs[1] else None,
            torch.empty(weight.shape[0]) if needs[2] and bias is not None else None)


def _ce_inputs(n, h, v, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * 2).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    target[torch.rand(n, generator=g) < 0.2] = IGNORE
    coeff = torch.randn(n, generator=g)
    return hidden, weight, b, target, coeff


def _f64(*ts):
    return [None if t is None else t.double() for t in ts]


def _ce_ref(hidden, weight, b, target, coeff, softcap, ascent_cap, needs, dtype=torch.float64):
    """The chunked primitive in `dtype` (coeff zeroed at ignored tokens, as the autograd layer does)."""
    cast = lambda t: None if t is None else t.to(dtype)
    live_coeff = torch.where(target != IGNORE, coeff, 0.0).to(dtype)
    return chunked.ce_forward_backward(cast(hidden), cast(weight), cast(b), target, live_coeff, ignore_index=IGNORE,
                                       softcap=softcap, ascent_cap=ascent_cap, needs=needs, chunk_size=13)


CE_OPTS = {
    "plain": dict(bias=False, softcap=None, ascent_cap=None),
    "bias-softcap": dict(bias=True, softcap=4.0, ascent_cap=None),
    "bias-ascent-cap": dict(bias=True, softcap=None, ascent_cap=4.5),
}


@pytest.mark.parametrize("case", list(CE_OPTS))
def test_ce_float32(ops, case):
    o = CE_OPTS[case]
    n, h, v = 45, 24, 301
    hidden, weight, b, target, coeff = _ce_inputs(n, h, v, torch.float32, bias=o["bias"])
    ref = _ce_ref(hidden, weight, b, target, coeff, o["softcap"], o["ascent_cap"], (True, True, True))
    if o["ascent_cap"] is not None:
        capped = ((coeff < 0) & (ref[0] > o["ascent_cap"]) & (target != IGNORE)).sum().item()
        assert capped > 0, "the case should cap some ascent tokens"

    ce, lse = ops.ce_forward(hidden, weight, b, target, None, IGNORE, o["softcap"], o["ascent_cap"], 17, None, None,
                             None)
    assert rel_err(ce, ref[0]) <= F32_TOL and rel_err(lse, ref[1]) <= F32_TOL

    grads = _grads(hidden, weight, b)
    ce, lse = ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, o["softcap"], o["ascent_cap"], 17, *grads)
    assert rel_err(ce, ref[0]) <= F32_TOL and rel_err(lse, ref[1]) <= F32_TOL
    for got, r in zip(grads, ref[2:]):
        if r is not None:
            assert rel_err(got, r) <= F32_TOL

    # backward: the coefficient as the autograd layer passes it (zero at capped tokens)
    c = torch.where(target != IGNORE, coeff, 0.0)
    if o["ascent_cap"] is not None:
        c = torch.where((c < 0) & (ce > o["ascent_cap"]), 0.0, c)
    bgrads = _grads(hidden, weight, b)
    ops.ce_backward(hidden, weight, b, target, lse, c, IGNORE, o["softcap"], 10, *bgrads)
    for got, r in zip(bgrads, ref[2:]):
        if r is not None:
            assert rel_err(got, r) <= F32_TOL


@pytest.mark.parametrize("needs", [(True, False, False), (False, True, False), (False, False, True)],
                         ids=["dhidden", "dweight", "dbias"])
def test_ce_each_gradient_alone(ops, needs):
    hidden, weight, b, target, coeff = _ce_inputs(30, 16, 129, torch.float32)
    ref = _ce_ref(hidden, weight, b, target, coeff, None, None, (True, True, True))
    grads = _grads(hidden, weight, b, needs)
    ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, None, None, 7, *grads)
    for got, r in zip(grads, ref[2:]):
        if got is not None:
            assert rel_err(got, r) <= F32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_ce_low_precision(ops, dtype):
    """bf16/fp16: no worse than 2x the chunked torch backend run in the same dtype, + 1e-6."""
    hidden, weight, b, target, coeff = _ce_inputs(64, 48, 517, dtype)
    ref = _ce_ref(hidden, weight, b, target, coeff, None, None, (True, True, True))
    plain = _ce_ref(hidden, weight, b, target, coeff, None, None, (True, True, True), dtype=dtype)
    grads = _grads(hidden, weight, b)
    ce, lse = ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, None, None, 20, *grads)
    for name, got, r, p in zip(["ce", "lse", "dh", "dw", "db"], (ce, lse, *grads), ref, plain):
        assert got.dtype == (dtype if name == "dh" else torch.float32)
        assert rel_err(got, r) <= 2 * rel_err(p, r) + 1e-6, name


def _kl_inputs(n, h, h_ref, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype)
    ref_hidden = torch.randn(n, h_ref, generator=g).to(dtype)
    ref_weight = (torch.randn(v, h_ref, generator=g) / h_ref**0.5).to(dtype)
    b = torch.randn(v, generator=g).to(dtype)
    rb = torch.randn(v, generator=g).to(dtype)
    mask = torch.rand(n, generator=g) > 0.25
    coeff = torch.randn(n, generator=g)
    return hidden, weight, b, ref_hidden, ref_weight, rb, mask, coeff


def _kl_ref(inp, direction, temperature, dtype=torch.float64, caps=(None, None)):
    hidden, weight, b, ref_hidden, ref_weight, rb, mask, coeff = inp
    cast = lambda t: t.to(dtype)
    return chunked.kl_forward_backward(cast(hidden), cast(weight), cast(b), cast(ref_hidden), cast(ref_weight),
                                       cast(rb), mask, torch.where(mask, coeff, 0.0).to(dtype), direction=direction,
                                       temperature=temperature, softcap=caps[0], ref_softcap=caps[1],
                                       needs=(True, True, True), chunk_size=11)


# (softcap, ref_softcap): none, both, each side alone; caps of 2-3 saturate tanh for these logits
KL_CAPS = [(None, None), (2.0, 3.0), (2.5, None), (None, 2.0)]


@pytest.mark.parametrize("caps", KL_CAPS, ids=lambda c: f"caps{c[0]}-{c[1]}")
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_float32(ops, direction, caps):
    inp = _kl_inputs(41, 24, 16, 257, torch.float32)
    hidden, weight, b, ref_hidden, ref_weight, rb, mask, coeff = inp
    reverse, t = direction == "reverse", 1.5
    ref = _kl_ref(inp, direction, t, caps=caps)

    kl, lse, rlse = ops.kl_forward(hidden, weight, b, ref_hidden, ref_weight, rb, mask, None, reverse, t, *caps, 9,
                                   None, None, None)
    for got, r in zip((kl, lse, rlse), ref[:3]):
        assert rel_err(got, r) <= F32_TOL

    grads = _grads(hidden, weight, b)
    out = ops.kl_forward(hidden, weight, b, ref_hidden, ref_weight, rb, mask, coeff, reverse, t, *caps, 9, *grads)
    for got, r in zip((*out, *grads), ref):
        assert rel_err(got, r) <= F32_TOL

    bgrads = _grads(hidden, weight, b)
    ops.kl_backward(hidden, weight, b, ref_hidden, ref_weight, rb, lse, rlse, kl, torch.where(mask, coeff, 0.0),
                    reverse, t, *caps, 16, *bgrads)
    for got, r in zip(bgrads, ref[3:]):
        assert rel_err(got, r) <= F32_TOL


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kl_low_precision(ops, dtype, direction):
    inp = _kl_inputs(48, 32, 40, 389, dtype, seed=1)
    hidden, weight, b, ref_hidden, ref_weight, rb, mask, coeff = inp
    ref = _kl_ref(inp, direction, 1.0)
    plain = _kl_ref(inp, direction, 1.0, dtype=dtype)
    grads = _grads(hidden, weight, b)
    out = ops.kl_forward(hidden, weight, b, ref_hidden, ref_weight, rb, mask, coeff, direction == "reverse", 1.0,
                         None, None, 20, *grads)
    for name, got, r, p in zip(["kl", "lse", "ref_lse", "dh", "dw", "db"], (*out, *grads), ref, plain):
        assert rel_err(got, r) <= 2 * rel_err(p, r) + 1e-6, name


def test_empty_batch_and_chunk_sizes(ops):
    """N = 0 zeroes d_weight/d_bias; chunk sizes 1, 7 (not dividing N), N and <= 0 (the default)
    agree."""
    hidden, weight, b, target, coeff = _ce_inputs(0, 8, 33, torch.float32)
    dh, dw, db = _grads(hidden, weight, b)
    ce, lse = ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, None, None, 4, dh, dw, db)
    assert ce.shape == (0,) and not dw.any() and not db.any()
    hidden, weight, b, target, coeff = _ce_inputs(23, 8, 33, torch.float32)
    outs = []
    for cs in (1, 7, 23, 0):
        grads = _grads(hidden, weight, b)
        outs.append([*ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, 3.0, None, cs, *grads), *grads])
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert rel_err(x, y) <= 1e-6


def test_bad_input_names_the_argument(ops):
    hidden, weight, b, target, coeff = _ce_inputs(10, 8, 33, torch.float32)
    call = lambda **kw: ops.ce_forward(kw.get("hidden", hidden), kw.get("weight", weight), kw.get("bias", b),
                                       kw.get("target", target), kw.get("coeff", coeff), IGNORE, None, None, 4,
                                       kw.get("dhidden"), kw.get("dweight"), None)
    with pytest.raises(TypeError, match="weight"):
        call(weight=weight.double())
    with pytest.raises(ValueError, match="weight"):
        call(weight=weight[:, :5].contiguous())
    with pytest.raises(ValueError, match="bias"):
        call(bias=b[:-1])
    with pytest.raises(TypeError, match="target"):
        call(target=target.int())
    with pytest.raises(ValueError, match="coeff"):
        call(coeff=coeff[:-1])
    with pytest.raises(TypeError, match="dweight"):
        call(dweight=torch.empty(weight.shape, dtype=torch.float64))
    with pytest.raises(ValueError, match="hidden"):
        call(hidden=hidden.t().contiguous().t())
    with pytest.raises(ValueError, match="need coeff"):
        call(coeff=None, dhidden=torch.empty_like(hidden))
    for bad in (0.0, -2.0, math.inf, math.nan, 1e39):
        with pytest.raises(ValueError, match="softcap must be > 0"):
            ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, bad, None, 4, None, None, None)
        if bad != 1e39:
            with pytest.raises(ValueError, match="ascent_cap must be > 0"):
                ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, None, bad, 4, None, None, None)
    hidden, weight, b, ref_hidden, ref_weight, rb, mask, coeff = _kl_inputs(10, 8, 8, 33, torch.float32)
    for bad in (0.0, -2.0, math.inf, math.nan, 1e39):
        for name, t, caps in [("temperature", bad, (None, None)), ("softcap", 1.0, (bad, None)),
                              ("ref_softcap", 1.0, (None, bad))]:
            with pytest.raises(ValueError, match=f"{name} must be > 0"):
                ops.kl_forward(hidden, weight, b, ref_hidden, ref_weight, rb, mask, None, False, t, *caps, 4, None,
                               None, None)

