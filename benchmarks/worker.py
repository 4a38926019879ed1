"""The measuring process: ``python -m benchmarks.worker SPEC.json OUT.jsonl``.

The spec gives the device, the settings and a list of cases, each with the providers to measure.
One JSON line per (case, provider) -- the floor included -- is appended to OUT at once, so a
crash keeps what was measured. The runner starts one worker per case on the CPU (a fresh process
per case) and one for everything on CUDA.

Per case, all providers share one set of inputs. The floor is the bare GEMMs of the case into
preallocated outputs: ``logits = hidden @ weight.T`` (twice for the KL: the reference's too) and,
for fwd+bwd, ``dhidden = dlogits @ weight`` and ``dweight = dlogits.T @ hidden``.

CPU: every provider is first run at N = 64 (kernels loaded, compilation done). Then one full
call per provider measures its memory: ``malloc_trim`` and VmRSS before, VmHWM reset, the call,
VmHWM after (see ``benchmarks.measure``); this call is also the warm-up. Then ``repeats`` rounds
time every provider once each, in a rotating order, so a load change on the shared machine
hits all providers alike.

CUDA: providers one after the other: a warm-up call, a call for ``max_memory_allocated``
growth, then ``triton.testing.do_bench``.
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch

from . import measure
from .cases import Case, make_inputs
from .providers import by_name, run_once

PRIME_N = 64


def _clear_grads(x: dict):
    for k in ("hidden", "weight"):
        x[k].grad = None


def floor_fn(c: Case, x: dict, device: str):
    """(function running the case's bare GEMMs, description)."""
    h, w = x["hidden"].detach(), x["weight"].detach()
    g = torch.Generator(device=device).manual_seed(7)
    dz = torch.randn(c.n, c.v, generator=g, device=device).to(h.dtype) if c.mode == "fwd+bwd" else None
    z = torch.empty(c.n, c.v, dtype=h.dtype, device=device)
    dh, dw = torch.empty_like(h), torch.empty_like(w)
    parts = ["logits"] + (["logits (reference)"] if c.op == "kl" else []) + (
        ["dhidden", "dweight"] if c.mode == "fwd+bwd" else [])

    def fn():
        torch.mm(h, w.t(), out=z)
        if c.op == "kl":
            torch.mm(h, w.t(), out=z)
        if dz is not None:
            torch.mm(dz, w, out=dh)
            torch.mm(dz.t(), h, out=dw)
        return z

    return fn, "bare GEMMs: " + " + ".join(parts)


def _call(fns: dict, name: str, mode: str):
    """One call of provider ``name`` (the floor has no autograd)."""
    return fns[name]() if name == "floor" else run_once(fns[name], mode)


def case_cpu(c: Case, names: list[str], device: str, repeats: int, max_call_s: float | None, emit) -> None:
    provs = by_name()
    live = []
    for name in names:
        try:
            small = make_inputs(c, device, n=min(PRIME_N, c.n))
            run_once(provs[name].build(c, small, device), c.mode)
            live.append(name)
        except Exception as exc:
            traceback.print_exc()
            emit(name, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
    x = make_inputs(c, device)
    fns = {name: provs[name].build(c, x, device) for name in live}
    fns["floor"], floor_note = floor_fn(c, x, device)
    order = ["floor"] + live
    res = {name: {} for name in order}
    for name in list(order):
        _clear_grads(x)
        gc.collect()
        measure.trim_heap()
        base = measure.rss_bytes()
        exact = measure.reset_peak_rss()
        try:
            t0 = time.perf_counter()
            out = _call(fns, name, c.mode)
            first = (time.perf_counter() - t0) * 1e3
        except Exception as exc:
            traceback.print_exc()
            emit(name, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            order.remove(name)
            continue
        r = res[name]
        r.update(first_call_ms=first, samples_ms=[])
        if name != "floor":
            r["peak_mib"] = max(measure.peak_rss_bytes() - base, 0) / measure.MIB
            r["mem_method"] = "RSS growth" + ("" if exact else " (VmHWM not resettable: upper bound)")
            r["value"] = float(out)
        else:
            r["reason"] = floor_note
        if max_call_s is not None and first > max_call_s * 1e3:
            r["reason"] = f"1 cold call only (it took over --max-call-s {max_call_s:g} s)"
    timed = [n for n in order if not res[n].get("reason", "").startswith("1 cold call")]
    for k in range(repeats if timed else 0):
        rotated = timed[k % len(timed):] + timed[:k % len(timed)]
        for name in rotated:
            _clear_grads(x)
            t0 = time.perf_counter()
            _call(fns, name, c.mode)
            res[name]["samples_ms"].append((time.perf_counter() - t0) * 1e3)
    for name in order:
        r = res[name]
        samples = r["samples_ms"] or [r["first_call_ms"]]
        med, p20, p80 = measure.quantiles(samples)
        emit(name, status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, runs=len(r["samples_ms"]) or 1,
             **{k: v for k, v in r.items() if k != "samples_ms"}, samples_ms=samples)


# Errors after which the CUDA context may be unusable (every later call in the process fails).
_STICKY = ("CUDA error", "device-side assert", "illegal memory access", "unspecified launch failure",
           "misaligned address", "illegal instruction")


def poisons_context(exc: BaseException, device: str | None = None) -> bool:
    """Whether ``exc`` left the CUDA context broken: an error of the kinds above (out of memory is
    not one) after which a tiny kernel on ``device`` fails too (a cuBLAS "not supported" is a
    CUDA error the context survives). Without ``device``, by the message alone."""
    if isinstance(exc, torch.cuda.OutOfMemoryError) or not any(m in str(exc) for m in _STICKY):
        return False
    if device is None:
        return True
    try:
        torch.cuda.synchronize()
        torch.ones(1, device=device).add_(1).item()
        return False
    except Exception:
        return True


def case_cuda(c: Case, names: list[str], device: str, emit) -> None:
    provs = by_name()
    for name in ["floor"] + names:
        try:
            x = make_inputs(c, device)
            if name == "floor":
                fn, note = floor_fn(c, x, device)
                fn()
                med, p20, p80 = measure.time_cuda(fn, [])
                emit(name, status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, reason=note)
                continue
            small = make_inputs(c, device, n=min(PRIME_N, c.n))
            run_once(provs[name].build(c, small, device), c.mode)
            del small
            fn = provs[name].build(c, x, device)
            # Warm-up at full size (autotuning may key on N), then one call for the memory peak.
            run_once(fn, c.mode)
            _clear_grads(x)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            loss = run_once(fn, c.mode)
            torch.cuda.synchronize()
            peak = (torch.cuda.max_memory_allocated() - base) / measure.MIB
            med, p20, p80 = measure.time_cuda(lambda: run_once(fn, c.mode), [x["hidden"], x["weight"]])
            emit(name, status="ok", median_ms=med, p20_ms=p20, p80_ms=p80, peak_mib=peak, value=float(loss),
                 mem_method="cuda max_memory_allocated growth")
        except Exception as exc:  # out of memory included: record why, go on
            traceback.print_exc()
            emit(name, status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
            if poisons_context(exc, device):
                # Leave: the runner records this case's other providers as failed and starts a
                # fresh worker (a fresh context) for the cases after it.
                sys.stderr.flush()
                os._exit(3)
        finally:
            x = fn = None
            gc.collect()
            torch.cuda.empty_cache()


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    device, repeats, deadline = spec["device"], spec["repeats"], spec.get("deadline")
    for task in spec["tasks"]:
        c = Case(**task["case"])

        def emit(provider, **row):
            row.update(case=task["case"], provider=provider, load1=measure.load_average())
            with open(out_path, "a") as f:
                f.write(json.dumps(row) + "\n")

        if deadline is not None and time.time() > deadline:
            for name in ["floor"] + task["providers"]:
                emit(name, status="skipped", reason="time limit of the run reached")
            continue
        if device.startswith("cuda"):
            case_cuda(c, task["providers"], device, emit)
        else:
            case_cpu(c, task["providers"], device, repeats, spec.get("max_call_s"), emit)
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
