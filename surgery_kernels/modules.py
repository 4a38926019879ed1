"""nn.Module wrappers that hold the options of the functional API."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from . import checks
from .functional import linear_cross_entropy, linear_kl_div


class LinearCrossEntropy(torch.nn.Module):
    """``forward(hidden, weight, target, bias=None, token_weight=None)``; the other options of
    :func:`surgery_kernels.linear_cross_entropy` are fixed, and checked, at construction (whether
    the backend runs on the inputs' device is known at the first call)."""

    def __init__(self, *, ignore_index: int = -100, reduction: str = "mean", softcap: float | None = None,
                 ascent_cap: float | None = None, backend: str = "auto", chunk_size: int | None = None,
                 return_values: bool = False) -> None:
        super().__init__()
        checks.ce_options(ignore_index, reduction, softcap, ascent_cap, backend, chunk_size, return_values)
        self.options: dict[str, Any] = dict(ignore_index=ignore_index, reduction=reduction, softcap=softcap,
                                            ascent_cap=ascent_cap, backend=backend, chunk_size=chunk_size,
                                            return_values=return_values)

    def forward(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None = None,
                token_weight: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return linear_cross_entropy(hidden, weight, target, bias=bias, token_weight=token_weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class LinearKLDiv(torch.nn.Module):
    """``forward(hidden, weight, ref_hidden, ref_weight, bias=None, ref_bias=None, mask=None,
    token_weight=None)``; the other options of :func:`surgery_kernels.linear_kl_div` are fixed, and
    checked, at construction."""

    def __init__(self, *, direction: str = "forward", temperature: float = 1.0, softcap: float | None = None,
                 ref_softcap: float | None = None, reduction: str = "mean", backend: str = "auto",
                 chunk_size: int | None = None, return_values: bool = False) -> None:
        super().__init__()
        checks.kl_options(direction, temperature, softcap, ref_softcap, reduction, backend, chunk_size, return_values)
        self.options: dict[str, Any] = dict(direction=direction, temperature=temperature, softcap=softcap,
                                            ref_softcap=ref_softcap, reduction=reduction, backend=backend,
                                            chunk_size=chunk_size, return_values=return_values)

    def forward(self, hidden: Tensor, weight: Tensor, ref_hidden: Tensor, ref_weight: Tensor,
                bias: Tensor | None = None, ref_bias: Tensor | None = None, mask: Tensor | None = None,
                token_weight: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        return linear_kl_div(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, mask=mask,
                             token_weight=token_weight, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
