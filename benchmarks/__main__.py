"""``python -m benchmarks run ...`` / ``python -m benchmarks report DIR``; see ``--help``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cases import PRESETS


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure and write results.json, results.csv, report.md, plots")
    r.add_argument("--output", required=True, help="directory for the results")
    r.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true",
                   help="the quick preset: CE and KL fwd+bwd, SmolLM2 head, N=4096, float32 (<= 5 min on 2 cores)")
    g.add_argument("--gpu-check", action="store_true",
                   help="the table benchmarks/gpu_check.sh runs on a GPU (~3 min on an H100)")
    g.add_argument("--preset", choices=sorted(PRESETS), help="default: cpu, or gpu with --device cuda")
    r.add_argument("--ops", help="comma-separated subset of: ce,kl")
    r.add_argument("--modes", help="comma-separated subset of: fwd,fwd+bwd")
    r.add_argument("--shapes", help="comma-separated subset of: llama2-7b,llama3-8b,smollm2")
    r.add_argument("--dtypes", help="comma-separated subset of: float32,bfloat16")
    r.add_argument("--n", help="comma-separated token counts to keep")
    r.add_argument("--providers", help="comma-separated provider names (default: all)")
    r.add_argument("--repeats", type=int, help="timed calls per CPU case (default 2 with --quick, else 3)")
    r.add_argument("--max-call-s", type=float,
                   help="CPU: a provider whose first call takes longer is reported from that one call "
                        "(default 30 with --quick, else 60)")
    r.add_argument("--mem-budget-gib", type=float, default=8.0,
                   help="CPU: skip a provider whose estimated peak exceeds this (default 8)")
    r.add_argument("--time-limit", type=float,
                   help="seconds for the whole run, report included: no case starts after 85%% of it, a case "
                        "running at its end is killed; what was not measured is recorded as skipped/failed")
    r.add_argument("--wheels", help="directory of pure-Python wheels (liger-kernel, cut-cross-entropy) to make "
                                    "importable when not installed; ignored if missing")
    r.add_argument("--task-timeout", type=float, default=1800.0, help="seconds one case (all its providers) may take (default 1800)")
    rep = sub.add_parser("report", help="rebuild report.md, CSV and plots from DIR/results.json")
    rep.add_argument("dir")
    rep.add_argument("--readme", action="store_true", help="print the README performance section instead")
    rep.add_argument("--merge", nargs="+", metavar="RUN_DIR",
                     help="first combine the rows of these runs (same device) into DIR/results.json")
    args = p.parse_args(argv)
    if args.cmd == "run":
        from .runner import run

        if args.gpu_check and args.time_limit is None:
            # gpu_check.sh's bench step has ~200 s; it passes its own --time-limit.
            args.time_limit = 180.0
        return run(args)
    from . import report

    try:
        if args.merge:
            resolved = [Path(d).resolve() for d in args.merge]
            if len(set(resolved)) != len(resolved):
                raise ValueError(f"--merge names a run twice ({' '.join(args.merge)}): its rows would be counted twice")
            runs = [report.load(Path(d)) for d in args.merge]
            Path(args.dir).mkdir(parents=True, exist_ok=True)
            meta, rows = report.merge(runs)
            report.write_all(Path(args.dir), meta, rows)
        meta, rows = report.load(Path(args.dir))
    except ValueError as e:  # not a run's directory, runs of different devices
        print(f"benchmarks report: {e}", file=sys.stderr)
        return 2
    if args.readme:
        print(report.readme_section(meta, rows, args.dir.rstrip("/")))
    else:
        report.write_all(Path(args.dir), meta, rows)
        print(f"rewrote {args.dir}/report.md, results.csv and plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
