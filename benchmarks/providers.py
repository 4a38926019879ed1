"""Who is measured: every implementation of a case, behind one interface.

A provider has ``ops`` it implements, ``unavailable(device)`` (None, or why it cannot run here),
``build(case, inputs, device)`` returning a zero-argument function that computes the loss (a
scalar tensor) from the inputs of ``benchmarks.cases.make_inputs``, and ``est_bytes(case)``:
a rough upper bound of its peak memory beyond the inputs, used to skip cases that would not fit
the memory budget (on a shared CPU machine an out-of-memory kill takes others' work down too).

Providers:

- ``sk-<backend>``: ours, one per backend in ``surgery_kernels.backends.BACKENDS`` that
  ``available_backends(device)`` reports; new backends show up without changes here.
- ``naive``: plain PyTorch with materialized logits (``surgery_kernels.reference``).
- ``torch-lce``: ``torch.nn.functional.linear_cross_entropy`` with
  ``LinearCrossEntropyOptions()`` (its chunked path; torch >= 2.13). Its default chunking sizes a
  chunk of logits like the hidden input (``N / ceil(V / H)`` tokens, halved for float32 on
  the CPU): at the SmolLM2 head that is 16 tokens per chunk at N = 2048, small GEMMs.
- ``torch-lce-tuned``: the same op with ``batch_chunk_size = 2**24 // V`` tokens, the 64 MiB
  float32 chunk ``sk-torch`` uses, so the comparison is not only about the chunk heuristic.
- ``cce``: apple/ml-cross-entropy (``impl="torch_compile"`` on CPU -- a compiled materializing
  version --, ``"cce"`` on CUDA).
- ``liger``: Liger-Kernel's fused linear CE, and its fused linear JSD with beta = 0, which is the
  forward KL(p_teacher || p_student) (CUDA only: Triton kernels).

The baselines that only take a uniform weight compute the signed CE the way a trainer would,
one call per stream: ``(-0.1 * sum_CE(unlearn half) + 2.0 * sum_CE(update half)) / live``.
The floor (the bare GEMMs) is not a provider: ``benchmarks.worker`` times the GEMMs themselves.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from .cases import IGNORE_INDEX, UNLEARN_WEIGHT, UPDATE_WEIGHT, Case


@dataclass(frozen=True)
class Provider:
    name: str
    ops: tuple[str, ...]
    unavailable: Callable[[str], str | None]
    build: Callable[[Case, dict, str], Callable[[], torch.Tensor]]
    # bytes per logit element (N * V) this provider may hold at its peak, beyond the inputs;
    # 0 for the chunked/fused ones (a bounded chunk).
    logit_bytes: Callable[[Case], float] = lambda c: 0.0
    # False: left out of ``--quick`` (which must finish in 5 minutes on 2 cores), with that reason.
    quick: bool = True

    def est_bytes(self, c: Case) -> float:
        return self.logit_bytes(c) * c.n * c.v


def _itemsize(c: Case) -> int:
    return 2 if c.dtype == "bfloat16" else 4


def _two_streams(c: Case, x: dict, loss_sum: Callable) -> Callable[[], torch.Tensor]:
    """Signed CE from a provider that only has uniform weights: one call per stream, then scale."""
    h, w, t, half = x["hidden"], x["weight"], x["target"], x["half"]
    inv_live = 1.0 / float((t != IGNORE_INDEX).sum())

    def fn():
        a = loss_sum(h[:half], w, t[:half])
        b = loss_sum(h[half:], w, t[half:])
        return (UNLEARN_WEIGHT * a + UPDATE_WEIGHT * b) * inv_live

    return fn


def _ours(backend: str) -> Provider:
    def unavailable(device):
        from surgery_kernels.backends import availability

        a = availability(backend, torch.device(device).type)
        return None if a.ok else a.reason

    def build(c, x, device):
        import surgery_kernels as sk

        if c.op == "ce":
            return lambda: sk.linear_cross_entropy(x["hidden"], x["weight"], x["target"],
                                                   token_weight=x["token_weight"], backend=backend)
        return lambda: sk.linear_kl_div(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], backend=backend)

    # One chunk of logits (64 MiB of float32 by default) and per-token statistics.
    return Provider(f"sk-{backend}", ("ce", "kl"), unavailable, build)


def _naive() -> Provider:
    def build(c, x, device):
        from surgery_kernels import reference as ref

        if c.op == "ce":
            return lambda: ref.linear_cross_entropy_ref(x["hidden"], x["weight"], x["target"],
                                                        token_weight=x["token_weight"])
        return lambda: ref.linear_kl_div_ref(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"])

    # CE: logits in the input dtype, their float32 copy, log-softmax and its gradient (~3 float32
    # copies); KL: both sides' logits, float32 log-softmaxes, p, and the products (~6).
    def logit_bytes(c):
        return _itemsize(c) + 12 if c.op == "ce" else 2 * _itemsize(c) + 24

    return Provider("naive", ("ce", "kl"), lambda d: None, build, logit_bytes)


def _torch_lce() -> Provider:
    def unavailable(device):
        if not hasattr(torch.nn.functional, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"torch {torch.__version__} has no F.linear_cross_entropy with LinearCrossEntropyOptions (>= 2.13)"
        return None

    def build(c, x, device):
        opts = torch.nn.LinearCrossEntropyOptions()
        return _two_streams(c, x, lambda h, w, t: torch.nn.functional.linear_cross_entropy(
            h, w, t, reduction="sum", ignore_index=IGNORE_INDEX, options=opts))

    return Provider("torch-lce", ("ce",), unavailable, build)


def _torch_lce_tuned() -> Provider:
    base = _torch_lce()

    def build(c, x, device):
        opts = torch.nn.LinearCrossEntropyOptions(batch_chunk_size=max(1, (1 << 24) // c.v), chunking_method=None)
        return _two_streams(c, x, lambda h, w, t: torch.nn.functional.linear_cross_entropy(
            h, w, t, reduction="sum", ignore_index=IGNORE_INDEX, options=opts))

    return Provider("torch-lce-tuned", ("ce",), base.unavailable, build, quick=False)


def _cce() -> Provider:
    def unavailable(device):
        if importlib.util.find_spec("cut_cross_entropy") is None:
            return "cut-cross-entropy is not installed (pip install cut-cross-entropy)"
        return None

    def build(c, x, device):
        from cut_cross_entropy import linear_cross_entropy

        impl = "cce" if torch.device(device).type == "cuda" else "torch_compile"
        return _two_streams(c, x, lambda h, w, t: linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX,
                                                                       reduction="sum", impl=impl))

    # torch_compile (CPU) materializes the logits: float32 logits and gradient; cce (GPU) does not.
    def logit_bytes(c):
        return 0.0 if torch.cuda.is_available() else _itemsize(c) + 8

    return Provider("cce", ("ce",), unavailable, build, logit_bytes, quick=False)


def _liger() -> Provider:
    def unavailable(device):
        if torch.device(device).type != "cuda":
            return "Liger-Kernel runs Triton kernels on CUDA only"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
        return None

    def build(c, x, device):
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy, liger_fused_linear_jsd

        if c.op == "ce":
            return _two_streams(c, x, lambda h, w, t: liger_fused_linear_cross_entropy(
                h, w, t, ignore_index=IGNORE_INDEX, reduction="sum"))
        # jsd_beta = 0 is the forward KL(p_teacher || p_student), averaged over tokens.
        return lambda: liger_fused_linear_jsd(x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], jsd_beta=0.0)

    return Provider("liger", ("ce", "kl"), unavailable, build)


def registry() -> list[Provider]:
    """All providers, ours first (in the backend registry's order), then the baselines."""
    from surgery_kernels.backends import BACKENDS

    return [_ours(b) for b in BACKENDS] + [_naive(), _torch_lce(), _torch_lce_tuned(), _cce(), _liger()]


def by_name() -> dict[str, Provider]:
    return {p.name: p for p in registry()}


def run_once(fn: Callable[[], torch.Tensor], mode: str) -> torch.Tensor:
    """One measured call: the loss under no_grad (``fwd``), or loss and backward (``fwd+bwd``)."""
    if mode == "fwd":
        with torch.no_grad():
            return fn()
    loss = fn()
    loss.backward()
    return loss.detach()
