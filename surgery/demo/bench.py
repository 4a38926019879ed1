"""The embedded benchmark: probe what the model knows, build the surgery sets from it, evaluate,
run surgery and its ablations through the trainer, evaluate again, write the tables.

Sets, all built deterministically from ``seed``:

- **probe**: every country/capital fact asked as a 3-option question (two other capitals of the
  same region as distractors) in the framings of ``facts.PROBE_TEMPLATES``; a fact is *known*
  when every framing picks the true capital.
- **unlearn**: ``n_unlearn`` known facts; their statements are the ascent stream.
- **edit**: ``n_edit`` known facts whose true capital is *outdated* (ascent) and replaced by an
  invented one, the *updated* fact (descent). Evaluated as ``update`` (does the model pick the
  new capital?) and ``outdated`` (does it still pick the old one?) on one question each, choices
  [new, old, a regional distractor].
- **retain**: half of the remaining known facts, *stated in the retain stream* (the KL term)
  next to Wikipedia paragraphs — the paper's measure; **retain_heldout**: the other half, in no
  stream — collateral damage on facts nobody protected.
- **perplexity**: Wikipedia paragraphs in no stream.

Training statements are declarative (``facts.TRAIN_TEMPLATES``, loss on the answer only); the
evaluation question (``facts.QUESTION``) is a form no training sentence uses.
"""

from __future__ import annotations

import copy
import json
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from . import facts as F
from .score import accuracy, choice_scores

# name -> the streams it trains on (full surgery and its ablations: one or two of its terms).
VARIANTS = {
    "ascent": ("unlearn", "outdated"),
    "descent": ("updated",),
    "ascent+descent": ("unlearn", "outdated", "updated"),
    "full": ("unlearn", "outdated", "updated", "retain_facts", "retain_text"),
}
VARIANT_LABELS = {"ascent": "ascent only", "descent": "descent only", "ascent+descent": "ascent + descent",
                  "full": "full surgery (+ KL)"}
SETS = ("unlearn", "update", "outdated", "retain", "retain_heldout")
SET_GOALS = {"unlearn": "down (chance 33%)", "update": "up", "outdated": "down", "retain": "unchanged",
             "retain_heldout": "unchanged"}


@dataclass
class DemoConfig:
    """Everything that defines a demo run (written to results.json)."""

    seed: int = 0
    n_unlearn: int = 10
    n_edit: int = 10
    steps: int = 20
    quick_steps: int = 20
    lr: float = 3.0e-5
    weight_decay: float = 0.01
    clip: float = 1.0
    # Stream coefficients (the paper's alpha, beta, gamma) and records per stream per step.
    # Chosen on seed 0 with the MLP-only training below (2026-11-27, one run each, PMI accuracy
    # retain / retain_heldout / unlearn after): gamma 4 -> 90 / 98 / 70, gamma 10 -> 94 / 100 /
    # 70, gamma 20 -> 98 / 100 / 70; beta 2 -> 1 then took unlearn to 60 at the same retention.
    alpha: float = 1.0
    beta: float = 1.0
    gamma: float = 20.0
    gamma_text: float = 1.0
    # Bounded ascent: an ascent token whose CE already exceeds this stops contributing.
    ascent_cap: float | None = 5.0
    batch_facts: int = 8
    # Retain statements per step: more than the other streams, retention is the hard part.
    batch_retain: int = 16
    batch_text: int = 4
    # The trainer pads every row of a step to the longest: fact statements are ~15 tokens, so
    # text pieces of 40 tokens made most of each step padding (20 steps: 161 s -> 100 s at 20,
    # same accuracies).
    text_max_tokens: int = 20
    n_text_train: int = 64
    n_text_eval: int = 16
    ppl_max_tokens: int = 128
    # Parameter-name patterns of what is trained (fnmatch over the model's parameter names): the
    # MLPs of all 30 blocks (attention, norms, embedding and tied head frozen). Training every
    # block (gamma 4) cost retain / retain_heldout 12 / 6 points; its MLPs alone 10 / 2, at
    # unchanged unlearn/update accuracy and a 40% shorter step.
    trainable: list = field(default_factory=lambda: ["*mlp*"])
    variants: tuple = tuple(VARIANTS)
    norm: str = "pmi"
    backend: str = "auto"


# ---------------------------------------------------------------------------------------- probe
def probe_questions(all_facts: list[F.Fact], seed: int) -> list[dict]:
    """One 3-option question per fact and framing; distractors fixed per fact by ``seed``."""
    rng = random.Random(f"probe-{seed}")
    out = []
    for f in all_facts:
        choices = [f.capital] + F.distractors(f, all_facts, 2, rng)
        order = list(range(3))
        rng.shuffle(order)
        ch = [choices[i] for i in order]
        for k, t in enumerate(F.PROBE_TEMPLATES):
            out.append({"code": f.code, "framing": k, "question": F.fill(t, f), "choices": ch,
                        "answer": ch.index(f.capital)})
    return out


def probe_key(model_name: str, all_facts: list[F.Fact], seed: int, norm: str) -> str:
    """What a probe result depends on (model, facts, framings, distractor seed, scoring), hashed:
    the real model's probe is cached next to the converted model under this key."""
    import hashlib

    h = hashlib.sha256(json.dumps([model_name, [asdict(f) for f in all_facts], F.PROBE_TEMPLATES, seed, norm,
                                   "probe-v2"]).encode())
    return h.hexdigest()[:16]


def probe(model, tok, all_facts: list[F.Fact], seed: int, norm: str = "pmi", progress=None,
          backend: str = "auto") -> dict:
    """Which facts the model knows: ``{"known": [codes], "per_framing": [correct counts], "n": ...}``."""
    qs = probe_questions(all_facts, seed)
    scores = choice_scores(model, tok, qs, progress=progress, backend=backend)
    right: dict[str, list[bool]] = {}
    per_framing = [0] * len(F.PROBE_TEMPLATES)
    for q, s in zip(qs, scores[norm]):
        ok = max(range(len(s)), key=lambda j: (s[j], -j)) == q["answer"]
        right.setdefault(q["code"], []).append(ok)
        per_framing[q["framing"]] += ok
    mean_right = sum(max(range(len(s)), key=lambda j: (s[j], -j)) == q["answer"]
                     for q, s in zip(qs, scores["mean"]) if q["framing"] == 0)
    return {"known": [c for c, v in right.items() if all(v)], "per_framing": per_framing,
            "question_mean_norm": mean_right, "n": len(all_facts), "norm": norm}


# ------------------------------------------------------------------------------------------ sets
def sentences(paragraph: str, min_chars: int = 40) -> list[str]:
    """A paragraph split after sentence-ending punctuation; fragments shorter than ``min_chars``
    stay with the previous sentence."""
    out: list[str] = []
    for part in re.split(r"(?<=[.!?])\s+(?=[A-Z])", paragraph.strip()):
        if out and len(part) < min_chars:
            out[-1] += " " + part
        else:
            out.append(part)
    return out


def _mentions(text: str, names: set[str]) -> bool:
    return any(n in text for n in names)


def build_sets(all_facts: list[F.Fact], known_codes: list[str], paragraphs: list[tuple[str, str]],
               cfg: DemoConfig) -> dict:
    """Streams (records for the trainer) and evaluation questions, from the known facts."""
    rng = random.Random(f"sets-{cfg.seed}")
    by_code = {f.code: f for f in all_facts}
    known = [by_code[c] for c in sorted(known_codes)]
    if len(known) < cfg.n_unlearn + cfg.n_edit + 4:
        raise ValueError(f"the model knows only {len(known)} facts; need n_unlearn + n_edit + 4 = "
                         f"{cfg.n_unlearn + cfg.n_edit + 4}")
    rng.shuffle(known)
    unlearn = known[:cfg.n_unlearn]
    edit = known[cfg.n_unlearn:cfg.n_unlearn + cfg.n_edit]
    rest = known[cfg.n_unlearn + cfg.n_edit:]
    retain, heldout = rest[:len(rest) // 2], rest[len(rest) // 2:]
    new_caps = F.fictitious_capitals(len(edit), rng, {f.capital for f in all_facts} | {f.country for f in all_facts})

    # Distractors as in the probe, so a known fact's question is the one the probe got right.
    probe_q = {q["code"]: q for q in probe_questions(all_facts, cfg.seed) if q["framing"] == 0}

    def question(f: F.Fact) -> dict:
        q = probe_q[f.code]
        return {"code": f.code, "question": q["question"], "choices": q["choices"], "answer": q["answer"]}

    def edit_question(f: F.Fact, new: str) -> dict:
        other = [c for c in probe_q[f.code]["choices"] if c != f.capital][0]
        ch = [new, f.capital, other]
        rng.shuffle(ch)
        return {"code": f.code, "question": F.fill(F.QUESTION, f), "choices": ch, "answer": ch.index(new),
                "old": ch.index(f.capital), "new_capital": new}

    touched = {f.country for f in unlearn + edit} | {f.capital for f in unlearn + edit}
    clean = [(t, p) for t, p in paragraphs if not _mentions(p, touched) and not _mentions(t, touched)]
    rng.shuffle(clean)
    text_train = clean[:cfg.n_text_train]
    text_eval = clean[cfg.n_text_train:cfg.n_text_train + cfg.n_text_eval]

    edit_q = [edit_question(f, n) for f, n in zip(edit, new_caps)]
    return {
        "streams": {
            "unlearn": [r for f in unlearn for r in F.statements(f)],
            "outdated": [r for f in edit for r in F.statements(f)],
            "updated": [r for f, n in zip(edit, new_caps) for r in F.statements(f, n)],
            # KL over whole sentences: the template tokens are where ascent leaks to other facts.
            "retain_facts": [{"text": r["prompt"] + r["completion"] + "."} for f in retain for r in F.statements(f)],
            # Sentences, not whole paragraphs: the trainer pads every stream of a step to one
            # length, and fact statements are ~15 tokens.
            "retain_text": [{"text": x} for _, p in text_train for x in sentences(p)],
        },
        "questions": {
            "unlearn": [question(f) for f in unlearn],
            "update": edit_q,
            "outdated": [dict(q, answer=q["old"]) for q in edit_q],
            "retain": [question(f) for f in retain],
            "retain_heldout": [question(f) for f in heldout],
        },
        "ppl_text": [p for _, p in text_eval],
        "facts": {"unlearn": [asdict(f) for f in unlearn],
                  "edit": [dict(asdict(f), new_capital=n) for f, n in zip(edit, new_caps)],
                  "retain": [f.code for f in retain], "retain_heldout": [f.code for f in heldout]},
        "text_titles": {"train": [t for t, _ in text_train], "eval": [t for t, _ in text_eval]},
    }


# ------------------------------------------------------------------------------------ evaluation
def evaluate(model, tok, sets: dict, cfg: DemoConfig, progress=None) -> dict:
    """Accuracy per set (``cfg.norm`` scoring, and the paper's per-token log-likelihood's next to it) and
    perplexity on the held-out paragraphs."""
    from surgery.evaluate import perplexity

    qs = sets["questions"]
    # update and outdated are the same questions with two answers: score them once.
    names = ["unlearn", "update", "retain", "retain_heldout"]
    flat = [q for n in names for q in qs[n]]
    scores = choice_scores(model, tok, flat, progress=progress, backend=cfg.backend)
    out, k = {}, 0
    for n in names:
        m = len(qs[n])
        out[n] = {"accuracy": accuracy(qs[n], scores[cfg.norm][k:k + m]),
                  "accuracy_mean": accuracy(qs[n], scores["mean"][k:k + m]), "n": m}
        if n == "update":
            out["outdated"] = {"accuracy": accuracy(qs["outdated"], scores[cfg.norm][k:k + m]),
                               "accuracy_mean": accuracy(qs["outdated"], scores["mean"][k:k + m]), "n": m}
        k += m
    ppl = perplexity(model, tok, sets["ppl_text"], max_length=cfg.ppl_max_tokens, batch_size=16, backend=cfg.backend)
    out["ppl"] = ppl["perplexity"]
    return out


# ------------------------------------------------------------------------------------- training
def streams_for(variant: str, sets: dict, cfg: DemoConfig):
    from surgery import Stream

    spec = {
        "unlearn": ("ascent", cfg.alpha, cfg.batch_facts, None),
        "outdated": ("ascent", cfg.alpha, cfg.batch_facts, None),
        "updated": ("descent", cfg.beta, cfg.batch_facts, None),
        "retain_facts": ("kl", cfg.gamma, cfg.batch_retain, None),
        "retain_text": ("kl", cfg.gamma_text, cfg.batch_text, cfg.text_max_tokens),
    }
    out = []
    for name in VARIANTS[variant]:
        loss, w, bs, ml = spec[name]
        if w > 0 and sets["streams"][name]:
            out.append(Stream(name, sets["streams"][name], loss=loss, weight=w, batch_size=bs, max_length=ml))
    return out


def train_variant(base_model, tok, sets: dict, variant: str, cfg: DemoConfig, progress: bool = True):
    """A trained copy of ``base_model`` (the base is left untouched) and the per-step metrics."""
    from surgery import Surgery

    model = copy.deepcopy(base_model)
    run = Surgery(model=model, tokenizer=tok, streams=streams_for(variant, sets, cfg), reference="copy",
                  train={"steps": cfg.steps, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "clip": cfg.clip,
                         "seed": cfg.seed, "progress": progress, "backend": cfg.backend, "max_length": 256,
                         "ascent_cap": cfg.ascent_cap},
                  trainable=list(cfg.trainable), output_dir=None)
    history = run.train()
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, history, len(run.trainable_names)


# ---------------------------------------------------------------------------------------- output
def results_dict(before: dict, after: dict[str, dict], cfg: DemoConfig, meta: dict) -> dict:
    """The results.json object: top-level ``sets``/``retain_ppl`` are full
    surgery (or the last variant run when full surgery was not run)."""
    main = "full" if "full" in after else list(after)[-1]
    res = {
        "sets": {n: {"before": before[n]["accuracy"], "after": after[main][n]["accuracy"], "n": before[n]["n"],
                     "before_mean": before[n]["accuracy_mean"], "after_mean": after[main][n]["accuracy_mean"]}
                 for n in SETS},
        "retain_ppl": {"before": before["ppl"], "after": after[main]["ppl"]},
        "main_variant": main,
        "ablations": {v: {"sets": {n: a[n]["accuracy"] for n in SETS},
                          "sets_mean": {n: a[n]["accuracy_mean"] for n in SETS},
                          "retain_ppl": a["ppl"], "final_losses": a.get("final_losses", {})}
                      for v, a in after.items()},
        "config": asdict(cfg),
    }
    res["config"]["variants"] = list(cfg.variants)
    res.update(meta)
    return res


def _pct(x: float) -> str:
    return "—" if x != x else f"{100 * x:.0f}%"


def markdown_table(res: dict) -> str:
    """Accuracy per set before and after each variant, and perplexity, as Markdown."""
    variants = list(res["ablations"])
    head = ["set (n)", "goal", "before"] + [VARIANT_LABELS.get(v, v) for v in variants]
    rows = [head, ["---"] * len(head)]
    for n in SETS:
        rows.append([f"{n} ({res['sets'][n]['n']})", SET_GOALS[n], _pct(res["sets"][n]["before"])]
                    + [_pct(res["ablations"][v]["sets"][n]) for v in variants])
    rows.append(["retain perplexity", "within +10%", f"{res['retain_ppl']['before']:.2f}"]
                + [f"{res['ablations'][v]['retain_ppl']:.2f}" for v in variants])
    return "\n".join("| " + " | ".join(r) + " |" for r in rows) + "\n"


def text_table(res: dict) -> str:
    variants = list(res["ablations"])
    head = ["set (n)", "before"] + [VARIANT_LABELS.get(v, v) for v in variants]
    body = [[f"{n} ({res['sets'][n]['n']})", _pct(res["sets"][n]["before"])]
            + [_pct(res["ablations"][v]["sets"][n]) for v in variants] for n in SETS]
    body.append(["retain perplexity", f"{res['retain_ppl']['before']:.2f}"]
                + [f"{res['ablations'][v]['retain_ppl']:.2f}" for v in variants])
    widths = [max(len(r[i]) for r in [head] + body) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
    return "\n".join([fmt(head), "-" * len(fmt(head))] + [fmt(r) for r in body]) + "\n"


def bar_chart(res: dict, path: Path, title: str) -> None:
    """Grouped bars: accuracy per set, before and after each variant; perplexity in the legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = list(res["ablations"])
    series = [("before", [res["sets"][n]["before"] for n in SETS], res["retain_ppl"]["before"])]
    series += [(VARIANT_LABELS.get(v, v), [res["ablations"][v]["sets"][n] for n in SETS],
                res["ablations"][v]["retain_ppl"]) for v in variants]
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / len(series)
    for i, (label, ys, ppl) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(SETS))]
        ax.bar(xs, [100 * y for y in ys], width, label=f"{label} (ppl {ppl:.1f})")
    ax.axhline(100 / 3, color="gray", linestyle="--", linewidth=1, label="chance (3 options)")
    ax.set_xticks(range(len(SETS)))
    ax.set_xticklabels([f"{n}\n({SET_GOALS[n]})" for n in SETS])
    ax.set_ylabel("3-option accuracy (%)")
    ax.set_ylim(0, 105)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
