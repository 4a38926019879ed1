"""How things are measured.

CPU
- Time: wall clock (``time.perf_counter``) of ``repeats`` calls after a warm-up call; the median
  and the 20th/80th percentiles are reported. Gradients are set to None before every call
  (outside the timed region), as ``optimizer.zero_grad(set_to_none=True)`` does, so every call
  allocates its gradients the way a training step would.
- Peak memory: the growth of the resident set size over what the process holds once the inputs
  exist, in a *fresh process per case*. Every provider first runs once at a small N (kernels
  loaded, ``torch.compile`` done). Then, per provider: free the previous one's gradients,
  ``malloc_trim``, read VmRSS, reset the kernel's high-water mark
  (``echo 5 > /proc/self/clear_refs``), run one full call (also the warm-up), read VmHWM.
  Growth = VmHWM - VmRSS before the call: it counts the gradients and everything the call
  allocated and touched at its peak. Large blocks (>= 32 MiB: logits, chunks, gradients) are
  mmapped and go back to the system when freed, the heap is trimmed, so what one provider freed
  does not hide another's allocations.
- Providers are timed in rounds, each provider once per round in a rotating order: on a shared
  machine a change of load then slows all providers alike instead of whichever ran last.

CUDA
- Time: ``triton.testing.do_bench`` (CUDA events, L2 flushed between calls, gradients reset
  by ``grad_to_none``) after a warm-up call; median and 20th/80th percentiles.
- Peak memory: ``torch.cuda.max_memory_allocated()`` growth over ``memory_allocated()`` with
  the inputs alive, for one call after the warm-up (autotuning is over by then).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Callable

MIB = 1 << 20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return the C heap's free memory to the system (glibc ``malloc_trim``), so a provider's
    RSS baseline does not include what an earlier one freed but the allocator kept."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_rss_bytes() -> int:
    return _status_kib("VmHWM") * 1024


def quantiles(samples_ms: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of the samples, linear interpolation between order statistics."""
    s = sorted(samples_ms)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def time_cpu(call: Callable[[], object], reset: Callable[[], None], repeats: int) -> list[float]:
    """Milliseconds of ``repeats`` calls, ``reset()`` run untimed before each."""
    out = []
    for _ in range(repeats):
        reset()
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def time_cuda(call: Callable[[], object], grads: list, repeats: int | None = None) -> tuple[float, float, float]:
    """(median, p20, p80) ms of ``call`` on the GPU by ``triton.testing.do_bench``; CUDA events
    after a warm-up where triton is missing. The measuring window is at least 20 calls long, so
    slow calls still give percentiles (do_bench's default 100 ms would be one 150 ms call)."""
    est = _event_ms(call, grads)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        med, p20, p80 = do_bench(call, warmup=max(25, 3 * est), rep=max(100, 20 * est), grad_to_none=grads,
                                 quantiles=[0.5, 0.2, 0.8])
        return float(med), float(p20), float(p80)
    return quantiles([_event_ms(call, grads) for _ in range(repeats or 20)])


def _event_ms(call: Callable[[], object], grads: list) -> float:
    """One call timed by CUDA events, gradients of ``grads`` cleared first."""
    import torch

    for g in grads:
        g.grad = None
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def load_average() -> float:
    return round(os.getloadavg()[0], 2)
