"""Argument validation: every bad input becomes a ValueError/TypeError naming the argument and
what was expected, raised before any kernel runs."""

from __future__ import annotations

import math
import numbers

import torch

from .backends import BACKENDS

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
DIRECTIONS = ("forward", "reverse")


def tensor(name: str, x, *, dims: int | None = None, floating: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension(s), got shape {tuple(x.shape)}")


def same_device(ref_name: str, ref: torch.Tensor, **others) -> None:
    for name, x in others.items():
        if x is not None and x.device != ref.device:
            raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}; move them to one device")


def same_dtype(ref_name: str, ref: torch.Tensor, *, autocast: torch.dtype | None = None, **others) -> None:
    """``autocast``: the dtypes are those after autocast's cast to it (float64 is not cast)."""
    for name, x in others.items():
        if x is not None and x.dtype != ref.dtype:
            if autocast is not None:
                raise TypeError(
                    f"under torch.autocast({autocast}) {name} is {x.dtype} but {ref_name} is {ref.dtype}: autocast "
                    f"casts float32/16-bit tensors, not float64 ones (as for nn.Linear); pass one precision")
            raise TypeError(
                f"{name} has dtype {x.dtype} but {ref_name} has {ref.dtype}; outside torch.autocast they must match "
                f"(cast one, or run under torch.autocast)")


def hidden_weight_bias(prefix: str, hidden, weight, bias) -> None:
    """hidden (..., H), weight (V, H), bias (V,) | None, on one device. Their dtypes are checked
    with the other inputs' after autocast's cast (functional._autocast)."""
    tensor(f"{prefix}hidden", hidden, floating=True)
    if hidden.dim() < 1:
        raise ValueError(f"{prefix}hidden must have shape (..., H), got a 0-d tensor")
    if hidden.shape[-1] == 0:
        raise ValueError(f"{prefix}hidden must have a hidden size H >= 1 (its last dimension), "
                         f"got shape {tuple(hidden.shape)}")
    tensor(f"{prefix}weight", weight, dims=2, floating=True)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"{prefix}weight must have shape (V, H) with H = {prefix}hidden.shape[-1] = "
                         f"{hidden.shape[-1]}, got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{prefix}weight must have at least one row (V >= 1), got {tuple(weight.shape)}")
    if bias is not None:
        tensor(f"{prefix}bias", bias, dims=1, floating=True)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{prefix}bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    same_device(f"{prefix}hidden", hidden, **{f"{prefix}weight": weight, f"{prefix}bias": bias})


def per_token(name: str, x, hidden: torch.Tensor, *, kind: str) -> None:
    """x must be shaped like hidden.shape[:-1], on hidden's device, of the given kind."""
    if x is None:
        return
    tensor(name, x)
    lead = tuple(hidden.shape[:-1])
    if tuple(x.shape) != lead:
        raise ValueError(f"{name} must have the leading shape of hidden {lead}, got {tuple(x.shape)}")
    if kind == "int" and (x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool):
        raise TypeError(f"{name} must hold integer class ids (an integer dtype), got {x.dtype}")
    if kind == "float" and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if kind == "mask":
        mask_dtype(name, x)
    same_device("hidden", hidden, **{name: x})


def mask_dtype(name: str, x: torch.Tensor) -> None:
    """A token mask: bool or integer (0 = skipped), not float (a weight would be read as yes/no)."""
    if x.dtype.is_floating_point or x.dtype.is_complex:
        raise TypeError(f"{name} must be a bool or integer tensor (False / 0 = token skipped, as in an "
                        f"attention_mask), got {x.dtype}; per-token float weights go in token_weight")


def choice(name: str, value, options) -> None:
    if value not in options:
        raise ValueError(f"{name} must be one of {tuple(options)}, got {value!r}")


_F32 = torch.finfo(torch.float32)


def positive(name: str, value, *, allow_none: bool = True, float32: bool = False) -> None:
    """A positive finite number; ``float32``: one the kernels can divide by in float32 (a normal
    float32: softcap 1e39 would be inf there, and softcap * tanh(z / softcap) NaN)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise ValueError(f"{name} must be a positive finite number{' or None' if allow_none else ''}, got {value!r}")
    if float32 and not _F32.tiny <= value <= _F32.max:
        raise ValueError(f"{name} must lie in [{_F32.tiny:.3g}, {_F32.max:.3g}] (the kernels compute in float32), "
                         f"got {value!r}")


def flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")


def common(reduction, backend, chunk_size) -> int | None:
    """Checks reduction and backend; returns chunk_size as an int (numpy integers accepted)."""
    choice("reduction", reduction, REDUCTIONS)
    choice("backend", backend, ("auto",) + BACKENDS)
    if chunk_size is None:
        return None
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    # Past any token count, and within the ops' int64 (2**70 means one chunk, as it would in torch).
    return int(min(chunk_size, 2**62))


def ce_options(ignore_index, reduction, softcap, ascent_cap, backend, chunk_size, return_values):
    """The options of linear_cross_entropy (and LinearCrossEntropy, at construction): returns
    ``(ignore_index, chunk_size)`` as ints."""
    ignore_index = integer("ignore_index", ignore_index)
    chunk_size = common(reduction, backend, chunk_size)
    positive("softcap", softcap, float32=True)
    positive("ascent_cap", ascent_cap)
    flag("return_values", return_values)
    return ignore_index, chunk_size


def kl_options(direction, temperature, softcap, ref_softcap, reduction, backend, chunk_size, return_values):
    """The options of linear_kl_div (and LinearKLDiv, at construction): returns chunk_size as an int."""
    choice("direction", direction, DIRECTIONS)
    positive("temperature", temperature, allow_none=False, float32=True)
    positive("softcap", softcap, float32=True)
    positive("ref_softcap", ref_softcap, float32=True)
    chunk_size = common(reduction, backend, chunk_size)
    flag("return_values", return_values)
    return chunk_size


def integer(name: str, value) -> int:
    """An int64 value (numpy integers accepted) as a Python int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if not -2**63 <= value < 2**63:
        raise ValueError(f"{name} must fit in int64, got {value}")
    return int(value)


def plain_tensors(**tensors) -> None:
    """torch.func transforms (vmap, grad, jvp) wrap their inputs; the custom autograd functions
    and ops here do not support them (they would fail inside with messages that name neither the
    loss nor the transform)."""
    if torch.compiler.is_compiling():
        return
    for name, x in tensors.items():
        # (not a tensor: left to the type checks that follow, which name the argument)
        if isinstance(x, torch.Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(x):
            raise NotImplementedError(f"{name} is being transformed by torch.func (vmap, grad, jvp, ...), which these "
                                      f"losses do not support; call them outside the transform (per example: a loop, "
                                      f"or reduction='none' over the batch)")


def target_range(target: torch.Tensor, ignore_index: int, vocab: int, name: str = "target", shift: int = 0) -> None:
    """Targets must lie in [0, V) or equal ignore_index; the error names ``name`` and reports the
    index plus ``shift`` in the last dimension (labels shifted left by one: ``shift=1``).

    On CPU tensors this is checked eagerly (a ValueError). On CUDA tensors, and while being
    compiled, it is a device-side assertion: reading the values on the host would stall the GPU.
    """
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    msg = f"{name} must hold class ids in [0, {vocab}) or ignore_index={ignore_index}"
    if target.device.type != "cpu" or torch.compiler.is_compiling():
        torch._assert_async(~bad.any(), msg)
    elif bad.any():
        first = bad.nonzero()[0].tolist()
        first[-1] += shift
        first = first[0] if target.dim() == 1 else tuple(first)
        raise ValueError(f"{msg}; found {int(target[bad][0])} at index {first}")
