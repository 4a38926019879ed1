"""Backends ``cpu`` and ``cuda``: the C++/CUDA extension in ``csrc/``, as ``torch.ops.surgery.*``.

The extension is built on first use (``surgery_kernels._build``; ``python -m surgery_kernels
build`` prebuilds it). The four ops write gradients into the tensors they are given: this module
allocates them (dweight/dbias in float32, as the ops accumulate across chunks in float32) and casts
back to the parameter dtype. The same Python code serves both backends: the op's device dispatch
picks the CPU or the CUDA kernel from the tensors' device.

float64 inputs are delegated to the chunked ``torch`` backend: the kernels compute in float32 by
design (that is their point), and a float64 call is a reference/debugging computation for which
the chunked path already has the right precision.

``register_fake`` gives every op a shape-only kernel, so the ops pass ``torch.library.opcheck``
and trace under ``torch.compile(fullgraph=True)``; autograd is the shared layer in
``surgery_kernels.autograd``, which calls the primitives below.
"""

from __future__ import annotations

import torch

from .. import _build
from . import Availability, chunked

_DEVICE_OF = {"cpu": "cpu", "cuda": "cuda"}
_fakes_registered = False


def _register_fakes() -> None:
    """Shape-only kernels of the four ops (for FakeTensor tracing: opcheck, torch.compile)."""
    global _fakes_registered
    if _fakes_registered:
        return

    def stat(hidden):
        return hidden.new_empty((hidden.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("surgery::ce_forward")
    def _(hidden, weight, bias, target, coeff, ignore_index, softcap, ascent_cap, chunk_size, dhidden, dweight,
          dbias):
        return stat(hidden), stat(hidden)

    @torch.library.register_fake("surgery::ce_backward")
    def _(hidden, weight, bias, target, lse, coeff, ignore_index, softcap, chunk_size, dhidden, dweight, dbias):
        return None

    @torch.library.register_fake("surgery::kl_forward")
    def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, reverse, temperature, softcap,
          ref_softcap, chunk_size, dhidden, dweight, dbias):
        return stat(hidden), stat(hidden), stat(hidden)

    @torch.library.register_fake("surgery::kl_backward")
    def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, reverse, temperature,
          softcap, ref_softcap, chunk_size, dhidden, dweight, dbias):
        return None

    _fakes_registered = True


def load() -> _build.BuildResult:
    """Build/load the extension once and register the fake kernels."""
    result = _build.load()
    if result.ok:
        _register_fakes()
    return result


def availability(name: str, device_type: str) -> Availability:
    want = _DEVICE_OF[name]
    if device_type != want:
        return Availability(False, f"backend {name!r} runs on {want} tensors, not {device_type}")
    if name == "cuda" and not torch.cuda.is_available():
        return Availability(False, "no CUDA GPU is visible to torch")
    result = load()
    if not result.ok:
        return Availability(False, result.reason)
    if name == "cuda" and not result.cuda:
        return Availability(False, "the extension was built without CUDA: "
                                   + (result.cuda_reason or "no CUDA toolkit was found at build time"))
    return Availability(True)


def _chunk(chunk_size, n: int, v: int, device_type: str) -> int:
    """The op's chunk_size: the default does not depend on N (the op clamps it to N itself), so
    that torch.compile(dynamic=True) keeps the token count symbolic instead of recompiling per N."""
    if chunk_size is not None:
        return chunk_size
    return max(1, chunked.CHUNK_ELEMENTS.get(device_type, 1 << 24) // max(v, 1))


def _c(x):
    return None if x is None else x.contiguous()


def _grad_outputs(hidden, weight, bias, needs):
    dh = torch.empty_like(hidden) if needs[0] else None
    dw = torch.empty(weight.shape, dtype=torch.float32, device=weight.device) if needs[1] else None
    db = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device) if (needs[2] and bias is not None) \
        else None
    return dh, dw, db


def _cast_back(dh, dw, db, weight, bias):
    return dh, (None if dw is None else dw.to(weight.dtype)), (None if db is None else db.to(bias.dtype))


def _f(x):
    """An optional float argument of an op (a ``float?`` in the schema)."""
    return None if x is None else float(x)


@chunked.float64_here
def ce_forward(hidden, weight, bias, target, *, ignore_index, softcap, chunk_size):
    n, v = hidden.shape[0], weight.shape[0]
    return torch.ops.surgery.ce_forward(_c(hidden), _c(weight), _c(bias), _c(target), None, ignore_index, softcap,
                                        None, _chunk(chunk_size, n, v, hidden.device.type), None, None, None)


@chunked.float64_here
def ce_backward(hidden, weight, bias, target, lse, coeff, *, ignore_index, softcap, needs, chunk_size):
    hidden, weight, bias = _c(hidden), _c(weight), _c(bias)
    dh, dw, db = _grad_outputs(hidden, weight, bias, needs)
    n, v = hidden.shape[0], weight.shape[0]
    torch.ops.surgery.ce_backward(hidden, weight, bias, _c(target), _c(lse), coeff.to(torch.float32).contiguous(),
                                  ignore_index, softcap, _chunk(chunk_size, n, v, hidden.device.type), dh, dw, db)
    return _cast_back(dh, dw, db, weight, bias)


@chunked.float64_here
def ce_forward_backward(hidden, weight, bias, target, coeff, *, ignore_index, softcap, ascent_cap, needs,
                        chunk_size):
    hidden, weight, bias = _c(hidden), _c(weight), _c(bias)
    dh, dw, db = _grad_outputs(hidden, weight, bias, needs)
    n, v = hidden.shape[0], weight.shape[0]
    ce, lse = torch.ops.surgery.ce_forward(hidden, weight, bias, _c(target), coeff.to(torch.float32).contiguous(),
                                           ignore_index, softcap, ascent_cap, _chunk(chunk_size, n, v, hidden.device.type), dh, dw, db)
    return (ce, lse) + _cast_back(dh, dw, db, weight, bias)


@chunked.float64_here
def kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *, direction, temperature, softcap,
               ref_softcap, chunk_size):
    n, v = hidden.shape[0], weight.shape[0]
    return torch.ops.surgery.kl_forward(_c(hidden), _c(weight), _c(bias), _c(ref_hidden), _c(ref_weight),
                                        _c(ref_bias), _c(mask), None, direction == "reverse", float(temperature),
                                        _f(softcap), _f(ref_softcap), _chunk(chunk_size, n, v, hidden.device.type),
                                        None, None, None)


@chunked.float64_here
def kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, *, direction,
                temperature, softcap, ref_softcap, needs, chunk_size):
    hidden, weight, bias = _c(hidden), _c(weight), _c(bias)
    dh, dw, db = _grad_outputs(hidden, weight, bias, needs)
    n, v = hidden.shape[0], weight.shape[0]
    torch.ops.surgery.kl_backward(hidden, weight, bias, _c(ref_hidden), _c(ref_weight), _c(ref_bias), _c(lse),
                                  _c(ref_lse), _c(kl), coeff.to(torch.float32).contiguous(), direction == "reverse",
                                  float(temperature), _f(softcap), _f(ref_softcap),
                                  _chunk(chunk_size, n, v, hidden.device.type), dh, dw, db)
    return _cast_back(dh, dw, db, weight, bias)


@chunked.float64_here
def kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, *, direction,
                        temperature, softcap, ref_softcap, needs, chunk_size):
    hidden, weight, bias = _c(hidden), _c(weight), _c(bias)
    dh, dw, db = _grad_outputs(hidden, weight, bias, needs)
    n, v = hidden.shape[0], weight.shape[0]
    kl, lse, rlse = torch.ops.surgery.kl_forward(hidden, weight, bias, _c(ref_hidden), _c(ref_weight), _c(ref_bias),
                                                 _c(mask), coeff.to(torch.float32).contiguous(),
                                                 direction == "reverse", float(temperature), _f(softcap),
                                                 _f(ref_softcap), _chunk(chunk_size, n, v, hidden.device.type),
                                                 dh, dw, db)
    return (kl, lse, rlse) + _cast_back(dh, dw, db, weight, bias)
