"""Helpers for backends whose primitives run as ``torch.library.custom_op``\\ s (``torch``,
``triton``): an op returns tensors only, so a gradient that is not wanted leaves it as an empty
placeholder and the primitive turns it back into None; the fake (meta) implementations, which
``torch.compile`` calls instead of the op, give each output's shape and dtype. And the device
guard of the Triton launches."""

from __future__ import annotations

import contextlib

import torch


def device_of(t: torch.Tensor):
    """A guard that makes ``t``'s GPU the current device: Triton launches on the current device
    (and its current stream), so inputs on cuda:1 with cuda:0 current would run on the wrong GPU
    (an illegal address). Nothing for CPU tensors (the interpreter)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def placeholders(grads, hidden: torch.Tensor) -> tuple:
    """(dh, dw, db) with None replaced by an empty tensor: what an op returns."""
    return tuple(hidden.new_empty(0) if g is None else g for g in grads)


def none_where_unneeded(grads, needs, bias) -> tuple:
    """An op's (dh, dw, db) with the placeholders of gradients not wanted back to None."""
    dh, dw, db = grads
    return (dh if needs[0] else None, dw if needs[1] else None, db if (needs[2] and bias is not None) else None)


def fake_stats(hidden: torch.Tensor, *dtypes: torch.dtype) -> tuple:
    """One per-token (N,) tensor of each dtype."""
    return tuple(hidden.new_empty(hidden.shape[0], dtype=dt) for dt in dtypes)


def fake_grads(hidden: torch.Tensor, weight: torch.Tensor, bias, needs) -> tuple:
    """(dh, dw, db) as an op returns them: each gradient in its tensor's dtype, or a placeholder."""
    return (torch.empty_like(hidden) if needs[0] else hidden.new_empty(0),
            torch.empty_like(weight) if needs[1] else hidden.new_empty(0),
            torch.empty_like(bias) if (needs[2] and bias is not None) else hidden.new_empty(0))
