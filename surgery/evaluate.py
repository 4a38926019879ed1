"""Evaluation without logits: multiple-choice accuracy by answer likelihood, and perplexity.

Both score tokens with ``linear_cross_entropy(reduction="none")`` on the final hidden states under
``torch.no_grad()``, so no ``[tokens, vocab]`` tensor is made. Usable on their own::

    from surgery.evaluate import multiple_choice, perplexity
    multiple_choice(model, tokenizer, [{"question": "...", "choices": [...], "answer": 0}])

``model`` is a causal LM (peft-wrapped or not) or the trainer's ``SurgeryObjective``.

Multiple choice (the paper's method, as in the authors' code): each choice is scored by the mean
log-likelihood of its tokens given the question — the choice with the lowest perplexity
exp(mean NLL) wins — in ``accuracy``; ``accuracy_sum`` scores by the summed log-likelihood
instead (it favours short choices). The choice's tokens are those it has in ``question + sep +
choice`` (``data.tokens_after``: a tokenizer that marks a word start, SentencePiece's "▁", scores
them as they stand in the sentence); a choice that starts with whitespace (``" Paris"``, as
Hugging Face data often writes them) or a question that ends with it brings its own separator, and
``sep`` is not added (it would score one more space token). Ties go to the first choice. A choice
longer than ``max_length - 1`` tokens loses its end (the training rule, ``data.fit_to_length``):
choices that differ only there would tie, so that is logged as a warning.

Perplexity: ``perplexity`` is the corpus's, exp(total NLL / tokens); ``perplexity_per_document``
the mean over records of each one's exp(mean NLL), the paper's (its documents count equally,
whatever their length).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from .config import check_max_length
from .data import Example, collate, fit_to_length, read_records, tokenize_lm, tokens_after

log = logging.getLogger("surgery")


def _scorer(model, backend: str):
    from .objective import SurgeryObjective

    obj = model if isinstance(model, SurgeryObjective) else SurgeryObjective(model, backend=backend)
    return obj


def _device(model) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


@torch.no_grad()
def token_nll(model, examples: list[Example], tokenizer, *, batch_size: int = 16, backend: str = "auto",
              device=None) -> list[torch.Tensor]:
    """Per example, the NLL (float32, CPU) of each token that carries loss, in order."""
    obj = _scorer(model, backend)
    device = device or _device(obj)
    was_training = obj.training
    obj.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    try:
        # Longest first keeps padding low within a batch.
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i].ids))
        res: dict[int, torch.Tensor] = {}
        for s in range(0, len(order), batch_size):
            idx = order[s:s + batch_size]
            b = collate([examples[i] for i in idx], pad, idx).to(device)
            nll = obj("nll", b.input_ids, b.attention_mask, b.target).float().cpu()
            m = b.mask.cpu()
            for r, i in enumerate(idx):
                res[i] = nll[r][m[r]]
        out = [res[i] for i in range(len(examples))]
    finally:
        obj.train(was_training)
    return out


def multiple_choice(model, tokenizer, records, *, sep: str = " ", batch_size: int = 16, max_length: int | None = None,
                    backend: str = "auto", device=None, details: bool = False,
                    name: str = "eval records") -> dict[str, Any]:
    """Accuracy of 3-option (or any-option) questions by answer log-likelihood.

    records: list of ``{"question", "choices", "answer"}`` (or a file path). Returns
    ``{"accuracy", "accuracy_sum", "n"}`` (by mean and by summed log-likelihood, module
    docstring) and, with ``details=True``, ``"questions"``: per question the summed
    log-likelihood and token count of each choice, the picks (``pick`` by mean, ``pick_sum``) and
    the answer.
    """
    check_max_length("max_length", max_length)
    records = read_records(records, "choice", name=name)
    examples, owner = [], []
    cut = 0
    for qi, rec in enumerate(records):
        q = list(tokenizer(rec["question"])["input_ids"])
        for c in rec["choices"]:
            own = c[:1].isspace() or rec["question"][-1:].isspace()  # the separator is in the text
            p, c_ids = tokens_after(tokenizer, rec["question"], c if own else sep + c, prefix_ids=q)
            if max_length is not None:  # the training rule: the choice whole, the question's BOS kept
                cut += len(c_ids) > max_length - 1
                p, c_ids = fit_to_length(p, c_ids, max_length, tokenizer.bos_token_id)
            examples.append(Example(p + c_ids, max(1, len(p))))
            owner.append(qi)
    if cut:
        log.warning("%s: %d of %d choices are longer than max_length - 1 = %d tokens and lose their end; "
                    "choices that differ only there score alike (ties go to the first): raise max_length "
                    "(the eval set's, or train.max_length)", name, cut, len(examples), max_length - 1)
    nll = token_nll(model, examples, tokenizer, batch_size=batch_size, backend=backend, device=device)
    correct = correct_sum = 0
    per_q = []
    k = 0
    for rec in records:
        n = len(rec["choices"])
        ll = [-float(nll[k + j].double().sum()) for j in range(n)]
        ntok = [int(nll[k + j].numel()) for j in range(n)]
        k += n
        ans = rec["answer"] if isinstance(rec["answer"], int) else rec["choices"].index(rec["answer"])
        pick = max(range(n), key=lambda j: (ll[j] / max(ntok[j], 1), -j))
        pick_sum = max(range(n), key=lambda j: (ll[j], -j))
        correct += pick == ans
        correct_sum += pick_sum == ans
        per_q.append({"loglik": ll, "tokens": ntok, "pick": pick, "pick_sum": pick_sum, "answer": ans})
    out = {"accuracy": correct / len(records), "accuracy_sum": correct_sum / len(records), "n": len(records)}
    if details:
        out["questions"] = per_q
    return out


def perplexity(model, tokenizer, records, *, batch_size: int = 16, max_length: int = 4096, backend: str = "auto",
               device=None, name: str = "perplexity records") -> dict[str, Any]:
    """Perplexity over text records (``{"text"}``, ``{"prompt", "completion"}``, plain strings, or a
    file path): ``perplexity`` = exp(total NLL / tokens), ``perplexity_per_document`` = the mean of
    each record's exp(mean NLL) (the paper's), ``nll`` = total NLL / tokens."""
    if isinstance(records, (list, tuple)) and records and all(isinstance(r, str) for r in records):
        records = [{"text": r} for r in records]
    records = read_records(records, "lm", name=name)
    examples = tokenize_lm(records, tokenizer, max_length, name=name)
    nll = token_nll(model, examples, tokenizer, batch_size=batch_size, backend=backend, device=device)
    total = sum(float(x.double().sum()) for x in nll)
    n = sum(int(x.numel()) for x in nll)
    mean = total / max(n, 1)
    per_doc = [_exp(float(x.double().mean())) for x in nll if x.numel()]
    return {"perplexity": _exp(mean), "perplexity_per_document": sum(per_doc) / max(len(per_doc), 1), "nll": mean,
            "tokens": n, "n": len(records)}


def _exp(x: float) -> float:
    """exp, inf past float64's range (a mean NLL above ~709.8: a forget set after unbounded ascent)."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def evaluate_set(model, tokenizer, eval_set, *, backend: str = "auto", device=None, max_length: int = 4096):
    """Run one :class:`~surgery.config.EvalSet` (records already validated or a path)."""
    data = eval_set.data
    kind = eval_set.kind
    if kind == "auto":
        recs = read_records(data, "auto", name=eval_set.name)
        kind = "choice" if "question" in recs[0] else "perplexity"
        data = recs
    ml = eval_set.max_length or max_length
    if kind == "choice":
        return multiple_choice(model, tokenizer, data, batch_size=eval_set.batch_size, max_length=ml,
                               backend=backend, device=device, name=eval_set.name)
    return perplexity(model, tokenizer, data, batch_size=eval_set.batch_size, max_length=ml, backend=backend,
                      device=device, name=eval_set.name)
