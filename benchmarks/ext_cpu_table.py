"""Forward+backward time and peak memory of the ``cpu`` extension backend against its baselines.

    python benchmarks/ext_cpu_table.py                       # signed CE and forward KL, N=4096 H=576 V=49152
    python benchmarks/ext_cpu_table.py --loss ce --repeats 3 --n 1024

Providers, all doing one forward + backward (gradients of hidden and weight) in float32:
- ``cpu``: surgery_kernels backend="cpu" (the C++ extension);
- ``torch``: surgery_kernels backend="torch" (chunked PyTorch);
- ``naive``: materialized logits (surgery_kernels.reference, i.e. F.cross_entropy / log_softmax);
- ``torch-lce``: torch.nn.functional.linear_cross_entropy with LinearCrossEntropyOptions() (CE only;
  it has no per-token weights, so it computes the unsigned mean CE: the same GEMMs and row work);
- ``floor``: the bare GEMMs the loss needs, nothing else (CE: 3, KL: 4 -- the reference logits too).

Time: median of ``--repeats`` runs after one warm-up, providers interleaved round by round so a
noisy (shared) machine slows them alike. Memory: peak RSS growth of one forward+backward in a fresh
subprocess per provider (after a small warm-up call that loads libraries), which includes the
gradients themselves (dweight is V x H float32 for everyone).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from surgery_kernels import linear_cross_entropy, linear_kl_div  # noqa: E402
from surgery_kernels.reference import linear_cross_entropy_ref, linear_kl_div_ref  # noqa: E402

CE_PROVIDERS = ("cpu", "torch", "naive", "torch-lce", "floor")
KL_PROVIDERS = ("cpu", "torch", "naive", "floor")


def make_inputs(loss, n, h, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = {"hidden": torch.randn(n, h, generator=g), "weight": torch.randn(v, h, generator=g) / h**0.5}
    if loss == "ce":
        x["target"] = torch.randint(0, v, (n,), generator=g)
        # signed per-token weights: a mix of ascent (negative) and descent tokens, as in LLM Surgery
        x["token_weight"] = torch.where(torch.rand(n, generator=g) < 0.25, -0.1, 1.0)
    else:
        x["ref_hidden"] = torch.randn(n, h, generator=g)
        x["ref_weight"] = x["weight"] + 0.01 * torch.randn(v, h, generator=g) / h**0.5
    return x


def step_fn(loss, provider, x):
    """A closure doing one forward + backward; returns nothing."""
    hidden = x["hidden"].clone().requires_grad_()
    weight = x["weight"].clone().requires_grad_()
    params = [hidden, weight]
    if provider == "floor":
        n, v = hidden.shape[0], weight.shape[0]
        g = torch.randn(n, v) * 1e-3  # stands for the logit gradient; allocated outside the timing
        h_, w_ = x["hidden"], x["weight"]
        if loss == "ce":
            def run():
                torch.mm(h_, w_.t())
                torch.mm(g, w_)
                torch.mm(g.t(), h_)
        else:
            rh, rw = x["ref_hidden"], x["ref_weight"]

            def run():
                torch.mm(h_, w_.t())
                torch.mm(rh, rw.t())
                torch.mm(g, w_)
                torch.mm(g.t(), h_)
        return run
    if loss == "ce":
        t, tw = x["target"], x["token_weight"]
        if provider in ("cpu", "torch"):
            def fwd():
                return linear_cross_entropy(hidden, weight, t, token_weight=tw, backend=provider)
        elif provider == "naive":
            def fwd():
                return linear_cross_entropy_ref(hidden, weight, t, token_weight=tw)
        elif provider == "torch-lce":
            opts = torch.nn.LinearCrossEntropyOptions()

            def fwd():
                return torch.nn.functional.linear_cross_entropy(hidden, weight, t, options=opts)
        else:
            raise ValueError(provider)
    else:
        rh, rw = x["ref_hidden"], x["ref_weight"]
        if provider in ("cpu", "torch"):
            def fwd():
                return linear_kl_div(hidden, weight, rh, rw, backend=provider)
        elif provider == "naive":
            def fwd():
                return linear_kl_div_ref(hidden, weight, rh, rw)
        else:
            raise ValueError(provider)

    def run():
        torch.autograd.grad(fwd(), params)
    return run


def _status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_child(loss, provider, n, h, v):
    """In a fresh process: peak RSS growth (MiB) of one forward+backward."""
    step_fn(loss, provider, make_inputs(loss, 64, h, 512))()  # load libraries, warm allocators
    x = make_inputs(loss, n, h, v)
    run = step_fn(loss, provider, x)
    # Reset the peak-RSS mark (VmHWM) to the current RSS, then read it after the step.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    run()
    return _status_mib("VmHWM") - before


def measure_memory(loss, provider, n, h, v):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-child", loss, provider, str(n), str(h), str(v)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        return float("nan"), out.stderr.strip().splitlines()[-1] if out.stderr else "failed"
    return float(out.stdout.strip().splitlines()[-1]), ""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--loss", choices=["ce", "kl", "both"], default="both")
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--h", type=int, default=576)
    ap.add_argument("--v", type=int, default=49152)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--providers", default=None, help="comma-separated subset")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("--memory-child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        loss, provider, n, h, v = args.memory_child
        print(memory_child(loss, provider, int(n), int(h), int(v)))
        return

    losses = ["ce", "kl"] if args.loss == "both" else [args.loss]
    print(f"# machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads; N={args.n} H={args.h} V={args.v} float32, "
          f"forward+backward, median of {args.repeats}")
    rows = []
    for loss in losses:
        providers = CE_PROVIDERS if loss == "ce" else KL_PROVIDERS
        if args.providers:
            providers = [p for p in providers if p in args.providers.split(",")]
        x = make_inputs(loss, args.n, args.h, args.v)
        runs = {p: step_fn(loss, p, x) for p in providers}
        for p in providers:
            runs[p]()  # warm-up (and the extension build, if needed)
        times = {p: [] for p in providers}
        for _ in range(args.repeats):
            for p in providers:
                t0 = time.perf_counter()
                runs[p]()
                times[p].append(time.perf_counter() - t0)
        del runs
        med = {p: statistics.median(ts) for p, ts in times.items()}
        mem = {}
        if not args.no_memory:
            for p in providers:
                mem[p], err = measure_memory(loss, p, args.n, args.h, args.v)
                if err:
                    print(f"# memory of {loss}/{p} not measured: {err}", file=sys.stderr)
        print(f"\n{loss.upper()}  {'provider':10s} {'median s':>9s} {'min s':>7s} {'x floor':>8s} {'x naive':>8s} "
              f"{'x lce':>7s} {'peak MiB':>9s} {'mem/naive':>9s}")
        for p in providers:
            r = dict(loss=loss, provider=p, n=args.n, h=args.h, v=args.v, median_s=med[p], min_s=min(times[p]),
                     times_s=times[p], peak_mib=mem.get(p))
            rows.append(r)
            xf = med[p] / med["floor"] if "floor" in med else float("nan")
            xn = med[p] / med["naive"] if "naive" in med else float("nan")
            xl = med[p] / med["torch-lce"] if "torch-lce" in med else float("nan")
            mm = mem.get(p, float("nan"))
            mn = mm / mem["naive"] if mem.get("naive") else float("nan")
            print(f"    {p:10s} {med[p]:9.3f} {min(times[p]):7.3f} {xf:8.2f} {xn:8.2f} {xl:7.2f} {mm:9.0f} "
                  f"{mn:9.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
