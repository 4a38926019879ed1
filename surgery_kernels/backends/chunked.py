"""Backend ``torch``: chunked pure-PyTorch implementation of the primitives.

Tokens are processed ``chunk_size`` at a time, never ``(N, V)``: the CE computes in one ``(chunk,
V)`` buffer, in place (logits, their exponentials, the gradient); the KL in three (the reference's
probabilities, the trained side's, and the log-ratio), plus the softcap's derivative when there
is one and a gradient is formed. A chunk's buffers are freed before the next chunk's logits.
Statistics and the dweight accumulator are float32 (float64 for float64 inputs) whatever the input
dtype; the GEMMs run in the input dtype, as ``nn.Linear`` would. The forward+backward primitives reuse each chunk's
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
            dw.add_(gc.t() @ h[s:e])  # float32 += bf16/fp16 product, without a float32 copy of it
    if db is not None:
        db += g.sum(0)


def _finish(dh, dw, db, weight, bias):
    return dh, (dw.to(weight.dtype) if dw is not None else None), (db.to(bias.dtype) if db is not None else None)


def _shifted(h, weight, bias, temperature, softcap, acc, dcap=False):
    """One chunk of one side's tempered logits softcap(z) / T (the CE's: T = 1) shifted by their
    row max, in their own buffer; the row max; and, with ``dcap`` and a softcap, d softcap(z) / dz
    = 1 - (softcap(z) / softcap)^2 (a second chunk; else None)."""
    z = _softcap_(_logits(h, weight, bias, acc), softcap)
    d = z.div(softcap).square_().neg_().add_(1) if dcap and softcap is not None else None
    if temperature != 1.0:
        z.div_(temperature)
    m = z.amax(dim=-1, keepdim=True)
    return z.sub_(m), m.squeeze(1), d


def _ce_chunk(h, weight, bias, target, ignore_index, softcap, acc, grad=False):
    """One chunk's exponentials ``exp(z - max z)`` (in the logits' own buffer: the one chunk-sized
    tensor) with the target's column set to 0, their row sums R (the other columns'), the row
    sums S = R + exp(z[target] - max z), lse = max z + log S, ce, the clamped targets and, with
    ``grad`` and a softcap, d softcap(z) / dz = 1 - (softcap(z) / softcap)^2 (a second chunk).
    Shifting by the row max before the exponential keeps the softmax exp(z - max) / S exact even
    for logits of +-1e4, where lse itself has lost bits. Keeping the target out of R makes
    ce = log1p(R / exp(z[target] - max z)) and the target's gradient -R / S exact on a memorized
    token (p_target near 1), where lse - z[target] and p_target - 1 cancel (at 1 - p = 1e-6 they
    err by ~10% in float32, plain PyTorch's too)."""
    z, m, dcap = _shifted(h, weight, bias, 1.0, softcap, acc, grad)
    live = target != ignore_index
    safe_t = torch.where(live, target, torch.zeros_like(target))
    zs_t = z.gather(1, safe_t[:, None]).squeeze(1)
    rest = z.exp_().scatter_(1, safe_t[:, None], 0.0).sum(-1)
    e_t = zs_t.exp()
    total = rest + e_t
    s = total.log()
    ce = torch.where(e_t >= rest, torch.log1p(rest / e_t), s - zs_t)
    ce = torch.where(live, ce, torch.zeros_like(s))
    return z, rest, total, m + s, ce, safe_t, dcap


def _ce_logit_grad_(e, rest, total, safe_t, coeff, dcap):
    """In place: e (``_ce_chunk``'s exponentials, the target's column 0) -> coeff * d ce / d z_raw
    = coeff * (softmax - onehot) * dcap (the softcap factor, or None), the target's column as
    -R / S."""
    e.div_(total[:, None])
    e.scatter_(1, safe_t[:, None], (-rest / total)[:, None])
    e.mul_(coeff[:, None])
    if dcap is not None:
        e.mul_(dcap)
    return e


def _ce_forward(hidden, weight, bias, target, *, ignore_index, softcap, chunk_size):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    ce = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    for s, e in _chunks(n, chunk_size, weight.shape[0], hidden.device.type):
        _, _, _, lse[s:e], ce[s:e], _, _ = _ce_chunk(hidden[s:e], weight, bias, target[s:e], ignore_index, softcap,
                                                     acc)
    return ce, lse


def _ce_backward(hidden, weight, bias, target, lse, coeff, *, ignore_index, softcap, needs, chunk_size):
    # lse is not used: the row statistics are recomputed with the logits (one more pass over the
    # chunk), because exp(z - lse) with a float32 lse loses precision for very large logits.
    acc = _acc_dtype(hidden.dtype)
    dh, dw, db = _grad_buffers(hidden, weight, bias, needs)
    coeff = coeff.to(acc)
    for s, e in _chunks(hidden.shape[0], chunk_size, weight.shape[0], hidden.device.type):
        ex, rest, total, _, _, safe_t, dcap = _ce_chunk(hidden[s:e], weight, bias, target[s:e], ignore_index,
                                                        softcap, acc, grad=True)
        g = _ce_logit_grad_(ex, rest, total, safe_t, coeff[s:e], dcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
        del ex, g, dcap  # before the next chunk's logits: one chunk alive, not two
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
        ex, rest, total, lse[s:e], ce_c, safe_t, dcap = _ce_chunk(hidden[s:e], weight, bias, target[s:e],
                                                                  ignore_index, softcap, acc, grad=True)
        ce[s:e] = ce_c
        c = coeff[s:e]
        if ascent_cap is not None:
            c = torch.where((c < 0) & (ce_c > ascent_cap), torch.zeros_like(c), c)
        g = _ce_logit_grad_(ex, rest, total, safe_t, c, dcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
        del ex, g, dcap  # before the next chunk's logits: one chunk alive, not two
    return (ce, lse) + _finish(dh, dw, db, weight, bias)


def _kl_chunk(h, weight, bias, rh, rweight, rbias, m, direction, temperature, softcap, ref_softcap, acc,
              grad=False, want_kl=True):
    """One chunk's KL with at most three chunk-sized buffers alive (four with the trained side's
    softcap factor): ``d = log p - log q`` (reference minus trained log-probs, from the shifted
    logits and the two log-sums: as exact as log_softmax), the trained side's probabilities q
    and, for the forward KL, the reference's p. Returns (d, q, p, lse, rlse, kl, dcap); p is None
    for the reverse KL, which weights by q; d is spent for the forward KL (its gradient is q - p).
    0 * log 0 = 0: a column the weighting side gives probability 0 (a -inf logit: -inf - -inf
    would be NaN) adds nothing. ``m``: the token mask (None: all); ``want_kl`` False: kl is None
    (the recomputing backward has the forward's)."""
    zr, mr, _ = _shifted(rh, rweight, rbias, temperature, ref_softcap, acc)
    p = zr.exp()
    sp = p.sum(-1)
    p = p.div_(sp[:, None]) if direction == "forward" else None  # the reverse KL needs only sp
    z, mq, dcap = _shifted(h, weight, bias, temperature, softcap, acc, grad)
    d = zr.sub_(z)  # (z_ref - max) - (z - max), in the reference's buffer
    del zr
    q = z.exp_()
    sq = q.sum(-1)
    q.div_(sq[:, None])
    lq, lp = sq.log(), sp.log()
    d.add_((lq - lp)[:, None])  # log p - log q
    if not want_kl:
        kl = None
    else:
        # A column the other side bans (-inf) under a weighting probability > 0 makes the KL +inf,
        # also where that probability underflows float32 to 0 (d = +-inf at a finite weighting
        # logit; the masked product below would count it as 0 * log 0)
        banned = (d == (math.inf if direction == "forward" else -math.inf)).any(-1)
        if direction == "forward":
            kl = d.masked_fill_(p == 0, 0.0).mul_(p).sum(-1)
        else:
            kl = -d.masked_fill(q == 0, 0.0).mul_(q).sum(-1)
        kl = kl.masked_fill_(banned, math.inf)
    if m is not None and kl is not None:
        kl = torch.where(m, kl, torch.zeros_like(kl))
    return d, q, p, mq + lq, mr + lp, kl, dcap


def _kl_logit_grad_(d, q, p, kl, coeff, direction, temperature, dcap):
    """In place: q -> coeff * d kl / d z (trained side, raw logits), from ``_kl_chunk``'s buffers
    (d and p are overwritten); dcap: the softcap factor or None."""
    c = (coeff / temperature)[:, None]
    if dcap is not None:
        c = dcap.mul_(c)
    if direction == "forward":
        # (q - p) / T
        return q.sub_(p).mul_(c)
    # q * (log q - log p - kl) / T, 0 where q = 0 (a -inf logit); a token of coefficient 0 (masked,
    # zero weight) gets none, also where its kl is inf (inf - inf would be NaN), as the cpu backend
    d.neg_().sub_(kl[:, None]).masked_fill_(q == 0, 0.0).masked_fill_(coeff[:, None] == 0, 0.0)
    return q.mul_(d).mul_(c)


def _kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *, direction, temperature, softcap,
               ref_softcap, chunk_size):
    acc = _acc_dtype(hidden.dtype)
    n = hidden.shape[0]
    kl = torch.empty(n, dtype=acc, device=hidden.device)
    lse = torch.empty(n, dtype=acc, device=hidden.device)
    rlse = torch.empty(n, dtype=acc, device=hidden.device)
    for s, e in _chunks(n, chunk_size, weight.shape[0], hidden.device.type):
        *_, lse[s:e], rlse[s:e], kl[s:e], _ = _kl_chunk(
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
        # the mask does not matter here: a masked token's coefficient is 0
        d, q, p, *_, dcap = _kl_chunk(hidden[s:e], weight, bias, ref_hidden[s:e], ref_weight, ref_bias, None,
                                      direction, temperature, softcap, ref_softcap, acc, grad=True, want_kl=False)
        g = _kl_logit_grad_(d, q, p, kl[s:e], coeff[s:e], direction, temperature, dcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
        del d, q, p, g, dcap  # before the next chunk's logits
    return _finish(dh, dw, db, weight, bias)


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
        d, q, p, lse[s:e], rlse[s:e], kl_c, dcap = _kl_chunk(
            hidden[s:e], weight, bias, ref_hidden[s:e], ref_weight, ref_bias, mask[s:e], direction, temperature,
            softcap, ref_softcap, acc, grad=True)
        kl[s:e] = kl_c
        g = _kl_logit_grad_(d, q, p, kl_c, coeff[s:e], direction, temperature, dcap)
        _accumulate(g, hidden, weight, s, e, dh, dw, db)
        del d, q, p, g, dcap  # before the next chunk's logits
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
