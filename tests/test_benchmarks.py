"""The benchmark harness itself: every provider computes the same loss and gradients (else its
timings compare different work), the floor and ratios are composed right, and the one command
writes JSON, CSV, Markdown and plots."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import report, runner
from benchmarks.cases import Case, make_inputs
from benchmarks.providers import registry, run_once
from surgery_kernels import reference as ref

ROOT = Path(__file__).resolve().parent.parent

# Odd N (an odd split into the two streams) and V, small H: seconds per provider.
TINY = {"n": 37, "h": 16, "v": 101}


def _provider_params():
    out = []
    for p in registry():
        for op in p.ops:
            marks = []
            why = p.unavailable("cpu")
            if why:
                marks.append(pytest.mark.skip(reason=why))
            if p.name == "cce":
                # impl="torch_compile": ~25 s of compilation on the 2-core machine.
                marks.append(pytest.mark.slow)
            out.append(pytest.param(p, op, id=f"{p.name}-{op}", marks=marks))
    return out


def _rel(a, b):
    return float((a.detach().double() - b).norm() / b.norm())


@pytest.mark.parametrize("prov,op", _provider_params())
def test_provider_matches_float64_reference(prov, op):
    c = Case(op, "fwd+bwd", "tiny", TINY["n"], TINY["h"], TINY["v"], "float32")
    x = make_inputs(c, "cpu")
    value = run_once(prov.build(c, x, "cpu"), c.mode)
    h = x["hidden"].detach().double().requires_grad_()
    w = x["weight"].detach().double().requires_grad_()
    if op == "ce":
        want = ref.linear_cross_entropy_ref(h, w, x["target"], token_weight=x["token_weight"].double())
    else:
        want = ref.linear_kl_div_ref(h, w, x["ref_hidden"].double(), x["ref_weight"].double())
    want.backward()
    # The KL of two close distributions is small, which inflates its float32 relative error;
    # the gradients are the check that matters there.
    assert _rel(value, want.detach()) <= (1e-5 if op == "ce" else 1e-4)
    assert _rel(x["hidden"].grad, h.grad) <= 1e-5
    assert _rel(x["weight"].grad, w.grad) <= 1e-5


def test_signed_ce_inputs_are_the_two_streams():
    c = Case("ce", "fwd", "tiny", 100, 16, 101, "float32")
    x = make_inputs(c, "cpu")
    assert x["half"] == 50
    assert torch.all(x["token_weight"][:50] == -0.1) and torch.all(x["token_weight"][50:] == 2.0)
    assert (x["target"] == -100).any() and (x["target"] != -100).any()
    # Same seed, same inputs: providers in separate processes see the same tensors.
    assert torch.equal(make_inputs(c, "cpu")["hidden"], x["hidden"])


def _measured(c: Case, provider: str, ms: float, mib: float | None, value: float | None, **kw) -> dict:
    return runner._row(c, provider, status="ok", median_ms=ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1, runs=3,
                       peak_mib=mib, value=value, load1=0.5, **kw)


def _synthetic_rows():
    ce = Case("ce", "fwd+bwd", "smollm2", 4096, 576, 49152, "float32")
    kl = Case("kl", "fwd+bwd", "smollm2", 4096, 576, 49152, "float32")
    measured = [_measured(ce, "floor", 300.0, None, None, reason="bare GEMMs"),
                _measured(ce, "naive", 400.0, 2000.0, 12.0),
                _measured(ce, "sk-torch", 440.0, 300.0, 12.0 * (1 + 1e-7)),
                _measured(kl, "floor", 400.0, None, None),
                _measured(kl, "naive", 500.0, 4000.0, 0.01),
                runner._row(kl, "sk-torch", status="failed", reason="RuntimeError: boom")]
    fixed = [runner._row(ce, "liger", status="unavailable", reason="CUDA only")]
    meta = {"device": "test cpu", "device_type": "cpu", "torch": "x", "triton": None, "commit": "abc",
            "date_utc": "today", "command": "python -m benchmarks run --quick", "preset": "quick", "repeats": 3,
            "load_start": 0.1, "load_end": 0.2, "wall_s": 1.0}
    return [ce, kl], runner.compose([ce, kl], measured, fixed, meta), meta


def test_ratios_are_to_the_floor_and_naive_of_the_same_case():
    _, rows, _ = _synthetic_rows()
    by = {(r["op"], r["provider"]): r for r in rows}
    t = by["ce", "sk-torch"]
    assert t["ratio_to_floor"] == pytest.approx(440 / 300)
    assert t["ratio_to_naive"] == pytest.approx(1.1)
    assert t["mem_ratio_to_naive"] == pytest.approx(0.15)
    assert t["value_rel_diff"] == pytest.approx(1e-7)
    assert by["kl", "naive"]["ratio_to_floor"] == pytest.approx(1.25)
    assert by["kl", "sk-torch"]["status"] == "failed" and by["kl", "sk-torch"]["ratio_to_naive"] is None
    assert by["ce", "liger"]["reason"] == "CUDA only"
    assert all(r["commit"] == "abc" for r in rows)
    # floor first, then naive, then ours
    assert [r["provider"] for r in rows if r["op"] == "ce"][:3] == ["floor", "naive", "sk-torch"]


def test_floor_runs_the_gemms_of_the_case():
    from benchmarks.worker import floor_fn

    for op, mode, want in (("ce", "fwd", "logits"), ("ce", "fwd+bwd", "logits + dhidden + dweight"),
                           ("kl", "fwd+bwd", "logits + logits (reference) + dhidden + dweight")):
        c = Case(op, mode, "tiny", 8, 16, 101, "float32")
        x = make_inputs(c, "cpu")
        fn, note = floor_fn(c, x, "cpu")
        z = fn()
        assert note == "bare GEMMs: " + want
        torch.testing.assert_close(z, x["hidden"].detach() @ x["weight"].detach().t())


def test_report_files_and_goal_verdicts(tmp_path):
    _, rows, meta = _synthetic_rows()
    report.write_all(tmp_path, meta, rows)
    for name in ("results.json", "results.csv", "report.md", "time_vs_n.png", "memory_vs_n.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "time_vs_n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(tmp_path / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    md = (tmp_path / "report.md").read_text()
    # sk-torch memory 300/2000 = 0.15 <= 1/4 met; time 1.1 <= 1.3 met; sk-cpu has no row.
    assert "| ce | sk-torch | memory vs naive | 0.150 | ≤ 0.25 | **met** |" in md
    assert "| ce | sk-torch | time vs naive | 1.100 | ≤ 1.3 | **met** |" in md
    assert "| ce | sk-cpu | time vs naive | – | ≤ 1 | not measured (no row) |" in md
    assert "failed: RuntimeError: boom" in md
    assert json.loads((tmp_path / "results.json").read_text())["meta"]["commit"] == "abc"


def test_report_of_a_directory_that_is_not_a_run(tmp_path, capsys):
    """`benchmarks report DIR` on a demo result or an empty directory: exit 2 and a message naming
    the file, not a KeyError."""
    from benchmarks.__main__ import main

    (tmp_path / "demo").mkdir()
    (tmp_path / "demo" / "results.json").write_text(json.dumps({"sets": {}, "model": "x"}))
    assert main(["report", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert "demo/results.json is not the output of" in err and "surgery demo" in err
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "empty/results.json does not exist" in capsys.readouterr().err


@pytest.mark.no_poison
def test_one_command_end_to_end(tmp_path):
    """The real command on the smoke preset: workers, floor, naive, report, plots."""
    out = tmp_path / "bench"
    cmd = [sys.executable, "-m", "benchmarks", "run", "--preset", "smoke", "--ops", "ce", "--n", "64", "--providers",
           "naive,sk-torch", "--repeats", "2", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads((out / "results.json").read_text())["rows"]
    got = {(r["mode"], r["provider"]): r for r in rows}
    assert {k for k, r in got.items() if r["status"] == "ok"} == {
        (m, p) for m in ("fwd", "fwd+bwd") for p in ("floor", "naive", "sk-torch")}
    for r in rows:
        if r["status"] != "ok":
            assert r["provider"] not in ("floor", "naive", "sk-torch")
            continue
        assert r["median_ms"] > 0 and r["ratio_to_floor"] > 0 and r["ratio_to_naive"] > 0
        if r["provider"] != "floor":
            assert r["peak_mib"] is not None and r["value_rel_diff"] < 1e-5
    for name in ("results.csv", "report.md", "time_vs_n.png", "memory_vs_n.png"):
        assert (out / name).exists()


def test_cuda_case_flow_on_cpu(monkeypatch):
    """No GPU here: run the CUDA worker's control flow with the CUDA calls stubbed, so what
    gpu_check.sh runs has at least executed once (memory numbers are meaningless here)."""
    from benchmarks import measure, worker

    for fn in ("synchronize", "reset_peak_memory_stats", "empty_cache"):
        monkeypatch.setattr(torch.cuda, fn, lambda *a, **k: None)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda *a, **k: 0)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a, **k: 1 << 20)
    monkeypatch.setattr(measure, "time_cuda", lambda call, grads, repeats=None: (call(), (1.0, 0.9, 1.1))[1])
    rows = []
    c = Case("kl", "fwd+bwd", "tiny", 16, 16, 101, "float32")
    worker.case_cuda(c, ["naive", "sk-torch", "no-such-provider"], "cpu", lambda name, **r: rows.append((name, r)))
    got = {name: r for name, r in rows}
    assert got["floor"]["status"] == "ok" and got["floor"]["reason"].startswith("bare GEMMs")
    assert got["naive"]["status"] == "ok" and got["naive"]["peak_mib"] == 1.0
    assert got["sk-torch"]["value"] == pytest.approx(got["naive"]["value"], rel=1e-5)
    assert got["no-such-provider"]["status"] == "failed"


def test_triton_gpu_bars_verdicts():
    """benchmarks/triton_gpu.py's summary of the Triton bars: a CE row meets them only when it is
    within 1.25x its floor, faster than both Liger and cce of its group and within 64 MiB; the KL
    within 1.35x; the floor's drift within a group is reported."""
    from benchmarks.triton_gpu import bars

    def row(op, provider, ms, x, mib):
        return dict(op=op, provider=provider, ms=ms, x_floor=x, extra_mib=mib, note="")

    rows = [row("signed CE", "floor (3 GEMMs)", 10.0, 1.0, 1000.0),
            row("signed CE", "triton fast small", 12.0, 1.2, 60.0),
            row("signed CE", "triton fast big", 11.0, 1.1, 250.0),
            row("signed CE", "triton slow", 12.6, 1.26, 10.0),
            row("signed CE", "triton behind liger", 12.4, 1.24, 10.0),
            row("signed CE", "liger (unsigned)", 12.3, 1.23, 126.0),
            row("signed CE", "cce default filter (unsigned)", 40.0, 4.0, 0.0),
            row("signed CE", "floor again (drift within the group)", 10.5, 1.05, 1000.0),
            row("forward KL", "floor (4 GEMMs)", 20.0, 1.0, 0.0),
            row("forward KL", "triton", 26.0, 1.30, 700.0),
            row("forward KL", "triton 64 MiB", 30.0, 1.50, 60.0)]
    text = "\n".join(bars(rows))
    assert "triton fast small: MEETS ALL" in text
    for name in ("fast big", "slow", "behind liger"):
        assert f"triton {name}: misses" in text
    assert "forward KL, triton: meets (1.30x)" in text and "forward KL, triton 64 MiB: misses" in text
    assert "signed CE: floor 10.00 ms at the start, 10.50 ms at the end (+5.0 %)" in text
    assert "MEETS ALL" not in "\n".join(bars(rows[:5] + rows[6:]))  # no Liger measured: not established


def test_train_step_variants_start_from_the_same_step(tmp_path):
    """benchmarks/train_step.py on a tiny Llama: every variant's warm-up step starts from the same
    parameters and records, so their first-step losses agree (the fused step, the fused step in
    one-row passes, the Hugging Face labels= path)."""
    from benchmarks import train_step

    out = tmp_path / "step.json"
    n = torch.get_num_threads()
    try:
        assert train_step.main(["--variants", "fused,fused-mb1,hf", "--hidden", "32", "--intermediate", "64",
                                "--layers", "1", "--heads", "2", "--vocab", "300", "--length", "16", "--steps", "1",
                                "--time-only", "--threads", "1", "--json", str(out)]) == 0
    finally:
        torch.set_num_threads(n)
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == ["fused", "fused-mb1", "hf"]
    first = rows[0]["first_step_losses"]
    assert set(first) == {"total", "problematic", "outdated", "updated", "retain"}
    for r in rows[1:]:
        assert r["first_step_losses"] == pytest.approx(first, rel=1e-4, abs=1e-4), r["variant"]


def test_worker_leaves_after_an_error_that_breaks_the_cuda_context():
    """After an illegal memory access or a device-side assert every later CUDA call of the process
    fails: the worker exits and the runner starts a fresh one for the remaining cases. Out of
    memory and ordinary errors do not end it."""
    from benchmarks.worker import poisons_context

    assert poisons_context(RuntimeError("CUDA error: an illegal memory access was encountered"))
    assert poisons_context(RuntimeError("CUDA error: device-side assert triggered"))
    assert not poisons_context(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not poisons_context(ValueError("liger_kernel: shape mismatch"))


def _fake_workers(monkeypatch, behaviours):
    """runner's worker processes replaced: the i-th call writes the rows of its spec's first case
    for the providers it lists (``behaviours[i]`` = (those providers, then what to do: None,
    "timeout" or "ctrl-c"))."""
    calls = iter(behaviours)

    def fake_run(cmd, **kw):
        spec, out = json.loads(Path(cmd[-2]).read_text()), Path(cmd[-1])
        done, then = next(calls)
        task = spec["tasks"][0]
        with out.open("a") as f:
            for name in done:
                f.write(json.dumps({"case": task["case"], "provider": name, "status": "ok", "median_ms": 1.0,
                                    "p20_ms": 1.0, "p80_ms": 1.0, "runs": 2, "peak_mib": 1.0, "value": 1.0}) + "\n")
            if then == "ctrl-c":
                f.write('{"case": {"op"')  # a line cut by the kill
        if then == "timeout":
            raise subprocess.TimeoutExpired(cmd, 1)
        if then == "ctrl-c":
            raise KeyboardInterrupt

    monkeypatch.setattr(runner.subprocess, "run", fake_run)


SMOKE = ["run", "--preset", "smoke", "--ops", "ce", "--n", "64", "--providers", "naive,sk-torch"]


def test_interrupted_run_keeps_what_it_measured(tmp_path, monkeypatch):
    """Ctrl-C in the second case: the first case's rows and the second's finished ones are written
    (results.json marked interrupted, exit 130); the rest are skipped, not lost."""
    from benchmarks.__main__ import main

    _fake_workers(monkeypatch, [(["floor", "naive", "sk-torch"], None), (["floor"], "ctrl-c")])
    assert main(SMOKE + ["--output", str(tmp_path)]) == 130
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["meta"]["interrupted"] is True
    status = {(r["mode"], r["provider"]): r["status"] for r in res["rows"]}
    assert status == {("fwd", "floor"): "ok", ("fwd", "naive"): "ok", ("fwd", "sk-torch"): "ok",
                      ("fwd+bwd", "floor"): "ok", ("fwd+bwd", "naive"): "skipped", ("fwd+bwd", "sk-torch"): "skipped"}


def test_failed_measurements_fail_the_command(tmp_path, monkeypatch, capsys):
    """A failed row (here: the worker of the second case timed out) makes the exit status 1 and is
    listed at the end, so a script (gpu_check.sh) sees it; bad options are refused up front."""
    from benchmarks.__main__ import main

    _fake_workers(monkeypatch, [(["floor", "naive", "sk-torch"], None), ([], "timeout")])
    assert main(SMOKE + ["--output", str(tmp_path / "a")]) == 1
    assert "3 measurement(s) failed" in capsys.readouterr().err
    for bad, what in ((["--providers", "naive,sk_torch"], "--providers: unknown sk_torch"),
                      (["--repeats", "0"], "--repeats must be > 0"), (["--time-limit", "0"], "--time-limit must be"),
                      (["--n", "abc"], "--n must be comma-separated token counts")):
        args = [a for a in SMOKE if a not in ("--providers", "naive,sk-torch")] if bad[0] == "--providers" else SMOKE
        if bad[0] == "--n":
            args = SMOKE[:5] + SMOKE[7:]
        assert main(args + bad + ["--output", str(tmp_path / "b")]) == 2
        assert what in capsys.readouterr().err
    assert main(["run", "--gpu-check", "--output", str(tmp_path / "g")]) == 2  # the 7B heads, on the CPU
    assert "add --device cuda" in capsys.readouterr().err
    (tmp_path / "f").write_text("")
    assert main(SMOKE + ["--output", str(tmp_path / "f")]) == 2
    assert "is a file" in capsys.readouterr().err
    # a run merged with itself would count every row twice
    assert main(["report", str(tmp_path / "m"), "--merge", str(tmp_path / "a"), str(tmp_path / "a") + "/"]) == 2
    assert "names a run twice" in capsys.readouterr().err
