"""The naive reference: materialize the ``(N, V)`` logits and apply the definitions
(``surgery_kernels/backends/__init__.py`` states them).

Differentiable by plain autograd; used by the tests (in float64, and in the test dtype as
"what plain PyTorch gets") and by the benchmarks (the "naive" provider). Never used by the
library's own code paths.
"""

from __future__ import annotations

import math

import torch


def _reduce(values: torch.Tensor, live: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return values
    total = values.sum()
    if reduction == "sum":
        return total
    return total / live.sum().clamp_min(1).to(total.dtype)


def _kept(values, live, w):
    """Each live token's value, 0 for the others and for an inf value of weight 0: a zero-weight
    (or capped) token adds nothing even where its value is inf (a target its head bans with a
    -inf bias; 0 * inf would be NaN)."""
    return torch.where(live & ~((w == 0) & torch.isinf(values)), values, torch.zeros_like(values))


def linear_cross_entropy_ref(hidden, weight, target, *, bias=None, token_weight=None, ignore_index=-100,
                             reduction="mean", softcap=None, ascent_cap=None, compute_dtype=None):
    """Signed, weighted linear CE by materialized logits.

    hidden: (..., H); weight: (V, H); target: (...). ``compute_dtype`` upcasts inputs first (float64
    for the reference); None computes in the input dtype with float32 softmax, as plain PyTorch does.
    Returns a scalar, or values shaped like ``target`` for ``reduction="none"``.
    """
    shape = target.shape
    h = hidden.reshape(-1, hidden.shape[-1])
    t = target.reshape(-1)
    if compute_dtype is not None:
        h, weight = h.to(compute_dtype), weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
    z = torch.nn.functional.linear(h, weight, bias)
    stat = torch.promote_types(z.dtype, torch.float32)
    z = z.to(stat)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    live = t != ignore_index
    ce = torch.nn.functional.cross_entropy(z, torch.where(live, t, 0), reduction="none")
    w = torch.ones_like(ce) if token_weight is None else token_weight.reshape(-1).to(stat)
    if ascent_cap is not None:
        live_grad = ~((w < 0) & (ce.detach() > ascent_cap))
        w = w * live_grad
    values = w * _kept(ce, live, w)
    out = _reduce(values, live, reduction)
    return out.reshape(shape) if reduction == "none" else out


def linear_kl_div_ref(hidden, weight, ref_hidden, ref_weight, *, bias=None, ref_bias=None, mask=None,
                      token_weight=None, direction="forward", temperature=1.0, softcap=None, ref_softcap=None,
                      reduction="mean", compute_dtype=None):
    """Token-level KL between softmax(z/T) of the trained side (q) and the reference (p), by
    materialized logits, each side's z softcapped first (``c * tanh(z / c)``, c = ``softcap`` /
    ``ref_softcap``). forward: KL(p || q); reverse: KL(q || p). The reference side is detached."""
    shape = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1])
    rh = ref_hidden.reshape(-1, ref_hidden.shape[-1]).detach()
    if compute_dtype is not None:
        h, weight, rh = h.to(compute_dtype), weight.to(compute_dtype), rh.to(compute_dtype)
        ref_weight = ref_weight.to(compute_dtype)
        bias = bias.to(compute_dtype) if bias is not None else None
        ref_bias = ref_bias.to(compute_dtype) if ref_bias is not None else None
    ref_weight = ref_weight.detach()
    ref_bias = ref_bias.detach() if ref_bias is not None else None
    z = torch.nn.functional.linear(h, weight, bias)
    zr = torch.nn.functional.linear(rh, ref_weight, ref_bias)
    stat = torch.promote_types(z.dtype, torch.float32)
    z, zr = z.to(stat), zr.to(stat)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if ref_softcap is not None:
        zr = ref_softcap * torch.tanh(zr / ref_softcap)
    logq = torch.log_softmax(z / temperature, -1)
    logp = torch.log_softmax(zr / temperature, -1)
    if direction == "forward":
        # 0 * log 0 = 0: where the weighting side is 0 the term is 0 (and its gradient too)
        kl = (logp.exp() * torch.where(logp != -math.inf, logp - logq, 0.0)).sum(-1)
    else:
        kl = (logq.exp() * torch.where(logq != -math.inf, logq - logp, 0.0)).sum(-1)
    live = torch.ones_like(kl, dtype=torch.bool) if mask is None else mask.reshape(-1) != 0
    w = torch.ones_like(kl) if token_weight is None else token_weight.reshape(-1).to(stat)
    values = w * _kept(kl, live, w)
    out = _reduce(values, live, reduction)
    return out.reshape(shape) if reduction == "none" else out
