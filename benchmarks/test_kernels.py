"""pytest-benchmark suite over the same providers, cases and floor as ``python -m benchmarks run``.

    python -m pytest benchmarks/test_kernels.py --benchmark-columns=median,iqr,rounds \
        [--benchmark-json out.json]

The shape comes from the environment (defaults: the SmolLM2 head, N=1024, float32, CPU --
about a second per call on a 2-core CPU): ``BENCH_SHAPE`` (llama2-7b | llama3-8b | smollm2),
``BENCH_N``, ``BENCH_DTYPE`` (float32 | bfloat16), ``BENCH_DEVICE`` (cpu | cuda), ``BENCH_PROVIDERS``
(comma-separated names; default all, except on the CPU ``torch-lce`` and ``torch-lce-tuned``,
whose CPU calls take tens of seconds each on the 2-core VM — name them to include them). This suite
gives times only (in one process, so memory is not comparable across providers here); the
one command gives memory, ratios and the report.
"""

from __future__ import annotations

import os

import pytest
import torch

from .cases import MODES, OPS, case, make_inputs
from .providers import registry, run_once

pytest.importorskip("pytest_benchmark")

DEVICE = os.environ.get("BENCH_DEVICE", "cpu")
SHAPE = os.environ.get("BENCH_SHAPE", "smollm2")
N = int(os.environ.get("BENCH_N", "1024"))
DTYPE = os.environ.get("BENCH_DTYPE", "float32")
ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
PROVIDERS = [x for x in os.environ.get("BENCH_PROVIDERS", "").split(",") if x]

if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("BENCH_DEVICE=cuda but no CUDA device", allow_module_level=True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _params():
    out = []
    for p in registry():
        if PROVIDERS and p.name not in PROVIDERS:
            continue
        if not PROVIDERS and DEVICE == "cpu" and p.name.startswith("torch-lce"):
            continue
        for op in OPS:
            for mode in MODES:
                why = p.unavailable(DEVICE) if op in p.ops else f"{p.name} has no {op} op"
                marks = [pytest.mark.skip(reason=why)] if why else []
                out.append(pytest.param(p, op, mode, id=f"{op}-{mode}-{p.name}", marks=marks))
    return out


def _bench(benchmark, call, grads, info):
    def setup():
        for t in grads:
            t.grad = None

    def timed():
        call()
        _sync()

    benchmark.extra_info.update(info)
    benchmark.pedantic(timed, setup=setup, rounds=ROUNDS, warmup_rounds=1)


@pytest.mark.parametrize("prov,op,mode", _params())
def test_provider(benchmark, prov, op, mode):
    c = case(op, mode, SHAPE, N, DTYPE)
    x = make_inputs(c, DEVICE)
    fn = prov.build(c, x, DEVICE)
    _bench(benchmark, lambda: run_once(fn, mode), [x["hidden"], x["weight"]],
           dict(c.as_dict(), provider=prov.name, device=DEVICE))


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("mode", MODES)
def test_floor(benchmark, op, mode):
    """The bare GEMMs of the case into preallocated outputs (``benchmarks.worker.floor_fn``)."""
    from .worker import floor_fn

    c = case(op, mode, SHAPE, N, DTYPE)
    fn, _ = floor_fn(c, make_inputs(c, DEVICE), DEVICE)
    _bench(benchmark, fn, [], dict(c.as_dict(), provider="floor", device=DEVICE))
