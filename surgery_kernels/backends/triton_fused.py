"""Backend ``triton``: fused Triton kernels; no logits, no logit chunk, ever reach device memory.

The six primitives of ``surgery_kernels.backends`` over the kernels of ``triton_kernels``:

- ``*_forward``: one kernel computes logit tiles on chip and keeps only per-row statistics
  (online log-sum-exp, target logit, for KL the expectation of the logit difference), then a
  few O(N) torch ops merge the vocabulary splits.
- ``*_backward``: one kernel recomputes each (token block x vocabulary block) tile, forms the
  logit gradient in registers and adds its share of dH and dW.
- ``*_forward_backward``: forward kernel, then (the ascent_cap rule needs the finished ce of
  each token) the O(N) coefficient update, then the backward kernel: 2 + 6 = 8 N*H*V flops
  for CE against the 6 N*H*V of the three plain GEMMs (KL: see the end of this docstring).

Why float32 atomics for dH and dW rather than a kernel that owns vocabulary blocks: each logit
tile needs a full reduction over H, and a (BLOCK_V x H) float32 dW accumulator (2 MiB at
H = 4096) fits neither registers nor shared memory, so an owning kernel would have to recompute
each tile once per H block it owns (H / BLOCK_K times). Atomics let every tile be recomputed
exactly once; the price is the float32 accumulators (N*H and V*H float32 until the final cast;
for float32 inputs they are the gradients themselves) and atomic traffic, which the grouped
tile order keeps in L2. The ``cuda`` and ``torch`` backends keep the other trade-off (a logit
chunk in memory, cuBLAS GEMMs).

The main performance risk (not yet measured on a GPU): each (BLOCK_N x BLOCK_V) tile adds
(BLOCK_N + BLOCK_V) x H float32 with atomics, N*H*V * 4 * (1/BLOCK_V + 1/BLOCK_N) bytes in all:
128 GiB at N=16384, H=4096, V=32000 with 128x128 tiles, against ~1.7e13 flops of tensor-core
work. If ``benchmarks/triton_gpu.py`` shows the backward atomic-bound, the next step is a
supertile (several row and vocabulary blocks per program, gradient tiles staged in shared
memory) that divides that traffic by its side.

Deviation from the primitive contract, on purpose: ``lse``/``ref_lse`` come back in float64
(ce and kl in float32). The row statistics are a float32 max plus a float32 log-sum-exp of the
shifted logits; their float32 sum would be off by up to ~5e-4 at |z| ~ 1e4, and the backward's
softmax exp(z - lse) would carry that error into every gradient. They only travel between this
backend's own forward and backward (through the autograd layer), so nothing else sees them.

Gradient filtering (skip a tile whose |softmax - onehot| is below a threshold everywhere) is off
by default; see ``triton_kernels.common.GRAD_FILTER_EPS``.

KL flops: forward 2 tiles (4 N*H*V when H' = H), backward 2 recomputed tiles + dH + dW (8 N*H*V),
12 N*H*V in all against the 8 N*H*V of the four plain GEMMs (both logits, dH, dW).
"""

from __future__ import annotations

import importlib.util
import os

import torch

from . import Availability

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


def _check(hidden: torch.Tensor) -> None:
    if hidden.dtype not in _DTYPES:
        raise TypeError(f"backend='triton' takes hidden/weight in float32, bfloat16 or float16, got {hidden.dtype}; "
                        f"use backend='torch' for {hidden.dtype}")


def _c(*tensors):
    return tuple(None if t is None else t.contiguous() for t in tensors)


def ce_forward(hidden, weight, bias, target, *, ignore_index, softcap, chunk_size):
    _check(hidden)
    hidden, weight, bias, target = _c(hidden, weight, bias, target)
    return _kernels()[0].forward(hidden, weight, bias, target, ignore_index, softcap)


def ce_backward(hidden, weight, bias, target, lse, coeff, *, ignore_index, softcap, needs, chunk_size):
    _check(hidden)
    hidden, weight, bias, target = _c(hidden, weight, bias, target)
    return _kernels()[0].backward(hidden, weight, bias, target, lse, coeff, softcap, needs)


def ce_forward_backward(hidden, weight, bias, target, coeff, *, ignore_index, softcap, ascent_cap, needs,
                        chunk_size):
    _check(hidden)
    hidden, weight, bias, target = _c(hidden, weight, bias, target)
    ce_mod = _kernels()[0]
    ce, lse = ce_mod.forward(hidden, weight, bias, target, ignore_index, softcap)
    coeff = coeff.float()
    if ascent_cap is not None:
        # Bounded ascent: a token pushed past the cap gets no gradient (decided on the device).
        coeff = torch.where((coeff < 0) & (ce > ascent_cap), torch.zeros_like(coeff), coeff)
    return (ce, lse) + ce_mod.backward(hidden, weight, bias, target, lse, coeff, softcap, needs)


def kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *, direction, temperature,
               chunk_size):
    _check(hidden)
    args = _c(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    return _kernels()[1].forward(*args, mask, direction, temperature)


def kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, *, direction,
                temperature, needs, chunk_size):
    _check(hidden)
    args = _c(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    return _kernels()[1].backward(*args, lse, ref_lse, kl, coeff, direction, temperature, needs)


def kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, *, direction,
                        temperature, needs, chunk_size):
    _check(hidden)
    args = _c(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    kl_mod = _kernels()[1]
    kl, lse, rlse = kl_mod.forward(*args, mask, direction, temperature)
    return (kl, lse, rlse) + kl_mod.backward(*args, lse, rlse, kl, coeff, direction, temperature, needs)
