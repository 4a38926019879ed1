"""pytest-benchmark suite over the same providers, cases and floor as ``python -m benchmarks run``.

    python -m pytest benchmarks/test_kernels.py --benchmark-columns=median,iqr,rounds \
        [--benchmark-json out.json]

The shape comes from the environment (defaults: the SmolLM2 head, N=1024, float32, CPU --
about a second per call on a 2-core CPU): ``BENCH_SHAPE`` (llama2-7b | llama3-8b | smollm2),
``BENCH_N``, ``BENCH_DTYPE`` (float32 | bfloat16), ``BENCH_DEVICE`` (cpu | cuda). This suite
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

if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("BENCH_DEVICE=cuda but no CUDA device", allow_module_level=True)


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _params():
    out = []
    for p in registry():
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
    """The bare GEMMs of the case into preallocated outputs (see benchmarks.worker.gemm_task)."""
    c = case(op, mode, SHAPE, N, DTYPE)
    x = make_inputs(c, DEVICE)
    h, w = x["hidden"].detach(), x["weight"].detach()
    dz = torch.randn(c.n, c.v, device=DEVICE).to(h.dtype)
    z, dh, dw = torch.empty_like(dz), torch.empty_like(h), torch.empty_like(w)

    def gemms():
        torch.mm(h, w.t(), out=z)
        if op == "kl":
            torch.mm(h, w.t(), out=z)
        if mode == "fwd+bwd":
            torch.mm(dz, w, out=dh)
            torch.mm(dz.t(), h, out=dw)

    _bench(benchmark, gemms, [], dict(c.as_dict(), provider="floor", device=DEVICE))
