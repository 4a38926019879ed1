"""The examples under examples/ run (few steps: they are there to show the API, not to train)
and do what they claim."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("datasets")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from surgery_kernels.reference import linear_cross_entropy_ref, linear_kl_div_ref  # noqa: E402


def _rel(a, b) -> float:
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def test_hf_trainer_patched_run_matches_the_plain_run():
    """A convergence test: the stock Trainer with the patched model follows the same loss curve
    as with Hugging Face's own loss, and ends at the same weights."""
    import hf_trainer

    steps = 6
    patched = hf_trainer.main(["--steps", str(steps), "--backend", "torch"])
    plain = hf_trainer.main(["--steps", str(steps), "--no-patch"])
    # Gradient accumulation is on, so the Trainer passed num_items_in_batch to the patched forward.
    assert patched.model_accepts_loss_kwargs
    losses = [[h["loss"] for h in t.state.log_history if "loss" in h] for t in (patched, plain)]
    assert len(losses[0]) == len(losses[1]) == steps
    for ours, theirs in zip(*losses):
        assert abs(ours - theirs) <= 1e-5 * abs(theirs)
    assert losses[0][-1] < losses[0][0]
    evals = [[h["eval_loss"] for h in t.state.log_history if "eval_loss" in h] for t in (patched, plain)]
    assert len(evals[0]) == 1 and abs(evals[0][0] - evals[1][0]) <= 1e-5 * abs(evals[1][0])
    # AdamW normalizes each update, so 1e-7-level gradient differences move weights a little more
    # than they move the loss; after 6 steps the weights still agree to 1e-5 here.
    theirs = dict(plain.model.named_parameters())
    for name, p in patched.model.named_parameters():
        assert _rel(p.detach(), theirs[name].detach()) <= 1e-5, name


def test_distillation_loop_with_different_hidden_sizes():
    import distill_custom_loop as ex
    import tiny

    out = ex.main(["--steps", "6", "--teacher-steps", "3", "--backend", "torch"])
    teacher, student = out["teacher"], out["student"]
    assert teacher.config.hidden_size != student.config.hidden_size
    assert out["kl"][-1] < out["kl"][0] and out["ce"][-1] < out["ce"][0]

    # The first step's losses equal the materialized float64 reference for the untrained student.
    texts = tiny.corpus()
    tok = tiny.tokenizer(texts)
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, attn = batch["input_ids"], batch["attention_mask"]
    target = ex.shifted(ids.masked_fill(attn == 0, -100))
    fresh = tiny.model(len(tok), hidden_size=48, layers=1, seed=2)
    with torch.no_grad():
        h, w = ex.hidden_and_head(fresh, ids, attn)
        th, tw = ex.hidden_and_head(teacher, ids, attn)
        ce = linear_cross_entropy_ref(h, w, target, compute_dtype=torch.float64)
        kl = linear_kl_div_ref(h, w, th, tw, mask=target != -100, temperature=2.0, compute_dtype=torch.float64)
    assert _rel(out["ce"][0], ce) <= 1e-5
    assert _rel(out["kl"][0], kl) <= 1e-5


def _logits_losses(h, w, t, rh, rw, method):
    """The unlearning objectives of examples/unlearning_losses.py on materialized float64 logits,
    written the way a framework writes them."""
    def seq_nll(h, w):
        ce = torch.nn.functional.cross_entropy((h @ w.T).transpose(1, 2), t.clamp_min(0), reduction="none")
        return (ce * (t != -100)).sum(-1)

    live = t != -100
    if method == "npo":
        return -2 / 0.1 * torch.nn.functional.logsigmoid(0.1 * (seq_nll(h, w) - seq_nll(rh, rw).detach())).mean()
    if method == "simnpo":
        return -2 / 2.5 * torch.nn.functional.logsigmoid(2.5 * seq_nll(h, w) / live.sum(-1)).mean()
    logp = torch.log_softmax(h @ w.T, -1).gather(-1, t.clamp_min(0)[..., None])[..., 0]
    return -(logp.exp().detach() * -logp)[live].mean()  # wga, beta 1


@pytest.mark.parametrize("method", ["grad_diff", "npo", "simnpo", "wga"])
def test_unlearning_losses_match_logits(method):
    """Each objective of examples/unlearning_losses.py, loss and gradients, equals its formula on
    materialized logits (float64)."""
    import unlearning_losses as ex

    g = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 7, 8, 29
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    rh, rw = torch.randn(B, T, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)
    t = torch.randint(0, V, (B, T), generator=g)
    t[0, :2] = t[2, 5:] = -100
    if method == "grad_diff":  # rows 0-1 forget, row 2 retain with weight 0.5
        ours = ex.grad_diff((h[:2], t[:2]), (h[2:], t[2:]), w, retain_weight=0.5, backend="torch")
        logits = h @ w.T
        ce = torch.nn.functional.cross_entropy(logits.transpose(1, 2), t, reduction="none", ignore_index=-100)
        lf, lr = t[:2] != -100, t[2:] != -100
        ref = -ce[:2][lf].mean() + 0.5 * ce[2:][lr].mean()
    else:
        call = {"npo": lambda: ex.npo(h, w, t, rh, rw, backend="torch"),
                "simnpo": lambda: ex.simnpo(h, w, t, backend="torch"),
                "wga": lambda: ex.wga(h, w, t, backend="torch")}[method]
        ours, ref = call(), _logits_losses(h, w, t, rh, rw, method)
    got, exp = torch.autograd.grad(ours, [h, w]), torch.autograd.grad(ref, [h, w])
    assert _rel(ours.detach(), ref.detach()) < 1e-12
    for a, b in zip(got, exp):
        assert _rel(a, b) < 1e-10


@pytest.mark.parametrize("method", ["grad_diff", "npo", "simnpo", "wga"])
def test_unlearning_run_forgets_one_country(method):
    """examples/unlearning_losses.py: after learning the facts, 10 steps of each method raise the
    forgotten sentences' NLL by well over a nat while the KL term keeps the others' NLL within a
    quarter of that rise."""
    import unlearning_losses as ex

    hist = ex.main(["--method", method, "--steps", "10", "--backend", "torch"])
    rise = hist["forget_nll"][-1] - hist["forget_nll"][0]
    assert hist["forget_nll"][0] < 1.0 and rise > 1.5
    assert abs(hist["retain_nll"][-1] - hist["retain_nll"][0]) < 0.25 * rise


def test_quickstart_measures_in_a_child_and_reports_one_that_dies():
    """examples/quickstart.py measures each case in a fresh process; a case that died (an
    exception, a kill for memory) left the parent waiting on its queue forever."""
    import argparse
    import threading

    import quickstart

    def measure(args):
        """quickstart.measure with a deadline: a regression to blocking fails instead of hanging."""
        out = {}

        def run():
            try:
                out["result"] = quickstart.measure(args, "ours" if args.backend != "naive" else "naive", "signed CE")
            except Exception as exc:  # handed to the test's thread
                out["error"] = exc
        t = threading.Thread(target=run, daemon=True)
        t.start()
        t.join(timeout=180)
        assert not t.is_alive(), "quickstart.measure blocked on a measuring process"
        if "error" in out:
            raise out["error"]
        return out["result"]

    value, seconds, _ = measure(argparse.Namespace(tokens=8, backend="torch"))
    naive, _, _ = measure(argparse.Namespace(tokens=8, backend="naive"))
    assert seconds > 0 and abs(value - naive) <= 1e-5 * abs(naive)
    # main() refuses it up front; here the child raises
    with pytest.raises(RuntimeError, match=r"signed CE / ours: the measuring process ended without a result \(exit code 1\)"):
        measure(argparse.Namespace(tokens=8, backend="cuda"))
