"""``python -m benchmarks run``: plan the tasks, run the measuring workers, write the rows.

Every row is one (case, provider): op, provider, mode, shape, N, H, V, dtype, status
(``ok`` | ``unavailable`` | ``skipped`` | ``failed``, with ``reason`` when not ok), median/p20/p80
ms, peak MiB, ratios to the floor and to naive (time; memory too), the loss value and its
relative difference to naive's (every provider computes the same loss on the same inputs), the
1-minute load average when it ran, and the run's device, versions and commit (in ``meta`` and
repeated on each row of the CSV).

The ``floor`` row of a case is timed by the same worker, with the providers: CE forward = the
logits GEMM; forward+backward adds the dhidden and dweight GEMMs; KL adds the reference model's
logits GEMM. It has no memory number: it is a time floor (it writes into preallocated outputs).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from . import measure, report
from .cases import PRESETS, Case
from .providers import registry

ROOT = Path(__file__).resolve().parent.parent
# Directories added by --wheels, passed on to the workers after everything installed.
_EXTRA_PATHS: list[str] = []
ROW_FIELDS = ("op", "provider", "mode", "shape", "n", "h", "v", "dtype", "status", "reason", "median_ms", "p20_ms",
              "p80_ms", "runs", "peak_mib", "ratio_to_floor", "ratio_to_naive", "mem_ratio_to_naive", "value",
              "value_rel_diff", "load1", "device", "torch", "triton", "commit")


def _version(pkg: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    if git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        name = f"{_cpu_name()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"
    return {
        "device": name,
        "device_type": device,
        "torch": torch.__version__,
        "triton": _version("triton"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "liger_kernel": _version("liger-kernel"),
        "python": platform.python_version(),
        "commit": commit,
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def plan(cases: list[Case], device: str, provider_names: list[str] | None, mem_budget_gib: float,
         quick: bool = False):
    """(one task per case with the providers to measure, rows decided without measuring:
    unavailable / left out / over the memory budget)."""
    provs = [p for p in registry() if provider_names is None or p.name in provider_names]
    why_not = {p.name: p.unavailable(device) for p in provs}
    tasks, fixed = [], []
    for c in cases:
        names = []
        for p in provs:
            if c.op not in p.ops:
                fixed.append(_row(c, p.name, status="unavailable", reason=f"{p.name} has no {c.op} op"))
            elif why_not[p.name]:
                fixed.append(_row(c, p.name, status="unavailable", reason=why_not[p.name]))
            elif quick and not p.quick:
                fixed.append(_row(c, p.name, status="skipped", reason=(
                    "left out of --quick to keep it within 5 minutes; measured by the cpu preset")))
            elif device == "cpu" and p.est_bytes(c) > mem_budget_gib * 2**30:
                fixed.append(_row(c, p.name, status="skipped", reason=(
                    f"estimated peak {p.est_bytes(c) / 2**30:.1f} GiB > CPU memory budget {mem_budget_gib} GiB "
                    "(--mem-budget-gib)")))
            else:
                names.append(p.name)
        tasks.append({"case": c.as_dict(), "providers": names})
    return tasks, fixed


def _row(c: Case, provider: str, **kw) -> dict:
    row = {k: None for k in ROW_FIELDS}
    row.update(c.as_dict(), provider=provider)
    row.update(kw)
    return row


def _describe(r: dict) -> str:
    head = f"{r['op']:2} {r['mode']:7} {r['shape']:9} N={r['n']:<6} {r['dtype']:8} {r['provider']:15}"
    if r["status"] != "ok":
        return f"{head} {r['status']}: {r['reason']}"
    mem = "" if r.get("peak_mib") is None else f"  peak {r['peak_mib']:9.1f} MiB"
    note = f"  [{r['reason']}]" if r.get("reason") else ""
    return f"{head} {r['median_ms']:10.2f} ms{mem}  (load {r.get('load1')}){note}"


def _worker_row(r: dict) -> dict:
    row = _row(Case(**r["case"]), r["provider"])
    for k in ("status", "reason", "median_ms", "p20_ms", "p80_ms", "runs", "peak_mib", "value", "load1"):
        if k in r:
            row[k] = r[k]
    return row


class Interrupted(Exception):
    """Ctrl-C or SIGTERM during the measurements; ``rows`` holds every row measured until then."""

    def __init__(self, rows: list[dict]):
        super().__init__("interrupted")
        self.rows = rows


def execute(tasks: list[dict], device: str, repeats: int, out_dir: Path, deadline: float | None,
            task_timeout: float, max_call_s: float | None = None, hard_stop: float | None = None) -> list[dict]:
    """Run the cases in workers: one process per case on the CPU, one for all on CUDA (restarted
    past a crash for the cases left). Returns one row per (case, provider), the floor included.
    Ctrl-C (KeyboardInterrupt) raises Interrupted with the rows measured so far, the interrupted
    worker's finished ones included, and the rest recorded as skipped."""
    paths = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p] + _EXTRA_PATHS
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    log = open(out_dir / "worker.log", "a")
    groups = [[t] for t in tasks] if device == "cpu" else [tasks]
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for gi, group in enumerate(groups):
            pending = list(group)
            while pending:
                if deadline is not None and time.time() > deadline:
                    # No new worker past the deadline (its start alone costs seconds on a GPU).
                    for t in pending:
                        for name in ["floor"] + t["providers"]:
                            rows.append(_row(Case(**t["case"]), name, status="skipped",
                                             reason="time limit of the run reached"))
                            print(_describe(rows[-1]), flush=True)
                    break
                spec, out = Path(tmp) / f"spec{gi}.json", Path(tmp) / f"out{gi}.jsonl"
                out.unlink(missing_ok=True)
                spec.write_text(json.dumps({"device": device, "repeats": repeats, "deadline": deadline,
                                            "max_call_s": max_call_s, "tasks": pending}))
                limit = task_timeout * len(pending)
                if hard_stop is not None:
                    # A case still running at the hard stop is killed, so the report gets written in time.
                    limit = min(limit, max(hard_stop - time.time(), 1))
                interrupted = False
                try:
                    subprocess.run([sys.executable, "-m", "benchmarks.worker", str(spec), str(out)], cwd=ROOT, env=env,
                                   stdout=log, stderr=log, timeout=limit)
                    crash = None
                except subprocess.TimeoutExpired:
                    crash = f"worker timed out after {limit:.0f} s"
                except KeyboardInterrupt:
                    interrupted = True
                got: dict[str, set] = {}
                for line in (out.read_text().splitlines() if out.exists() else []):
                    try:
                        r = json.loads(line)
                    except json.JSONDecodeError:  # the last line of a worker killed while writing it
                        continue
                    rows.append(_worker_row(r))
                    got.setdefault(Case(**r["case"]).key, set()).add(r["provider"])
                    print(_describe(rows[-1]), flush=True)
                if interrupted:
                    for g in [pending] + groups[gi + 1:]:
                        for t in g:
                            for name in ["floor"] + t["providers"]:
                                if name not in got.get(Case(**t["case"]).key, ()):
                                    rows.append(_row(Case(**t["case"]), name, status="skipped",
                                                     reason="run interrupted (Ctrl-C or SIGTERM)"))
                    log.close()
                    raise Interrupted(rows)
                # Cases run in order: the first one with rows missing is where the worker died or
                # hung. Record its missing rows as failed and go on with the cases after it.
                for i, t in enumerate(pending):
                    missing = [n for n in ["floor"] + t["providers"] if n not in got.get(Case(**t["case"]).key, ())]
                    if missing:
                        for name in missing:
                            rows.append(_row(Case(**t["case"]), name, status="failed",
                                             reason=crash or "worker died (see worker.log)"))
                            print(_describe(rows[-1]), flush=True)
                        pending = pending[i + 1:]
                        break
                else:
                    pending = []
    log.close()
    return rows


def compose(cases: list[Case], measured: list[dict], fixed: list[dict], meta: dict) -> list[dict]:
    """All rows of the run, with the ratios to the floor and to naive of the same case."""
    rows = list(measured) + list(fixed)
    by_case: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_case.setdefault(_ckey(r), {})[r["provider"]] = r
    for r in rows:
        r.update({k: meta.get(k) for k in ("device", "torch", "triton", "commit")})
        peers = by_case[_ckey(r)]
        if r["status"] != "ok":
            continue
        fl, nv = peers.get("floor"), peers.get("naive")
        if fl and fl["status"] == "ok":
            r["ratio_to_floor"] = r["median_ms"] / fl["median_ms"]
        if nv and nv["status"] == "ok":
            r["ratio_to_naive"] = r["median_ms"] / nv["median_ms"]
            if r["peak_mib"] is not None and nv["peak_mib"]:
                r["mem_ratio_to_naive"] = r["peak_mib"] / nv["peak_mib"]
            if r["value"] is not None and nv["value"] is not None:
                r["value_rel_diff"] = abs(r["value"] - nv["value"]) / max(abs(nv["value"]), 1e-30)
    order = {c.key: i for i, c in enumerate(cases)}
    prov_order: dict[str, int] = {}
    for p in ["floor", "naive"] + [p.name for p in registry()]:
        prov_order.setdefault(p, len(prov_order))
    rows.sort(key=lambda r: (order.get(_ckey(r), 0), prov_order.get(r["provider"], 99)))
    return rows


def _ckey(r: dict) -> str:
    return Case(r["op"], r["mode"], r["shape"], r["n"], r["h"], r["v"], r["dtype"]).key


def add_wheels(wheel_dir: str | None) -> list[str]:
    """Make pure-Python wheels in ``wheel_dir`` importable (appended to sys.path, so installed
    packages win): how liger-kernel and cut-cross-entropy reach a GPU machine without internet.
    Returns the wheels used."""
    import zipfile

    if not wheel_dir or not Path(wheel_dir).is_dir():
        return []
    wheels = sorted(Path(wheel_dir).glob("*-py3-none-any.whl"))
    if not wheels:
        return []
    target = Path(tempfile.mkdtemp(prefix="bench_wheels_"))
    for whl in wheels:
        with zipfile.ZipFile(whl) as z:
            z.extractall(target)
    sys.path.append(str(target))
    _EXTRA_PATHS.append(str(target))
    return [w.name for w in wheels]


def run(args) -> int:
    device = args.device
    wheels = add_wheels(args.wheels)
    if device == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device visible", file=sys.stderr)
        return 2
    if args.gpu_check and device != "cuda":
        # its cases are the 7B/8B heads at 16384 tokens: ~17 GB for one floor on the CPU
        print("--gpu-check measures on a GPU: add --device cuda", file=sys.stderr)
        return 2
    preset = "quick" if args.quick else "gpu-check" if args.gpu_check else args.preset or (
        "gpu" if device == "cuda" else "cpu")
    cases = PRESETS[preset]()
    for attr, field in (("ops", "op"), ("modes", "mode"), ("shapes", "shape"), ("dtypes", "dtype")):
        want = getattr(args, attr)
        if want:
            cases = [c for c in cases if getattr(c, field) in want.split(",")]
    if args.n:
        try:
            ns = {int(x) for x in args.n.split(",")}
        except ValueError:
            print(f"--n must be comma-separated token counts, got {args.n!r}", file=sys.stderr)
            return 2
        cases = [c for c in cases if c.n in ns]
    if not cases:
        print("no case left after the filters", file=sys.stderr)
        return 2
    known = [p.name for p in registry()]
    providers = args.providers.split(",") if args.providers else None
    unknown = sorted(set(providers or ()) - set(known) - {"floor"})
    if unknown:
        print(f"--providers: unknown {', '.join(unknown)}; known: {', '.join(known)}", file=sys.stderr)
        return 2
    for name, value in (("--repeats", args.repeats), ("--time-limit", args.time_limit),
                        ("--max-call-s", args.max_call_s), ("--task-timeout", args.task_timeout),
                        ("--mem-budget-gib", args.mem_budget_gib)):
        if value is not None and not value > 0:
            print(f"{name} must be > 0, got {value}", file=sys.stderr)
            return 2
    out_dir = Path(args.output)
    if out_dir.exists() and not out_dir.is_dir():
        print(f"--output {out_dir} is a file, not a directory", file=sys.stderr)
        return 2
    repeats = args.repeats or (2 if preset == "quick" else 3 if device == "cpu" else 5)
    if args.max_call_s is None:
        # quick: torch-lce's default chunking takes ~30 s a call on 2 idle cores; one call is enough
        # to see it, and keeps the run near 5 minutes.
        args.max_call_s = 30.0 if preset == "quick" else 60.0
    if (out_dir / "results.json").is_file():
        print(f"note: replacing the earlier run's results in {out_dir}", flush=True)
        for old in ("time_vs_n.png", "memory_vs_n.png"):  # a run without ok rows writes no plots
            (out_dir / old).unlink(missing_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = environment(device)
    meta.update(preset=preset, repeats=repeats, wheels=wheels, mem_budget_gib=args.mem_budget_gib, max_call_s=args.max_call_s,
                command=" ".join(["python -m benchmarks"] + sys.argv[1:]), load_start=measure.load_average())
    tasks, fixed = plan(cases, device, providers, args.mem_budget_gib, quick=preset == "quick")
    print(f"{meta['device']} | torch {meta['torch']} | triton {meta['triton']} | commit {meta['commit']} | "
          f"preset {preset}: {len(cases)} cases, {sum(len(t['providers']) + 1 for t in tasks)} measurements | "
          f"load {meta['load_start']}", flush=True)
    for r in fixed:
        print(_describe(r), flush=True)
    t0 = time.time()
    # --time-limit is the whole run: no case starts after 85% of it, a case still running 5 s
    # before its end is killed, and the last seconds write the report.
    deadline = t0 + 0.85 * args.time_limit if args.time_limit else None
    hard_stop = t0 + args.time_limit - 5 if args.time_limit else None
    # SIGTERM (a scheduler, timeout) as Ctrl-C: what was measured is written before leaving.
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    interrupted = False
    try:
        measured = execute(tasks, device, repeats, out_dir, deadline, args.task_timeout, args.max_call_s, hard_stop)
    except Interrupted as e:
        measured, interrupted = e.rows, True
        meta["interrupted"] = True
    finally:
        signal.signal(signal.SIGTERM, previous)
    meta.update(load_end=measure.load_average(), wall_s=round(time.time() - t0, 1))
    rows = compose(cases, measured, fixed, meta)
    report.write_all(out_dir, meta, rows)
    print(f"{'interrupted: ' if interrupted else ''}wrote {out_dir}/results.json, results.csv, report.md and plots "
          f"in {meta['wall_s']} s (load {meta['load_start']} -> {meta['load_end']})")
    failed = [r for r in rows if r["status"] == "failed"]
    if failed:
        print(f"{len(failed)} measurement(s) failed:", file=sys.stderr)
        for r in failed:
            print(f"  {_describe(r)}", file=sys.stderr)
    return 130 if interrupted else 1 if failed else 0
