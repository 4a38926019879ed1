"""The public functional API: validate, flatten, apply autocast, pick the backend,
then call the shared autograd layer. Nothing here touches tensor values on the host."""

from __future__ import annotations

import contextlib
from typing import Literal, overload

import torch
from torch import Tensor

from . import checks
from .autograd import LinearCrossEntropyFunction, LinearKLDivFunction
from .backends import resolve


def _autocast(device_type: str, **tensors):
    """The named tensors (None allowed), cast for an enabled torch.autocast on ``device_type``, all
    of one dtype — else a TypeError naming the one that differs from the first. Under autocast the
    GEMMs run in its dtype, as nn.Linear's would: float32 and 16-bit tensors are cast to it,
    float64 ones are not (autocast leaves float64 alone)."""
    dt = None
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        dt = torch.get_autocast_dtype(device_type)
        tensors = {k: t if t is None or t.dtype == torch.float64 else t.to(dt) for k, t in tensors.items()}
    (first, ref), *rest = tensors.items()
    checks.same_dtype(first, ref, autocast=dt, **dict(rest))
    return tuple(tensors.values())


def _needs(*tensors) -> tuple[bool, ...]:
    on = torch.is_grad_enabled()
    return tuple(bool(on and t is not None and t.requires_grad) for t in tensors)


# The overloads give type checkers the result's type: a tensor, or (loss, values) with return_values=True.
@overload
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Tensor | None = ...,
                         token_weight: Tensor | None = ..., ignore_index: int = ..., reduction: str = ...,
                         softcap: float | None = ..., ascent_cap: float | None = ..., backend: str = ...,
                         chunk_size: int | None = ..., return_values: Literal[False] = ...) -> Tensor: ...
@overload
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Tensor | None = ...,
                         token_weight: Tensor | None = ..., ignore_index: int = ..., reduction: str = ...,
                         softcap: float | None = ..., ascent_cap: float | None = ..., backend: str = ...,
                         chunk_size: int | None = ..., return_values: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Tensor | None = ...,
                         token_weight: Tensor | None = ..., ignore_index: int = ..., reduction: str = ...,
                         softcap: float | None = ..., ascent_cap: float | None = ..., backend: str = ...,
                         chunk_size: int | None = ...,
                         return_values: bool = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def linear_cross_entropy(hidden: Tensor, weight: Tensor, target: Tensor, *, bias: Tensor | None = None,
                         token_weight: Tensor | None = None, ignore_index: int = -100, reduction: str = "mean",
                         softcap: float | None = None, ascent_cap: float | None = None, backend: str = "auto",
                         chunk_size: int | None = None, return_values: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Signed, weighted cross-entropy of ``hidden @ weight.T + bias`` against ``target``, without
    materializing the logits.

    hidden: (..., H) float32 | bfloat16 | float16; weight: (V, H); target: (...) integer class ids,
    ``ignore_index`` for skipped tokens; bias: (V,); token_weight: (...) float of any sign
    (negative = gradient ascent on that token).

    Per token ``m_i * w_i * ce_i`` with ``ce_i = logsumexp(z_i) - z_i[target_i]``; ``softcap``
    maps z -> softcap * tanh(z / softcap) first; tokens with ``w_i < 0`` whose ce exceeds
    ``ascent_cap`` contribute neither loss nor gradient (they still count in the mean's
    denominator); a capped or zero-weight token adds exactly 0, even with ce_i = inf (a target
    its bias bans with -inf). ``reduction``: "mean" (divide by the number of live tokens; 0 when there are
    none), "sum", or "none" (values shaped like ``target``, 0 where ignored). The result is
    float32 (float64 for float64 inputs). ``backend``: "auto" | "triton" | "cuda" | "cpu" | "torch";
    ``chunk_size``: tokens per chunk (None: the backend's default, e.g. ``2**24 // V`` on CPU, 64 MiB of
    float32 logits; see the README).

    ``return_values=True`` returns ``(loss, values)``: ``values`` are the unweighted per-token
    ``ce_i`` shaped like ``target`` (0 where ignored; capped tokens keep their CE), without a
    gradient. With "mean"/"sum" this logs per-token or per-group losses while keeping the
    one-pass gradients ("none" recomputes the logits in its backward).
    """
    checks.hidden_weight_bias("", hidden, weight, bias)
    checks.plain_tensors(hidden=hidden, weight=weight, bias=bias, target=target, token_weight=token_weight)
    checks.per_token("target", target, hidden, kind="int")
    checks.per_token("token_weight", token_weight, hidden, kind="float")
    ignore_index, chunk_size = checks.ce_options(ignore_index, reduction, softcap, ascent_cap, backend, chunk_size,
                                                 return_values)
    # compared as int64, as the kernels read it: in uint8, say, ignore_index -100 would be 156
    checks.target_range(target.to(torch.int64), ignore_index, weight.shape[0])
    device_type = hidden.device.type
    h, w, b = _autocast(device_type, hidden=hidden, weight=weight, bias=bias)
    name = resolve(backend, device_type)

    needs = _needs(hidden, weight, bias, token_weight)
    lead = target.shape
    h = h.reshape(-1, h.shape[-1])
    t = target.reshape(-1).to(torch.int64)
    tw = token_weight.reshape(-1) if token_weight is not None else None
    with _no_autocast(device_type):
        out, values = LinearCrossEntropyFunction.apply(h, w, b, t, tw, name, needs, ignore_index, reduction,
                                                       None if softcap is None else float(softcap),
                                                       None if ascent_cap is None else float(ascent_cap), chunk_size)
    return _outputs(out, values, lead, reduction, return_values)


@overload
def linear_kl_div(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *,
                  bias: Tensor | None = ..., ref_bias: Tensor | None = ..., mask: Tensor | None = ...,
                  token_weight: Tensor | None = ..., direction: str = ..., temperature: float = ...,
                  softcap: float | None = ..., ref_softcap: float | None = ..., reduction: str = ...,
                  backend: str = ..., chunk_size: int | None = ..., return_values: Literal[False] = ...) -> Tensor: ...
@overload
def linear_kl_div(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *,
                  bias: Tensor | None = ..., ref_bias: Tensor | None = ..., mask: Tensor | None = ...,
                  token_weight: Tensor | None = ..., direction: str = ..., temperature: float = ...,
                  softcap: float | None = ..., ref_softcap: float | None = ..., reduction: str = ...,
                  backend: str = ..., chunk_size: int | None = ...,
                  return_values: Literal[True]) -> tuple[Tensor, Tensor]: ...
@overload
def linear_kl_div(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *,
                  bias: Tensor | None = ..., ref_bias: Tensor | None = ..., mask: Tensor | None = ...,
                  token_weight: Tensor | None = ..., direction: str = ..., temperature: float = ...,
                  softcap: float | None = ..., ref_softcap: float | None = ..., reduction: str = ...,
                  backend: str = ..., chunk_size: int | None = ...,
                  return_values: bool = ...) -> Tensor | tuple[Tensor, Tensor]: ...
def linear_kl_div(hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor, *,
                  bias: Tensor | None = None, ref_bias: Tensor | None = None, mask: Tensor | None = None,
                  token_weight: Tensor | None = None, direction: str = "forward", temperature: float = 1.0,
                  softcap: float | None = None, ref_softcap: float | None = None, reduction: str = "mean",
                  backend: str = "auto", chunk_size: int | None = None,
                  return_values: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """Token-level KL divergence between the trained model's softmax(z / T), z = hidden @ weight.T
    + bias, and a frozen reference's softmax(z_ref / T), without materializing either's logits.

    hidden: (..., H), weight: (V, H) — gradients flow; ref_hidden: (..., H'), ref_weight: (V, H') —
    treated as constants (ref_weight may be the very tensor passed as weight); mask: (...) bool or
    integer, False / 0 = token skipped (an ``attention_mask`` as it is); token_weight: (...) float
    (a zero-weight token adds exactly 0, even with kl_i = inf). ``direction``: "forward" =
    KL(p_ref || p), "reverse" = KL(p || p_ref). The true KL, no T**2 rescaling: >= 0 up to
    rounding (a token whose two distributions nearly agree may come out a few ulps of its terms
    below 0, ~1e-7 in float32, as in plain PyTorch; the values are not clamped, so that they stay
    unbiased). ``softcap`` /
    ``ref_softcap``: each side's logits go through z -> c * tanh(z / c) before the temperature, as
    a model with a final logit softcap (Gemma-2) computes them; give both for such a model and its
    frozen copy (each side's own: None leaves that side uncapped; a capped side maps a -inf logit
    to -softcap, so it bans no token). ``reduction`` and
    ``return_values`` (unweighted per-token ``kl_i``, 0 where masked) as in
    :func:`linear_cross_entropy`, the mean dividing by the number of unmasked tokens.
    """
    checks.hidden_weight_bias("", hidden, weight, bias)
    checks.hidden_weight_bias("ref_", ref_hidden, ref_weight, ref_bias)
    checks.plain_tensors(hidden=hidden, weight=weight, bias=bias, ref_hidden=ref_hidden, ref_weight=ref_weight,
                         ref_bias=ref_bias, mask=mask, token_weight=token_weight)
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight must have the vocabulary size of weight (V = {weight.shape[0]}), "
                         f"got shape {tuple(ref_weight.shape)}")
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden must have the leading shape of hidden {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(ref_hidden.shape[:-1])}")
    checks.same_device("hidden", hidden, ref_hidden=ref_hidden)
    checks.per_token("mask", mask, hidden, kind="mask")
    checks.per_token("token_weight", token_weight, hidden, kind="float")
    chunk_size = checks.kl_options(direction, temperature, softcap, ref_softcap, reduction, backend, chunk_size,
                                   return_values)
    device_type = hidden.device.type
    h, w, b, rh, rw, rb = _autocast(device_type, hidden=hidden, weight=weight, bias=bias,
                                    ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias)
    name = resolve(backend, device_type)

    needs = _needs(hidden, weight, bias, token_weight)
    lead = hidden.shape[:-1]
    h = h.reshape(-1, h.shape[-1])
    rh = rh.detach().reshape(-1, rh.shape[-1])
    rw = rw.detach()
    rb = rb.detach() if rb is not None else None
    m = mask.reshape(-1) != 0 if mask is not None else torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
    tw = token_weight.reshape(-1) if token_weight is not None else None
    with _no_autocast(device_type):
        out, values = LinearKLDivFunction.apply(h, w, b, rh, rw, rb, m, tw, name, needs, direction,
                                                float(temperature), None if softcap is None else float(softcap),
                                                None if ref_softcap is None else float(ref_softcap), reduction,
                                                chunk_size)
    return _outputs(out, values, lead, reduction, return_values)


def _outputs(out: Tensor, values: Tensor, lead: torch.Size, reduction: str,
             return_values: bool) -> Tensor | tuple[Tensor, Tensor]:
    out = out.reshape(lead) if reduction == "none" else out
    return (out, values.reshape(lead)) if return_values else out


def _no_autocast(device_type: str):
    return torch.autocast(device_type, enabled=False) if device_type in ("cpu", "cuda") else contextlib.nullcontext()
