"""GPU-only checks of the CUDA ops (``csrc/cuda``), on top of the numerics suite (which runs over
the ``cuda`` backend on a GPU machine through BACKEND_CASES).

- the extension builds with CUDA and the ``cuda`` backend is available;
- no host synchronization inside any op (``torch.cuda.set_sync_debug_mode("error")``);
- 64-bit indexing: one chunk of N x V > 2^31 logits, rows past the 2^31-th element checked
  against float64;
- bf16 at a Llama-3 vocabulary (V = 128256): no worse than 2x plain PyTorch's bf16 error;
- the ops run on the caller's current stream; edge chunkings (N = 0, chunk_size 1);
- ``torch.library.opcheck`` of the four ops with CUDA tensors.

All marked ``cuda``: skipped without a GPU, run by ``benchmarks/gpu_check.sh``.
"""

from __future__ import annotations

import pytest
import torch

from surgery_kernels.backends import availability
from test_numerics import assert_close, ce_results, kl_results, make_ce_inputs, make_kl_inputs, rel_err

pytestmark = pytest.mark.cuda
DEV = "cuda"
IGNORE = -100


@pytest.fixture(scope="module")
def ops():
    from surgery_kernels.backends import extension

    result = extension.load()
    assert result.ok, result.reason
    assert result.cuda, "the extension was built without its CUDA sources"
    a = availability("cuda", "cuda")
    assert a.ok, a.reason
    return torch.ops.surgery


def _ce_args(n, h, v, dtype, *, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(DEV, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEV, dtype)
    b = torch.randn(v, generator=g).to(DEV, dtype) if bias else None
    target = torch.randint(0, v, (n,), generator=g)
    if n > 2:
        target[1] = IGNORE
    coeff = torch.randn(n, generator=g)
    return hidden, weight, b, target.to(DEV), coeff.to(DEV)


def _grads(hidden, weight, bias):
    return (torch.empty_like(hidden), torch.empty(weight.shape, device=DEV),
            torch.empty(weight.shape[0], device=DEV) if bias is not None else None)


def _kl_args(n, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g).to(DEV, dtype)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(DEV, dtype)
    ref_hidden = torch.randn(n, h + 8, generator=g).to(DEV, dtype)
    ref_weight = (torch.randn(v, h + 8, generator=g) / h**0.5).to(DEV, dtype)
    b = torch.randn(v, generator=g).to(DEV, dtype)
    mask = (torch.rand(n, generator=g) > 0.2).to(DEV)
    coeff = torch.randn(n, generator=g).to(DEV)
    return hidden, weight, b, ref_hidden, ref_weight, None, mask, coeff


def test_cuda_backend_available(ops):
    assert hasattr(ops, "ce_forward") and hasattr(ops, "kl_backward")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_no_host_synchronization(ops, dtype):
    """Every op, in every mode, runs without the host waiting for the device."""
    n, h, v = 300, 64, 5003
    hidden, weight, b, target, coeff = _ce_args(n, h, v, dtype)
    kl_in = _kl_args(n, h, v, dtype)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ce, lse = ops.ce_forward(hidden, weight, b, target, None, IGNORE, 30.0, None, 64, None, None, None)
        ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, 30.0, 2.0, 64, *_grads(hidden, weight, b))
        ops.ce_backward(hidden, weight, b, target, lse, coeff, IGNORE, None, 64, *_grads(hidden, weight, b))
        for reverse in (False, True):
            kl, klse, krlse = ops.kl_forward(*kl_in[:7], None, reverse, 1.5, None, None, 64, None, None, None)
            ops.kl_forward(*kl_in, reverse, 1.5, 30.0, 20.0, 64, *_grads(kl_in[0], kl_in[1], kl_in[2]))
            ops.kl_backward(*kl_in[:6], klse, krlse, kl, kl_in[7], reverse, 1.5, None, None, 64,
                            *_grads(kl_in[0], kl_in[1], kl_in[2]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert torch.isfinite(ce).all() and torch.isfinite(kl).all()


def _free_bytes() -> int:
    free, _ = torch.cuda.mem_get_info()
    return free


# 16500 x 131101 = 2.16e9 > 2^31 logits in one chunk; the last rows start past element 2^31.
BIG = (16500, 32, 131101)


def test_ce_one_chunk_past_2_31_elements(ops):
    """One float32 chunk of N x V > 2^31 logits (8.7 GB): the rows whose offset exceeds 2^31 must
    match float64, as must their d_hidden; d_weight (every row contributes) must match the
    chunked torch backend."""
    n, h, v = BIG
    assert (n - 48) * v > 2**31
    if _free_bytes() < 12 * 2**30:
        pytest.skip("needs ~12 GiB of free GPU memory")
    check_ce_one_chunk(ops, n, h, v, last_rows=48)


def check_ce_one_chunk(ops, n, h, v, last_rows):
    hidden, weight, b, target, coeff = _ce_args(n, h, v, torch.float32, bias=False, seed=5)
    dh, dw, _ = _grads(hidden, weight, None)
    ce, lse = ops.ce_forward(hidden, weight, None, target, coeff, IGNORE, None, None, n, dh, dw, None)
    last = slice(n - last_rows, n)
    z = hidden[last].double() @ weight.double().t()
    lse_ref = torch.logsumexp(z, 1)
    t = target[last]
    live = t != IGNORE
    ce_ref = torch.where(live, lse_ref - z.gather(1, t.clamp_min(0)[:, None])[:, 0], 0.0)
    g = torch.softmax(z, 1)
    g[torch.arange(last_rows, device=z.device), t.clamp_min(0)] -= 1
    g *= torch.where(live, coeff[last].double(), 0.0)[:, None]
    assert rel_err(lse[last], lse_ref) <= 1e-6
    assert rel_err(ce[last], ce_ref) <= 1e-5
    assert rel_err(dh[last], g @ weight.double()) <= 1e-5
    del z, g
    from surgery_kernels.backends import chunked

    # the primitive expects coeff already zero at ignored tokens (the op zeroes them itself)
    live_coeff = torch.where(target != IGNORE, coeff, 0.0)
    _, _, _, dw_ref, _ = chunked.ce_forward_backward(hidden, weight, None, target, live_coeff, ignore_index=IGNORE,
                                                     softcap=None, ascent_cap=None, needs=(False, True, False),
                                                     chunk_size=None)
    assert rel_err(dw, dw_ref) <= 1e-5


def test_kl_one_chunk_past_2_31_elements(ops):
    """KL with two float32 chunks of N x V > 2^31 logits each (17.3 GB): rows past 2^31
    elements match float64 (kl, lse, ref_lse and d_hidden)."""
    n, h, v = BIG
    if _free_bytes() < 22 * 2**30:
        pytest.skip("needs ~22 GiB of free GPU memory")
    check_kl_one_chunk(ops, n, h, v, last_rows=32)


def check_kl_one_chunk(ops, n, h, v, last_rows):
    hidden, weight, b, ref_hidden, ref_weight, _, mask, coeff = _kl_args(n, h, v, torch.float32, seed=6)
    dh = torch.empty_like(hidden)
    kl, lse, rlse = ops.kl_forward(hidden, weight, b, ref_hidden, ref_weight, None, mask, coeff, True, 1.0, None,
                                   None, n, dh, None, None)
    last = slice(n - last_rows, n)
    zq = hidden[last].double() @ weight.double().t() + b.double()
    zp = ref_hidden[last].double() @ ref_weight.double().t()
    logq, logp = torch.log_softmax(zq, 1), torch.log_softmax(zp, 1)
    q = logq.exp()
    kl_raw = (q * (logq - logp)).sum(1)
    m = mask[last]
    g = q * (logq - logp - kl_raw[:, None]) * torch.where(m, coeff[last].double(), 0.0)[:, None]
    assert rel_err(lse[last], torch.logsumexp(zq, 1)) <= 1e-6
    assert rel_err(rlse[last], torch.logsumexp(zp, 1)) <= 1e-6
    assert rel_err(kl[last], torch.where(m, kl_raw, 0.0)) <= 1e-5
    assert rel_err(dh[last], g @ weight.double()) <= 1e-5


@pytest.mark.parametrize("signed", [False, True], ids=["plain", "signed"])
def test_ce_bf16_llama3_vocab(ops, signed):
    """bf16 at V = 128256 (Llama-3): no worse than 2x plain PyTorch's bf16 error + 1e-6."""
    inp = make_ce_inputs(384, 256, 128256, device=DEV, dtype=torch.bfloat16, bias=True, signed=signed,
                         ignore_frac=0.1)
    res, refs, naives, budget = ce_results("cuda", DEV, inp, "mean", chunk_size=100)
    assert_close(res, refs, naives, torch.bfloat16, f"cuda/bf16-llama3/{signed}", budget)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_kl_bf16_llama3_vocab(ops, direction):
    inp = make_kl_inputs(256, 256, 192, 128256, device=DEV, dtype=torch.bfloat16, bias=True, mask_frac=0.2)
    res, refs, naives, budget = kl_results("cuda", DEV, inp, "mean", chunk_size=100, direction=direction, temperature=1.5)
    assert_close(res, refs, naives, torch.bfloat16, f"cuda/bf16-llama3/{direction}", budget)


def test_runs_on_the_current_stream(ops):
    """Results computed under a side stream equal those on the default stream: launches and
    GEMMs follow torch.cuda.current_stream()."""
    hidden, weight, b, target, coeff = _ce_args(512, 128, 32003, torch.bfloat16)
    grads = _grads(hidden, weight, b)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # a long kernel first: work wrongly enqueued on the default stream would then race ahead
        # and read the gradient outputs before the side stream wrote them
        torch.cuda._sleep(10_000_000)
        out = ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, None, None, 128, *grads)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    base_grads = _grads(hidden, weight, b)
    base = ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, None, None, 128, *base_grads)
    for x, y in zip(list(out) + list(grads), list(base) + list(base_grads)):
        assert torch.equal(x, y)


def test_empty_and_tiny_chunks(ops):
    """N = 0 writes zero d_weight/d_bias; chunk_size 1 and a chunk that does not divide N agree
    with one chunk."""
    hidden, weight, b, target, coeff = _ce_args(0, 16, 101, torch.float32)
    dh, dw, db = _grads(hidden, weight, b)
    ce, lse = ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, None, None, 8, dh, dw, db)
    assert ce.shape == (0,) and torch.equal(dw, torch.zeros_like(dw)) and torch.equal(db, torch.zeros_like(db))
    hidden, weight, b, target, coeff = _ce_args(37, 16, 101, torch.float32)
    outs = []
    for cs in (37, 1, 10):
        grads = _grads(hidden, weight, b)
        outs.append(list(ops.ce_forward(hidden, weight, b, target, coeff, IGNORE, 4.0, 1.5, cs, *grads)) + list(grads))
    for o in outs[1:]:
        for x, y in zip(o, outs[0]):
            assert rel_err(x, y) <= 1e-6


def test_opcheck(ops):
    hidden, weight, b, target, coeff = _ce_args(20, 16, 77, torch.float32)
    ce, lse = ops.ce_forward(hidden, weight, b, target, None, IGNORE, None, None, 8, None, None, None)
    kl_in = _kl_args(20, 16, 77, torch.float32)
    kl, klse, krlse = ops.kl_forward(*kl_in[:7], None, False, 1.0, None, None, 8, None, None, None)
    cases = [
        (ops.ce_forward.default, (hidden, weight, b, target, None, IGNORE, None, None, 8, None, None, None)),
        (ops.ce_forward.default, (hidden, weight, b, target, coeff, IGNORE, 3.0, 1.0, 8, *_grads(hidden, weight, b))),
        (ops.ce_backward.default, (hidden, weight, b, target, lse, coeff, IGNORE, None, 8,
                                   *_grads(hidden, weight, b))),
        (ops.kl_forward.default, (*kl_in[:7], None, True, 2.0, 30.0, None, 8, None, None, None)),
        (ops.kl_forward.default, (*kl_in, False, 1.0, None, 20.0, 8, *_grads(kl_in[0], kl_in[1], kl_in[2]))),
        (ops.kl_backward.default, (*kl_in[:6], klse, krlse, kl, kl_in[7], True, 1.0, 30.0, 30.0, 8,
                                   *_grads(kl_in[0], kl_in[1], kl_in[2]))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)
