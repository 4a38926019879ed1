"""The autograd layer shared by every backend.

Each loss is ``sum_i coeff_i * value_i`` over flattened tokens, where ``coeff_i`` folds in the
mask, the token weight (any sign) and, for ``reduction="mean"``, ``1 / sum(mask)`` — computed on
the device, so nothing here synchronizes with the host.

- ``mean``/``sum`` with a gradient wanted: the backend's ``*_forward_backward`` computes values
  and gradients in one pass over the logits; ``backward`` only scales them, in place, by
  the (scalar) upstream gradient, in float32 (``_scaled``). Not in float16 (``_fused``).
- ``none``, float16 ``mean``/``sum``, or no gradient wanted: ``*_forward`` keeps per-token
  statistics; ``backward`` recomputes the logits with ``coeff_i = grad_out_i * weight_i``, so any
  upstream gradient, a per-token one included, is honoured.

A ``token_weight`` that requires grad gets one, as ``(w * values).sum()`` in plain PyTorch would
give it: ``d loss / d w_i`` is token i's value (times the mean's ``1 / sum(mask)``, 0 where masked
or capped by ``ascent_cap``), kept from the forward (N floats) and scaled like the other gradients.

Both functions return ``(loss, values)``: ``values`` are the unweighted per-token ce_i / kl_i
(0 where masked), which either path computes anyway, marked non-differentiable (the public
functions hand them out with ``return_values=True``). They let a caller log per-token or
per-group losses from a ``mean``/``sum`` call, so it keeps the one-pass gradients instead of
paying ``none``'s recomputation of the logits.
"""

from __future__ import annotations

import functools

import torch
from torch.autograd.function import once_differentiable

from .backends import module as _impl


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _coefficients(live: torch.Tensor, token_weight: torch.Tensor | None, reduction: str, acc: torch.dtype):
    """(per-token weight with the mask folded in, the same scaled for the reduction, the scale)."""
    w = live.to(acc) if token_weight is None else torch.where(live, token_weight.to(acc), 0.0)
    if reduction == "mean":
        scale = 1 / live.sum().clamp_min(1).to(acc)
        return w, w * scale, scale
    return w, w, None


def _weighted(w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """w * values with 0 * inf = 0: an ignored, capped or zero-weight token adds nothing even where
    its value is inf (a target its head bans with a -inf bias); a NaN value stays NaN, as in plain
    PyTorch (``reference._kept``)."""
    return torch.where((w == 0) & torch.isinf(values), 0.0, w * values)


def _weight_grad(values: torch.Tensor, gate: torch.Tensor, scale, need: bool):
    """d loss / d token_weight for a unit upstream gradient: each gated token's value (times the
    mean's scale); None when token_weight wants no gradient."""
    if not need:
        return None
    g = torch.where(gate, values, 0.0)
    return g if scale is None else g * scale


def _scaled(ctx, grad_out):
    """The gradients computed in the forward (saved as dh, dw, db, d token_weight), times the
    scalar upstream gradient.

    The first backward scales dh, dw, db **in place** (an out-of-place product would hold a second
    weight-sized and hidden-sized tensor at the peak of the backward), through ``.data`` so the
    saved tensors' version counters stay valid: with ``retain_graph=True`` a later backward
    (``gradcheck`` does several) unpacks them, already scaled by the first upstream gradient, and
    rescales out of place by the ratio. Without ``retain_graph`` autograd frees the saved
    tensors right after this call and the returned ones become ``.grad`` without a copy. One
    limit: when the first backward's tensors became a leaf's ``.grad`` and a second backward
    accumulated into it, a third backward through the same graph finds them modified and raises
    (autograd's version check) rather than return a wrong gradient. The token-weight gradient (N
    floats) is always scaled out of place. Only a later backward reads a value on the host (whether
    the first upstream gradient was 0): one synchronization on a GPU, off the training path."""
    try:
        *grads, dtw = ctx.saved_tensors
    except RuntimeError as e:
        if "modified by an inplace operation" not in str(e):
            raise
        raise RuntimeError(
            f"backward through a reduction={ctx.reduction!r} loss again after the first backward's "
            f"gradients were changed in place (optimizer.zero_grad(set_to_none=False), clip_grad_norm_, an "
            f"optimizer step, or a third backward into the same .grad): the first backward hands out the "
            f"gradients its forward computed without a copy. Keep the default zero_grad(set_to_none=True) "
            f"between the backwards, or use reduction='none' (the backward recomputes)") from e
    dtw = None if dtw is None else _times(dtw, grad_out)
    if ctx.scale is None:
        ctx.scale = grad_out.detach().clone()
        for g in grads:
            if g is not None:
                _mul_(g.data, grad_out)
        return (*grads, dtw)
    if bool(ctx.scale == 0):
        raise RuntimeError(f"backward through a reduction={ctx.reduction!r} loss a second time after a first "
                           "backward with upstream gradient 0, which consumed its in-place gradients; use "
                           "reduction='none' (the backward recomputes) to backpropagate through it this way")
    ratio = grad_out / ctx.scale
    return (*(None if g is None else _times(g, ratio) for g in grads), dtw)


def _times(g: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """g * s out of place, the product in s's precision (float32 or float64), rounded to g's dtype once."""
    return (g.to(s.dtype) * s).to(g.dtype)


# Whether common.scale_ (Triton) works here: None until tried, then True or False.
_TRITON_SCALE: bool | None = None


def _mul_(g: torch.Tensor, s: torch.Tensor) -> None:
    """g *= s in place, the product in float32 for a 16-bit g (s: the 0-dim float32 or float64
    upstream gradient, never read on the host). Rounding s to float16 first, as ``g.mul_(s.to(g.dtype))``
    did, made GradScaler's first scale, 65536, inf — every gradient inf or NaN, every step
    skipped — and put a bias of up to 2**-9 on every bf16 gradient for scales such as 1/3."""
    if g.dtype == torch.float64:
        g.mul_(s)
        return
    s32 = s.to(torch.float32)
    if g.dtype == torch.float32 or g.device.type == "cpu":
        # ATen reads a CPU 0-dim tensor as a float32 scalar for 16-bit tensors (opmath).
        g.mul_(s32)
        return
    global _TRITON_SCALE
    if torch.compiler.is_compiling():
        # Traced: one fused elementwise kernel from the compiler, no global state touched.
        g.copy_(_times(g, s32))
        return
    if g.is_contiguous() and _TRITON_SCALE is not False:
        try:
            from .backends.triton_kernels.common import scale_

            scale_(g, s)
            _TRITON_SCALE = True
            return
        except Exception as e:  # no triton, no compiler, an unsupported GPU: float32 slices, 16 MiB at a time
            if _TRITON_SCALE:
                raise  # it ran before: a real error
            _TRITON_SCALE = False
            import logging
            logging.getLogger(__name__).info("scaling 16-bit gradients without Triton (%s: %s)", type(e).__name__, e)
    for part in g.view(-1).split(1 << 22) if g.is_contiguous() else (g,):
        part.copy_(_times(part, s32))


def _first_order(backward):
    """No double backward. ``once_differentiable`` alone raises only when the upstream gradient
    requires grad; ``autograd.grad(loss, h, create_graph=True)`` passes one that does not, and the
    returned gradient was silently a constant (a gradient penalty on it added nothing). Grad mode
    is on in a backward exactly when the caller asked for create_graph."""
    inner = once_differentiable(backward)

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError("surgery_kernels: the losses have no double backward: create_graph=True (a gradient "
                               "penalty, a Hessian-vector product) is not supported through them")
        return inner(ctx, *grads)
    return wrapper


def _fused(reduction: str, needs, dtype: torch.dtype) -> bool:
    """Whether the forward computes the gradients (mean/sum with a gradient wanted), so that the
    backward only scales them. Not for float16: the upstream gradient — GradScaler's scale, 65536
    at first — must meet the logit gradient before it is rounded to float16, as in plain PyTorch;
    gradients formed at scale 1 lose their small components below float16's range (N = 8192,
    V = 2000: dh 16.6x plain PyTorch's error under GradScaler, ``python benchmarks/fp16_scale.py``).
    float16 mean/sum recompute the logits in the backward instead (one GEMM more)."""
    return reduction != "none" and any(needs) and dtype != torch.float16


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, target, token_weight, backend, needs, ignore_index, reduction, softcap,
                ascent_cap, chunk_size):
        # needs: does (hidden, weight, bias, token_weight) want a gradient.
        impl = _impl(backend)
        acc = _acc(hidden.dtype)
        live = target != ignore_index
        w, coeff, scale = _coefficients(live, token_weight, reduction, acc)
        needs, need_tw = needs[:3], needs[3]
        opts = dict(ignore_index=ignore_index, softcap=softcap, chunk_size=chunk_size)
        ctx.reduction, ctx.backend, ctx.needs, ctx.opts, ctx.scale = reduction, backend, needs, opts, None
        ctx.fused = _fused(reduction, needs, hidden.dtype)
        if ctx.fused:
            ce, lse, dh, dw, db = impl.ce_forward_backward(hidden, weight, bias, target, coeff, ascent_cap=ascent_cap,
                                                           needs=needs, **opts)
        else:
            ce, lse = impl.ce_forward(hidden, weight, bias, target, **opts)
        gate = live
        if ascent_cap is not None:
            # Bounded ascent: a token pushed past the cap stops contributing (loss and gradient).
            capped = (w < 0) & (ce > ascent_cap)
            w = torch.where(capped, 0.0, w)
            coeff = torch.where(capped, 0.0, coeff)
            gate = live & ~capped
        dtw = _weight_grad(ce, gate, scale, need_tw)
        if ctx.fused:
            ctx.save_for_backward(dh, dw, db, dtw)
        elif any(needs):  # the backward's per-token coefficient, times the upstream gradient
            ctx.save_for_backward(hidden, weight, bias, target, lse, w if reduction == "none" else coeff, dtw)
        else:
            ctx.save_for_backward(None, None, None, None, None, None, dtw)
        values = torch.where(live, ce, 0.0)
        ctx.mark_non_differentiable(values)
        if reduction == "none":
            return _weighted(w, ce), values
        return _weighted(coeff, ce).sum(), values

    @staticmethod
    @_first_order
    def backward(ctx, grad_out, _grad_values):
        if ctx.fused:
            dh, dw, db, dtw = _scaled(ctx, grad_out)
        else:
            hidden, weight, bias, target, lse, w, dtw = ctx.saved_tensors
            dh = dw = db = None
            if any(ctx.needs):  # reduction "none", or a float16 mean/sum (_fused)
                dh, dw, db = _impl(ctx.backend).ce_backward(hidden, weight, bias, target, lse,
                                                            grad_out.to(w.dtype) * w, needs=ctx.needs, **ctx.opts)
            if dtw is not None:
                dtw = _times(dtw, grad_out)
        return dh, dw, db, None, dtw, None, None, None, None, None, None, None


class LinearKLDivFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, token_weight, backend, needs,
                direction, temperature, softcap, ref_softcap, reduction, chunk_size):
        # needs: does (hidden, weight, bias, token_weight) want a gradient.
        impl = _impl(backend)
        acc = _acc(hidden.dtype)
        w, coeff, scale = _coefficients(mask, token_weight, reduction, acc)
        needs, need_tw = needs[:3], needs[3]
        opts = dict(direction=direction, temperature=temperature, softcap=softcap, ref_softcap=ref_softcap,
                    chunk_size=chunk_size)
        ctx.reduction, ctx.backend, ctx.needs, ctx.opts, ctx.scale = reduction, backend, needs, opts, None
        ctx.fused = _fused(reduction, needs, hidden.dtype)
        refs = (ref_hidden, ref_weight, ref_bias)
        if ctx.fused:
            kl, lse, rlse, dh, dw, db = impl.kl_forward_backward(hidden, weight, bias, *refs, mask, coeff,
                                                                 needs=needs, **opts)
        else:
            kl, lse, rlse = impl.kl_forward(hidden, weight, bias, *refs, mask, **opts)
        dtw = _weight_grad(kl, mask, scale, need_tw)
        if ctx.fused:
            ctx.save_for_backward(dh, dw, db, dtw)
        elif any(needs):  # the backward's per-token coefficient, times the upstream gradient
            ctx.save_for_backward(hidden, weight, bias, *refs, lse, rlse, kl, w if reduction == "none" else coeff, dtw)
        else:
            ctx.save_for_backward(*[None] * 10, dtw)
        values = torch.where(mask, kl, 0.0)
        ctx.mark_non_differentiable(values)
        if reduction == "none":
            return _weighted(w, kl), values
        return _weighted(coeff, kl).sum(), values

    @staticmethod
    @_first_order
    def backward(ctx, grad_out, _grad_values):
        if ctx.fused:
            dh, dw, db, dtw = _scaled(ctx, grad_out)
        else:
            hidden, weight, bias, rh, rw, rb, lse, rlse, kl, w, dtw = ctx.saved_tensors
            dh = dw = db = None
            if any(ctx.needs):  # reduction "none", or a float16 mean/sum (_fused)
                dh, dw, db = _impl(ctx.backend).kl_backward(hidden, weight, bias, rh, rw, rb, lse, rlse, kl,
                                                            grad_out.to(w.dtype) * w, needs=ctx.needs, **ctx.opts)
            if dtw is not None:
                dtw = _times(dtw, grad_out)
        return dh, dw, db, None, None, None, None, dtw, None, None, None, None, None, None, None, None
