"""The measuring process: ``python -m benchmarks.worker SPEC.json OUT.jsonl``.

The spec gives the device, the settings and a list of tasks; one JSON line per task is appended
to OUT (flushed at once, so a crash keeps what was measured). On the CPU the runner starts one
worker per task (memory is measured as the RSS growth of a fresh process); on CUDA one worker
runs all tasks (memory comes from the caching allocator's counters).

Tasks:
- ``{"kind": "provider", "case": {...}, "provider": name}``: time and memory of one provider.
- ``{"kind": "gemm", "case": {...}}``: the floor's GEMMs at the case's (N, H, V, dtype), each
  timed alone into preallocated outputs: ``logits = hidden @ weight.T``,
  ``dhidden = dlogits @ weight``, ``dweight = dlogits.T @ hidden`` (dlogits random).
"""

from __future__ import annotations

import gc
import json
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


def _sync(device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def provider_task(c: Case, name: str, device: str, repeats: int, max_call_s: float | None = None) -> dict:
    prov = by_name()[name]
    # Prime at a small N: kernels loaded, torch.compile and autotuning done before measuring.
    small = make_inputs(c, device, n=min(PRIME_N, c.n))
    run_once(prov.build(c, small, device), c.mode)
    del small
    x = make_inputs(c, device)
    fn = prov.build(c, x, device)
    gc.collect()
    res: dict = {}
    if device.startswith("cuda"):
        # Warm-up at full size (autotuning may key on N), then one call for the memory peak.
        run_once(fn, c.mode)
        _clear_grads(x)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = run_once(fn, c.mode)
        torch.cuda.synchronize()
        res["peak_mib"] = (torch.cuda.max_memory_allocated() - base) / measure.MIB
        res["mem_method"] = "cuda max_memory_allocated growth"
        med, p20, p80 = measure.time_cuda(lambda: run_once(fn, c.mode), [x["hidden"], x["weight"]])
        res.update(median_ms=med, p20_ms=p20, p80_ms=p80, runs=None)
    else:
        base = measure.rss_bytes()
        exact = measure.reset_peak_rss()
        t0 = time.perf_counter()
        loss = run_once(fn, c.mode)
        res["first_call_ms"] = (time.perf_counter() - t0) * 1e3
        res["peak_mib"] = max(measure.peak_rss_bytes() - base, 0) / measure.MIB
        res["mem_method"] = "RSS growth, fresh process" + ("" if exact else " (VmHWM not resettable: upper bound)")
        if max_call_s is not None and res["first_call_ms"] > max_call_s * 1e3:
            # Too slow to repeat within the run's time: report the one (cold) call, flagged.
            repeats = 0
            res["reason"] = f"1 cold call only (it took over --max-call-s {max_call_s:g} s)"
        times = measure.time_cpu(lambda: run_once(fn, c.mode), lambda: _clear_grads(x), repeats) or [
            res["first_call_ms"]]
        med, p20, p80 = measure.quantiles(times)
        res.update(median_ms=med, p20_ms=p20, p80_ms=p80, runs=repeats, samples_ms=times)
    res["value"] = float(loss)
    return res


def gemm_task(c: Case, device: str, repeats: int) -> dict:
    x = make_inputs(c, device)
    h, w = x["hidden"].detach(), x["weight"].detach()
    del x
    g = torch.Generator(device=device).manual_seed(7)
    dz = torch.randn(c.n, c.v, generator=g, device=device).to(h.dtype)
    z = torch.empty_like(dz)
    dh, dw = torch.empty_like(h), torch.empty_like(w)
    parts = {
        "logits": lambda: torch.mm(h, w.t(), out=z),
        "dhidden": lambda: torch.mm(dz, w, out=dh),
        "dweight": lambda: torch.mm(dz.t(), h, out=dw),
    }
    res = {}
    for part, fn in parts.items():
        fn()
        if device.startswith("cuda"):
            med, p20, p80 = measure.time_cuda(fn, [])
        else:
            med, p20, p80 = measure.quantiles(measure.time_cpu(fn, lambda: None, repeats))
        res[part] = {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    res["runs"] = None if device.startswith("cuda") else repeats
    return res


def main(spec_path: str, out_path: str) -> int:
    with open(spec_path) as f:
        spec = json.load(f)
    device, repeats, deadline = spec["device"], spec["repeats"], spec.get("deadline")
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    for task in spec["tasks"]:
        c = Case(**task["case"])
        row = {"task": task, "load1": measure.load_average()}
        if deadline is not None and time.time() > deadline:
            row.update(status="skipped", reason="time limit of the run reached")
        else:
            try:
                if task["kind"] == "gemm":
                    row.update(gemm_task(c, device, repeats), status="ok")
                else:
                    row.update(provider_task(c, task["provider"], device, repeats, spec.get("max_call_s")),
                               status="ok")
            except Exception as exc:  # record why, keep measuring the others
                row.update(status="failed", reason=f"{type(exc).__name__}: {str(exc)[:300]}")
                traceback.print_exc()
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
        with open(out_path, "a") as f:
            f.write(json.dumps(row) + "\n")
        gc.collect()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
