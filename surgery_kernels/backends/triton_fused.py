"""Backend ``triton``: Triton kernels for the six primitives of ``surgery_kernels.backends``.

- ``*_forward`` (values, no gradient: evaluation, and the forward of ``reduction="none"``):
  fully fused, no logits in memory. One kernel (``triton_kernels.ce`` / ``kl``) computes logit
  tiles on chip and keeps only per-row statistics (online log-sum-exp, target logit, for KL the
  expectation of the logit difference); a few O(N) torch ops merge the vocabulary splits.
- ``*_backward`` and ``*_forward_backward`` (``BACKWARD = "chunked"``, the default): through a
  bounded chunk of logits, ``triton_kernels.rows`` — per chunk the logits GEMM (cuBLAS), one
  fused Triton row kernel (statistics, value, ascent cap, the logit gradient written in place),
  the dH and dW GEMMs (cuBLAS). Three GEMMs for CE (four for KL) plus two passes over the chunk.
- ``BACKWARD = "fused"`` (``SURGERY_TRITON_BACKWARD=fused``; kept for comparison and for its
  gradient filtering): each (token block x vocabulary block) tile is recomputed on chip, its
  logit gradient formed in registers and added to dH and dW with float32 atomics.

Why the default goes through memory (measured on an H100, Llama-2-7B head, N = 16384, bf16,
benchmarks/results/2026-11-27-h100-triton): the fused backward ran the signed CE at 3.8x the
GEMM floor and the KL at 3.85x; the chunked path at 1.10x and 1.28x with its default 256 MiB
chunks. A fused tile's gradient must reach an (N, H) and a (V, H) accumulator that no chip can
hold: atomics move N*H*V*4*(1/BLOCK_N + 1/BLOCK_V) bytes (~128 GiB here with 128x128 tiles),
and a kernel that owns vocabulary blocks instead would recompute every tile H / BLOCK_K times
(a float32 BLOCK_V x H accumulator is 2 MiB at H = 4096). Writing the logit gradient once in 16
bits and letting cuBLAS run the dH and dW GEMMs costs 2 bytes per logit. What the chunked path
costs instead is memory (a chunk, and for 16-bit weights over several chunks a float32 dW
accumulator; see ``triton_kernels.rows``).

float64 inputs go to the chunked ``torch`` backend (as with ``cpu`` and ``cuda``): the kernels
compute in float32 by design, and a float64 call is a reference computation.

Deviation from the primitive contract, on purpose: ``lse``/``ref_lse`` come back in float64
(ce and kl in float32). The row statistics are a float32 max plus a float32 log-sum-exp of the
shifted logits; their float32 sum would be off by up to ~5e-4 at |z| ~ 1e4, and the backward's
softmax exp(z - lse) would carry that error into every gradient. They only travel between this
backend's own forward and backward (through the autograd layer), so nothing else sees them.

Each primitive is one ``torch.library.custom_op`` (namespace ``surgery_triton``) with a fake
(meta) implementation, so ``torch.compile(fullgraph=True)`` sees an opaque op instead of tracing
into the launcher (or the interpreter). Gradients that are not needed come out of the ops as
empty placeholders and leave the primitives as None.

Gradient filtering (skip a tile whose |softmax - onehot| is below a threshold everywhere; fused
backward only) is off by default; see ``triton_kernels.common.GRAD_FILTER_EPS``.

Fused-backward KL flops: forward 2 tiles (4 N*H*V when H' = H), backward 2 recomputed tiles + dH + dW (8 N*H*V),
12 N*H*V in all against the 8 N*H*V of the four plain GEMMs (both logits, dH, dW).
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch
from torch import Tensor

from . import Availability, chunked
from ._ops import device_of as _device_of, fake_grads, fake_stats, none_where_unneeded, placeholders

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def availability(name: str, device_type: str) -> Availability:
    if importlib.util.find_spec("triton") is None:
        return Availability(False, "triton is not installed (pip install 'surgery-kernels[triton]')")
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return Availability(False, "no CUDA device is visible")
        return Availability(True)
    if device_type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
            return Availability(True)
        return Availability(False, "Triton runs on CUDA tensors (on CPU only under TRITON_INTERPRET=1, for tests)")
    return Availability(False, f"Triton kernels do not run on {device_type} tensors")


def _kernels():
    from .triton_kernels import ce, kl  # noqa: PLC0415  (triton is imported only when used)
    return ce, kl


def _rows():
    from .triton_kernels import rows  # noqa: PLC0415
    return rows


# Which gradient path the *_backward and *_forward_backward primitives take: "chunked" (default,
# triton_kernels.rows: logits chunk through memory, cuBLAS GEMMs, fused row kernel) or "fused"
# (triton_kernels.ce/kl: tiles recomputed on chip, float32 atomics; for comparison). Set with
# SURGERY_TRITON_BACKWARD or by assigning this attribute before a call.
BACKWARD = os.environ.get("SURGERY_TRITON_BACKWARD", "chunked")


def _backward() -> str:
    if BACKWARD not in ("chunked", "fused"):
        raise ValueError(f"SURGERY_TRITON_BACKWARD must be 'chunked' or 'fused', got {BACKWARD!r}")
    return BACKWARD


def _check(hidden: torch.Tensor) -> None:
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' takes hidden/weight in float32, bfloat16 or float16, got {hidden.dtype}; "
                        f"use backend='torch' for {hidden.dtype}")


def _c(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def _on_input_device(fn):
    """Runs a primitive with its first argument's (hidden's) GPU current."""
    @functools.wraps(fn)
    def run(hidden, *args, **kwargs):
        with _device_of(hidden):
            return fn(hidden, *args, **kwargs)
    return run


@torch.library.custom_op("surgery_triton::ce_forward", mutates_args=())
@_on_input_device
def _ce_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, ignore_index: int,
                softcap: Optional[float]) -> tuple[Tensor, Tensor]:
    hidden, weight, bias, target = _c(hidden, weight, bias, target)
    return _kernels()[0].forward(hidden, weight, bias, target, ignore_index, softcap)


@_ce_forward.register_fake
def _(hidden, weight, bias, target, ignore_index, softcap):
    return fake_stats(hidden, torch.float32, torch.float64)


@torch.library.custom_op("surgery_triton::ce_backward", mutates_args=())
@_on_input_device
def _ce_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, lse: Tensor, coeff: Tensor,
                 ignore_index: int, softcap: Optional[float], needs: list[bool],
                 chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    hidden, weight, bias, target = _c(hidden, weight, bias, target)
    if _backward() == "fused":
        grads = _kernels()[0].backward(hidden, weight, bias, target, lse, coeff, softcap, needs)
    else:
        # the row statistics are recomputed from the chunk's own (input-dtype) logits, not taken from lse
        grads = _rows().ce(hidden, weight, bias, target, coeff, ignore_index=ignore_index, softcap=softcap,
                           ascent_cap=None, needs=needs, chunk_size=chunk_size, stats=False)[2:]
    return placeholders(grads, hidden)


@_ce_backward.register_fake
def _(hidden, weight, bias, target, lse, coeff, ignore_index, softcap, needs, chunk_size):
    return fake_grads(hidden, weight, bias, needs)


@torch.library.custom_op("surgery_triton::ce_forward_backward", mutates_args=())
@_on_input_device
def _ce_forward_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], target: Tensor, coeff: Tensor,
                         ignore_index: int, softcap: Optional[float], ascent_cap: Optional[float],
                         needs: list[bool], chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    hidden, weight, bias, target = _c(hidden, weight, bias, target)
    if _backward() == "fused":
        ce_mod = _kernels()[0]
        ce, lse = ce_mod.forward(hidden, weight, bias, target, ignore_index, softcap)
        coeff = coeff.float()
        if ascent_cap is not None:
            # Bounded ascent: a token pushed past the cap gets no gradient (decided on the device).
            coeff = torch.where((coeff < 0) & (ce > ascent_cap), torch.zeros_like(coeff), coeff)
        grads = ce_mod.backward(hidden, weight, bias, target, lse, coeff, softcap, needs)
    else:
        ce, lse, *grads = _rows().ce(hidden, weight, bias, target, coeff, ignore_index=ignore_index, softcap=softcap,
                                     ascent_cap=ascent_cap, needs=needs, chunk_size=chunk_size, stats=True)
    return (ce, lse) + placeholders(grads, hidden)


@_ce_forward_backward.register_fake
def _(hidden, weight, bias, target, coeff, ignore_index, softcap, ascent_cap, needs, chunk_size):
    return fake_stats(hidden, torch.float32, torch.float64) + fake_grads(hidden, weight, bias, needs)


@torch.library.custom_op("surgery_triton::kl_forward", mutates_args=())
@_on_input_device
def _kl_forward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                ref_bias: Optional[Tensor], mask: Tensor, direction: str, temperature: float,
                softcap: Optional[float], ref_softcap: Optional[float]) -> tuple[Tensor, Tensor, Tensor]:
    args = _c(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    return _kernels()[1].forward(*args, mask, direction, temperature, softcap, ref_softcap)


@_kl_forward.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, direction, temperature, softcap, ref_softcap):
    return fake_stats(hidden, torch.float32, torch.float64, torch.float64)


@torch.library.custom_op("surgery_triton::kl_backward", mutates_args=())
@_on_input_device
def _kl_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor, ref_weight: Tensor,
                 ref_bias: Optional[Tensor], lse: Tensor, ref_lse: Tensor, kl: Tensor, coeff: Tensor, direction: str,
                 temperature: float, softcap: Optional[float], ref_softcap: Optional[float], needs: list[bool],
                 chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor]:
    args = _c(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    if _backward() == "fused":
        grads = _kernels()[1].backward(*args, lse, ref_lse, kl, coeff, direction, temperature, softcap, ref_softcap,
                                       needs)
    else:
        # lse, ref_lse and kl are recomputed from the chunk's own logits (coeff is 0 where masked)
        grads = _rows().kl(*args, None, coeff, direction=direction, temperature=temperature, softcap=softcap,
                           ref_softcap=ref_softcap, needs=needs, chunk_size=chunk_size, stats=False)[3:]
    return placeholders(grads, hidden)


@_kl_backward.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, direction, temperature, softcap,
      ref_softcap, needs, chunk_size):
    return fake_grads(hidden, weight, bias, needs)


@torch.library.custom_op("surgery_triton::kl_forward_backward", mutates_args=())
@_on_input_device
def _kl_forward_backward(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], ref_hidden: Tensor,
                         ref_weight: Tensor, ref_bias: Optional[Tensor], mask: Tensor, coeff: Tensor, direction: str,
                         temperature: float, softcap: Optional[float], ref_softcap: Optional[float], needs: list[bool],
                         chunk_size: Optional[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    args = _c(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    caps = (softcap, ref_softcap)
    if _backward() == "fused":
        kl_mod = _kernels()[1]
        kl, lse, rlse = kl_mod.forward(*args, mask, direction, temperature, *caps)
        grads = kl_mod.backward(*args, lse, rlse, kl, coeff, direction, temperature, *caps, needs)
    else:
        kl, lse, rlse, *grads = _rows().kl(*args, mask, coeff, direction=direction, temperature=temperature,
                                           softcap=softcap, ref_softcap=ref_softcap, needs=needs,
                                           chunk_size=chunk_size, stats=True)
    return (kl, lse, rlse) + placeholders(grads, hidden)


@_kl_forward_backward.register_fake
def _(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, direction, temperature, softcap, ref_softcap,
      needs, chunk_size):
    return fake_stats(hidden, torch.float32, torch.float64, torch.float64) + fake_grads(hidden, weight, bias, needs)


@chunked.float64_here
def ce_forward(hidden, weight, bias, target, *, ignore_index, softcap, chunk_size):
    _check(hidden)
    return _ce_forward(hidden, weight, bias, target, ignore_index, softcap)


@chunked.float64_here
def ce_backward(hidden, weight, bias, target, lse, coeff, *, ignore_index, softcap, needs, chunk_size):
    _check(hidden)
    grads = _ce_backward(hidden, weight, bias, target, lse, coeff, ignore_index, softcap, list(needs), chunk_size)
    return none_where_unneeded(grads, needs, bias)


@chunked.float64_here
def ce_forward_backward(hidden, weight, bias, target, coeff, *, ignore_index, softcap, ascent_cap, needs,
                        chunk_size):
    _check(hidden)
    ce, lse, *grads = _ce_forward_backward(hidden, weight, bias, target, coeff, ignore_index, softcap, ascent_cap,
                                           list(needs), chunk_size)
    return (ce, lse) + none_where_unneeded(grads, needs, bias)


@chunked.float64_here
def kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *, direction, temperature, softcap,
               ref_softcap, chunk_size):
    _check(hidden)
    return _kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, direction, temperature, softcap,
                       ref_softcap)


@chunked.float64_here
def kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, *, direction,
                temperature, softcap, ref_softcap, needs, chunk_size):
    _check(hidden)
    grads = _kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, direction,
                         temperature, softcap, ref_softcap, list(needs), chunk_size)
    return none_where_unneeded(grads, needs, bias)


@chunked.float64_here
def kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, *, direction,
                        temperature, softcap, ref_softcap, needs, chunk_size):
    _check(hidden)
    kl, lse, rlse, *grads = _kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff,
                                                 direction, temperature, softcap, ref_softcap, list(needs),
                                                 chunk_size)
    return (kl, lse, rlse) + none_where_unneeded(grads, needs, bias)
