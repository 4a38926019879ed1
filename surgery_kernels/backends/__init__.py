"""Backend registry: which implementations exist, which load here, and what ``auto`` picks.

Every backend implements the same six primitives over *flattened, validated* tensors
(``surgery_kernels.functional`` does the checking, flattening, autocast and reduction; the
shared autograd layer in ``surgery_kernels.autograd`` calls these). Shapes:
``hidden (N, H)``, ``weight (V, H)``, ``bias (V,) | None``, ``target (N,) int64``,
``ref_hidden (N, H')``, ``ref_weight (V, H')``, ``ref_bias (V,) | None``, ``mask (N,) bool``.
Per-token outputs (``ce``, ``kl``, ``lse``, ``ref_lse``) are float32 (float64 for float64
inputs). Gradients come back in the dtype of the tensor they belong to; ``None`` where the
matching ``needs`` flag is False. ``needs = (need_dhidden, need_dweight, need_dbias)``.

Cross-entropy (``z = hidden @ weight.T + bias``, then ``softcap * tanh(z / softcap)``)::

    ce_forward(hidden, weight, bias, target, *, ignore_index, softcap, chunk_size)
        -> (ce, lse)                   ce = lse - z[target]; 0 (finite) where target == ignore_index
    ce_backward(hidden, weight, bias, target, lse, coeff, *, ignore_index, softcap, needs, chunk_size)
        -> (dhidden, dweight, dbias)   gradient of sum_i coeff_i * ce_i; coeff is float32 (N,),
                                       already 0 for ignored and capped tokens
    ce_forward_backward(hidden, weight, bias, target, coeff, *, ignore_index, softcap,
                        ascent_cap, needs, chunk_size)
        -> (ce, lse, dhidden, dweight, dbias)
                                       one pass: values and the gradient of sum_i coeff_i * ce_i,
                                       except tokens with coeff_i < 0 and ce_i > ascent_cap
                                       (bounded ascent), which get no gradient

KL between softmax(z / T) of the trained side (q) and of the reference side (p), each side's z
softcapped first when its ``softcap`` / ``ref_softcap`` is not None::

    kl_forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, *,
               direction, temperature, softcap, ref_softcap, chunk_size)
        -> (kl, lse, ref_lse)          forward: KL(p || q), reverse: KL(q || p); lse of z/T and
                                       of z_ref/T (capped); kl = 0 (finite) where mask is False
    kl_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, *,
                direction, temperature, softcap, ref_softcap, needs, chunk_size)
        -> (dhidden, dweight, dbias)   gradient of sum_i coeff_i * kl_i (trained side only)
    kl_forward_backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, *,
                        direction, temperature, softcap, ref_softcap, needs, chunk_size)
        -> (kl, lse, ref_lse, dhidden, dweight, dbias)

``chunk_size`` is a hint that a backend may ignore (the Triton forward without gradients has no chunks).
No primitive may synchronize with the host or allocate an ``(N, V)`` tensor.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass
from types import ModuleType

import torch

log = logging.getLogger("surgery_kernels")

BACKENDS = ("triton", "cuda", "cpu", "torch")
# Preference order of backend="auto" per device type (triton first on CUDA). Measured
# on an H100 in one group of rows each (benchmarks/results/2026-11-28-h100, Llama-2-7B head,
# N=16384, bf16, forward+backward): the signed CE 20.18 ms with triton, 20.25 with cuda (1.15x /
# 1.16x the GEMM floor; 250 / 506 MiB beyond inputs and gradients), the KL 29.84 / 28.01 ms (1.16x
# / 1.09x; 750 / 762 MiB); the 7B LoRA training step 2.86 / 2.88 s. So triton first: a tie on
# the CE with half the memory, 6 % behind on the KL, and no C++/CUDA build on first use; cuda
# follows where triton is not installed.
AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpu", "torch")}

# name -> module implementing the primitives above and ``availability(device_type)``.
_MODULES = {
    "torch": "surgery_kernels.backends.chunked",
    "cpu": "surgery_kernels.backends.extension",
    "cuda": "surgery_kernels.backends.extension",
    "triton": "surgery_kernels.backends.triton_fused",
}


@dataclass(frozen=True)
class Availability:
    ok: bool
    reason: str = ""


_loaded: dict[str, ModuleType] = {}


def module(name: str) -> ModuleType:
    """The module implementing the primitives of backend ``name``."""
    # Cached so that code traced by torch.compile finds the module with a dict lookup:
    # dynamo cannot trace importlib.import_module (a graph break on every call).
    if name not in _loaded:
        _loaded[name] = importlib.import_module(_MODULES[name])
    return _loaded[name]


def availability(name: str, device_type: str) -> Availability:
    """Whether backend ``name`` can run on tensors of ``device_type``, and why not."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {('auto',) + BACKENDS}, got {name!r}")
    try:
        return module(name).availability(name, device_type)
    except Exception as exc:  # a backend that fails to load must not take the others down
        return Availability(False, f"{type(exc).__name__}: {exc}")


def available_backends(device: str | torch.device | None = None) -> dict[str, str]:
    """Map every backend name to ``"available"`` or the reason it cannot run here.

    ``device``: the device type to ask about (default: ``"cuda"`` when a GPU is visible,
    else ``"cpu"``).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.device(device).type
    out = {}
    for name in BACKENDS:
        a = availability(name, dtype)
        out[name] = "available" if a.ok else a.reason
    return out


_auto_logged: set[tuple[str, str]] = set()


# torch.compile runs this at trace time and bakes the (string) result into the graph: it
# depends only on constant arguments and on what is installed, and tracing it would import
# modules and log (graph breaks).
@torch.compiler.assume_constant_result
def resolve(name: str, device_type: str) -> str:
    """The backend that runs ``name`` (``"auto"`` resolved) on ``device_type`` tensors.

    Raises ValueError naming the reason when the requested backend cannot run.
    """
    if name == "auto":
        reasons = []
        for cand in AUTO_ORDER.get(device_type, ("torch",)):
            a = availability(cand, device_type)
            if a.ok:
                if (device_type, cand) not in _auto_logged:
                    _auto_logged.add((device_type, cand))
                    log.debug("backend='auto' on %s picked %r (%s)", device_type, cand,
                              "; ".join(reasons) or "first choice")
                return cand
            reasons.append(f"{cand}: {a.reason}")
        raise ValueError(f"no backend can run on {device_type}: " + "; ".join(reasons))
    a = availability(name, device_type)
    if not a.ok:
        raise ValueError(f"backend={name!r} is not available for {device_type} tensors: {a.reason}")
    return name

