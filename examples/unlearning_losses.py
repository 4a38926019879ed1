"""Other unlearning objectives on surgery_kernels — gradient difference, NPO, SimNPO, WGA — computed
from final hidden states and the lm_head weight, never materializing the logits: what an
unlearning framework's trainer calls in place of its logits-based losses.

    python examples/unlearning_losses.py [--method npo] [--steps 30] [--backend auto]

A tiny model first learns the capital facts (``tiny.corpus``), then forgets one country's three
sentences with the chosen method, while a token-level KL to the model as it was before unlearning
holds the other sentences where they were. Each function below takes ``(hidden (B, T, H), weight
(V, H), target (B, T))`` with ``target`` already shifted (-100 where no loss) and is checked
against the same formula on materialized logits in ``tests/test_examples.py``.
"""

from __future__ import annotations

import argparse
import copy

import torch
import torch.nn.functional as F

import tiny
from distill_custom_loop import hidden_and_head, shifted
from surgery_kernels import linear_cross_entropy, linear_kl_div

IGNORE = -100


def sequence_nll(hidden, weight, target, **kw):
    """Per sequence (B,): ``-log pi(y | x)``, the summed CE of its live targets. reduction="none"
    honours any upstream gradient (its backward recomputes the logits chunk by chunk)."""
    return linear_cross_entropy(hidden, weight, target, reduction="none", **kw).sum(-1)


def grad_diff(forget, retain, weight, *, retain_weight=1.0, **kw):
    """Gradient difference: ascent on the forget tokens' mean CE, descent on the retain tokens'
    (``forget``, ``retain``: (hidden, target) pairs). One signed call over both sets' live tokens,
    whose per-token weights carry each set's sign and mean (the trainer's CE streams, in small)."""
    (hf, tf), (hr, tr) = forget, retain
    lf, lr = tf != IGNORE, tr != IGNORE
    h = torch.cat([hf[lf], hr[lr]])
    t = torch.cat([tf[lf], tr[lr]])
    nf, nr = int(lf.sum()), int(lr.sum())
    acc = torch.float64 if h.dtype == torch.float64 else torch.float32  # weights in 16 bits would round
    w = torch.cat([torch.full((nf,), -1.0 / max(nf, 1), dtype=acc),
                   torch.full((nr,), retain_weight / max(nr, 1), dtype=acc)]).to(h.device)
    return linear_cross_entropy(h, weight, t, token_weight=w, reduction="sum", **kw)


def npo(hidden, weight, target, ref_hidden, ref_weight, *, beta=0.1, **kw):
    """NPO (Zhang et al., 2024): ``-(2 / beta) * mean_seq log sigmoid(beta * (nll - nll_ref))``, the
    reference's sequence NLL from its own final hidden states and head, without gradient."""
    nll = sequence_nll(hidden, weight, target, **kw)
    with torch.no_grad():
        ref = sequence_nll(ref_hidden, ref_weight, target, **kw)
    return -2.0 / beta * F.logsigmoid(beta * (nll - ref)).mean()


def simnpo(hidden, weight, target, *, beta=2.5, delta=0.0, **kw):
    """SimNPO (Fan et al., 2024): NPO without a reference, on the length-normalized NLL:
    ``-(2 / beta) * mean_seq log sigmoid(beta * (nll / |y| - delta))`` (``delta`` is the paper's
    reward margin gamma divided by beta)."""
    n = (target != IGNORE).sum(-1).clamp_min(1)
    return -2.0 / beta * F.logsigmoid(beta * (sequence_nll(hidden, weight, target, **kw) / n - delta)).mean()


def wga(hidden, weight, target, *, beta=1.0, **kw):
    """Weighted gradient ascent (Wang et al., 2025): ascent on each token's CE weighted by its own
    probability to the power beta, ``-(mean over live tokens of p_i**beta * ce_i)``, no gradient
    through the weight (detach it: a weight that requires grad would get one)."""
    ce = linear_cross_entropy(hidden, weight, target, reduction="none", **kw)
    live = target != IGNORE
    w = torch.exp(-beta * ce.detach())
    return -(w * ce).sum() / live.sum().clamp_min(1)


METHODS = ("grad_diff", "npo", "simnpo", "wga")


def main(argv=None) -> dict:
    """Learn the facts, then unlearn one country's; return per-step forget / retain NLL and the KL."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--method", choices=METHODS, default="npo")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--learn-steps", type=int, default=60)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1.0)
    p.add_argument("--backend", default="auto")
    args = p.parse_args(argv)
    kw = dict(backend=args.backend)

    texts = tiny.corpus()
    tok = tiny.tokenizer(texts)
    enc = lambda xs: tok(["[BOS] " + x for x in xs], padding=True, return_tensors="pt")
    n_forget = len(tiny.TEMPLATES)  # the first country's sentences
    batches = {}
    for name, xs in (("all", texts), ("forget", texts[:n_forget]), ("retain", texts[n_forget:])):
        b = enc(xs)
        target = shifted(b["input_ids"].masked_fill(b["attention_mask"] == 0, IGNORE))
        batches[name] = (b["input_ids"], b["attention_mask"], target)

    model = tiny.model(len(tok), hidden_size=64, layers=2, seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, att, tgt = batches["all"]
    for _ in range(args.learn_steps):
        h, w = hidden_and_head(model, ids, att)
        loss = linear_cross_entropy(h, w, tgt, **kw)
        opt.zero_grad()
        loss.backward()
        opt.step()

    reference = copy.deepcopy(model).eval().requires_grad_(False)

    def mean_nll(m, name):
        ids, att, tgt = batches[name]
        with torch.no_grad():
            h, w = hidden_and_head(m, ids, att)
            return linear_cross_entropy(h, w, tgt, **kw).item()

    history = {"forget_nll": [mean_nll(model, "forget")], "retain_nll": [mean_nll(model, "retain")], "kl": []}
    print(f"{args.method} before    forget NLL {history['forget_nll'][0]:.3f}  "
          f"retain NLL {history['retain_nll'][0]:.3f}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    (fi, fa, ft), (ri, ra, rt) = batches["forget"], batches["retain"]
    with torch.no_grad():
        ref_f = hidden_and_head(reference, fi, fa)
        ref_r = hidden_and_head(reference, ri, ra)
    for step in range(args.steps):
        hf, w = hidden_and_head(model, fi, fa)
        hr, _ = hidden_and_head(model, ri, ra)
        if args.method == "grad_diff":
            forget = grad_diff((hf, ft), (hr, rt), w, **kw)
        elif args.method == "npo":
            forget = npo(hf, w, ft, *ref_f, **kw)
        elif args.method == "simnpo":
            forget = simnpo(hf, w, ft, **kw)
        else:
            forget = wga(hf, w, ft, **kw)
        kl = linear_kl_div(hr, w, *ref_r, mask=rt != IGNORE, **kw)
        loss = forget + args.kl_weight * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        history["kl"].append(kl.item())
        history["forget_nll"].append(mean_nll(model, "forget"))
        history["retain_nll"].append(mean_nll(model, "retain"))
        if step == 0 or (step + 1) % 10 == 0 or step == args.steps - 1:  # steps 1, 10, 20, ... and the last
            # the NLLs after this step's update; the KL is its loss term (before the update)
            print(f"{args.method} step {step + 1:3d}  forget NLL {history['forget_nll'][-1]:.3f}  "
                  f"retain NLL {history['retain_nll'][-1]:.3f}  (after the step)  KL {kl.item():.4f} (its loss term)")
    return history


if __name__ == "__main__":
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    main()
