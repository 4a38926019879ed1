"""Shared test setup.

- Fresh memory is poisoned: ``torch.empty`` (and ``empty_like``) return NaN-filled float tensors
  (and 0x7f.. patterns for integers) so an output a kernel forgot to write fails the test.
- ``BACKEND_CASES``: every (backend, device) pair that can run here. The numerics suite is
  parametrized over it, so a new backend is tested as soon as ``available_backends`` reports it.
- ``--runslow`` runs tests marked ``slow``; tests marked ``cuda`` skip without a GPU.
- Without a GPU, ``TRITON_INTERPRET=1`` is set, so the triton backend runs (slowly) on the CPU.
"""

from __future__ import annotations

import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Without a GPU the Triton kernels run under Triton's CPU interpreter (set before any kernel module
# is imported: triton.jit reads it when a kernel is defined), so the whole suite covers them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from surgery_kernels.backends import BACKENDS, availability  # noqa: E402

_real_empty, _real_empty_like = torch.empty, torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    # no_grad: torch.empty(..., requires_grad=True) makes a leaf that an in-place fill would refuse
    # (torch 2.11's checkpoint does this on CUDA)
    with torch.no_grad():
        if t.is_floating_point():
            t.fill_(float("nan"))
        elif t.dtype not in (torch.bool,) and not t.is_complex():
            t.fill_(torch.iinfo(t.dtype).max)
    return t


def _poisoned_empty(*args, **kwargs):
    return _poison(_real_empty(*args, **kwargs))


def _poisoned_empty_like(*args, **kwargs):
    return _poison(_real_empty_like(*args, **kwargs))


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch, request):
    if request.node.get_closest_marker("no_poison"):
        yield
        return
    monkeypatch.setattr(torch, "empty", _poisoned_empty)
    monkeypatch.setattr(torch, "empty_like", _poisoned_empty_like)
    yield


def _backend_cases():
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    cases = []
    for dev in devices:
        for name in BACKENDS:
            if availability(name, dev).ok:
                marks = [pytest.mark.cuda] if dev == "cuda" else []
                cases.append(pytest.param((name, dev), id=f"{name}-{dev}", marks=marks))
    return cases


BACKEND_CASES = _backend_cases()


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config, items):
    skip_slow = pytest.mark.skip(reason="slow: pass --runslow")
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "slow" in item.keywords and not config.getoption("--runslow"):
            item.add_marker(skip_slow)
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)


class RecordCreated(TorchDispatchMode):
    """Records every tensor an aten op returns while active, as (numel, bytes, op name): the
    structural tests use it to show that no [tokens x vocab] tensor is ever created."""

    def __init__(self, storage: bool = False):
        super().__init__()
        # storage=True: entries get a 4th field, whether the tensor has new memory (not a view or
        # the in-place result of one of the op's inputs).
        self.storage = storage
        self.created: list[tuple] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.storage:
            seen = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                entry = (t.numel(), t.numel() * t.element_size(), str(func))
                if self.storage:
                    entry += (t.untyped_storage().data_ptr() not in seen,)
                self.created.append(entry)
        return out

    def largest(self) -> tuple[int, str]:
        """(element count, op) of the largest tensor created."""
        numel, _, name = max(self.created)
        return numel, name

    def largest_bytes(self) -> tuple[int, str]:
        nbytes, name = max((b, n) for _, b, n in self.created)
        return nbytes, name
