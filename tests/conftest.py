"""Shared test setup.

- Fresh memory is poisoned: ``torch.empty`` (and ``empty_like``) return NaN-filled float tensors
  (and 0x7f.. patterns for integers) so an output a kernel forgot to write fails the test.
- ``BACKEND_CASES``: every (backend, device) pair that can run here. The numerics suite is
  parametrized over it, so a new backend is tested as soon as ``available_backends`` reports it.
- ``--runslow`` runs tests marked ``slow``; tests marked ``cuda`` skip without a GPU.
- ``RecordCreated`` / ``RecordSyncs``: the tensors a call creates / the ops it runs that would make
  the host wait for a GPU; ``loss_calls``: forward+backward of every option of a loss, for the latter.
- Without a GPU, ``TRITON_INTERPRET=1`` is set, so the triton backend runs (slowly) on the CPU.
"""

from __future__ import annotations

import os
import traceback

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

# Without a GPU the Triton kernels run under Triton's CPU interpreter (set before any kernel module
# is imported: triton.jit reads it when a kernel is defined), so the whole suite covers them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import surgery_kernels as sk  # noqa: E402
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


try:  # torch's private table of custom ops: RecordSyncs fails by name without it, not the whole suite
    from torch._library.custom_ops import OPDEFS
except ImportError:
    OPDEFS = {}

_aten = torch.ops.aten
# Ops that make the host wait for the device when their tensors are on a GPU: a value read on the
# host (.item(), float(t), bool(t), int(t): _local_scalar_dense), or an output whose size depends
# on the values (nonzero and what is built on it).
_SYNCING = {_aten._local_scalar_dense.default, _aten.item.default, _aten.nonzero.default, _aten.nonzero_numpy.default,
            _aten.argwhere.default, _aten.is_nonzero.default, _aten.equal.default, _aten.masked_select.default,
            _aten._unique2.default, _aten.unique_dim.default, _aten.unique_consecutive.default,
            _aten.bincount.default}
_INDEXING = (_aten.index, _aten.index_put, _aten.index_put_, _aten._index_put_impl_)


class RecordSyncs(TorchDispatchMode):
    """Records the aten ops that would synchronize the host with a GPU, as (op, innermost project
    frame): the ops above, ``repeat_interleave`` without ``output_size``, and indexing by a boolean
    mask (``x[mask]``, ``x[mask] = v``, and the backward of the first), which finds the positions
    with a nonzero. On CPU tensors too, so that a machine without a GPU catches what would stall
    one. The Python body of a ``torch.library.custom_op`` (the torch and triton backends' primitives
    under torch.compile, the triton ones always) is run and recorded too: as an op it would hide the
    ops it calls. Not seen: host reads that dispatch no op on a CPU tensor (``.tolist()``,
    ``.numpy()``). ``outside``: packages (``"transformers"``) whose own ops are not recorded (the
    innermost frame outside torch is theirs)."""

    def __init__(self, outside: tuple[str, ...] = ()):
        super().__init__()
        self.outside = outside
        self.syncs: list[tuple[str, str]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace.startswith("surgery_"):
            # torch's record of the custom ops: a private table, so fail rather than see nothing
            body = getattr(OPDEFS.get(func._schema.name), "_init_fn", None)
            assert body is not None, f"cannot find the Python function of {func} to record inside it"
            with self:
                return body(*args, **kwargs)
        syncing = func in _SYNCING or (func is _aten.repeat_interleave.Tensor and kwargs.get("output_size") is None)
        if func.overloadpacket in _INDEXING:
            index = args[1] if len(args) > 1 else kwargs.get("indices")
            syncing = syncing or any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8)
                                     for t in tree_leaves(index))
        if syncing:
            stack = traceback.extract_stack()
            if not _issued_by(stack, self.outside):
                self.syncs.append((str(func), _project_frame(stack)))
        return func(*args, **kwargs)


_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))


def _issued_by(stack, packages) -> bool:
    """Whether the innermost frame of ``stack`` outside torch is in one of ``packages``."""
    for frame in reversed(stack):
        path = os.path.abspath(frame.filename)
        if not path.startswith(_TORCH_DIR) and path != os.path.abspath(__file__):
            return any(f"{os.sep}{p}{os.sep}" in path for p in packages)
    return False


def _project_frame(stack) -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for frame in reversed(stack):
        path = os.path.abspath(frame.filename)
        if path.startswith(root) and not path.startswith(os.path.join(root, "tests")):
            return f"{os.path.relpath(path, root)}:{frame.lineno}"
    return "?"


@pytest.fixture
def target_check_as_on_cuda(monkeypatch):
    """``checks.target_range`` takes its CUDA branch (a device-side assertion) on CPU tensors too:
    on the CPU it reads the targets on the host by design (an eager ValueError), which the
    host-synchronization tests would otherwise report."""
    from surgery_kernels import checks

    real = checks.target_range

    def as_on_cuda(*args, **kwargs):
        # the branch it takes while compiled is the CUDA one
        with monkeypatch.context() as m:
            m.setattr(torch.compiler, "is_compiling", lambda: True)
            return real(*args, **kwargs)

    monkeypatch.setattr(checks, "target_range", as_on_cuda)


# Per loss, the options whose Python paths differ (each with every reduction and dtype).
SYNC_OPTIONS = {
    "ce": [{}, dict(bias=True), dict(token_weight=True), dict(token_weight=True, ascent_cap=1.0),
           dict(softcap=5.0), dict(return_values=True)],
    "kl": [{}, dict(bias=True), dict(mask=True, token_weight=True), dict(direction="reverse"),
           dict(softcap=5.0, ref_softcap=4.0, temperature=2.0), dict(direction="reverse", return_values=True)],
}


def loss_calls(op: str, backend: str, device: str, dtype: torch.dtype, reduction: str, n: int = 7, h: int = 16,
               v: int = 40) -> list:
    """One closure per ``SYNC_OPTIONS[op]``: forward and backward of ``op`` ("ce" | "kl") on inputs
    built here, on ``device`` (so that calling them copies nothing from the host). A mean/sum loss
    gets an upstream gradient of 2.5 (the backward scales), "none" a per-token one."""
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False, dt=dtype):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dt).requires_grad_(grad)

    calls = []
    for opts in SYNC_OPTIONS[op]:
        opts = dict(opts)
        kw = dict(backend=backend, reduction=reduction, **opts)
        if kw.pop("bias", False):
            kw["bias"] = rand(v, grad=True)
        if kw.pop("token_weight", False):
            kw["token_weight"] = rand(n, grad=True, dt=torch.float32)
        args = [rand(n, h, grad=True), rand(v, h, grad=True)]
        if op == "ce":
            target = torch.randint(0, v, (n,), generator=g)
            target[1] = -100
            args.append(target.to(device))
            fn = sk.linear_cross_entropy
        else:
            args += [rand(n, h), rand(v, h)]
            if kw.pop("mask", False):
                kw["mask"] = (torch.arange(n) % 3 != 1).to(device)
            fn = sk.linear_kl_div
        upstream = rand(n, dt=torch.float32) if reduction == "none" else torch.tensor(2.5, device=device)

        def call(fn=fn, args=args, kw=kw, upstream=upstream):
            out = fn(*args, **kw)
            loss = out[0] if kw.get("return_values") else out
            loss.backward(upstream)
        calls.append(call)
    return calls


def assert_no_host_sync(calls, device: str) -> None:
    """Runs ``calls`` under ``RecordSyncs`` (on CUDA also under ``torch.cuda.set_sync_debug_mode
    ("error")``, which catches copies to and from the host as well) and fails naming every op that
    would make the host wait for the device, and the line that issued it."""
    with RecordSyncs() as rec:
        if device == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            for call in calls:
                call()
        finally:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert rec.syncs == [], "host synchronizations: " + "; ".join(f"{op} at {where}" for op, where in rec.syncs)
