"""The API contract beyond numerics: bad input, backend choice, modules, memory structure, and
equality with a Hugging Face model's own loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import surgery_kernels as sk
from conftest import BACKEND_CASES, RecordCreated, RecordSyncs, assert_no_host_sync, loss_calls
from surgery_kernels import LinearCrossEntropy, LinearKLDiv, linear_cross_entropy, linear_kl_div
from surgery_kernels.backends import availability, resolve
from surgery_kernels.backends.chunked import default_chunk_size
from surgery_kernels.reference import linear_cross_entropy_ref, linear_kl_div_ref


def ce_args(n=8, h=4, v=10, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return torch.randn(n, h, generator=g, dtype=dtype), torch.randn(v, h, generator=g, dtype=dtype), \
        torch.randint(0, v, (n,), generator=g)


BAD_CE = [
    # (what, kwargs override, exception, words the message must contain)
    ("hidden-not-tensor", dict(hidden=[[1.0]]), TypeError, ["hidden", "Tensor"]),
    ("hidden-int", dict(hidden=torch.ones(8, 4, dtype=torch.int64)), TypeError, ["hidden", "float32"]),
    ("weight-1d", dict(weight=torch.randn(40)), ValueError, ["weight", "2 dimension"]),
    ("weight-wrong-H", dict(weight=torch.randn(10, 5)), ValueError, ["weight", "(V, H)", "4"]),
    ("weight-dtype", dict(weight=torch.randn(10, 4, dtype=torch.float64)), TypeError, ["weight", "dtype", "autocast"]),
    ("bias-wrong-V", dict(bias=torch.randn(9)), ValueError, ["bias", "(10,)"]),
    ("target-float", dict(target=torch.zeros(8)), TypeError, ["target", "integer"]),
    ("target-wrong-shape", dict(target=torch.zeros(7, dtype=torch.int64)), ValueError, ["target", "(8,)"]),
    ("target-too-big", dict(target=torch.full((8,), 10)), ValueError, ["target", "[0, 10)", "found 10"]),
    ("target-negative", dict(target=torch.full((8,), -1)), ValueError, ["target", "ignore_index=-100"]),
    # in uint8, ignore_index -100 is 156: the class id 156 must not pass for it
    ("target-uint8-156", dict(target=torch.full((8,), 156, dtype=torch.uint8)), ValueError,
     ["target", "[0, 10)", "found 156"]),
    ("token-weight-int", dict(token_weight=torch.ones(8, dtype=torch.int64)), TypeError, ["token_weight"]),
    ("token-weight-shape", dict(token_weight=torch.ones(3)), ValueError, ["token_weight", "(8,)"]),
    ("reduction", dict(reduction="avg"), ValueError, ["reduction", "'avg'"]),
    ("backend", dict(backend="fast"), ValueError, ["backend", "'fast'"]),
    ("ascent-cap-zero", dict(ascent_cap=0.0), ValueError, ["ascent_cap", "positive"]),
    ("ascent-cap-negative", dict(ascent_cap=-1), ValueError, ["ascent_cap"]),
    ("softcap-zero", dict(softcap=0), ValueError, ["softcap"]),
    ("softcap-inf", dict(softcap=float("inf")), ValueError, ["softcap", "finite"]),
    ("ascent-cap-inf", dict(ascent_cap=float("inf")), ValueError, ["ascent_cap", "finite", "None"]),
    ("softcap-past-float32", dict(softcap=1e39), ValueError, ["softcap", "float32", "1e+39"]),
    ("hidden-size-zero", dict(hidden=torch.randn(8, 0), weight=torch.randn(10, 0)), ValueError, ["hidden", "H >= 1"]),
    ("chunk-size", dict(chunk_size=0), ValueError, ["chunk_size"]),
    ("ignore-index-float", dict(ignore_index=-100.0), TypeError, ["ignore_index"]),
    ("ignore-index-huge", dict(ignore_index=2**70), ValueError, ["ignore_index", "int64"]),
    ("return-values-int", dict(return_values=1), TypeError, ["return_values", "True or False"]),
    ("target-list", dict(target=[1, 2, 3, 4, 5, 6, 7, 8]), TypeError, ["target", "torch.Tensor", "list"]),
    ("target-numpy", dict(target=np.arange(8)), TypeError, ["target", "torch.Tensor", "ndarray"]),
    ("token-weight-list", dict(token_weight=[1.0] * 8), TypeError, ["token_weight", "torch.Tensor", "list"]),
]


@pytest.mark.parametrize("what,override,exc,words", BAD_CE, ids=[b[0] for b in BAD_CE])
def test_bad_ce_input(what, override, exc, words):
    h, w, t = ce_args()
    kw = dict(hidden=h, weight=w, target=t)
    kw.update(override)
    with pytest.raises(exc) as info:
        linear_cross_entropy(kw.pop("hidden"), kw.pop("weight"), kw.pop("target"), **kw)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


def kl_args():
    g = torch.Generator().manual_seed(0)
    return dict(hidden=torch.randn(6, 4, generator=g), weight=torch.randn(10, 4, generator=g),
                ref_hidden=torch.randn(6, 3, generator=g), ref_weight=torch.randn(10, 3, generator=g))


BAD_KL = [
    ("ref-vocab", dict(ref_weight=torch.randn(11, 3)), ValueError, ["ref_weight", "V = 10"]),
    ("ref-H", dict(ref_weight=torch.randn(10, 5)), ValueError, ["ref_weight", "(V, H)"]),
    ("ref-tokens", dict(ref_hidden=torch.randn(5, 3)), ValueError, ["ref_hidden", "(6,)"]),
    ("ref-dtype", dict(ref_hidden=torch.randn(6, 3).double(), ref_weight=torch.randn(10, 3).double()), TypeError,
     ["ref_hidden", "dtype"]),
    ("mask-float", dict(mask=torch.ones(6)), TypeError, ["mask", "bool or integer", "token_weight"]),
    ("mask-shape", dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, ["mask"]),
    ("direction", dict(direction="backward"), ValueError, ["direction", "'backward'"]),
    ("temperature", dict(temperature=0.0), ValueError, ["temperature"]),
    ("temperature-inf", dict(temperature=float("inf")), ValueError, ["temperature", "finite"]),
    ("temperature-below-float32", dict(temperature=1e-39), ValueError, ["temperature", "float32"]),
    ("softcap-negative", dict(softcap=-1.0), ValueError, ["softcap"]),
    ("ref-softcap-zero", dict(ref_softcap=0), ValueError, ["ref_softcap"]),
    ("ref-softcap-string", dict(ref_softcap="30"), ValueError, ["ref_softcap", "'30'"]),
    ("ref-softcap-past-float32", dict(ref_softcap=1e39), ValueError, ["ref_softcap", "float32"]),
    ("reduction", dict(reduction="max"), ValueError, ["reduction"]),
    ("return-values-none", dict(return_values=None), TypeError, ["return_values"]),
    ("mask-list", dict(mask=[True] * 6), TypeError, ["mask", "torch.Tensor", "list"]),
]


@pytest.mark.parametrize("what,override,exc,words", BAD_KL, ids=[b[0] for b in BAD_KL])
def test_bad_kl_input(what, override, exc, words):
    kw = kl_args()
    kw.update(override)
    args = [kw.pop(k) for k in ("hidden", "weight", "ref_hidden", "ref_weight")]
    with pytest.raises(exc) as info:
        linear_kl_div(*args, **kw)
    for word in words:
        assert word in str(info.value), f"{word!r} not in: {info.value}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_kl_takes_an_integer_mask_as_an_attention_mask(backend):
    """An integer mask (an attention_mask as it is) skips its zeros and keeps any nonzero value
    (negative, or 255 in uint8), the same loss, values and gradients as the bool mask it stands
    for; the reference reads it the same way."""
    kw = kl_args()
    args = [kw.pop(k) for k in ("hidden", "weight", "ref_hidden", "ref_weight")]
    args[0].requires_grad_()
    keep = torch.tensor([1, 0, 2, 1, 0, 1])
    results = []
    for mask in (keep != 0, keep, keep.to(torch.int8).neg(), (keep * 255).to(torch.uint8)):
        loss, values = linear_kl_div(*args, mask=mask, backend=backend, return_values=True)
        (grad,) = torch.autograd.grad(loss, args[0])
        results.append((loss, values, grad))
        ref = linear_kl_div_ref(*args, mask=mask, compute_dtype=torch.float64)
        assert torch.allclose(loss.double(), ref, rtol=1e-5, atol=0), mask
    assert torch.equal(results[0][1][keep == 0], torch.zeros(2)) and bool((results[0][1][keep != 0] > 0).all())
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_chunk_size_past_int64_is_one_chunk(backend):
    """A chunk_size larger than any token count (even past int64, where the ops' argument would
    not fit) means one chunk."""
    h, w, t = ce_args()
    one = linear_cross_entropy(h, w, t, backend=backend, chunk_size=8)
    assert torch.equal(linear_cross_entropy(h, w, t, backend=backend, chunk_size=2**70), one)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_unavailable_backend_says_why():
    h, w, t = ce_args()
    with pytest.raises(ValueError) as info:
        linear_cross_entropy(h, w, t, backend="cuda")
    assert "backend='cuda' is not available for cpu tensors" in str(info.value)
    assert sk.available_backends("cpu")["torch"] == "available"
    assert all(isinstance(v, str) and v for v in sk.available_backends("cpu").values())


def test_auto_picks_by_device_order():
    name = resolve("auto", "cpu")
    order = ["cpu", "torch"]
    avail = sk.available_backends("cpu")
    assert name == next(b for b in order if avail[b] == "available")


def test_modules_hold_options():
    h, w, t = ce_args()
    tw = torch.linspace(-1, 1, 8)
    m = LinearCrossEntropy(reduction="sum", softcap=3.0, ascent_cap=5.0, backend="torch")
    assert "softcap=3.0" in repr(m)
    expect = linear_cross_entropy(h, w, t, token_weight=tw, reduction="sum", softcap=3.0, ascent_cap=5.0,
                                  backend="torch")
    assert torch.equal(m(h, w, t, token_weight=tw), expect)
    kw = kl_args()
    mk = LinearKLDiv(direction="reverse", temperature=2.0, softcap=1.5, ref_softcap=2.5, reduction="none",
                     backend="torch")
    assert "ref_softcap=2.5" in repr(mk)
    out = mk(kw["hidden"], kw["weight"], kw["ref_hidden"], kw["ref_weight"])
    assert out.shape == (6,)
    assert torch.equal(out, linear_kl_div(kw["hidden"], kw["weight"], kw["ref_hidden"], kw["ref_weight"],
                                          direction="reverse", temperature=2.0, softcap=1.5, ref_softcap=2.5,
                                          reduction="none", backend="torch"))
    loss, values = LinearCrossEntropy(reduction="sum", backend="torch", return_values=True)(h, w, t)
    assert torch.equal(loss, values.sum()) and values.shape == t.shape
    kl, kvals = LinearKLDiv(backend="torch", return_values=True)(kw["hidden"], kw["weight"], kw["ref_hidden"],
                                                                 kw["ref_weight"])
    assert torch.allclose(kl, kvals.mean()) and kvals.shape == (6,)


@pytest.mark.parametrize("module, option, bad", [
    (LinearCrossEntropy, "reduction", "avg"), (LinearCrossEntropy, "ascent_cap", -1.0),
    (LinearCrossEntropy, "backend", "gpu"), (LinearCrossEntropy, "softcap", 0.0),
    (LinearCrossEntropy, "ignore_index", 1.5), (LinearCrossEntropy, "chunk_size", 0),
    (LinearCrossEntropy, "return_values", 1),
    (LinearKLDiv, "direction", "fwd"), (LinearKLDiv, "temperature", 0.0), (LinearKLDiv, "ref_softcap", -1.0),
    (LinearKLDiv, "reduction", "avg"), (LinearKLDiv, "backend", "gpu")])
def test_modules_check_options_at_construction(module, option, bad):
    """A typo in a loss module's options is reported where the module is built, naming the option,
    not at the first forward after the model and data are set up."""
    with pytest.raises((ValueError, TypeError), match=option):
        module(**{option: bad})


def test_default_chunk_size():
    assert default_chunk_size(10**6, 32000) == (1 << 24) // 32000
    assert default_chunk_size(5, 32000) == 5
    assert default_chunk_size(10**6, 10**9) == 1


@pytest.mark.parametrize("op", ["ce", "ce-none", "kl", "kl-none"])
def test_never_creates_an_n_by_v_tensor(op):
    """Forward+backward with chunk_size < N never creates a tensor of N x V elements (the naive
    computation does, which shows the recorder sees them)."""
    n, h, v = 96, 8, 500  # N > H so that (V, H) weight gradients stay below N x V
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g, requires_grad=True)
    weight = torch.randn(v, h, generator=g, requires_grad=True)
    target = torch.randint(0, v, (n,), generator=g)
    ref_h, ref_w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g)
    red = "none" if op.endswith("none") else "mean"

    def run(fn):
        with RecordCreated() as rec:
            out = fn()
            out.backward(torch.ones_like(out))
        return rec.largest()

    if op.startswith("ce"):
        ours = lambda: linear_cross_entropy(hidden, weight, target, reduction=red, backend="torch", chunk_size=32)
        naive = lambda: linear_cross_entropy_ref(hidden, weight, target, reduction=red)
    else:
        ours = lambda: linear_kl_div(hidden, weight, ref_h, ref_w, reduction=red, backend="torch", chunk_size=32)
        naive = lambda: linear_kl_div_ref(hidden, weight, ref_h, ref_w, reduction=red)
    assert run(naive)[0] >= n * v
    biggest = run(ours)
    assert biggest[0] <= 32 * v, f"created a tensor of {biggest[0]} elements in {biggest[1]}"


_PEAK_SCRIPT = r"""
import resource, sys, torch
from surgery_kernels import linear_cross_entropy, linear_kl_div
backend, op, red = sys.argv[1:4]
n, h, v, chunk = 2048, 16, 32768, 512  # 64 MiB float32 chunks
g = torch.Generator().manual_seed(0)
hidden = torch.randn(n, h, generator=g, requires_grad=True)
weight = torch.randn(v, h, generator=g).div_(4).requires_grad_()
target = torch.randint(0, v, (n,), generator=g)
ref_h, ref_w = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g).div_(4)
def step(k):
    if op == "ce":
        out = linear_cross_entropy(hidden[:k], weight, target[:k], reduction=red, backend=backend, chunk_size=chunk)
    else:
        out = linear_kl_div(hidden[:k], weight, ref_h[:k], ref_w, reduction=red, backend=backend, chunk_size=chunk)
    out.sum().backward()
step(4)  # libraries, the extension, the gradient buffers: before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
step(n)
grads = 2 * (n * h + v * h) * 4  # the call's own dhidden and float32 dweight, and .grad's sums
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base - grads) / (chunk * v * 4))
"""


@pytest.mark.parametrize("red", ["mean", "none"])
@pytest.mark.parametrize("op, chunks", [("ce", 1.25), ("kl", 3.5)])
@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_peak_memory_in_chunks(backend, op, chunks, red):
    """The memory contract, measured: beyond inputs and gradients a call's peak is about one
    chunk of logits for the CE and three for the KL (the two sides and their difference; the cpu
    backend's KL: two), over 4 chunks of 64 MiB (peak RSS of a fresh process; a finished chunk
    must be gone before the next one's logits). glibc's malloc is told to map every block of 1 MiB
    or more on its own, so that a freed one leaves the resident set at once and the peak RSS is
    the peak of live memory (by default blocks under 32 MiB stay in its heap once freed: the
    KL's quarter-chunk masks moved the peak by 0.25 chunk steps, 3.45-4.47). The torch backend
    held 3.0 chunks for the CE and 5.5-7.4 for the KL before it computed in its chunk buffers in
    place."""
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("reads the live peak off glibc malloc's resident set")
    if not availability(backend, "cpu").ok:
        pytest.skip(f"backend {backend} cannot run here")
    env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}  # glibc's malloc, not a preloaded one
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, backend, op, red], capture_output=True, text=True,
                         timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    peak = float(out.stdout.split()[-1])
    assert peak <= chunks, f"{backend} {op} {red}: peak {peak:.2f} chunks beyond inputs and gradients"


def test_sync_recorder_sees_host_reads():
    """RecordSyncs reports on CPU tensors what would wait for a GPU: a value read on the host, a
    Python branch on a tensor, selection by a boolean mask and its backward."""
    x = torch.randn(6, 3, requires_grad=True)
    mask = torch.tensor([True, False] * 3)
    with RecordSyncs() as rec:
        float(x.detach().sum())
        if (x > 0).any():
            pass
        x[mask].sum().backward()
        x.detach()[mask] = 0.0
    ops = [op for op, _ in rec.syncs]
    assert ops.count("aten._local_scalar_dense.default") == 2
    assert ops.count("aten.index.Tensor") == 1 and ops.count("aten.index_put.default") == 1
    assert ops.count("aten.index_put_.default") == 1


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("op", ["ce", "kl"])
def test_no_host_synchronization(op, reduction, dtype, device, target_check_as_on_cuda):
    """Forward+backward with every option (loss_calls) on the torch backend, whose Python also runs
    on CUDA tensors — functional, checks, autograd, the chunked primitives — runs no op that would
    make the host wait for a GPU (the README's promise; tests/test_cuda_ops.py checks the C++ ops on
    a GPU). The target check takes its CUDA branch, a device-side assertion (target_check_as_on_cuda).
    float16 takes the backward that recomputes the logits, bf16 the in-place scaling of 16-bit
    gradients (a Triton kernel on CUDA)."""
    assert_no_host_sync(loss_calls(op, "torch", device, dtype, reduction), device)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("op", ["ce", "kl"])
def test_mean_backward_scales_in_place_and_only_once(case, op):
    """reduction="mean": the gradients computed in the forward are multiplied by a non-unit upstream
    gradient correctly (float64 reference) and in place (the backward allocates no weight-sized
    tensor); a retained graph backpropagated again gives each call its own scale."""
    backend, device = case
    n, h, v = 24, 32, 128
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(device).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 0.3).to(device).requires_grad_()
    target = torch.randint(0, v, (n,), generator=g).to(device)
    ref_h, ref_w = torch.randn(n, h, generator=g).to(device), (torch.randn(v, h, generator=g) * 0.3).to(device)
    if op == "ce":
        loss_fn = lambda hh, ww, **k: linear_cross_entropy(hh, ww, target, **k)
        ref_fn = lambda hh, ww: linear_cross_entropy_ref(hh, ww, target, compute_dtype=torch.float64)
    else:
        loss_fn = lambda hh, ww, **k: linear_kl_div(hh, ww, ref_h, ref_w, **k)
        ref_fn = lambda hh, ww: linear_kl_div_ref(hh, ww, ref_h, ref_w, compute_dtype=torch.float64)
    loss = loss_fn(hidden, weight, backend=backend)
    with RecordCreated(storage=True) as rec:
        (2.5 * loss).backward()
    fresh = [name for numel, _, name, new in rec.created if numel == v * h and new]
    assert fresh == [], f"the backward allocated weight-sized tensors: {fresh}"
    expect = torch.autograd.grad(2.5 * ref_fn(hidden, weight), [hidden, weight])
    for got, want in zip([hidden.grad, weight.grad], expect):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # A retained graph: later backwards (other upstream gradients) still get the right gradients.
    loss = loss_fn(hidden, weight, backend=backend)
    for scale in (2.5, -0.5, 3.0):
        got = torch.autograd.grad(scale * loss, [hidden, weight], retain_graph=True)
        for g_, want in zip(got, expect):
            torch.testing.assert_close(g_, want * (scale / 2.5), rtol=1e-5, atol=1e-6)
    # ... except after a first upstream gradient of 0, which leaves nothing to rescale: a clear error.
    loss = loss_fn(hidden, weight, backend=backend)
    torch.autograd.grad(0 * loss, [hidden, weight], retain_graph=True)
    with pytest.raises(RuntimeError, match="reduction='none'"):
        torch.autograd.grad(loss, [hidden, weight])


def test_no_grad_requested_computes_no_gradient(monkeypatch):
    """Inputs that need no gradient take the values-only path (no wasted backward GEMMs)."""
    from surgery_kernels.backends import chunked

    called = []
    monkeypatch.setattr(chunked, "ce_forward_backward", lambda *a, **k: called.append(1))
    h, w, t = ce_args()
    out = linear_cross_entropy(h, w, t, backend="torch")
    assert not called and out.requires_grad is False


def test_matches_hugging_face_llama_loss():
    """model(ids, labels=labels).loss == our loss on the last hidden state, lm_head.weight and shifted labels."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).float()
    ids = torch.randint(0, 211, (3, 17))
    labels = ids.clone()
    labels[0, :5] = -100
    hf = model(input_ids=ids, labels=labels).loss
    hidden = model.model(input_ids=ids).last_hidden_state
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    ours = linear_cross_entropy(hidden, model.lm_head.weight, shifted)
    assert torch.allclose(ours, hf, rtol=1e-5, atol=0)
    g_hf = torch.autograd.grad(hf, [model.lm_head.weight, model.model.embed_tokens.weight])
    g_ours = torch.autograd.grad(ours, [model.lm_head.weight, model.model.embed_tokens.weight])
    for a, b in zip(g_ours, g_hf):
        assert (a - b).norm() <= 1e-5 * b.norm()


@pytest.mark.slow
def test_int64_indexing_beyond_2_31():
    """N x V > 2^31 logit elements (processed chunk by chunk): every hidden row is the same, so the
    exact per-token values and gradients are known in closed form, and a 32-bit offset anywhere
    would show as wrong rows past the 2^31-th element."""
    n, h, v = (1 << 16) + 3, 4, (1 << 15) + 5
    assert n * v > 2**31
    g = torch.Generator().manual_seed(0)
    row = torch.randn(h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64).float().requires_grad_()
    hidden = row.float().expand(n, h).contiguous().requires_grad_()
    target = torch.randint(0, v, (n,), generator=g)
    out = linear_cross_entropy(hidden, weight, target, reduction="none", backend="auto", chunk_size=8192)
    # Upstream gradient only on the last 64 tokens, whose logits lie past element 2^31: their
    # d_weight contributions are then not drowned in float32 summation noise of 65k others.
    up = torch.zeros(n)
    up[-64:] = torch.rand(64, generator=g) + 0.5
    assert (n - 64) * v < 2**31
    gh, gw = torch.autograd.grad(out, [hidden, weight], up)
    z = weight.detach().double() @ row.float().double()
    logp = torch.log_softmax(z, 0)
    assert torch.allclose(out.double(), -logp[target], rtol=1e-5, atol=1e-5)
    assert torch.equal(gh[:-64], torch.zeros_like(gh[:-64]))
    # The last 64 tokens against float64, with plain float32 PyTorch's own error as the yardstick
    # (a V = 32773-term float32 reduction is itself ~1e-5 off).
    tail_h = hidden.detach()[-64:].clone().requires_grad_()
    tail = lambda dt: linear_cross_entropy_ref(tail_h, weight, target[-64:], reduction="none", compute_dtype=dt)
    ref_g = torch.autograd.grad(tail(torch.float64), [tail_h, weight], up[-64:].double())
    naive_g = torch.autograd.grad(tail(None), [tail_h, weight], up[-64:])
    for name, ours_g, r, nv in [("d_hidden", gh[-64:], ref_g[0], naive_g[0]), ("d_weight", gw, ref_g[1], naive_g[1])]:
        err = (ours_g.double() - r).norm() / r.norm()
        assert err <= 2 * (nv.double() - r).norm() / r.norm() + 1e-6, f"{name}: {err:.3g}"


def test_numpy_integers_are_ints():
    """chunk_size and ignore_index given as numpy integers work as the same Python ints."""
    np = pytest.importorskip("numpy")
    h, w, t = ce_args()
    t[0] = 3
    want = linear_cross_entropy(h, w, t, ignore_index=3, chunk_size=3, backend="torch")
    got = linear_cross_entropy(h, w, t, ignore_index=np.int32(3), chunk_size=np.int64(3), backend="torch")
    assert torch.equal(got, want)


def test_torch_func_transforms_are_refused_by_name():
    """vmap / grad of torch.func wrap the inputs; the losses refuse them, naming the transform,
    instead of failing inside the checks or the autograd function."""
    h, w, t = ce_args()
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.vmap(lambda x: linear_cross_entropy(x, w, t[:1].squeeze(0), backend="torch"))(h)
    kw = kl_args()
    with pytest.raises(NotImplementedError, match="torch.func"):
        torch.func.grad(lambda x: linear_kl_div(x, kw["weight"], kw["ref_hidden"], kw["ref_weight"], backend="torch"))(
            kw["hidden"])


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_double_backward_is_refused(case):
    """create_graph=True through the losses raises instead of returning a gradient that is silently
    a constant (a gradient penalty on it would add nothing)."""
    backend, device = case
    h, w, t = (x.to(device) for x in ce_args())
    h.requires_grad_(True)
    for reduction in ("mean", "none"):
        loss = linear_cross_entropy(h, w, t, reduction=reduction, backend=backend).sum()
        # the gradient penalty's usual form: create_graph=True, the penalty added to the loss
        with pytest.raises(RuntimeError, match="no double backward: create_graph=True"):
            torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_upstream_scale_is_applied_in_float32(case, dtype):
    """A "mean"/"sum" backward scales the forward's gradients by the upstream gradient in float32:
    GradScaler's first scale, 65536, is inf in float16 (every gradient was inf); a scale of 1/3
    rounded to bf16 first put a bias on every gradient. Against float64, with the scale applied
    to the float64 gradients, no worse than twice the unscaled call's own error."""
    backend, device = case
    g = torch.Generator().manual_seed(1)
    h = (torch.randn(64, 16, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    w = (torch.randn(40, 16, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    t = torch.randint(0, 40, (64,), generator=g).to(device)
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    linear_cross_entropy_ref(h64, w64, t).backward()
    for scale in (1.0, 65536.0 if dtype == torch.float16 else 2.0**100, 1 / 3):
        h.grad = w.grad = None
        (linear_cross_entropy(h, w, t, backend=backend) * scale).backward()
        for got, ref in ((h.grad, h64.grad), (w.grad, w64.grad)):
            assert torch.isfinite(got).all()
            err = ((got.double() / scale - ref).norm() / ref.norm()).item()
            if scale == 1.0:
                base = max(err, 1e-4)
            else:
                assert err <= 2 * base, (scale, err, base)


@pytest.mark.parametrize("case", BACKEND_CASES)
def test_second_backward_after_in_place_grad_change_says_why(case):
    """retain_graph, then the first gradients changed in place (zero_grad(set_to_none=False)), then a
    second backward: the message says what happened and what to do, not autograd's version error."""
    backend, device = case
    h, w, t = (x.to(device) for x in ce_args())
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss = linear_cross_entropy(h, w, t, backend=backend)
    loss.backward(retain_graph=True)
    torch.optim.SGD([h, w], lr=0.1).zero_grad(set_to_none=False)
    with pytest.raises(RuntimeError, match="changed in place .* zero_grad"):
        loss.backward()


@pytest.mark.parametrize("case", BACKEND_CASES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_float16_under_a_loss_scale_matches_plain_pytorch(case, reduction):
    """float16 under GradScaler's scale: the logit gradient must be formed with the scale, before
    float16 rounding, as plain PyTorch forms it; formed at scale 1 in the forward its small
    components underflowed (dh 16.6x plain's error at N = 8192, benchmarks/fp16_scale.py). Against
    float64: no worse than twice plain PyTorch's error at the same scale."""
    backend, device = case
    g = torch.Generator().manual_seed(2)
    n, v, hdim = 2048, 500, 32
    h = (torch.randn(n, hdim, generator=g) * 0.5).half().to(device)
    w = (torch.randn(v, hdim, generator=g) * 0.5).half().to(device)
    t = torch.randint(0, v, (n,), generator=g).to(device)
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    linear_cross_entropy_ref(h64, w64, t, reduction=reduction).backward()
    scale = 65536.0 if reduction == "mean" else 64.0
    errs = {}
    for name in ("plain", backend):
        hh, ww = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
        if name == "plain":
            loss = torch.nn.functional.cross_entropy((hh @ ww.t()).float(), t, reduction=reduction)
        else:
            loss = linear_cross_entropy(hh, ww, t, reduction=reduction, backend=name)
        (loss * scale).backward()
        errs[name] = [((a.double() / scale - r).norm() / r.norm()).item()
                      for a, r in ((hh.grad, h64.grad), (ww.grad, w64.grad))]
    for ours, plain in zip(errs[backend], errs["plain"]):
        assert ours <= 2 * plain, errs


def test_scaling_falls_back_when_triton_cannot_run(monkeypatch):
    """Off the CPU, 16-bit gradients are scaled by a Triton kernel; where it cannot run (no
    compiler, an unsupported device — here a meta tensor) the float32-slice path takes over once
    and for good, instead of failing the backward of the torch and cuda backends."""
    from surgery_kernels import autograd

    monkeypatch.setattr(autograd, "_TRITON_SCALE", None)
    g = torch.empty(3 << 21, dtype=torch.float16, device="meta")
    autograd._mul_(g, torch.tensor(65536.0, device="meta"))
    assert autograd._TRITON_SCALE is False
    autograd._mul_(g, torch.tensor(2.0, device="meta"))  # not retried
