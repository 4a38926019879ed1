"""Outputs of a run: ``results.json`` (meta + rows), ``results.csv`` (one row per case and provider,
long format), ``report.md`` (tables, goal checks, plots) and PNG plots. ``python -m benchmarks
report DIR`` rebuilds them from ``DIR/results.json``; ``--readme`` prints the Markdown for the
README's performance section instead."""

from __future__ import annotations

import csv
import json
from pathlib import Path

HOW_CPU = (
    "CPU: one fresh process per case; all providers and the floor share its inputs and are run once at "
    "N=64 first. Memory: per provider, heap trimmed, VmRSS read, VmHWM reset, one full call (the warm-up), "
    "VmHWM read: peak = resident-set growth over the inputs, gradients included. Time: median (and 20th/80th "
    "percentiles) of the timed calls, every provider once per round in a rotating order so load changes on "
    "the shared machine hit all alike; gradients set to None before each call, untimed. A provider whose "
    "first call exceeds --max-call-s is reported from that one call, flagged. Cases whose estimated peak "
    "exceeds the memory budget are skipped, with the reason."
)
HOW_CUDA = (
    "GPU time: `triton.testing.do_bench` median (20th/80th percentiles) after warm-up, gradients reset "
    "between calls. GPU memory: `torch.cuda.max_memory_allocated()` growth over the inputs for one call "
    "after warm-up; it counts the gradients."
)
LEGEND = (
    "Providers: `sk-<backend>` = surgery_kernels with that backend; `naive` = plain PyTorch with materialized "
    "logits (`surgery_kernels.reference`); `torch-lce` = `torch.nn.functional.linear_cross_entropy` with "
    "`LinearCrossEntropyOptions()`; `cce` = cut-cross-entropy (`torch_compile` impl on CPU, `cce` on GPU); "
    "`liger` = Liger-Kernel (fused linear CE; fused linear JSD with beta=0 for the KL); `floor` = the bare GEMMs "
    "the loss needs, timed in the same run (CE forward 1 GEMM, forward+backward 3; KL one more), each writing its full (N, V) "
    "output to memory: a chunked kernel whose logits stay in cache can beat it (ratio below 1). Signed CE: "
    "half the tokens weighted -0.1 (unlearn), half +2.0 (update), 5% padding; baselines without per-token "
    "weights make one call per stream. `fwd` runs under `torch.no_grad()`; `fwd+bwd` includes the gradients "
    "w.r.t. hidden and weight. Inputs are random (logit std ~2)."
)

# The CPU backends' goals (faster than naive, far less memory), measured at the SmolLM2 head, N=4096, float32, forward+backward on the CPU.
GOAL_CASE = {"shape": "smollm2", "n": 4096, "dtype": "float32", "mode": "fwd+bwd"}
GOALS = [
    ("sk-torch", "memory vs naive", "mem_ratio_to_naive", None, 0.25),
    ("sk-torch", "time vs naive", "ratio_to_naive", None, 1.3),
    ("sk-cpu", "time vs naive", "ratio_to_naive", None, 1.0),
    ("sk-cpu", "time vs torch-lce", "median_ms", "torch-lce", 1.0),
    # not an issue goal: the same op with a sane chunk size, so the verdict is not about a heuristic
    ("sk-cpu", "time vs torch-lce-tuned", "median_ms", "torch-lce-tuned", 1.0),
    ("sk-cpu", "time vs floor", "ratio_to_floor", None, 1.3),
    ("sk-cpu", "memory vs naive", "mem_ratio_to_naive", None, 0.125),
]


def write_all(out_dir: Path, meta: dict, rows: list[dict]) -> None:
    out_dir = Path(out_dir)
    (out_dir / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_csv(out_dir / "results.csv", rows)
    plots = write_plots(out_dir, rows)
    (out_dir / "report.md").write_text(markdown(meta, rows, plots))


def load(out_dir: Path) -> tuple[dict, list[dict]]:
    path = Path(out_dir) / "results.json"
    if not path.is_file():
        raise ValueError(f"{path} does not exist: give the directory of a `python -m benchmarks run`")
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or "meta" not in data or "rows" not in data:
        what = " (a `surgery demo` result: its report is results.md beside it)" \
            if isinstance(data, dict) and "sets" in data else ""
        raise ValueError(f"{path} is not the output of `python -m benchmarks run` (no 'meta' and 'rows'){what}")
    return data["meta"], data["rows"]


def merge(runs: list[tuple[dict, list[dict]]]) -> tuple[dict, list[dict]]:
    """One table from several runs on one device (each row keeps its own commit and load)."""
    metas = [m for m, _ in runs]
    if len({m["device"] for m in metas}) > 1:
        raise ValueError(f"--merge: runs from different devices: {sorted({m['device'] for m in metas})}")
    meta = dict(metas[0])
    meta.update(command=" ; ".join(m.get("command", "?") for m in metas),
                commit=", ".join(dict.fromkeys(m["commit"] for m in metas)),
                date_utc=", ".join(dict.fromkeys(m["date_utc"] for m in metas)),
                load_start=min(m.get("load_start") or 0 for m in metas),
                load_end=max(m.get("load_end") or 0 for m in metas),
                wall_s=round(sum(m.get("wall_s") or 0 for m in metas), 1), preset="merged",
                repeats=", ".join(dict.fromkeys(str(m.get("repeats")) for m in metas)))
    rows = [r for _, rs in runs for r in rs]
    rows.sort(key=lambda r: (r["op"], r["mode"], r["shape"], r["dtype"], r["n"]))
    return meta, rows


def write_csv(path: Path, rows: list[dict]) -> None:
    from .runner import ROW_FIELDS

    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=ROW_FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _f(x, fmt="{:.2f}", none="–"):
    return none if x is None else fmt.format(x)


def _groups(rows):
    """Rows grouped by case, in row order."""
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r["op"], r["mode"], r["shape"], r["n"], r["h"], r["v"], r["dtype"]), []).append(r)
    return out


def _title(key) -> str:
    op, mode, shape, n, h, v, dtype = key
    name = {"ce": "signed linear CE", "kl": "linear KL"}[op]
    return f"{name}, {mode}, {shape} head (H={h}, V={v}), N={n}, {dtype}"


def case_table(rows: list[dict]) -> str:
    lines = ["| provider | median ms | p20–p80 ms | peak MiB | × floor | × naive time | × naive memory | "
             "loss rel. diff | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['provider']} | – | – | – | – | – | – | – | {r['status']}: {r['reason']} |")
            continue
        note = r.get("reason") or ""
        lines.append(
            f"| {r['provider']} | {_f(r['median_ms'])} | {_f(r['p20_ms'])}–{_f(r['p80_ms'])} | "
            f"{_f(r['peak_mib'], '{:.0f}')} | {_f(r['ratio_to_floor'])} | {_f(r['ratio_to_naive'])} | "
            f"{_f(r['mem_ratio_to_naive'], '{:.3f}')} | {_f(r['value_rel_diff'], '{:.1e}')} | {note} |")
    return "\n".join(lines)


def goal_table(rows: list[dict]) -> str | None:
    lines = []
    for (op, *_), group in _groups(rows).items():
        r0 = group[0]
        if any(r0[k] != v for k, v in GOAL_CASE.items()):
            continue
        by = {r["provider"]: r for r in group}
        for prov, what, field, other, goal in GOALS:
            if other and other.startswith("torch-lce") and op != "ce":
                continue
            r = by.get(prov)
            if r is None or r["status"] != "ok" or r.get(field) is None:
                got, verdict = "–", f"not measured ({r['status'] + ': ' + r['reason'] if r else 'no row'})"
            else:
                val = r[field]
                if other:
                    o = by.get(other)
                    if not o or o["status"] != "ok":
                        why = f"{o['status']}: {o['reason']}" if o else "no row"
                        lines.append(f"| {op} | {prov} | {what} | – | ≤ {goal:g} | not measured ({other} {why}) |")
                        continue
                    val = val / o[field]
                got = f"{val:.3f}"
                verdict = "**met**" if val <= goal else "**missed**"
                for x in (r, by.get(other) if other else None):
                    if x and (x.get("reason") or "").startswith("1 cold call"):
                        verdict += f" ({x['provider']}: {x['reason']})"
            lines.append(f"| {op} | {prov} | {what} | {got} | ≤ {goal:g} | {verdict} |")
    if not lines:
        return None
    head = ["| op | provider | ratio | measured | goal | verdict |", "|---|---|---|---:|---:|---|"]
    return "\n".join(head + lines)


def markdown(meta: dict, rows: list[dict], plots: list[str]) -> str:
    out = [f"# surgery-kernels benchmarks — {meta['device']}", ""]
    out.append(f"- date: {meta['date_utc']}; commit `{meta['commit']}`; torch {meta['torch']}, triton "
               f"{meta.get('triton')}, cut-cross-entropy {meta.get('cut_cross_entropy')}, liger-kernel "
               f"{meta.get('liger_kernel')}, Python {meta.get('python')}")
    timing = f"{meta.get('repeats')} timed calls per case" if meta.get("device_type") == "cpu" else \
        "do_bench over a time window per case"
    out.append(f"- command: `{meta.get('command')}` (preset `{meta.get('preset')}`, {timing}); wall time "
               f"{meta.get('wall_s')} s")
    if meta.get("device_type") == "cpu":
        out.append(f"- 1-minute load average at start {meta.get('load_start')}, at end {meta.get('load_end')} "
                   "(shared machine: other processes add noise; each row has the load when it ran)")
    out += ["", HOW_CUDA if meta.get("device_type") == "cuda" else HOW_CPU, "", LEGEND, ""]
    goals = goal_table(rows)
    if goals:
        out += ["## Goals of the CPU backends: SmolLM2 head, N=4096, float32, forward+backward", "", goals, ""]
    out += ["## Results", ""]
    for key, group in _groups(rows).items():
        out += [f"### {_title(key)}", "", case_table(group), ""]
    if plots:
        out += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    return "\n".join(out)


def summary_table(rows: list[dict]) -> str:
    """One line per case, one column per provider that ran somewhere: ``ms (x floor) / MiB``."""
    groups = _groups(rows)
    provs = []
    for r in rows:
        if r["status"] == "ok" and r["provider"] not in provs:
            provs.append(r["provider"])
    head = ["| case | " + " | ".join(provs) + " |", "|---|" + "---:|" * len(provs)]
    lines = []
    for (op, mode, shape, n, h, v, dtype), group in groups.items():
        by = {r["provider"]: r for r in group}
        cells = []
        for p in provs:
            r = by.get(p)
            if r is None or r["status"] != "ok":
                cells.append("–")
                continue
            cell = f"{r['median_ms']:.0f} ms"
            if p != "floor" and r.get("ratio_to_floor"):
                cell += f" ({r['ratio_to_floor']:.2f}×)"
            if r.get("peak_mib") is not None:
                cell += f" / {r['peak_mib']:.0f} MiB"
            cells.append(cell)
        lines.append(f"| {op} {mode} {shape} N={n} {dtype} | " + " | ".join(cells) + " |")
    return "\n".join(head + lines)


def readme_section(meta: dict, rows: list[dict], rel_dir: str) -> str:
    """Markdown for the README: machine and versions, the goal table, one summary table, plots."""
    out = [f"Measured {meta['date_utc']} on {meta['device']}, torch {meta['torch']}, commit `{meta['commit']}`"
           + (f", 1-minute load {meta.get('load_start')}–{meta.get('load_end')} (shared machine)"
              if meta.get("device_type") == "cpu" else "") + f"; full tables in `{rel_dir}/report.md`.", ""]
    goals = goal_table(rows)
    if goals:
        out += [goals, ""]
    out += ["Median time (ratio to the floor) / peak memory growth; `floor` = the bare GEMMs, `naive` = "
            "materialized logits, `sk-*` = this package's backends.", "", summary_table(rows), ""]
    for p in ("time_vs_n.png", "memory_vs_n.png"):
        if (Path(rel_dir) / p).exists():
            out.append(f"![{p}]({rel_dir}/{p})")
    return "\n".join(out)


def write_plots(out_dir: Path, rows: list[dict]) -> list[str]:
    """time_vs_n.png and memory_vs_n.png: one panel per (op, mode, head, dtype), one line per provider."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the GPU image may lack it: tables still get written
        print("matplotlib is not installed: no plots (python -m benchmarks report DIR makes them later)")
        return []

    panels: dict[tuple, dict[str, list]] = {}
    for r in rows:
        if r["status"] == "ok":
            panels.setdefault((r["op"], r["mode"], r["shape"], r["dtype"]), {}).setdefault(r["provider"], []).append(r)
    if not panels:
        return []
    # One colour per provider across panels and plots.
    provs_all = sorted({r["provider"] for r in rows})
    colour = {p: plt.cm.tab10(i % 10) for i, p in enumerate(provs_all)}
    names = []
    for fname, field, ylabel in (("time_vs_n.png", "median_ms", "median time (ms)"),
                                 ("memory_vs_n.png", "peak_mib", "peak memory growth (MiB)")):
        k = len(panels)
        cols = min(k, 3)
        nrows = (k + cols - 1) // cols
        fig, axes = plt.subplots(nrows, cols, figsize=(5.2 * cols, 4 * nrows), squeeze=False)
        for ax, ((op, mode, shape, dtype), provs) in zip(axes.flat, sorted(panels.items())):
            ns = set()
            for prov, rs in sorted(provs.items()):
                pts = sorted((r["n"], r[field]) for r in rs if r.get(field) is not None)
                if not pts:
                    continue
                ns.update(n for n, _ in pts)
                style = "x--" if prov == "floor" else "o-" if prov.startswith("sk-") else "s:"
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=prov, markersize=5,
                        color="k" if prov == "floor" else colour[prov])
            ax.set_title(f"{op} {mode} {shape} {dtype}", fontsize=10)
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            if len(ns) > 1:
                ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        for ax in list(axes.flat)[k:]:
            ax.axis("off")
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=110)
        plt.close(fig)
        names.append(fname)
    return names
