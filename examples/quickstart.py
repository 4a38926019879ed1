"""Both losses on a SmolLM2-sized head (H=576, V=49152), ours against the naive computation:
values, time and peak memory growth. Each measurement runs in a fresh process so that its peak
resident memory is its own.

    python examples/quickstart.py [--tokens 2048] [--backend auto]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import queue
import resource
import sys
import time

import torch

import surgery_kernels as sk
from surgery_kernels.backends import resolve
from surgery_kernels.reference import linear_cross_entropy_ref, linear_kl_div_ref


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _case(args, provider: str, op: str, q):
    torch.manual_seed(0)
    n, h, v = args.tokens, 576, 49152
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h**0.5).requires_grad_()
    target = torch.randint(0, v, (n,))
    sign = torch.where(torch.arange(n) < n // 4, -1.0, 1.0)  # a quarter of the tokens unlearned
    ref_h, ref_w = torch.randn(n, h), torch.randn(v, h) / h**0.5
    if provider != "naive":
        # Load the backend (the C++ extension's first import or build) outside the timed region.
        sk.linear_cross_entropy(torch.randn(2, 8), torch.randn(16, 8), torch.zeros(2, dtype=torch.long),
                                backend=args.backend)
    before = _rss_mib()
    t0 = time.perf_counter()
    if op == "signed CE":
        if provider == "naive":
            loss = linear_cross_entropy_ref(hidden, weight, target, token_weight=sign)
        else:
            loss = sk.linear_cross_entropy(hidden, weight, target, token_weight=sign, backend=args.backend)
    else:
        if provider == "naive":
            loss = linear_kl_div_ref(hidden, weight, ref_h, ref_w)
        else:
            loss = sk.linear_kl_div(hidden, weight, ref_h, ref_w, backend=args.backend)
    loss.backward()
    dt = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB on Linux
    q.put((loss.item(), dt, peak - before))


def measure(args, provider: str, op: str) -> tuple[float, float, float]:
    """(value, seconds, peak MiB) of one case, in a fresh process; RuntimeError if that process
    dies without a result (an exception, printed by the child, or a kill for memory)."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=_case, args=(args, provider, op, q))
    proc.start()
    try:
        while True:
            try:
                return q.get(timeout=1.0)
            except queue.Empty:
                if not proc.is_alive():
                    try:  # a result sent just before the child exited
                        return q.get(timeout=1.0)
                    except queue.Empty:
                        raise RuntimeError(f"{op} / {provider}: the measuring process ended without a result "
                                           f"(exit code {proc.exitcode})") from None
    finally:
        proc.join()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--backend", default="auto")
    args = p.parse_args()
    if args.tokens < 1:
        p.error(f"--tokens must be a positive int, got {args.tokens}")
    try:
        resolve(args.backend, "cpu")
    except ValueError as exc:
        p.error(f"--backend: {exc}")
    print(f"N={args.tokens} tokens, H=576, V=49152, float32, forward+backward on the CPU")
    print(f"backends here: {sk.available_backends('cpu')}")
    print(f"{'loss':10} {'provider':14} {'value':>10} {'time s':>8} {'peak MiB':>9}")
    for op in ["signed CE", "KL"]:
        for provider in ["naive", f"ours ({args.backend})"]:
            try:
                value, dt, mib = measure(args, "naive" if provider == "naive" else "ours", op)
            except RuntimeError as exc:
                sys.exit(f"quickstart: {exc}")
            print(f"{op:10} {provider:14} {value:10.5f} {dt:8.2f} {mib:9.0f}")


if __name__ == "__main__":
    main()
