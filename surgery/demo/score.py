"""Multiple-choice scoring for the demo, on top of the trainer's logit-free evaluation
(``surgery.evaluate.multiple_choice``: answer log-likelihoods through
``surgery_kernels.linear_cross_entropy(reduction="none")``, no ``[tokens, vocab]`` tensor).

The paper scores a choice by the mean log-likelihood of its tokens given the question (the
lowest perplexity wins). Answer likelihood, summed or per token, favours frequent names, so the
demo scores by **PMI** instead:
log p(choice | question) - log p(choice | "Answer:"), how much the question raises the choice's
likelihood over a neutral prompt (Holtzman et al. 2021, "Surface Form Competition"). It also puts
an invented name (the edit set's new capitals) on equal footing with a real one: its low prior is
divided out. Measured on SmolLM2-135M-Instruct, 179 capitals, the demo's question and same-region
distractors (2026-11-27): summed 125/179 right, per token 121/179, PMI 137/179 (choices in a fixed
order); with the demo's shuffled choices (seed 0) summed 127/179, PMI 131/179. The per-token
(paper's) score's accuracy is reported next to PMI's in results.json (``*_mean``).
"""

from __future__ import annotations

from surgery.evaluate import multiple_choice

NEUTRAL_PROMPT = "Answer:"
NORMS = ("pmi", "sum", "mean")


def choice_scores(model, tok, questions: list[dict], batch_size: int = 64, progress=None,
                  backend: str = "auto") -> dict[str, list]:
    """Scores (higher = more likely) of every choice of every question ``{"question", "choices"}``
    under each normalization: ``{"pmi": [[...], ...], "sum": ..., "mean": ...}``.

    "pmi": log-likelihood given the question minus given ``NEUTRAL_PROMPT``; "sum": the summed
    log-likelihood; "mean": per answer token (the paper's score).
    """
    if not questions:
        return {n: [] for n in NORMS}
    recs = [{"question": q["question"], "choices": list(q["choices"]), "answer": 0} for q in questions]
    names = sorted({c for q in questions for c in q["choices"]})
    # One record per 64 names for the neutral prompt (a record needs >= 2 choices).
    prior_recs = [{"question": NEUTRAL_PROMPT, "choices": (names[s:s + 64] + names[:1])[:max(2, len(names[s:s + 64]))],
                   "answer": 0} for s in range(0, len(names), 64)]
    # Score in slices so the progress bar moves; the result does not depend on the slicing.
    per_q = []
    step = max(1, batch_size // 3)
    for s in range(0, len(recs), step):
        per_q += multiple_choice(model, tok, recs[s:s + step], batch_size=batch_size, details=True,
                                 backend=backend)["questions"]
        if progress is not None:
            progress.update(len(recs[s:s + step]))
    prior = {}
    for r, res in zip(prior_recs, multiple_choice(model, tok, prior_recs, batch_size=batch_size, details=True,
                                                  backend=backend)["questions"]):
        prior.update(zip(r["choices"], res["loglik"]))
    return {
        "pmi": [[ll - prior[c] for ll, c in zip(r["loglik"], q["choices"])] for r, q in zip(per_q, questions)],
        "sum": [r["loglik"] for r in per_q],
        "mean": [[ll / max(n, 1) for ll, n in zip(r["loglik"], r["tokens"])] for r in per_q],
    }


def accuracy(questions: list[dict], scores: list[list[float]], key: str = "answer") -> float:
    """Fraction of questions whose ``q[key]`` (a choice index) has the highest score (ties: the first)."""
    if not questions:
        return float("nan")
    right = sum(max(range(len(s)), key=lambda j: (s[j], -j)) == q[key] for q, s in zip(questions, scores))
    return right / len(questions)
