"""Backend ``torch``: chunked pure-PyTorch implementation of the primitives.

Tokens are processed ``chunk_size`` at a time: one ``(chunk, V)`` block of logits is alive at
once (plus, in the KL, the reference's block), never ``(N, V)``. Statistics and the dweight
accumulator are float32 (float64 for float64 inputs) whatever the input dtype; the GEMMs run
in the input dtype, as ``nn.Linear`` would. The forward+backward primitives reuse each chunk's
logits for the gradient, so a training step costs the three GEMMs of the floor.

Works on any device; it is also the reference the fused backends are tested against (the naive
materializing one lives in ``surgery_kernels.reference``).

Under ``torch.compile`` each primitive runs as one ``torch.library.custom_op`` (namespace
``surgery_torch``) with a fake implementation, as the other backends' ops do: the compiler sees an
opaque op instead of tracing the Python loop over chunks, whose trip count made every token count a
new graph (a recompile per N, and fullgraph's hard failure after 8). Eager calls skip the op.
"""

from __future__ import annotations

import functools
import math

import torch

from typing import Optional

from torch import Tensor

from . import Availability
from ._ops import fake_grads, fake_stats, none_where_unneeded, placeholders

# Logit elements per chunk when chunk_size is None, by device type. CPU: 2**24 (64 MiB of float32
# logits) keeps the chunk's row pass close to cache-friendly while the GEMMs run near peak. CUDA:
# 2**27 (256 MiB in bf16): every chunk reads and writes the whole float32 weight gradient (500 MiB
# for a Llama-2-7B head), so chunks of a few hundred tokens would spend more time there than in
# the GEMMs; 4096 tokens at V = 32000 make that traffic a few percent.
CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


def availability(name: str, device_type: str) -> Availability:
    return Availability(True)


def float64_here(primitive):
    """Decorates a primitive of a float32-computing backend (cpu, cuda, triton): float64 inputs
    run this module's primitive of the same name instead. A float64 call is a reference
    computation, which the chunked path does in float64."""
    @functools.wraps(primitive)
    def run(hidden, *args, **kwargs):
        if hidden.dtype == torch.float64:
            return globals()[primitive.__name__](hidden, *args, **kwargs)
        return primitive(hidden, *args, **kwargs)
    return run


def default_chunk_size(n: int, v: int, device_type: str = "cpu") -> int:
    """Tokens per chunk: ``CHUNK_ELEMENTS[device_type] // V`` (CPU: 2**24, CUDA: 2**27 logits),
    at least 1, at most N."""
    return max(1, min(n, CHUNK_ELEMENTS.get(device_type, 1 << 24) // max(v, 1)))


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _chunks(n: int, chunk_size: int | None, v: int, device_type: str = "cpu"):
    step = chunk_size or default_chunk_size(n, v, device_type)
    for start in range(0, n, step):
        yield start, min(start + step, n)


def _logits(h: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, acc: torch.dtype) -> torch.Tensor:
    # F.linear, as the model's own lm_head: for bf16/fp16 the bias is added before the one rounding.
    return torch.nn.functional.linear(h, w, b).to(acc)


def _softcap_(z: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """In place: z -> softcap * tanh(z / softcap)."""
    if softcap is not None:
        z.div_(softcap).tanh_().mul_(softcap)
    return z


def _grad_buffers(hidden, weight, bias, needs):
    acc = _acc_dtype(hidden.dtype)
    dh = torch.empty_like(hidden) if needs[0] else None
    dw = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
    db = torch.zeros(weight.shape[0], dtype=acc, device=weight.device) if (needs[2] and bias is not None) else None
    return dh, dw, db


def _accumulate(g, h, w, s, e, dh, dw, db):
    """Given the logit gradient g (chunk, V) in the accumulation dtype, add this chunk's share."""
    gc = g.to(h.dtype)
    if dh is not None:
        dh[s:e] = gc @ w
    if dw is not None:
        if dw.dtype == h.dtype:
            dw.addmm_(gc.t(), h[s:e])
        else:
            dw += (gc.t() @ h[s:e]).to(dw.dtype)
    if db is not None:
        db += g.sum(0)


def _finish(dh, dw, db, weight, bias):
    return dh, (dw.to(weight.dtype) if dw is not None else None), (db.to(bias.dtype) if db is not None else None)


def _ce_chunk(h, weight, bias, target, ignore_index, softcap, acc):
    """Logits of one chunk shifted by their row max (in place), the row max, log-sum-exp of the
    shifted logits, lse, ce and the clamped targets. Keeping the shifted form makes
    softmax = exp(z_shifted - s) exact even for logits of +-1e4, where lse itself has lost bits."""
    z = _softcap_(_logits(h, weight, bias, acc), softcap)
    m = z.amax(dim=-1, keepdim=True)
    z.sub_(m)
    s = torch.logsumexp(z, dim=-1)
    live = target != ignore_index
    safe_t = torch.where(live, target, torch.zeros_like(target))
    zs_t = z.gather(1, safe_t[:, None]).squeeze(1)
    ce = torch.where(live, s - zs_t, torch.zeros_like(s))
    return z, m, s, m.squeeze(1) + s, ce, safe_t


def _ce_logit_grad_(zs, m, s, safe_t, coeff, softcap):
    """In place: zs (shifted, softcapped logits) -> coeff * d ce / d z_raw."""
    if softcap is not None:
        # d(softcap * tanh(x / softcap))/dx = 1 - tanh^2 of the capped logit; taken before zs is overwritten.
        dcap = 1 - ((zs + m) / softcap).square_()
    zs.sub_(s[:, None]).exp_()
    zs.scatter_add_(1, safe_t[:, None], -torch.ones_like(s)[:, None])
    zs.mul_(coeff[:, None])
    if softcap is not None:
        zs.mul_(dcap)
    return zs


def _ce_forward(hidden, weight, bias, target, *, ignore_index, softcap, chunk_size):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    ce = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    for s, e in _chunks(n, chunk_size, weight.shape[0], hidden.device.type):
        _, _, _, lse[s:e], ce[s:e], _ = _ce_chunk(hidden[s:e], weight, bias, target[s:e], ignore_index, softcap, acc)
    return ce, lse


def _ce_backward(hidden, weight, bias, target, lse, coeff, *, ignore_index, softcap, needs, chunk_size):
    # lse is not used: the row statistics are recomputed with the logits (one more pass over the
    # chunk), because exp(z - lse) with a float32 lse loses precision for very large logits.
    acc = _acc_dtype(hidden.dtype)
    dh, dw, db = _grad_buffers(hidden, weight, bias, needs)
    coeff = coeff.to(acc)
    for s, e in _chunks(hidden.shape[0], chunk_size, weight.shape[0], hidden.device.type):
        zs, m, lse_s, _, _, safe_t = _ce_chunk(hidden[s:e], weight, bias, target[s:e], ignore_index, softcap, acc)
        g = _ce_logit_grad_(zs, m, lse_s, safe_t, coeff[s:e], softcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
    return _finish(dh, dw, db, weight, bias)


def _ce_forward_backward(hidden, weight, bias, target, coeff, *, ignore_index, softcap, ascent_cap, needs,
                        chunk_size):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    ce = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    dh, dw, db = _grad_buffers(hidden, weight, bias, needs)
    coeff = coeff.to(acc)
    for s, e in _chunks(n, chunk_size, weight.shape[0], hidden.device.type):
        zs, m, lse_s, lse[s:e], ce_c, safe_t = _ce_chunk(hidden[s:e], weight, bias, target[s:e], ignore_index,
                                                         softcap, acc)
        ce[s:e] = ce_c
        c = coeff[s:e]
        if ascent_cap is not None:
            c = torch.where((c < 0) & (ce_c > ascent_cap), torch.zeros_like(c), c)
        g = _ce_logit_grad_(zs, m, lse_s, safe_t, c, softcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
    return (ce, lse) + _finish(dh, dw, db, weight, bias)


def _kl_chunk(h, weight, bias, rh, rweight, rbias, m, direction, temperature, softcap, ref_softcap, acc,
              grad=False):
    """Tempered log-probs of both sides, both lse's, the per-token kl and, with ``grad``, the
    trained side's softcap factor (``_tempered_logprobs``). The reference side first: at most
    three chunk buffers are alive."""
    logp, rlse, _ = _tempered_logprobs(rh, rweight, rbias, temperature, ref_softcap, acc)
    logq, lse, dcap = _tempered_logprobs(h, weight, bias, temperature, softcap, acc, grad)
    # forward: sum p (log p - log q); reverse: sum q (log q - log p); 0 * log 0 = 0 where the
    # weighting side has a -inf logit (-inf - -inf would be NaN)
    if direction == "forward":
        kl = (logp.exp() * (logp - logq).masked_fill_(logp == -math.inf, 0.0)).sum(-1)
    else:
        kl = (logq.exp() * (logq - logp).masked_fill_(logq == -math.inf, 0.0)).sum(-1)
    kl = torch.where(m, kl, torch.zeros_like(kl))
    return logq, logp, lse, rlse, kl, dcap


def _kl_logit_grad_(logq, logp, kl, coeff, direction, temperature, dcap):
    """In place: logq -> coeff * d kl / d z (trained side, raw logits); dcap: the softcap factor
    (``_tempered_logprobs``, overwritten) or None."""
    c = (coeff / temperature)[:, None]
    if dcap is not None:
        c = dcap.mul_(c)
    if direction == "forward":
        # (q - p) / T
        logp.exp_()
        return logq.exp_().sub_(logp).mul_(c)
    # q * (log q - log p - kl) / T, 0 where q = 0 (a -inf logit)
    d = (logq - logp).sub_(kl[:, None]).masked_fill_(logq == -math.inf, 0.0)
    return logq.exp_().mul_(d).mul_(c)


def _kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *, direction, temperature, softcap,
               ref_softcap, chunk_size):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    kl = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    rlse = torch.empty(n, dtype=acc, device=hidden.device)
    for s, e in _chunks(n, chunk_size, weight.shape[0], hidden.device.type):
        _, _, lse[s:e], rlse[s:e], kl[s:e], _ = _kl_chunk(
            hidden[s:e], weight, bias, ref_hidden[s:e], ref_weight, ref_bias, mask[s:e], direction, temperature,
            softcap, ref_softcap, acc)
    return kl, lse, rlse


def _kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, *, direction,
                temperature, softcap, ref_softcap, needs, chunk_size):
    # lse/ref_lse are not used: log-softmax is recomputed with the logits (exact for large logits).
    acc = _acc_dtype(hidden.dtype)
    dh, dw, db = _grad_buffers(hidden, weight, bias, needs)
    coeff = coeff.to(acc)
    for s, e in _chunks(hidden.shape[0], chunk_size, weight.shape[0], hidden.device.type):
        logp, _, _ = _tempered_logprobs(ref_hidden[s:e], ref_weight, ref_bias, temperature, ref_softcap, acc)
        logq, _, dcap = _tempered_logprobs(hidden[s:e], weight, bias, temperature, softcap, acc, True)
        g = _kl_logit_grad_(logq, logp, kl[s:e], coeff[s:e], direction, temperature, dcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
    return _finish(dh, dw, db, weight, bias)


def _tempered_logprobs(h, weight, bias, temperature, softcap, acc, dcap=False):
    """log_softmax(softcap(z) / T) of one chunk (it shifts by the row max: exact for large logits),
    the row lse, read off it at the row max (lse = max z - max log p, exact there) instead of a
    second pass of exponentials, and, with ``dcap`` and a softcap, d softcap(z) / dz = 1 -
    tanh(z / softcap)^2 from the capped logits, in their buffer (else None)."""
    z = _softcap_(_logits(h, weight, bias, acc), softcap)
    if temperature != 1.0:
        z.div_(temperature)
    logp = torch.log_softmax(z, dim=-1)
    lse = z.amax(dim=-1) - logp.amax(dim=-1)
    if not (dcap and softcap is not None):
        return logp, lse, None
    # from the capped logits themselves: rebuilding them as T * (log p + lse) cancels to ulp(lse) * T / softcap
    return logp, lse, z.mul_(temperature / softcap).square_().neg_().add_(1)


def _kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, *, direction,
                        temperature, softcap, ref_softcap, needs, chunk_size):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    kl = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    rlse = torch.empty(n, dtype=acc, device=hidden.device)
    dh, dw, db = _grad_buffers(hidden, weight, bias, needs)
    coeff = coeff.to(acc)
    for s, e in _chunks(n, chunk_size, weight.shape[0], hidden.device.type):
        logq, logp, lse[s:e], rlse[s:e], kl_c, dcap = _kl_chunk(
            hidden[s:e], weight, bias, ref_hidden[s:e], ref_weight, ref_bias, mask[s:e], direction, temperature,
            softcap, ref_softcap, acc, grad=True)
        kl[s:e] = kl_c
        g = _kl_logit_grad_(logq, logp, kl_c, coeff[s:e], direction, temperature, dcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
    return (kl, lse, rlse) + _finish(dh, dw, db, weight, bias)


# The primitives as opaque ops (see the module docstring): the functions above do the work.

def _acc_stats(hidden, k):
    return fake_stats(hidden, *[_acc_dtype(hidden.dtype)] * k)


@torch.library.custom_op("surgery_torch::ce_forward", mutates_args=())
def _ce_forward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                   softcap: Optional[float], chunk_size: Optional[int]) -> tuple[Tensor, Tensor]:
    return _ce_forward(hidden, weight, bias, target, ignore_index=ignore_index, softcap=softcap, chunk_size=chunk_size)


@_ce_forward_op.register_fake
def _(hidden, weight, bias, target, ignore_index, softcap, chunk_size):
    return _acc_stats(hidden, 2)


@torch.library.custom_op("surgery_torch::ce_backward", mutates_args=())
def _ce_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor,
                    coeff: Tensor, ignore_index: int, softcap: Optional[float], needs: list[bool],
                    chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    return placeholders(_ce_backward(hidden, weight, bias, target, lse, coeff, ignore_index=ignore_index,
                                     softcap=softcap, needs=needs, chunk_size=chunk_size), hidden)


@_ce_backward_op.register_fake
def _(hidden, weight, bias, target, lse, coeff, ignore_index, softcap, needs, chunk_size):
    return fake_grads(hidden, weight, bias, needs)


@torch.library.custom_op("surgery_torch::ce_forward_backward", mutates_args=())
def _ce_forward_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, coeff: Tensor,
                            ignore_index: int, softcap: Optional[float], ascent_cap: Optional[float],
                            needs: list[bool], chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                                   Tensor]:
    ce, lse, *grads = _ce_forward_backward(hidden, weight, bias, target, coeff, ignore_index=ignore_index,
                                           softcap=softcap, ascent_cap=ascent_cap, needs=needs, chunk_size=chunk_size)
    return (ce, lse) + placeholders(grads, hidden)


@_ce_forward_backward_op.register_fake
def _(hidden, weight, bias, target, coeff, ignore_index, softcap, ascent_cap, needs, chunk_size):
    return _acc_stats(hidden, 2) + fake_grads(hidden, weight, bias, needs)


@torch.library.custom_op("surgery_torch::kl_forward", mutates_args=())
def _kl_forward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                   ref_bias: Optional[Tensor], mask: Tensor, direction: str, temperature: float,
                   softcap: Optional[float], ref_softcap: Optional[float],
                   chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    return _kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, direction=direction,
                       temperature=temperature, softcap=softcap, ref_softcap=ref_softcap, chunk_size=chunk_size)


@_kl_forward_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, direction, temperature, softcap, ref_softcap,
      chunk_size):
    return _acc_stats(hidden, 3)


@torch.library.custom_op("surgery_torch::kl_backward", mutates_args=())
def _kl_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                    ref_bias: Optional[Tensor], lse: Tensor, ref_lse: Tensor, kl: Tensor, coeff: Tensor,
                    direction: str, temperature: float, softcap: Optional[float], ref_softcap: Optional[float],
                    needs: list[bool], chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    return placeholders(_kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff,
                                     direction=direction, temperature=temperature, softcap=softcap,
                                     ref_softcap=ref_softcap, needs=needs, chunk_size=chunk_size), hidden)


@_kl_backward_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, direction, temperature, softcap,
      ref_softcap, needs, chunk_size):
    return fake_grads(hidden, weight, bias, needs)


@torch.library.custom_op("surgery_torch::kl_forward_backward", mutates_args=())
def _kl_forward_backward_op(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                            ref_weight: Tensor, ref_bias: Optional[Tensor], mask: Tensor, coeff: Tensor,
                            direction: str, temperature: float, softcap: Optional[float],
                            ref_softcap: Optional[float], needs: list[bool],
                            chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kl, lse, rlse, *grads = _kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff,
                                                 direction=direction, temperature=temperature, softcap=softcap,
                                                 ref_softcap=ref_softcap, needs=needs, chunk_size=chunk_size)
    return (kl, lse, rlse) + placeholders(grads, hidden)


@_kl_forward_backward_op.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, direction, temperature, softcap, ref_softcap,
      needs, chunk_size):
    return _acc_stats(hidden, 3) + fake_grads(hidden, weight, bias, needs)


# The primitives (signatures: surgery_kernels.backends). Eager calls run the functions above
# directly: the custom op's Python dispatch costs ~0.1 ms a call (CPU, N = 64: a forward+backward
# 0.76 -> 0.89 ms through it); traced calls go through the op.

def ce_forward(hidden, weight, bias, target, *, ignore_index, softcap, chunk_size):
    if not torch.compiler.is_compiling():
        return _ce_forward(hidden, weight, bias, target, ignore_index=ignore_index, softcap=softcap,
                           chunk_size=chunk_size)
    return _ce_forward_op(hidden, weight, bias, target, ignore_index, softcap, chunk_size)


def ce_backward(hidden, weight, bias, target, lse, coeff, *, ignore_index, softcap, needs, chunk_size):
    if not torch.compiler.is_compiling():
        return _ce_backward(hidden, weight, bias, target, lse, coeff, ignore_index=ignore_index, softcap=softcap,
                            needs=needs, chunk_size=chunk_size)
    grads = _ce_backward_op(hidden, weight, bias, target, lse, coeff, ignore_index, softcap, list(needs), chunk_size)
    return none_where_unneeded(grads, needs, bias)


def ce_forward_backward(hidden, weight, bias, target, coeff, *, ignore_index, softcap, ascent_cap, needs,
                        chunk_size):
    if not torch.compiler.is_compiling():
        return _ce_forward_backward(hidden, weight, bias, target, coeff, ignore_index=ignore_index, softcap=softcap,
                                    ascent_cap=ascent_cap, needs=needs, chunk_size=chunk_size)
    ce, lse, *grads = _ce_forward_backward_op(hidden, weight, bias, target, coeff, ignore_index, softcap, ascent_cap,
                                              list(needs), chunk_size)
    return (ce, lse) + none_where_unneeded(grads, needs, bias)


def kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *, direction, temperature, softcap,
               ref_softcap, chunk_size):
    if not torch.compiler.is_compiling():
        return _kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, direction=direction,
                           temperature=temperature, softcap=softcap, ref_softcap=ref_softcap, chunk_size=chunk_size)
    return _kl_forward_op(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, direction, temperature,
                          softcap, ref_softcap, chunk_size)


def kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, *, direction,
                temperature, softcap, ref_softcap, needs, chunk_size):
    if not torch.compiler.is_compiling():
        return _kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff,
                            direction=direction, temperature=temperature, softcap=softcap, ref_softcap=ref_softcap,
                            needs=needs, chunk_size=chunk_size)
    grads = _kl_backward_op(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff,
                            direction, temperature, softcap, ref_softcap, list(needs), chunk_size)
    return none_where_unneeded(grads, needs, bias)


def kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, *, direction,
                        temperature, softcap, ref_softcap, needs, chunk_size):
    if not torch.compiler.is_compiling():
        return _kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff,
                                    direction=direction, temperature=temperature, softcap=softcap,
                                    ref_softcap=ref_softcap, needs=needs, chunk_size=chunk_size)
    kl, lse, rlse, *grads = _kl_forward_backward_op(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask,
                                                    coeff, direction, temperature, softcap, ref_softcap, list(needs),
                                                    chunk_size)
    return (kl, lse, rlse) + none_where_unneeded(grads, needs, bias)
