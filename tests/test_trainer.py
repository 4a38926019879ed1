"""The surgery trainer on tiny random Llama models with a tokenizer built here (no hub).

Sizes: hidden 32, 2 layers, a ~90-word vocabulary, sequences of 5-16 tokens — a step takes
milliseconds, so every test here is a real run, not a mock.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import shutil
import signal
import types

import pytest
import torch

from surgery import EvalSet, NonFiniteLossError, Stream, Surgery, TrainingInterrupted
from surgery.data import IGNORE, collate, tokenize_lm
from surgery.evaluate import multiple_choice, perplexity
from surgery.modeling import load_model
from surgery.objective import SurgeryObjective
from surgery.testing import all_words, fact_streams, tiny_llama, word_tokenizer
from conftest import RecordSyncs



@pytest.fixture(autouse=True)
def one_thread():
    # Tiny GEMMs: threads only add contention on the shared 2-core CI machine.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(all_words())


@pytest.fixture(scope="module")
def data():
    return fact_streams()


def _model(tok, dtype="float32", seed=0, **kw):
    return load_model(config=tiny_llama(len(tok), **kw), dtype=dtype, seed=seed)


def _gemma2(tok, seed=0, cap=3.0):
    """A tiny Gemma-2: its logits are softcapped (final_logit_softcapping) after the head."""
    return _tiny(tok, "gemma2", seed=seed, final_logit_softcapping=cap)


def _tiny(tok, model_type, seed=0, **extra):
    """A tiny random model of another architecture (two layers, hidden size 32)."""
    return load_model(config=dict(model_type=model_type, vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  pad_token_id=0, bos_token_id=2, eos_token_id=3, tie_word_embeddings=False,
                                  **extra), seed=seed)


def _streams(data, weights=(0.1, 2.0, 0.5)):
    u, p, r, _ = data
    return [Stream("unlearn", u, "ascent", weights[0]), Stream("update", p, "descent", weights[1]),
            Stream("retain", r, "kl", weights[2])]


def _train(**kw):
    base = {"lr": 1e-2, "progress": False, "batch_size": 2, "steps": 4}
    base.update(kw)
    return base


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_same_params(m1, m2, atol=1e-12):
    """Every parameter of two float64 runs equal to ``atol`` (rounding only; a real difference is ~lr)."""
    a, b = _params(m1), _params(m2)
    for n in a:
        assert torch.allclose(a[n], b[n], rtol=0, atol=atol), (n, (a[n] - b[n]).abs().max())




def _naive_objective(model, ref, batch_rows, streams, weights, ascent_cap=None):
    """Per-stream mean CE / KL from materialized logits (float64), signed and weighted as the paper;
    with ``ascent_cap`` an ascent token whose CE exceeds it adds nothing to the loss but still counts
    in its stream's mean. Returns (total, means, capped token counts)."""
    total, means, n_capped = 0.0, [], []
    for (b, kind), c in zip(batch_rows, weights):
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double()
        m = b.target != IGNORE
        logq = torch.log_softmax(logits, -1)
        if kind == "kl":
            with torch.no_grad():
                logp = torch.log_softmax(ref(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.double(), -1)
            per = (logp.exp() * (logp - logq)).sum(-1)
        else:
            per = -logq.gather(-1, b.target.clamp_min(0)[..., None]).squeeze(-1)
        mean = per[m].mean()
        means.append(mean)
        capped = (per > ascent_cap) & m if (kind == "ascent" and ascent_cap is not None) else torch.zeros_like(m)
        n_capped.append(int(capped.sum()))
        total = total + (-c if kind == "ascent" else c) * torch.where(capped, 0.0, per)[m].sum() / m.sum()
    return total, means, n_capped


@pytest.mark.parametrize("cap", [None, "median"])
def test_objective_matches_naive_logits(tok, data, cap):
    """One step's loss, per-stream means and gradients equal the materialized-logits computation:
    signs, per-stream token means, coefficients, padding and prompt masks are all in the right place.
    cap="median": ascent_cap at the median CE of the ascent tokens, so about half of them stop
    training while the logged mean still counts them."""
    model = _model(tok, "float32").double()
    ref = copy.deepcopy(model)
    with torch.no_grad():  # make the reference differ so the KL is not zero
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    u, p, r, _ = data
    streams = [("ascent", u[:2]), ("descent", p[:3]), ("kl", r[:2])]
    weights = [0.1, 2.0, 0.5]
    batches = [(collate(tokenize_lm(recs, tok, 64), tok.pad_token_id), kind) for kind, recs in streams]
    # The trainer's layout: all rows padded to one length, CE streams first.
    L = max(b.input_ids.shape[1] for b, _ in batches)
    pad = lambda t, v: torch.nn.functional.pad(t, (0, L - t.shape[1]), value=v)  # noqa: E731
    ids = torch.cat([pad(b.input_ids, tok.pad_token_id) for b, _ in batches])
    att = torch.cat([pad(b.attention_mask, 0) for b, _ in batches])
    tgt = torch.cat([pad(b.target, IGNORE) for b, _ in batches])
    rows, r0 = [], 0
    for b, _ in batches:
        rows.append((r0, r0 + b.input_ids.shape[0]))
        r0 = rows[-1][1]
    counts = [int((b.target != IGNORE).sum()) for b, _ in batches]
    w = torch.zeros(r0, dtype=torch.float64)
    c = torch.zeros(r0, dtype=torch.float64)
    for (a, z), (kind, _), n, cw in zip(rows, streams, counts, weights):
        w[a:z] = (-1.0 if kind == "ascent" else 1.0) / n
        c[a:z] = cw
    tw, tc = w[:, None].expand(-1, L).contiguous(), c[:, None].expand(-1, L)
    n_ce = rows[1][1]
    ascent_cap = None
    if cap == "median":
        with torch.no_grad():
            b, _ = batches[0]
            logq = torch.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, -1)
            ce = -logq.gather(-1, b.target.clamp_min(0)[..., None]).squeeze(-1)[b.target != IGNORE]
            ascent_cap = float(ce.median())
            assert (ce > ascent_cap).any() and (ce < ascent_cap).any()
    obj = SurgeryObjective(model, backend="torch", ascent_cap=ascent_cap)
    with torch.no_grad():
        from surgery.modeling import final_hidden, output_layer
        rh = final_hidden(ref, ids[n_ce:], att[n_ce:])
        rw = output_layer(ref).weight
    total, terms, capped = obj("loss", ids, att, tgt, n_ce_rows=n_ce, ce_weight=tw[:n_ce], ce_coeff=tc[:n_ce],
                       kl_weight=tw[n_ce:], kl_coeff=tc[n_ce:], ref_hidden=rh, ref_weight=rw, stream_rows=rows)
    total.backward()
    g_ours = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref_total, means, ref_capped = _naive_objective(model, ref, batches, None, weights, ascent_cap)
    ref_total.backward()
    assert capped.tolist() == ref_capped and (cap is None or ref_capped[0] > 0)
    assert abs(total.item() - ref_total.item()) <= 1e-9 * abs(ref_total.item())
    signs = [-1.0, 1.0, 1.0]
    for t, m, s in zip(terms, means, signs):
        assert abs(t.item() * s - m.item()) <= 1e-9 * abs(m.item())
    for n, p in model.named_parameters():
        assert torch.allclose(g_ours[n], p.grad, rtol=1e-7, atol=1e-10), n




def test_short_run_unlearns_updates_retains(tok, data, tmp_path):
    """The paper's three effects in one short run: unlearn CE up, update CE down, retain KL small."""
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=12),
                  eval=[EvalSet("qa", data[3]), EvalSet("retain_ppl", data[2])], output_dir=tmp_path)
    summary = run.run()
    h = run.history
    first, last = h[0], h[-1]
    assert last["loss/unlearn"] > first["loss/unlearn"] + 0.5
    assert last["loss/update"] < first["loss/update"] - 1.0
    assert first["loss/retain"] == pytest.approx(0.0, abs=1e-6)  # reference == model before step 1
    # "Small": the same run without the KL term (weight 0, still measured) drifts 4-5x further
    # (0.92 vs 0.18 nats at step 12 when written); the KL term keeps it under a quarter nat.
    free = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data, (0.1, 2.0, 0.0)), train=_train(steps=12))
    free.train()
    assert max(m["loss/retain"] for m in h) < 0.25
    assert last["loss/retain"] < 0.5 * free.history[-1]["loss/retain"]
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 13))
    for k in ("loss/total", "loss/unlearn", "loss/update", "loss/retain", "grad_norm", "tokens_per_s"):
        assert k in lines[0]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["before"]["qa"]["n"] == 8 and "perplexity" in s["after"]["retain_ppl"]
    assert summary["steps"] == 12
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    for (n, a), (_, b) in zip(run.model.named_parameters(), back.named_parameters()):
        assert torch.equal(a, b), n


def test_resume_is_exact(tok, data, tmp_path):
    """6 steps straight == 3 steps + resume + 3 steps (parameters bit for bit); same seed, same run."""
    straight = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=6),
                       output_dir=tmp_path / "a")
    straight.train()
    first = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=3),
                    output_dir=tmp_path / "b")
    first.train()
    assert [m["loss/total"] for m in first.history] == [m["loss/total"] for m in straight.history[:3]]
    second = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=6),
                     output_dir=tmp_path / "b")
    second.train(resume=True)
    assert second.step == 6
    assert [m["loss/total"] for m in second.history] == [m["loss/total"] for m in straight.history]
    a, b = _params(straight.model), _params(second.model)
    for n in a:
        assert torch.equal(a[n], b[n]), n
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_another_start(tok, data, tmp_path):
    """A resumed run rebuilds the frozen weights and the reference from its model and indexes its
    data by the restored positions: another model (another model.path, a config with another
    seed, the same weights under another config), other examples in a stream or another
    train.seed is refused before anything is restored, naming what changed; another lr or stream
    weight is not."""
    kw = dict(tokenizer=tok, output_dir=tmp_path, reference="copy")
    Surgery(model=_model(tok), streams=_streams(data), train=_train(steps=2), **kw).train()
    state = (tmp_path / "checkpoint" / "state.pt").read_bytes()
    with pytest.raises(ValueError, match=r"started from other weights \(first difference: model.embed_tokens"):
        Surgery(model=_model(tok, seed=1), streams=_streams(data), train=_train(steps=4), **kw).train(resume=True)
    u, p, r, e = data
    other = (u, p, r[1:] + r[:1], e)  # the same retain records in another order
    with pytest.raises(ValueError, match=r"other examples in stream\(s\) \['retain'\]"):
        Surgery(model=_model(tok), streams=_streams(other), train=_train(steps=4), **kw).train(resume=True)
    with pytest.raises(ValueError, match=r"train.seed=0, this one has 5"):
        Surgery(model=_model(tok), streams=_streams(data), train=_train(steps=4, seed=5), **kw).train(resume=True)
    # the same weights under another config compute something else
    rope = _model(tok, rope_parameters={"rope_theta": 500.0, "rope_type": "default"})
    with pytest.raises(ValueError, match=r"another config \(rope_parameters: .*10000.0.* -> .*500.0"):
        Surgery(model=rope, streams=_streams(data), train=_train(steps=4), **kw).train(resume=True)
    assert (tmp_path / "checkpoint" / "state.pt").read_bytes() == state
    run = Surgery(model=_model(tok), streams=_streams(data, weights=(0.2, 1.0, 0.5)), train=_train(steps=4, lr=5e-3),
                  **kw)
    run.train(resume=True)
    assert run.step == 4


def test_resume_weights_comparison_tolerates_summation_order_only():
    """weights_digest on another device or thread count may move the last digits of a sum whose
    terms cancel: the same weights then; a change of the weights themselves (1e-4 relative, far
    less than another model's) is still another start."""
    from surgery.reference import weights_digest
    from surgery.reference import first_weight_difference

    torch.manual_seed(0)
    m = torch.nn.Linear(64, 32)
    rows = weights_digest(m)
    shuffled = torch.nn.Linear(64, 32)
    with torch.no_grad():  # the same values in another order: another summation order
        shuffled.weight.copy_(m.weight.flatten()[torch.randperm(64 * 32)].view(32, 64))
        shuffled.bias.copy_(m.bias.flip(0))
    assert first_weight_difference(rows, weights_digest(shuffled)) is None
    nudged = [list(r) for r in rows]
    nudged[0][2] = f"{float(rows[0][2]) * (1 + 1e-12) + 1e-15:.9e}"  # the last digits of the sum
    assert first_weight_difference(rows, nudged) is None
    with torch.no_grad():
        m.weight.mul_(1 + 1e-4)
    assert first_weight_difference(rows, weights_digest(m)) == "weight"
    assert first_weight_difference(rows, rows[:1]) == "the parameter list"


def test_evaluation_runs_in_the_training_precision(tok, data):
    """mixed_precision applies to evaluation as to the steps (it ran in float32: twice training's
    activation memory at scale, and other numbers than the model trains with)."""
    from surgery.evaluate import evaluate_set

    evals = [EvalSet("qa", data[3]), EvalSet("ppl", data[2])]
    run = Surgery(model=_model(tok), tokenizer=tok, streams=[], eval=evals,
                  train=_train(mixed_precision="bfloat16"))
    got = run.evaluate()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = {e.name: evaluate_set(run.objective, tok, e, backend=run.cfg.backend, device=run.device,
                                     max_length=run.cfg.max_length) for e in evals}
    full = {e.name: evaluate_set(run.objective, tok, e, backend=run.cfg.backend, device=run.device,
                                 max_length=run.cfg.max_length) for e in evals}
    assert got == want
    assert got["ppl"]["perplexity"] != full["ppl"]["perplexity"]


def test_summary_after_resume_times_the_whole_run(tok, data, tmp_path):
    """summary.json's train_time_s sums the steps of the whole run, those before the resume too;
    time_s is the resuming call's own; "first" is step 1's losses. A step logged after the
    checkpoint (then a crash) is dropped from metrics.jsonl by the resume, which logs it again."""
    first = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                    output_dir=tmp_path / "b")
    first.train()
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a step logged after the checkpoint, then a crash
        f.write(json.dumps({"step": 3, "loss/total": 123.0}) + "\n")
    second = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=4),
                     output_dir=tmp_path / "b")
    summary = second.run(resume=True)
    lines = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and lines[2]["loss/total"] != 123.0
    assert summary["first"] == {k: v for k, v in lines[0].items() if k.startswith("loss/")}
    steps = [m["time_s"] for m in lines]
    assert len(steps) == 4 and summary["train_time_s"] == pytest.approx(sum(steps), rel=1e-9)
    assert summary["train_time_s"] > sum(steps[2:])
    assert json.loads((tmp_path / "b" / "summary.json").read_text())["train_time_s"] == summary["train_time_s"]


def test_warmup_per_stream_batch_last_checkpoint_and_kl_direction(tok, data, tmp_path):
    """warmup_steps ramps lr linearly (lr * step / warmup_steps from step 1), then holds it; a
    stream's own batch_size draws that many of its records per step; the last step is
    checkpointed when save_every does not divide steps (a resume starts there, not at step 4);
    kl_direction reaches the objective."""
    u, p, r, _ = data
    streams = [Stream("unlearn", u, "ascent", 0.1), Stream("update", p, "descent", 2.0),
               Stream("retain", r, "kl", 0.5, batch_size=3)]
    run = Surgery(model=_model(tok), tokenizer=tok, streams=streams, output_dir=tmp_path,
                  train=_train(steps=5, save_every=2, warmup_steps=3, kl_direction="reverse"))
    run.train()
    assert [m["lr"] for m in run.history] == pytest.approx([1e-2 / 3, 2e-2 / 3, 1e-2, 1e-2, 1e-2])
    assert [s.cursor for s in run._samplers] == [10, 10, 15]
    assert torch.load(tmp_path / "checkpoint" / "state.pt", weights_only=False)["step"] == 5
    assert run.objective.kl_direction == "reverse"


def test_train_again_continues_the_random_streams(tok, data):
    """train() to step 2 and then to 4 on one object is one run to 4, dropout included: the
    second call continues the RNG where the first left it (a reseed would repeat step 1's masks)."""
    def run(steps_list):
        r = Surgery(model=_model(tok, attention_dropout=0.3), tokenizer=tok, streams=_streams(data),
                    train=_train(steps=steps_list[0]))
        for steps in steps_list:
            r.cfg.steps = steps
            r.train()
        return r

    a, b = run([4]), run([2, 4])
    assert [m["loss/total"] for m in a.history] == [m["loss/total"] for m in b.history]
    pa, pb = _params(a.model), _params(b.model)
    assert all(torch.equal(pa[n], pb[n]) for n in pa)


def test_evaluation_truncates_as_the_run_and_the_set_say(tok, data, caplog):
    """Evaluation cuts records at train.max_length, or at the eval set's own max_length: a text of
    20 words scores 7 tokens at max_length 8 (the first predicts nothing), 3 at the set's 4. Each
    cut is logged (info for text) naming the stream or eval set and its max_length."""
    text = " ".join(all_words()[:20])
    assert len(tok(text)["input_ids"]) > 8
    with caplog.at_level("INFO", logger="surgery"):
        run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data) + [Stream("long", [{"text": text}], "descent")],
                      train=_train(steps=1, max_length=8),
                      eval=[EvalSet("run", [{"text": text}]), EvalSet("own", [{"text": text}], max_length=4)])
        got = run.evaluate()
    assert got["run"]["tokens"] == 7 and got["own"]["tokens"] == 3
    for name, n in (("stream 'long'", 8), ("run", 8), ("own", 4)):
        assert f"{name}: max_length {n} cuts records: 1 of 1 text(s) lose their end" in caplog.text
    assert "stream 'update'" not in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="surgery"):  # said once a run, not at every evaluation
        run.evaluate()
    assert "cuts records" not in caplog.text


@pytest.mark.parametrize("clip", [0.0, None, 0.5])
def test_gradient_clipping(tok, data, clip):
    """train.clip bounds the gradient's global norm before AdamW (its first moment after one step
    is (1 - beta1) times the gradient it got); 0 or None leaves the gradient as it is. The logged
    grad_norm is the norm before clipping."""
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data, weights=(1.0, 20.0, 5.0)),
                  train=_train(steps=1, clip=clip))
    run.train()
    gn = run.history[0]["grad_norm"]
    moment = torch.stack([st["exp_avg"].double().norm() for st in run.optimizer.state.values()]).norm().item()
    assert gn > 1.0
    assert moment == pytest.approx((1 - run.cfg.betas[0]) * (min(gn, clip) if clip else gn), rel=1e-5)


def test_tokens_metric_counts_every_streams_live_tokens(tok, data):
    """metrics' ``tokens`` is the step's live tokens (those with a loss) over all streams: the
    records each stream's sampler draws, counted from their targets."""
    from surgery.data import StreamSampler

    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2))
    run.train()
    samplers = [StreamSampler(len(ex), run.cfg.seed, s.name) for s, ex in zip(run.streams, run._examples)]
    for m in run.history:
        want = 0
        for sampler, ex in zip(samplers, run._examples):
            b = collate([ex[i] for i in sampler.draw(run.cfg.batch_size)], tok.pad_token_id)
            want += int((b.target != IGNORE).sum())
        assert m["tokens"] == want


@pytest.mark.parametrize("micro", [None, 2], ids=["one-pass", "micro-batches"])
def test_passes_do_not_wait_for_the_device(tok, data, monkeypatch, target_check_as_on_cuda, micro):
    """The objective's forward and its backward run no op that would make the host wait for a GPU:
    the live tokens are taken by positions the trainer finds on the host (selecting them by a
    boolean mask on the device waits there, once per selection and again in the backward, in the
    middle of every pass). The model's own (transformers' attention-mask checks) are not ours; the
    target check takes its CUDA branch (target_check_as_on_cuda)."""
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data),
                  train=_train(steps=2, backend="torch", ascent_cap=3.0, micro_batch_size=micro))
    rec = RecordSyncs(outside=("transformers",))
    forward, backward = run.objective.forward, torch.Tensor.backward
    calls = []

    def recorded_forward(*args, **kwargs):
        calls.append(args[0])
        with rec:
            return forward(*args, **kwargs)

    def recorded_backward(self, *args, **kwargs):
        with rec:
            return backward(self, *args, **kwargs)

    monkeypatch.setattr(run.objective, "forward", recorded_forward)
    monkeypatch.setattr(torch.Tensor, "backward", recorded_backward)
    run.train()
    assert calls.count("loss") == (2 if micro is None else 6)
    assert rec.syncs == []


def test_eval_every_during_training_not_at_the_end(tok, data):
    """eval_every evaluates inside the run at its multiples, not at the last step (run()'s
    evaluation after training is that one): run() evaluates before, at step 2 and after."""
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), eval=[EvalSet("ppl", data[2])],
                  train=_train(steps=4, eval_every=2))
    calls = []
    evaluate = run.evaluate
    run.evaluate = lambda: calls.append(run.step) or evaluate()
    run.run()
    assert calls == [0, 2, 4]
    assert [any(k.startswith("eval/ppl/") for k in m) for m in run.history] == [False, True, False, False]


def _signal_at(step, *signums):
    """An on_step callback that sends this process the signals ``signums`` after step ``step``."""
    def on_step(m):
        if m["step"] == step:
            for signum in signums:
                os.kill(os.getpid(), signum)
    return on_step


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_signal_stops_after_the_step_with_a_checkpoint(tok, data, tmp_path, sig):
    """Ctrl-C (SIGINT) or a scheduler's SIGTERM during step 2 of 6 (save_every 0: no checkpoint
    would exist before the end) stops at the end of that step with a checkpoint and
    TrainingInterrupted; the signal handlers are put back; resuming gives the uninterrupted run bit
    for bit."""
    straight = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=6),
                       output_dir=tmp_path / "a")
    straight.train()
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signum = getattr(signal, sig)
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=6),
                  output_dir=tmp_path / "b", on_step=_signal_at(2, signum))
    with pytest.raises(TrainingInterrupted, match=f"{sig}.* after step 2") as exc:
        run.train()
    assert exc.value.step == 2 and exc.value.checkpoint == tmp_path / "b" / "checkpoint"
    assert exc.value.signum == signum
    back = pickle.loads(pickle.dumps(exc.value))  # e.g. from a worker process
    assert (type(back), back.step, back.checkpoint, back.signum, str(back)) == \
        (TrainingInterrupted, 2, exc.value.checkpoint, signum, str(exc.value))
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    assert torch.load(tmp_path / "b" / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    resumed = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=6),
                      output_dir=tmp_path / "b")
    assert len(resumed.train(resume=True)) == 4
    assert [m["loss/total"] for m in resumed.history] == [m["loss/total"] for m in straight.history]
    a, b = _params(straight.model), _params(resumed.model)
    for n in a:
        assert torch.equal(a[n], b[n]), n


def test_second_ctrl_c_stops_at_once(tok, data, tmp_path):
    """A second Ctrl-C does what Ctrl-C does without the trainer: KeyboardInterrupt at once (not
    after the step, no checkpoint)."""
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=6),
                  output_dir=tmp_path / "b", on_step=_signal_at(2, signal.SIGINT, signal.SIGINT))
    with pytest.raises(KeyboardInterrupt) as exc:
        run.train()
    assert not isinstance(exc.value, TrainingInterrupted)
    assert not (tmp_path / "b" / "checkpoint").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_repeated_sigterm_and_ignored_sigint(tok, data, tmp_path):
    """SIGTERM twice (a scheduler and torchrun may each send one) still stops after the step with
    a checkpoint; a SIGINT the process ignores (a background job) stays ignored and is put back."""
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=6),
                  output_dir=tmp_path / "a", on_step=_signal_at(2, signal.SIGTERM, signal.SIGTERM))
    with pytest.raises(TrainingInterrupted, match="after step 2"):
        run.train()
    assert torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=4),
                      on_step=_signal_at(2, signal.SIGINT))
        assert len(run.train()) == 4
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, old)


def test_signal_during_the_last_save_waits_for_it(tok, data, tmp_path, monkeypatch):
    """Ctrl-C while the end-of-training checkpoint is written (the only one with save_every 0):
    the save completes, then the run stops (run() would otherwise go on to evaluate)."""
    save = Surgery.save_checkpoint

    def interrupted_save(self):
        os.kill(os.getpid(), signal.SIGINT)
        return save(self)

    monkeypatch.setattr(Surgery, "save_checkpoint", interrupted_save)
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=3),
                  output_dir=tmp_path / "a")
    with pytest.raises(TrainingInterrupted, match="after step 3"):
        run.run()
    assert torch.load(tmp_path / "a" / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    assert not (tmp_path / "a" / "final").exists()


def test_cli_exit_code_when_interrupted(tmp_path, monkeypatch, capsys):
    """cli.main maps TrainingInterrupted to 128 + the signal and a message with the command that
    resumes (as a command it then dies of the signal: tested through torchrun in test_fsdp); a
    Ctrl-C elsewhere too."""
    from surgery import cli

    def interrupted(self, resume=False):
        raise TrainingInterrupted(3, tmp_path / "checkpoint", signal.SIGTERM)

    monkeypatch.setattr(Surgery, "run", interrupted)
    monkeypatch.setattr("surgery.from_config", lambda cfg: Surgery.__new__(Surgery))
    monkeypatch.setattr("surgery.load_config",
                        lambda path, overrides, **kw: types.SimpleNamespace(output_dir=str(tmp_path)))
    assert cli.main(["train", "x.yaml", "--set", "train.lr=0.1"]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "interrupted (SIGTERM) after step 3" in err
    assert "continue with: surgery train x.yaml --set train.lr=0.1 --resume" in err
    # Ctrl-C outside the steps (loading, the reference cache's build, an evaluation, the final save):
    # the same exit code and how to continue, no traceback
    def ctrl_c(self, resume=False):
        raise KeyboardInterrupt

    monkeypatch.setattr(Surgery, "run", ctrl_c)
    assert cli.main(["train", "x.yaml"]) == 128 + signal.SIGINT
    err = capsys.readouterr().err
    assert err.startswith("surgery: interrupted (SIGINT); continue with: surgery train x.yaml --resume")
    assert "Traceback" not in err


def test_output_dir_of_an_earlier_run(tok, data, tmp_path):
    """A fresh run does not take over an output_dir holding an earlier run's checkpoint (its
    metrics and checkpoint stay; --resume continues it); a resume must have the checkpoint's
    streams and trained parameters, while the optimizer's settings come from the new config;
    train() again on the same object continues its run and its metrics.jsonl."""
    first = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                    output_dir=tmp_path)
    first.train()
    first.cfg.steps = 3
    first.train()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3]
    saved = (tmp_path / "checkpoint" / "state.pt").read_bytes()
    with pytest.raises(ValueError, match="holds an earlier run's checkpoint.*--resume"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                output_dir=tmp_path).train()
    fresh = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                    output_dir=tmp_path)
    fresh.evaluate = lambda: pytest.fail("run() evaluated before refusing the output_dir")
    with pytest.raises(ValueError, match="holds an earlier run's checkpoint"):
        fresh.run()
    assert (tmp_path / "checkpoint" / "state.pt").read_bytes() == saved
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 3
    (tmp_path / "summary.json").write_text("{}")  # what run() leaves at the end
    with pytest.raises(ValueError, match=r"holds a finished run.*train.steps above its last step"):
        fresh.run()
    (tmp_path / "summary.json").unlink()
    (tmp_path / "afile").write_text("")
    with pytest.raises(ValueError, match=r"output_dir .*afile is a file, not a directory"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                output_dir=tmp_path / "afile").run()
    # a file on the path: refused before the evaluation (NotADirectoryError when the run first wrote)
    under = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                    output_dir=tmp_path / "afile" / "sub")
    under.evaluate = lambda: pytest.fail("run() evaluated before refusing output_dir")
    with pytest.raises(ValueError, match=r"output_dir .*afile/sub is a file, not a directory \(.*afile on its path\)"):
        under.run()
    with pytest.raises(ValueError, match=r"other streams.*'unlearn', 'ascent'"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data)[1:], train=_train(steps=4),
                output_dir=tmp_path).train(resume=True)
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    with pytest.raises(ValueError, match="other trained parameters.*lora_A"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=lora, train=_train(steps=4),
                output_dir=tmp_path).train(resume=True)
    more = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data),
                   train=_train(steps=4, eps=1e-3, weight_decay=0.5, betas=(0.5, 0.6)), output_dir=tmp_path)
    more.train(resume=True)
    g = more.optimizer.param_groups[0]
    assert (g["eps"], g["weight_decay"], tuple(g["betas"])) == (1e-3, 0.5, (0.5, 0.6)) and more.step == 4


def test_cache_reference_needs_an_output_dir_to_train_not_to_evaluate(tok, data):
    """reference='cache' without output_dir: evaluate() runs (it needs no reference); run() and
    train() refuse before any work (run() before its "before" evaluation)."""
    _, _, r, _ = data
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="cache",
                  train=_train(steps=1), eval=[EvalSet("ppl", r)])
    assert "perplexity" in run.evaluate()["ppl"]
    run.evaluate = lambda: pytest.fail("run() evaluated before refusing")
    for call in (run.run, run.train):
        with pytest.raises(ValueError, match="reference='cache' stores hidden states under output_dir"):
            call()


def test_final_dir_holds_only_the_last_model(tok, data, tmp_path):
    """final/ is replaced whole: a full model saved where a LoRA adapter was leaves no adapter
    files (which would load instead of it)."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj"]}
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=lora, reference="adapter",
            train=_train(steps=1)).save_final(tmp_path / "final")
    assert (tmp_path / "final" / "adapter_config.json").is_file()
    full = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=1))
    full.save_final(tmp_path / "final")
    assert not (tmp_path / "final" / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert type(load_model(str(tmp_path / "final"))).__name__ == type(full.model).__name__
    # a crash between the two renames left final.old and final.tmp: the next save starts from final.old
    (tmp_path / "final").rename(tmp_path / "final.old")
    (tmp_path / "final.tmp").mkdir()
    full.save_final(tmp_path / "final")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    # a folder that holds no model is not replaced (save_final replaces its target whole)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no saved model"):
        full.save_final(tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_reference_cache_of_other_weights_is_refused(tok, data, tmp_path):
    """The reference cache is keyed by the weights too: the same config with another seed's
    weights does not reuse the hidden states."""
    first = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="cache",
                    train=_train(steps=1), output_dir=tmp_path)
    first.train()
    shutil.rmtree(tmp_path / "checkpoint")
    # a cache written before the weights digest was stored apart (one hash of config, data, weights)
    from surgery.reference import _fingerprint, weights_digest

    meta = tmp_path / "reference_cache" / "meta.json"
    current = meta.read_text()
    untrained = _model(tok)
    kl = {s.name: e for s, e in zip(first.streams, first._examples) if s.loss == "kl"}
    config = first.objective.model.config.to_dict()  # as the trainer sets it (use_cache off)
    meta.write_text(json.dumps({"fingerprint": _fingerprint(config, kl, weights_digest(untrained)),
                                "complete": True}))
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="cache",
            train=_train(steps=1), output_dir=tmp_path).train()
    shutil.rmtree(tmp_path / "checkpoint")
    meta.write_text(current)
    # the last digits of a sum (another device's summation order) do not make it another model
    saved = json.loads(meta.read_text())
    before = saved["weights"][0][2]
    saved["weights"][0][2] = f"{float(before) * (1 + 1e-7) + 1e-7:.9e}"
    assert saved["weights"][0][2] != before
    meta.write_text(json.dumps(saved))
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="cache",
            train=_train(steps=1), output_dir=tmp_path).train()
    shutil.rmtree(tmp_path / "checkpoint")
    with pytest.raises(ValueError, match="reference cache of another model"):
        Surgery(model=_model(tok, seed=1), tokenizer=tok, streams=_streams(data), reference="cache",
                train=_train(steps=1), output_dir=tmp_path).train()
    shutil.rmtree(tmp_path / "checkpoint", ignore_errors=True)
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="cache",
            train=_train(steps=1), output_dir=tmp_path).train()
    # fresh LoRA adapters (lora_B = 0) change nothing: any seed or rank of them shares one cache
    from surgery.reference import weights_digest

    lora = [Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="adapter",
                    lora={"r": r, "target_modules": ["q_proj"]}, train=_train(seed=seed)).model
            for r, seed in ((4, 0), (8, 3))]
    assert weights_digest(lora[0]) == weights_digest(lora[1])
    with torch.no_grad():
        next(p for n, p in lora[1].named_parameters() if "lora_B" in n).add_(1.0)
    assert weights_digest(lora[0]) != weights_digest(lora[1])


def test_reference_cache_stopped_part_way_resumes_only_with_its_model(tok, data, tmp_path, monkeypatch):
    """A cache build killed after a few hidden states has its fingerprint on disk already: another
    model in the same output_dir is refused (it reused the first model's files: a nonzero KL at
    step 1 between a model and itself), the same model completes it."""
    import safetensors.torch

    save = safetensors.torch.save_file
    calls = {"n": 0}

    def dying_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise KeyboardInterrupt("killed")
        return save(*args, **kwargs)

    kw = dict(tokenizer=tok, streams=_streams(data), reference="cache", train=_train(steps=1), output_dir=tmp_path)
    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(KeyboardInterrupt):
        Surgery(model=_model(tok), **kw).train()
    monkeypatch.setattr(safetensors.torch, "save_file", save)
    cache = tmp_path / "reference_cache"
    assert len(list(cache.rglob("*.safetensors"))) == 3
    assert not json.loads((cache / "meta.json").read_text())["complete"]
    with pytest.raises(ValueError, match="reference cache of another model"):
        Surgery(model=_model(tok, seed=1), **kw).train()
    Surgery(model=_model(tok), **kw).train()
    assert json.loads((cache / "meta.json").read_text())["complete"]
    # files without a fingerprint (a build stopped before it was written first) are not trusted
    shutil.rmtree(tmp_path)
    (cache / "retain").mkdir(parents=True)
    (cache / "retain" / "0000000.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="no meta.json"):
        Surgery(model=_model(tok), **kw).train()


def test_reference_cache_recomputes_missing_and_damaged_files_in_their_own_groups(tok, data, tmp_path, monkeypatch,
                                                                                   caplog):
    """The cache goes through the model in fixed groups of records: a build stopped part way, or a
    file damaged later, is completed by the same groups, so every file comes out as an
    uninterrupted build wrote it. Grouping only the missing records padded them to another length,
    and the recomputed hidden states differed by an ulp (a resumed run then drifted from one that
    was never stopped: final weights 0.036 apart after 40 steps of a tiny model)."""
    import surgery.reference as reference

    kw = dict(tokenizer=tok, streams=_streams(data), reference="cache", train=_train(steps=1), output_dir=tmp_path)
    Surgery(model=_model(tok), **kw).train()
    d = tmp_path / "reference_cache" / "retain"
    files = sorted(d.glob("*.safetensors"))
    before = {f.name: f.read_bytes() for f in files}
    n = len(files)
    assert n == 8
    (d / "0000001.safetensors").unlink()
    (d / "0000005.safetensors").unlink()
    (d / "0000006.safetensors").write_bytes(before["0000006.safetensors"][:60])  # damaged after it was written
    batches = []
    collate = reference.collate

    def spy(examples, pad_id, index=None):
        batches.append(list(index))
        return collate(examples, pad_id, index)

    monkeypatch.setattr(reference, "collate", spy)
    with caplog.at_level("WARNING", logger="surgery.reference"):
        Surgery(model=_model(tok), **kw).train(resume=True)
    assert batches == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert "0000006.safetensors cannot be read" in caplog.text
    assert {f.name: f.read_bytes() for f in sorted(d.glob("*.safetensors"))} == before
    # a damaged record of the model and data is named, with what to do
    (tmp_path / "reference_cache" / "meta.json").write_text('{"fingerprint": "ab')
    with pytest.raises(ValueError, match=r"meta.json cannot be read .*delete"):
        Surgery(model=_model(tok), **kw).train(resume=True)


def test_nan_stops_with_last_good_checkpoint(tok, data, tmp_path):
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=5, save_every=2),
                  output_dir=tmp_path)
    poison = {"on": False}
    norm = run.model.model.norm
    norm.register_forward_hook(lambda m, i, o: o * float("nan") if poison["on"] else o)
    run.cfg.steps = 2
    run.train()
    ck = tmp_path / "checkpoint" / "state.pt"
    saved = ck.read_bytes()
    before = _params(run.model)
    poison["on"] = True
    run.cfg.steps = 5
    with pytest.raises(NonFiniteLossError, match=r"step 3: non-finite.*last good checkpoint.*step 2"):
        run.train(resume=True)
    assert ck.read_bytes() == saved
    after = _params(run.model)
    assert all(torch.equal(before[n], after[n]) for n in before), "weights changed after a NaN loss"


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
@pytest.mark.parametrize("mode", ["cache"])
def test_reference_cache_equals_copy(tok, data, tmp_path, mode, arch):
    """The cached reference gives the same run as the frozen copy (the same hidden states; on
    Gemma-2, in float64, both softcapped as the model caps its logits)."""
    runs = {}
    for ref in ("copy", mode):
        model = _gemma2(tok).double() if arch == "gemma2" else _model(tok)
        r = Surgery(model=model, tokenizer=tok, streams=_streams(data), reference=ref,
                    train=_train(steps=4), output_dir=tmp_path / ref)
        r.train()
        runs[ref] = [m["loss/retain"] for m in r.history]
    assert runs["copy"][1:] == pytest.approx(runs[mode][1:], rel=1e-6, abs=1e-9)
    assert runs["copy"][-1] > 0
    assert len(list((tmp_path / "cache" / "reference_cache" / "retain").glob("*.safetensors"))) == 8


def test_reference_cache_in_mixed_precision_equals_copy(tok, data, tmp_path):
    """With mixed_precision the cache holds the hidden states the steps compute (under autocast),
    as the copy gives them: the same retain loss from the first step (0 there: the model is still
    the reference), not the distance of bf16 compute to a float32 reference. A cache of another
    precision is refused."""
    runs = {}
    for ref in ("copy", "cache"):
        r = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference=ref,
                    train=_train(steps=3, mixed_precision="bfloat16"), output_dir=tmp_path / ref)
        r.train()
        runs[ref] = [m["loss/retain"] for m in r.history]
    assert runs["cache"][0] == pytest.approx(0.0, abs=1e-9)
    assert runs["copy"] == pytest.approx(runs["cache"], rel=1e-6, abs=1e-9)
    assert runs["copy"][-1] > 0
    shutil.rmtree(tmp_path / "cache" / "checkpoint")
    with pytest.raises(ValueError, match="mixed_precision bfloat16, this run's is None"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="cache",
                train=_train(steps=1), output_dir=tmp_path / "cache").train()


@pytest.mark.parametrize("arch,dropout", [("llama", 0.0), ("llama", 0.3), ("gemma2", 0.0)])
def test_lora_adapter_reference_equals_copy(tok, data, tmp_path, arch, dropout):
    """LoRA: the adapters-off reference gives the same run as a frozen copy (on Gemma-2 both
    softcapped); only adapters train; final/ is a peft adapter. With dropout in the model, the
    adapters-off reference runs in eval mode like the copy (no dropout of its own, no random
    draws that would change the trained forward's masks), and the model is back in train mode
    after it."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    runs = {}
    for ref in ("copy", "adapter"):
        model = _gemma2(tok) if arch == "gemma2" else _model(tok, attention_dropout=dropout)
        r = Surgery(model=model, tokenizer=tok, streams=_streams(data),
                    reference=ref, lora=lora, train=_train(steps=3, lr=5e-2), output_dir=tmp_path / ref)
        r.run()
        runs[ref] = r
    a, b = runs["copy"].history, runs["adapter"].history
    for k in ("loss/retain", "loss/unlearn", "loss/total"):
        assert [m[k] for m in a] == pytest.approx([m[k] for m in b], rel=1e-6, abs=1e-9), k
    assert a[-1]["loss/retain"] > 0
    assert runs["adapter"].model.training
    assert all("lora_" in n for n in runs["adapter"].trainable_names)
    assert (tmp_path / "adapter" / "final" / "adapter_config.json").is_file()


def test_lora_init_follows_the_seed(tok, data):
    """LoRA adapters are drawn from train.seed, whatever the global RNG state: the same seed gives
    the same adapters (so a LoRA run is reproducible), another seed others."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}

    def adapters(seed, global_seed):
        torch.manual_seed(global_seed)
        r = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="adapter", lora=lora,
                    train=_train(seed=seed))
        return {n: p.detach().clone() for n, p in r.model.named_parameters() if "lora_A" in n}

    a, b, c = adapters(0, 1), adapters(0, 2), adapters(1, 1)
    assert a and all(torch.equal(a[n], b[n]) for n in a)
    assert not all(torch.equal(a[n], c[n]) for n in a)


def test_lora_target_modules_that_name_no_module_are_refused(tok, data):
    """peft adapts the target_modules it finds and drops the rest silently (it errs only when none
    is found, in its own words): a typo trained fewer adapters than asked. Refused, naming the key,
    the missing names and the model's linear layers."""
    for targets, missing in ((["q_proj", "v_prj"], "['v_prj']"), (["c_attn"], "['c_attn']")):
        with pytest.raises(ValueError, match=rf"lora.target_modules: \{missing}\ name no module of this model; "
                                             r"its linear layers are named \[.*'q_proj'.*\]"):
            Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="adapter",
                    lora={"r": 4, "target_modules": targets})
    # the suffix of a full name, and peft's own "all-linear", are fine
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="adapter",
            lora={"r": 4, "target_modules": ["self_attn.q_proj", "mlp.down_proj"]})


def test_lora_differences_compare_settings_with_the_adapter(tok):
    """The settings an adapter was made with compare equal to it (all-linear: every linear layer but
    the head, also with the head in modules_to_save); each differing key is named."""
    from surgery.modeling import add_lora, lora_differences

    for lora in ({"r": 4, "alpha": 8, "target_modules": "all-linear", "modules_to_save": ["lm_head"]},
                 {"target_modules": ["q_proj", "v_proj"]}, {"r": 2}):
        model = add_lora(_model(tok), lora)
        assert lora_differences(model, lora) == [], lora
    regex = {"target_modules": r".*\.(q_proj|v_proj)"}  # a string is peft's regular expression over names
    assert lora_differences(add_lora(_model(tok), regex), regex) == []
    assert lora_differences(add_lora(_model(tok), regex), {"target_modules": ["v_proj", "q_proj"]}) == []
    with pytest.raises(ValueError, match=r"lora: unknown key\(s\) \['alpah'\]"):  # not a silent pass
        lora_differences(model, {"r": 2, "alpah": 4})
    assert lora_differences(model, {"r": 2, "alpha": 4, "dropout": 0.1, "target_modules": ["q_proj"],
                                    "modules_to_save": ["lm_head"]}) == [
        "alpha: 4 asked, 16 in the adapter", "dropout: 0.1 asked, 0 in the adapter",
        "target_modules: ['q_proj'] asked, ['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj', 'up_proj', "
        "'v_proj'] in the adapter", "modules_to_save: ['lm_head'] asked, [] in the adapter"]


def test_lora_final_dir_loads_as_the_trained_adapter(tok, data, tmp_path, caplog):
    """model.path at a LoRA run's final/ (an adapter directory) loads the base model with that
    adapter, trainable: evaluating it gives the run's "after" numbers, not the untrained model's,
    even with the run's lora settings still in the config — which agree with the adapter, so
    nothing warns that they are ignored; lora settings that differ are named in a warning."""
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    _model(tok).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    _, _, r, q = data
    evals = [EvalSet("qa", q), EvalSet("ppl", r)]
    run = Surgery(model={"path": str(tmp_path / "base"), "lora": lora}, streams=_streams(data), reference="adapter",
                  train=_train(steps=3, lr=5e-2), eval=evals, output_dir=tmp_path / "out")
    summary = run.run()
    assert summary["after"] != summary["before"]
    cfg = json.loads((tmp_path / "out" / "final" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tmp_path / "base")
    with caplog.at_level("WARNING", logger="surgery"):
        again = Surgery(model={"path": str(tmp_path / "out" / "final"), "lora": lora}, tokenizer=tmp_path / "base",
                        streams=_streams(data), reference="adapter", eval=evals)
    assert "lora settings are ignored" not in caplog.text
    with caplog.at_level("WARNING", logger="surgery"):
        Surgery(model={"path": str(tmp_path / "out" / "final"), "lora": {**lora, "r": 8, "target_modules": "all-linear"}},
                tokenizer=tmp_path / "base", streams=_streams(data), reference="adapter")
    assert ("differ from the lora settings (r: 8 asked, 4 in the adapter; target_modules: ['down_proj', 'gate_proj', "
            "'k_proj', 'o_proj', 'q_proj', 'up_proj', 'v_proj'] asked, ['q_proj', 'v_proj'] in the adapter)" in caplog.text)
    got = again.evaluate()
    assert got.keys() == summary["after"].keys()
    for name, metrics in summary["after"].items():
        assert got[name] == pytest.approx(metrics, rel=1e-6), name
    assert got["ppl"]["perplexity"] != pytest.approx(summary["before"]["ppl"]["perplexity"], rel=1e-3)
    assert again.trainable_names and all("lora_" in n for n in again.trainable_names)
    # an adapter whose base is not a local folder (here: a base built from model.config) says so
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="adapter", lora=lora,
            train=_train(steps=1)).save_final(tmp_path / "cfg_final")
    with pytest.raises(ValueError, match="base model None is not a local directory"):
        load_model(str(tmp_path / "cfg_final"))


def test_trainable_patterns_only_train_those(tok, data):
    model = _model(tok)
    before = _params(model)
    run = Surgery(model=model, tokenizer=tok, streams=_streams(data), trainable=["model.layers.1.*"],
                  train=_train(steps=2))
    run.train()
    after = _params(run.model)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    assert "lm_head.weight" not in changed


def test_bf16_with_gradient_checkpointing(tok, data):
    """bf16 weights + gradient checkpointing run and move the losses the right way."""
    run = Surgery(model=_model(tok, "bfloat16"), tokenizer=tok, streams=_streams(data),
                  train=_train(steps=6, gradient_checkpointing=True))
    run.train()
    h = run.history
    assert all(torch.isfinite(torch.tensor(m["loss/total"])) for m in h)
    assert h[-1]["loss/update"] < h[0]["loss/update"]
    assert getattr(run.model, "is_activation_checkpointing", None) or run.model.is_gradient_checkpointing


def test_mixed_precision_autocast_follows_float32(tok, data):
    """float32 weights with bf16 compute (autocast on one process) track the float32 run."""
    runs = []
    for mp in (None, "bfloat16"):
        r = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=3, mixed_precision=mp))
        r.train()
        runs.append(r.history)
    for a, b in zip(*runs):
        # bf16 has 8 bits of mantissa: losses of ~4 agree to a few hundredths.
        assert b["loss/total"] == pytest.approx(a["loss/total"], rel=2e-2)
    assert runs[1][-1]["loss/retain"] > 0


def test_gradient_checkpointing_same_step(tok, data):
    """Gradient checkpointing changes memory, not results."""
    hist = []
    for gc in (False, True):
        r = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2,
                                                                                           gradient_checkpointing=gc))
        r.train()
        hist.append([m["loss/total"] for m in r.history])
    assert hist[0] == pytest.approx(hist[1], rel=1e-6)


def test_zero_weight_stream_is_measured_but_does_not_train(tok, data):
    """A stream with weight 0 is still measured (ablations keep the column) and trains nothing: the run
    equals the run without that stream (records are drawn per stream name, so the others see the same).
    In float64: the two runs feed the head GEMMs different token counts, and AdamW at lr 1e-2 turns
    float32 rounding differences of near-zero gradients into ~1e-5 weight differences; a stream that
    did train would move weights by ~lr."""
    runs = []
    for streams in (_streams(data, (0.0, 2.0, 0.5)), _streams(data)[1:]):
        r = Surgery(model=_model(tok).double(), tokenizer=tok, streams=streams, train=_train(steps=3))
        r.train()
        runs.append(r)
    assert runs[0].history[-1]["loss/unlearn"] > 0
    _assert_same_params(runs[0].model, runs[1].model)


def test_ascent_cap_stops_training_but_not_the_metrics(tok, data):
    """ascent_cap=1e-6: every ascent token is past the cap, so the stream trains nothing (the run
    equals the run without it, in float64 as above) while its logged mean is still its real CE and
    capped/<stream> says all of it was switched off."""
    runs = []
    for streams in (_streams(data), _streams(data)[1:]):
        r = Surgery(model=_model(tok).double(), tokenizer=tok, streams=streams, train=_train(steps=3, ascent_cap=1e-6))
        r.train()
        runs.append(r)
    last = runs[0].history[-1]
    assert last["loss/unlearn"] > 1.0 and last["capped/unlearn"] == 1.0
    assert "capped/update" not in last and "capped/unlearn" not in runs[1].history[-1]
    _assert_same_params(runs[0].model, runs[1].model)


@pytest.mark.parametrize("reference", ["copy", "cache", "adapter"])
def test_ce_and_kl_rows_as_two_batches_equal_one(tok, data, monkeypatch, tmp_path, reference):
    """Short CE rows next to long KL rows go through the model as two batches of their own lengths;
    the run equals the one-batch run (float64) with each kind of reference, and the split really
    happened."""
    u, p, r, _ = data
    long_r = [{"text": " ".join(x["text"] for x in r[i:i + 4])} for i in range(len(r))]  # ~40 tokens
    streams = [Stream("unlearn", u, "ascent", 0.1), Stream("update", p, "descent", 2.0),
               Stream("retain", long_r, "kl", 0.5)]
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]} if reference == "adapter" else None
    runs, splits = [], []
    for ratio in (float("inf"), 1.0):
        monkeypatch.setattr(Surgery, "SPLIT_PADDING_RATIO", ratio)
        r_ = Surgery(model=_model(tok).double(), tokenizer=tok, streams=streams, train=_train(steps=3),
                     reference=reference, lora=lora, output_dir=tmp_path / f"{reference}-{ratio}")
        r_._setup()
        splits.append(r_._passes()[0][0].kl_batch is not None)
        r_.train()
        runs.append(r_)
    assert splits == [False, True]
    for k in ("loss/unlearn", "loss/update", "loss/retain"):
        assert runs[0].history[-1][k] == pytest.approx(runs[1].history[-1][k], rel=1e-12)
    _assert_same_params(runs[0].model, runs[1].model)


@pytest.mark.parametrize("reference", ["copy", "cache", "adapter"])
def test_micro_batches_equal_one_pass(tok, data, tmp_path, reference):
    """train.micro_batch_size splits a step's rows into forward/backward passes whose gradients
    add up: the run equals the one-pass run (float64: metrics and parameters to rounding) with each
    kind of reference, with ascent_cap, for passes of one row, and of rows of several streams
    (CE and KL rows of one pass as two batches of their own lengths; passes holding one of two
    KL streams only)."""
    u, p, r, _ = data
    long_r = [{"text": " ".join(x["text"] for x in r[i:i + 4])} for i in range(len(r))]  # ~40 tokens
    # 2 + 2 + 3 + 1 rows a step; two KL streams, so some passes hold rows of one of them only.
    streams = [Stream("unlearn", u, "ascent", 0.1), Stream("update", p, "descent", 2.0),
               Stream("retain", long_r, "kl", 0.5, batch_size=3), Stream("retain_short", r, "kl", 0.2, batch_size=1)]
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]} if reference == "adapter" else None
    runs = {}
    for mbs in (None, 1, 3):
        run = Surgery(model=_model(tok).double(), tokenizer=tok, streams=streams, reference=reference, lora=lora,
                      train=_train(steps=3, micro_batch_size=mbs, ascent_cap=4.4),
                      output_dir=tmp_path / f"{reference}-{mbs}")
        run._setup()
        passes, _ = run._passes()
        runs[mbs] = (run, [(ps.stop - ps.start, ps.n_ce, ps.kl_batch is not None) for ps in passes])
        run.train()
    assert runs[None][1] == [(8, 4, True)]
    assert runs[1][1] == [(1, 1, False)] * 4 + [(1, 0, False)] * 4
    assert runs[3][1] == [(3, 3, False), (3, 1, True), (2, 0, False)]
    ref_hist = runs[None][0].history
    assert any(m["capped/unlearn"] > 0 for m in ref_hist) and any(m["capped/unlearn"] < 1 for m in ref_hist)
    for mbs in (1, 3):
        hist = runs[mbs][0].history
        for k in ("loss/total", "loss/unlearn", "loss/update", "loss/retain", "loss/retain_short", "capped/unlearn",
                  "grad_norm", "tokens"):
            assert [m[k] for m in hist] == pytest.approx([m[k] for m in ref_hist], rel=1e-12, abs=1e-15), k
        _assert_same_params(runs[None][0].model, runs[mbs][0].model)


@pytest.mark.parametrize("mean_over", ["tokens", "records"])
def test_stream_order_changes_nothing(tok, data, mean_over):
    """A KL stream listed before the CE streams: the step draws CE rows first whatever the config
    order, and every row must still get its own stream's sign, weight and count (the ascent rows
    once got the KL stream's + sign and were trained by descent). Same metrics and weights in
    float64 as the CE-first order — the second run also in passes of 2 rows (micro_batch_size),
    whose per-stream means are the step's."""
    u, p, r, _ = data
    ce_first = [Stream("unlearn", u, "ascent", 0.1), Stream("update", p, "descent", 2.0), Stream("retain", r, "kl", 0.5)]
    runs = []
    for streams, mbs in ((ce_first, None), ([ce_first[2], ce_first[0], ce_first[1]], 2)):
        run = Surgery(model=_model(tok).double(), tokenizer=tok, streams=streams,
                      train=_train(steps=3, mean_over=mean_over, micro_batch_size=mbs))
        run.train()
        runs.append(run)
    for a, b in zip(*(r.history for r in runs)):
        for k in ("loss/total", "loss/unlearn", "loss/update", "loss/retain", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-12), k
    _assert_same_params(runs[0].model, runs[1].model)


def _records_objective(model, ref, streams, ps, rows):
    """The step's objective with train.mean_over="records" from the model's own materialized
    logits (float64): (total, each stream's mean, the gradient norm of the total). ``ps``, ``rows``:
    the step's draw (``Surgery._passes``)."""
    batch, kl_batch, nc = ps.batch, ps.kl_batch, ps.n_ce
    total, means = 0.0, []
    for (a, z), s in zip(rows, streams):
        per_record = []
        for i in range(a, z):
            b, j = (batch, i) if i < nc else ((kl_batch, i - nc) if kl_batch is not None else (batch, i))
            ids, att, tgt = b.input_ids[j:j + 1], b.attention_mask[j:j + 1], b.target[j:j + 1]
            m = tgt != IGNORE
            logq = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.double(), -1)
            if s.loss == "kl":
                with torch.no_grad():
                    logp = torch.log_softmax(ref(input_ids=ids, attention_mask=att).logits.double(), -1)
                per = (logp.exp() * (logp - logq)).sum(-1)
            else:
                per = -logq.gather(-1, tgt.clamp_min(0)[..., None]).squeeze(-1)
            per_record.append(per[m].mean())
        mean = torch.stack(per_record).mean()
        means.append(mean)
        total = total + (-1.0 if s.loss == "ascent" else 1.0) * s.weight * mean
    total.backward()
    norm = torch.cat([q.grad.flatten() for q in model.parameters() if q.grad is not None]).norm()
    return total, means, norm


def _perturbed_step(model, streams, tok, **train):
    """One float64 step at lr 1e-30 (AdamW leaves the weights as they are) of a run whose model
    moved away from its copy reference after setup (so the KL is not zero): (run, a copy of the
    reference, the step's draw)."""
    ref = copy.deepcopy(model)  # what the copy reference holds: the model at setup
    run = Surgery(model=model, tokenizer=tok, streams=streams, reference="copy",
                  train=_train(steps=1, batch_size=3, lr=1e-30, clip=0, **train))
    run._setup()
    with torch.no_grad():
        for q in model.parameters():
            q.add_(0.05 * torch.randn(q.shape, generator=torch.Generator().manual_seed(q.numel()), dtype=q.dtype))
    seen = []
    draw = run._passes
    run._passes = lambda: seen.append(draw()) or seen[-1]
    run.train()
    return run, ref, seen[0]


def test_mean_over_records_averages_each_record_mean(tok, data):
    """train.mean_over="records": each stream's term is the mean over its records of each record's
    own token mean (the authors' weighting), checked in float64 against materialized logits on
    records of different lengths; the default "tokens" differs there."""
    u, p, r, _ = data
    longer = lambda recs: [dict(x, text=" ".join([x["text"]] * (1 + i % 3))) for i, x in enumerate(recs)]  # noqa: E731
    streams = [Stream("unlearn", longer(u), "ascent", 0.1), Stream("update", p, "descent", 2.0),
               Stream("retain", longer(r), "kl", 0.5)]
    got = {}
    for mean_over in ("records", "tokens"):  # the same draw and model both times
        model = _model(tok).double()
        run, ref, seen = _perturbed_step(model, streams, tok, mean_over=mean_over)
        got[mean_over] = run.history[0]
    (ps,), rows = seen
    assert len(set(ps.live(*rows[0]).sum(1).tolist())) > 1  # the ascent records differ in length
    total, means, norm = _records_objective(model, ref, streams, ps, rows)
    m = got["records"]
    # float64 to rounding: the per-token weights are float64 in a float64 run
    assert m["loss/total"] == pytest.approx(total.item(), rel=1e-10)
    for s, mean in zip(streams, means):
        assert m[f"loss/{s.name}"] == pytest.approx(mean.item(), rel=1e-10), s.name
    assert m["grad_norm"] == pytest.approx(norm.item(), rel=1e-10)
    assert got["tokens"]["loss/unlearn"] != pytest.approx(means[0].item(), rel=1e-3)
    assert got["tokens"]["loss/retain"] != pytest.approx(means[2].item(), rel=1e-2)


ARCHS = {
    "llama": dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "mistral": dict(model_type="mistral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2),
    # GPT-2 ties lm_head to the input embedding: the head's gradient lands on the shared weight.
    "gpt2": dict(model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0, embd_pdrop=0.0,
                 attn_pdrop=0.0),
}


def _check_arch(tok, data, arch, device):
    from surgery.modeling import final_hidden, output_layer

    model = load_model(config=dict(ARCHS[arch], vocab_size=len(tok), pad_token_id=0, bos_token_id=2,
                                   eos_token_id=3)).to(device).eval()
    b = collate(tokenize_lm(data[2][:3], tok, 64), tok.pad_token_id).to(device)
    with torch.no_grad():
        logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
        h = final_hidden(model, b.input_ids, b.attention_mask)
        z = torch.nn.functional.linear(h, output_layer(model).weight, output_layer(model).bias)
    m = b.attention_mask.bool()
    assert torch.allclose(z[m], logits[m], rtol=1e-5, atol=1e-5)
    before = perplexity(model, tok, data[1])["nll"]
    run = Surgery(model=model, tokenizer=tok, streams=_streams(data), train=_train(steps=3))
    run.train()
    assert perplexity(run.model, tok, data[1])["nll"] < before - 0.1


# Heads that do more than lm_head(hidden): Gemma-2's softcap (weights x40: raw logits past twice
# the cap), Granite's division by logits_scaling, Cohere's logit_scale.
TRANSFORMED_HEADS = {
    "gemma2": (dict(final_logit_softcapping=3.0), 40.0, dict(softcap=3.0), 1.0),
    "granite": (dict(logits_scaling=4.0), 1.0, {}, 0.25),
    "cohere": (dict(logit_scale=2.5), 1.0, {}, 2.5),
}


@pytest.mark.parametrize("arch", sorted(TRANSFORMED_HEADS))
def test_transformed_heads_train_every_stream_on_the_model_logits(tok, data, arch):
    """A softcapped (Gemma-2) or scaled (Granite, Cohere) head reaches every stream: the CE terms
    and the KL term against the reference's logits (linear_kl_div's softcap / ref_softcap, the
    scale folded into both sides' hidden states) equal those of the model's own logits, and so
    does the gradient (float64). KL streams had been refused on Gemma-2 (before that they trained
    on uncapped logits: 0.512 against 0.225), and scaled heads refused altogether."""
    extra, mul, opts, scale = TRANSFORMED_HEADS[arch]
    streams = _streams(data)
    model = _tiny(tok, arch, **extra).double()
    with torch.no_grad():
        model.lm_head.weight.mul_(mul)
    run, ref, ((ps,), rows) = _perturbed_step(model, streams, tok, mean_over="records")
    assert run.objective.head_opts == opts and run.objective.logit_scale == scale
    total, means, norm = _records_objective(model, ref, streams, ps, rows)
    m = run.history[0]
    assert m["loss/total"] == pytest.approx(total.item(), rel=1e-10)
    for s, mean in zip(streams, means):
        assert m[f"loss/{s.name}"] == pytest.approx(mean.item(), rel=1e-10), s.name
    assert m["grad_norm"] == pytest.approx(norm.item(), rel=1e-10)
    with torch.no_grad():  # evaluation's per-token NLL (perplexity, multiple choice) too
        b = ps.batch
        nll = run.objective("nll", b.input_ids, b.attention_mask, b.target)
        logp = torch.log_softmax(model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits, -1)
        live = b.target != IGNORE
        want = -logp.gather(-1, b.target.clamp_min(0)[..., None]).squeeze(-1)
        assert torch.allclose(nll[live], want[live], rtol=1e-10, atol=0) and (nll[~live] == 0).all()
    if arch == "gemma2":
        with torch.no_grad():
            b = ps.batch
            z = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            assert z.abs().max() > 2.9  # the cap is in play
            from surgery.modeling import final_hidden, output_layer
            raw = torch.nn.functional.linear(final_hidden(model, b.input_ids, b.attention_mask),
                                             output_layer(model).weight)
            assert raw.abs().max() > 6.0


def test_multiple_choice_picks_and_per_document_perplexity(tok, monkeypatch):
    """The rules on given per-token NLLs: ``accuracy`` picks the lowest mean NLL over a choice's
    tokens, ``accuracy_sum`` the lowest total, ties go to the first choice; the per-document
    perplexity averages the documents that have a scored token."""
    from surgery import evaluate

    nll = [torch.tensor([1.0, 1.0, 1.0]), torch.tensor([2.0]),  # mean 1 < 2 (pick 0); total 3 > 2 (pick_sum 1)
           torch.tensor([0.5]), torch.tensor([0.5])]              # a tie: the first
    monkeypatch.setattr(evaluate, "token_nll", lambda *a, **k: nll)
    recs = [{"question": "a", "choices": ["x", "y"], "answer": 0}, {"question": "b", "choices": ["x", "y"], "answer": 1}]
    out = evaluate.multiple_choice(None, tok, recs, details=True)
    assert [(q["pick"], q["pick_sum"]) for q in out["questions"]] == [(0, 1), (0, 0)]
    assert out["accuracy"] == 0.5 and out["accuracy_sum"] == 0.0
    nll = [torch.tensor([math.log(2.0), math.log(2.0)]), torch.tensor([])]
    out = evaluate.perplexity(None, tok, ["a b c", "a"])
    assert out["perplexity_per_document"] == pytest.approx(2.0) and out["tokens"] == 2


def test_multiple_choice_scores_the_choice_as_it_stands_after_the_question(monkeypatch):
    """A choice is scored on the tokens it has in ``question + " " + choice`` (a SentencePiece-style
    tokenizer marks the word start: "▁paris", not "paris"), after the question's own tokens.
    (This word-level tokenizer cannot tell the separator " " from "": joined without it, the
    unknown word makes the choice be tokenized alone, to the same ids.)"""
    from surgery import evaluate
    from surgery.testing import sentencepiece_style_tokenizer

    sp = sentencepiece_style_tokenizer("which city is the capital of france ? paris rome".split())
    seen = []
    monkeypatch.setattr(evaluate, "token_nll", lambda model, examples, *a, **k: seen.extend(examples) or
                        [torch.zeros(len(e.ids) - e.loss_from) for e in examples])
    q = "which city is the capital of france ?"
    evaluate.multiple_choice(None, sp, [{"question": q, "choices": ["paris", "rome"], "answer": 0}])
    for e, c in zip(seen, ["paris", "rome"]):
        assert e.ids == sp(q + " " + c)["input_ids"] and e.loss_from == len(sp(q)["input_ids"])
        assert sp.convert_ids_to_tokens(e.ids[e.loss_from:]) == ["▁" + c]


def test_multiple_choice_takes_a_leading_space_as_the_separator(monkeypatch, caplog):
    """Choices written with their leading space (" paris", as Hugging Face data often has them) are
    scored as "question paris", not "question  paris" with a stray "▁" token (it moved the shipped
    example's accuracies from 70/30% to 30/40%, silently); a choice cut by max_length warns."""
    from surgery import evaluate
    from surgery.testing import sentencepiece_style_tokenizer

    sp = sentencepiece_style_tokenizer("which city is the capital of france ? paris rome".split())
    seen = []
    monkeypatch.setattr(evaluate, "token_nll", lambda model, examples, *a, **k: seen.extend(examples) or
                        [torch.zeros(len(e.ids) - e.loss_from) for e in examples])
    q = "which city is the capital of france ?"
    for rec in ({"question": q, "choices": [" paris", " rome"], "answer": 0},
                {"question": q + " ", "choices": ["paris", "rome"], "answer": 0}):
        seen.clear()
        evaluate.multiple_choice(None, sp, [rec])
        for e, c in zip(seen, ["paris", "rome"]):
            assert sp.convert_ids_to_tokens(e.ids[e.loss_from:]) == ["▁" + c]
    assert "lose their end" not in caplog.text
    with caplog.at_level("WARNING", logger="surgery"):
        evaluate.multiple_choice(None, sp, [{"question": q, "choices": ["paris rome", "paris paris"], "answer": 0}],
                                 max_length=2, name="qa")
    assert "qa: 2 of 2 choices are longer than max_length - 1 = 1 tokens and lose their end" in caplog.text
    for fn, recs in ((evaluate.multiple_choice, [rec]), (evaluate.perplexity, [q])):
        with pytest.raises(ValueError, match="max_length must be an integer >= 2"):  # nothing left to score
            fn(None, sp, recs, max_length=1)


def test_evaluation_runs_in_eval_mode_and_restores_the_mode(tok):
    """Dropout is off while scoring (two evaluations of a model in training mode agree) and the
    model's mode is as it was after."""
    model = _model(tok, attention_dropout=0.5)
    model.train()
    texts = ["the capital of france is paris", "the capital of spain is madrid"]
    a, b = perplexity(model, tok, texts), perplexity(model, tok, texts)
    assert a["nll"] == b["nll"] and model.training
    with torch.no_grad():  # the same model in training mode does draw dropout
        ids = torch.tensor([tok(texts[0])["input_ids"]])
        assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)


def test_heads_the_losses_cannot_follow_are_refused(tok):
    """A scaling attribute on an architecture whose use of it is not known (the same name
    multiplies on HyperCLOVAX and divides on Granite) is refused, and so is a model whose logits
    are not what the losses compute from its final hidden states (checked on two tokens): here
    a head that doubles its output, as a MiniCPM-style scaling of the hidden states would
    change them, unseen by the config."""
    llama = load_model(config=tiny_llama(len(tok)))
    llama.config.lm_head_multiplier = 0.25
    with pytest.raises(ValueError, match="model_type 'llama'.* lm_head_multiplier=0.25"):
        Surgery(model=llama, tokenizer=tok, streams=_streams(fact_streams())[:2], train=_train(steps=1))
    llama = load_model(config=tiny_llama(len(tok)))
    head = llama.lm_head
    plain = head.forward
    for factor in (2.0, 1.01):  # a 1 % scale too: float32 rounding is far below it
        head.forward = lambda x, f=factor: f * plain(x)
        with pytest.raises(ValueError, match="logits are not what the losses compute.*model_type 'llama'"):
            Surgery(model=llama, tokenizer=tok, streams=_streams(fact_streams())[:2], train=_train(steps=1))
    assert llama.training  # the check left the model as it found it
    head.forward = plain
    Surgery(model=llama, tokenizer=tok, streams=_streams(fact_streams())[:2], train=_train(steps=1))


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_final_hidden_is_what_the_head_sees(tok, data, arch):
    """The one model path (base_model's last_hidden_state + get_output_embeddings) reproduces the
    model's own logits for each architecture family, and a surgery run trains it."""
    _check_arch(tok, data, arch, "cpu")


def test_checkpoint_write_is_atomic(tok, data, tmp_path, monkeypatch):
    """A crash while writing a checkpoint leaves the previous one whole (temp file + rename)."""
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=1),
                  output_dir=tmp_path)
    run.train()
    ck = tmp_path / "checkpoint" / "state.pt"
    good = ck.read_bytes()
    real_save = torch.save

    def crash(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    run.cfg.steps = 2
    with pytest.raises(OSError, match="disk full"):
        run.train(resume=True)
    assert ck.read_bytes() == good
    monkeypatch.setattr(torch, "save", real_save)
    again = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                    output_dir=tmp_path)
    again.train(resume=True)
    assert again.step == 2




def test_multiple_choice_equals_logit_scoring(tok, data):
    """Answer log-likelihood from the fused path == log_softmax over materialized logits; accuracy
    picks by the mean over the answer's tokens (the paper's), accuracy_sum by the sum."""
    model = _model(tok)
    q = data[3][:8]
    res = multiple_choice(model, tok, q, details=True)
    means, sums = [], []
    for rec, d in zip(q, res["questions"]):
        qi = tok(rec["question"])["input_ids"]
        mean, total = [], []
        for j, ch in enumerate(rec["choices"]):
            ids = tok(rec["question"] + " " + ch)["input_ids"]
            ci = ids[len(qi):]
            with torch.no_grad():
                lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double(), -1)[0]
            ll = sum(float(lp[len(qi) - 1 + k, t]) for k, t in enumerate(ci))
            assert d["loglik"][j] == pytest.approx(ll, rel=1e-5)
            assert d["tokens"][j] == len(ci)
            mean.append(ll / len(ci))
            total.append(ll)
        means.append(max(range(3), key=lambda j: (mean[j], -j)))
        sums.append(max(range(3), key=lambda j: (total[j], -j)))
        assert (d["pick"], d["pick_sum"]) == (means[-1], sums[-1])
    assert res["accuracy"] == sum(p == d["answer"] for p, d in zip(means, res["questions"])) / 8
    assert res["accuracy_sum"] == sum(p == d["answer"] for p, d in zip(sums, res["questions"])) / 8


def test_multiple_choice_truncation_keeps_bos_and_the_answer(tok, data):
    """A question cut to max_length loses its start, not its BOS nor the choice's tokens."""
    model = _model(tok)
    rec = dict(data[3][0])
    rec["question"] = " ".join([rec["question"]] * 3)
    d = multiple_choice(model, tok, [rec], max_length=8, details=True)["questions"][0]
    for j, ch in enumerate(rec["choices"]):
        whole = tok(rec["question"] + " " + ch)["input_ids"]
        n = len(tok(rec["question"])["input_ids"])
        ids = [tok.bos_token_id] + whole[len(whole) - 7:]
        assert whole[0] == tok.bos_token_id and len(whole) > 8
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double(), -1)[0]
        c = whole[n:]
        ll = sum(float(lp[len(ids) - len(c) - 1 + k, t]) for k, t in enumerate(c))
        assert d["loglik"][j] == pytest.approx(ll, rel=1e-5) and d["tokens"][j] == len(c)


def test_multiple_choice_scores_the_choice_as_it_stands_in_the_sentence():
    """A SentencePiece-style tokenizer ("▁" before every word, and before the text: " paris" alone
    is "▁", "▁paris"): the choice is scored on its tokens in "question choice", not on a stray "▁"
    that tokenizing " choice" by itself adds."""
    from surgery.testing import sentencepiece_style_tokenizer

    tok = sentencepiece_style_tokenizer("which city is the capital of france ? paris lyon nice".split())
    vocab = tok.get_vocab()
    assert tok.convert_ids_to_tokens(tok(" paris", add_special_tokens=False)["input_ids"]) == ["▁", "▁paris"]
    model = load_model(config=tiny_llama(len(vocab)), dtype="float32", seed=0)
    rec = {"question": "which city is the capital of france ?", "choices": ["paris", "lyon", "nice"], "answer": 0}
    d = multiple_choice(model, tok, [rec], details=True)["questions"][0]
    assert d["tokens"] == [1, 1, 1]
    ids = tok(rec["question"] + " paris")["input_ids"]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits.double(), -1)[0]
    assert d["loglik"][0] == pytest.approx(float(lp[-2, vocab["▁paris"]]), rel=1e-5)


def test_perplexity_equals_logits(tok, data):
    model = _model(tok)
    texts = [r["text"] for r in data[2][:3]]
    res = perplexity(model, tok, texts, batch_size=2)
    nll, n, docs, lengths = 0.0, 0, [], []
    for t in texts:
        ids = torch.tensor([tok(t)["input_ids"]])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.double(), -1)[0]
        doc = -float(lp[:-1].gather(-1, ids[0, 1:, None]).sum())
        nll += doc
        n += ids.shape[1] - 1
        docs.append(math.exp(doc / (ids.shape[1] - 1)))
        lengths.append(ids.shape[1])
    assert res["tokens"] == n
    assert res["nll"] == pytest.approx(nll / n, rel=1e-5)
    assert res["perplexity_per_document"] == pytest.approx(sum(docs) / len(docs), rel=1e-5)
    # a model sure of the wrong tokens (mean NLL past 710): inf, not an OverflowError
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)
    far = perplexity(model, tok, texts, batch_size=2)
    assert far["nll"] > 710 and far["perplexity"] == far["perplexity_per_document"] == math.inf
    assert len(set(lengths)) > 1 and res["perplexity_per_document"] != pytest.approx(res["perplexity"], rel=1e-4)




def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_cli_train_and_eval(tok, data, tmp_path, capsys):
    from surgery.cli import main

    tok.save_pretrained(tmp_path / "tok")
    u, p, r, q = data
    for name, recs in (("u", u), ("p", p), ("r", r), ("q", q)):
        _write_jsonl(tmp_path / f"{name}.jsonl", recs)
    cfg = {
        "model": {"config": tiny_llama(len(tok)), "tokenizer": "tok"},
        "streams": [{"name": "unlearn", "data": "u.jsonl", "loss": "ascent", "weight": 0.1},
                    {"name": "update", "data": "p.jsonl", "loss": "descent", "weight": 2.0},
                    {"name": "retain", "data": "r.jsonl", "loss": "kl", "weight": 0.5}],
        "eval": [{"name": "qa", "data": "q.jsonl"}],
        "reference": "copy",
        "train": {"steps": 2, "lr": 1e-2, "batch_size": 2, "progress": False},
        "output_dir": "out",
    }
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "train.steps=3", "--set", "streams.update.weight=1.5"]) == 0
    out = tmp_path / "out"
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    assert json.loads((out / "summary.json").read_text())["streams"][1]["weight"] == 1.5
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "train.steps=4", "--resume"]) == 0
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 4
    # runs.jsonl: each start's command, how to continue it, and the resolved config
    runs = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [(r["resume"], r["from_step"], r["overrides"]) for r in runs] == [
        (False, 0, ["train.steps=3", "streams.update.weight=1.5"]), (True, 3, ["train.steps=4"])]
    assert runs[0]["resume_with"].endswith("--set train.steps=3 --set streams.update.weight=1.5 --resume")
    assert runs[0]["resolved"]["streams"][1]["weight"] == 1.5 and runs[1]["resolved"]["train"]["steps"] == 4
    # a fresh run into the finished run's output_dir: refused before the model loads (minutes at 7B)
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        import surgery

        mp.setattr(surgery, "from_config", lambda *a, **k: pytest.fail("loaded the model before refusing output_dir"))
        assert main(["train", str(tmp_path / "c.yaml")]) == 2
        assert "holds a finished run" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "c.yaml")]) == 0
    assert '"accuracy"' in capsys.readouterr().out
    # Bad data: one line naming the file and line, exit code 2, before any model loads.
    (tmp_path / "u.jsonl").write_text('{"text": "ok"}\n{"txt": "bad"}\n')
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "output_dir=fresh"]) == 2
    err = capsys.readouterr().err
    assert "u.jsonl:line 2" in err and "'text'" in err
    # eval reads no training stream (u.jsonl is bad now, r.jsonl gone), here on the trained model.
    (tmp_path / "r.jsonl").unlink()
    trained = ["--set", f"model.path={out / 'final'}", "--set", "model.config=null"]
    assert main(["eval", str(tmp_path / "c.yaml")] + trained) == 0
    assert json.loads(capsys.readouterr().out)["qa"]["accuracy"] == pytest.approx(
        json.loads((out / "summary.json").read_text())["after"]["qa"]["accuracy"])
    cfg.pop("streams")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "c.yaml")]) == 0
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "output_dir=other"]) == 2
    assert "config has no streams" in capsys.readouterr().err
    cfg.pop("eval")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", str(tmp_path / "c.yaml")]) == 2
    assert "has no eval sets: nothing to evaluate" in capsys.readouterr().err


def test_surgery_without_streams_only_evaluates(tok, data, tmp_path):
    with pytest.raises(ValueError, match=r"eval set names must be unique, got \['qa', 'qa'\]"):
        Surgery(model=_model(tok), tokenizer=tok, streams=[], eval=[EvalSet("qa", data[3]), EvalSet("qa", data[2])])
    run = Surgery(model=_model(tok), tokenizer=tok, streams=[], eval=[EvalSet("qa", data[3])])
    assert set(run.evaluate()["qa"]) >= {"accuracy"}
    for call in (run.train, run.run):
        with pytest.raises(ValueError, match="at least one Stream to train on"):
            call()


@pytest.mark.parametrize("argv, blocked, extras", [(["train", "CONFIG"], "yaml", "hf"),
                                                   (["eval", "CONFIG"], "yaml", "hf"),
                                                   (["demo", "--tiny", "--out", "OUT"], "tqdm", "hf,demo")])
def test_commands_name_the_extra_of_a_missing_package(tmp_path, capsys, monkeypatch, argv, blocked, extras):
    """`pip install surgery-kernels` without [hf] installs the `surgery` command, which then died
    in a traceback (No module named 'yaml'); it names the extra to install instead. An import error
    of anything else is not disguised."""
    import sys

    from surgery.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {path: m}\n")
    argv = [str(cfg) if a == "CONFIG" else str(tmp_path / "out") if a == "OUT" else a for a in argv]
    # as if not installed: neither it nor its submodules loaded, and no finder finds it
    class NotInstalled:
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == blocked:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [NotInstalled] + sys.meta_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"surgery {argv[0]} needs the package {blocked!r}, which is not installed" in err
    assert f"pip install 'surgery-kernels[{extras}]'" in err and "Traceback" not in err
    from surgery import cli

    # a missing submodule of an installed package (a version mismatch) is not a missing extra
    assert cli._missing_extra(ModuleNotFoundError("x", name="transformers.models.x"), "train") is None
    monkeypatch.setattr(cli, "_EXTRA_OF", {})
    with pytest.raises(ModuleNotFoundError):
        main(argv)


def test_demo_subcommand_reports_missing_module(capsys, monkeypatch):
    import sys

    from surgery.cli import main

    monkeypatch.setitem(sys.modules, "surgery.demo", None)
    assert main(["demo"]) == 2
    assert "demo module is not installed" in capsys.readouterr().err




@pytest.mark.cuda
def test_cuda_run_matches_cpu(tok, data):
    """The trainer on CUDA with backend='auto' (triton / cuda / torch, whichever loads) gives the CPU
    run's first-step losses (same weights, same records); the hidden-state path holds for every
    architecture family on the GPU image's transformers."""
    cpu = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=3, backend="torch"))
    cpu.train()
    gpu = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data),
                  train=_train(steps=3, device="cuda", backend="auto"))
    gpu.train()
    for k in ("loss/total", "loss/unlearn", "loss/update"):
        # TF32 in a fused kernel's GEMMs is the only expected difference.
        assert gpu.history[0][k] == pytest.approx(cpu.history[0][k], rel=1e-3), k
    assert gpu.history[-1]["loss/retain"] == pytest.approx(cpu.history[-1]["loss/retain"], rel=0.1, abs=1e-3)
    # The model path on the GPU image's transformers version.
    for arch in sorted(ARCHS):
        _check_arch(tok, data, arch, "cuda")


@pytest.mark.cuda
def test_cuda_bf16_lora_adapter_run(tok, data):
    """bf16 LoRA with the adapters-off reference and gradient checkpointing on the GPU."""
    pytest.importorskip("peft")
    model = _model(tok, "bfloat16").cuda()
    before = [perplexity(model, tok, data[i])["nll"] for i in (0, 1)]
    lora = Surgery(model=model, tokenizer=tok, streams=_streams(data), reference="adapter",
                   lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj", "down_proj"]},
                   train=_train(steps=8, lr=1e-1, gradient_checkpointing=True))
    lora.train()
    after = [perplexity(lora.model, tok, data[i])["nll"] for i in (0, 1)]
    # On the CPU this run moves unlearn NLL 4.16 -> 4.28 and update NLL 4.26 -> 4.07.
    assert after[0] > before[0] + 0.05 and after[1] < before[1] - 0.1, (before, after)
    h = lora.history
    assert all(m["loss/retain"] >= 0 for m in h) and h[-1]["loss/retain"] > 0


LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def test_lora_with_trained_base_weights_is_refused(tok, data, tmp_path):
    """LoRA saves only its adapters to final/ (peft save_pretrained): base-model weights trained
    next to them would be lost. An explicit trainable "all" with lora is refused before the model
    loads (the model directory here does not exist), patterns reaching base weights once the
    names are known, before any training; the default (None: "lora" with lora), adapter patterns
    and modules_to_save still train."""
    why = "final/ holds only the adapters.*trainable: lora.*modules_to_save.*drop lora"
    with pytest.raises(ValueError, match=f"trainable 'all' with LoRA trains base-model weights.*{why}"):
        Surgery(model={"path": str(tmp_path / "nowhere"), "lora": LORA, "trainable": "all"}, tokenizer=tok,
                streams=_streams(data))
    with pytest.raises(ValueError, match="trainable 'all' with LoRA"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=LORA, trainable="all")
    with pytest.raises(ValueError, match=rf"trainable \['\*'\] with LoRA trains base-model weights \(\d+ "
                                         rf"base-model parameters, e.g. .*embed_tokens.weight\).*{why}"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=LORA, trainable=["*"])
    # a loaded adapter (a LoRA run's final/) with trainable all is a LoRA run too
    _model(tok).save_pretrained(tmp_path / "base")
    Surgery(model={"path": str(tmp_path / "base"), "lora": LORA}, tokenizer=tok, streams=_streams(data),
            reference="adapter", train=_train(steps=1)).save_final(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trainable 'all' with LoRA"):
        Surgery(model={"path": str(tmp_path / "adapter"), "trainable": "all"}, tokenizer=tok, streams=_streams(data))
    for kw in ({}, {"trainable": "lora"}, {"trainable": ["*lora_A*"]}):
        run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=LORA, **kw)
        assert run.trainable_names and all("lora_" in n for n in run.trainable_names), kw
    # a pattern written as without LoRA (no peft "base_model.model." prefix) picks the same layers
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=LORA,
                  trainable=["model.layers.1.*lora_*"])
    assert run.trainable_names and all(n.startswith("base_model.model.model.layers.1.") and "lora_" in n
                                       for n in run.trainable_names)
    with pytest.raises(ValueError, match=r"trainable \['model.layers.1.\*'\] with LoRA trains base-model weights"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=LORA, trainable=["model.layers.1.*"])
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data),
                  lora={**LORA, "modules_to_save": ["lm_head"]})
    assert any("modules_to_save" in n for n in run.trainable_names)
    # what peft saves decides, not parameter names: LoRA biases (bias="lora_only") are in final/
    peft = pytest.importorskip("peft")
    biased = peft.get_peft_model(load_model(config={**tiny_llama(len(tok)), "attention_bias": True}),
                                 peft.LoraConfig(r=2, target_modules=["q_proj"], bias="lora_only"))
    run = Surgery(model=biased, tokenizer=tok, streams=_streams(data), reference="copy")
    assert any(n.endswith("base_layer.bias") for n in run.trainable_names)
    # every adapter counts, whatever its name (save_pretrained writes them all)
    named = peft.get_peft_model(_model(tok), peft.LoraConfig(r=2, target_modules=["q_proj"]), adapter_name="unlearn")
    named.add_adapter("second", peft.LoraConfig(r=2, target_modules=["v_proj"]))
    named.set_adapter("second")
    assert Surgery(model=named, tokenizer=tok, streams=_streams(data), reference="copy").trainable_names
    # ... but a trained head has no adapters-off reference: said at construction, not at the first step
    with pytest.raises(ValueError, match="reference='adapter' needs a frozen lm_head"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), reference="adapter",
                lora={**LORA, "modules_to_save": ["lm_head"]})
    # without lora, the default and an explicit "all" train everything
    assert Surgery(model={"config": tiny_llama(len(tok)), "trainable": "all"}, tokenizer=tok,
                   streams=_streams(data)).trainable_names == [n for n, _ in _model(tok).named_parameters()]


def test_cli_train_needs_an_output_dir(tok, data, tmp_path, capsys):
    """surgery train without output_dir would train and keep nothing: refused up front (exit 2),
    before any model loads (model.path here does not exist); surgery eval does not need one."""
    from surgery.cli import main

    _write_jsonl(tmp_path / "u.jsonl", data[0])
    (tmp_path / "c.yaml").write_text("model: {path: nowhere}\nstreams: [{name: u, data: u.jsonl}]\n")
    assert main(["train", str(tmp_path / "c.yaml")]) == 2
    assert "output_dir is not set: surgery train would train and then save nothing" in capsys.readouterr().err
    assert main(["train", str(tmp_path / "c.yaml"), "--set", "output_dir=out", "--set", "train.lr=5e-4"]) == 2
    assert "model.path" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_a_finished_run_without_its_checkpoint_is_not_overwritten(tok, data, tmp_path):
    """Deleting a finished run's checkpoint (the largest folder; the earlier-checkpoint error
    suggests it) let a fresh run, or a --resume that found no checkpoint, start over and overwrite
    its final/ and summary.json without a word; refused now, before the evaluation."""
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=1),
            output_dir=tmp_path).run()
    shutil.rmtree(tmp_path / "checkpoint")
    saved = {f: (tmp_path / f).read_bytes() for f in ("summary.json", "final/config.json")}
    for resume in (False, True):
        again = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=1),
                        output_dir=tmp_path)
        again.evaluate = lambda: pytest.fail("run() evaluated before refusing output_dir")
        with pytest.raises(ValueError, match=r"holds a finished run \(summary.json, final/\) without the checkpoint"):
            again.run(resume=resume)
    assert {f: (tmp_path / f).read_bytes() for f in saved} == saved
    (tmp_path / "summary.json").unlink()  # final/ alone is a finished run's too
    with pytest.raises(ValueError, match=r"holds a finished run \(final/\)"):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=1),
                output_dir=tmp_path).train()


def test_final_folder_that_is_not_a_model_is_refused_before_training(tok, data, tmp_path):
    """final/ is replaced whole: a final/ holding other files is refused before the "before"
    evaluation and training, with nothing written (it used to train, then fail to save)."""
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "notes.txt").write_text("keep me")
    run = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=1), output_dir=tmp_path)
    run.evaluate = lambda: pytest.fail("run() evaluated before refusing final/")
    with pytest.raises(ValueError, match=r"final is a folder that holds no saved model"):
        run.run()
    assert run.step == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["final"]


def test_resume_refuses_other_shapes_damaged_files_and_fewer_steps(tok, data, tmp_path):
    """Resume errors name the file and the problem, before any training: another LoRA rank (same
    parameter names, other shapes), train.steps below the checkpoint's step (nothing would train
    and final/ would be rewritten), another model dtype (loading would round silently), a
    truncated state.pt."""
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=LORA, reference="adapter",
            train=_train(steps=2), output_dir=tmp_path).train()

    def resume(lora=LORA, steps=3):
        Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), lora=lora, reference="adapter",
                train=_train(steps=steps), output_dir=tmp_path).train(resume=True)

    with pytest.raises(ValueError, match=r"state.pt holds .*lora_A.default.weight with shape \[4, 32\], this run's "
                                         r"is \[8, 32\] \(8 parameter\(s\) differ.*lora.r"):
        resume({**LORA, "r": 8})
    with pytest.raises(ValueError, match=r"checkpoint is at step 2, past train.steps=1"):
        resume(steps=1)
    full = tmp_path / "full"
    Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=1), output_dir=full).train()
    with pytest.raises(ValueError, match=r"state.pt holds .* in torch.float32, this run's model is torch.bfloat16 .*"
                                         r"model.dtype"):
        Surgery(model=_model(tok).to(torch.bfloat16), tokenizer=tok, streams=_streams(data), train=_train(steps=2),
                output_dir=full).train(resume=True)
    metrics = (tmp_path / "metrics.jsonl").read_text()
    state = tmp_path / "checkpoint" / "state.pt"
    state.write_bytes(state.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"cannot read checkpoint .*state.pt \(RuntimeError.*damaged or truncated"):
        resume()
    torch.save({"step": 1}, state)
    with pytest.raises(ValueError, match=r"state.pt is not a surgery checkpoint \(no model, optimizer"):
        resume()
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_tokenizer_larger_than_the_model_vocabulary(tok, data):
    """Token ids past the model's embedding would fail mid-forward (IndexError): refused at load."""
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tok)} tokens but the model's embedding has 20 rows"):
        Surgery(model=load_model(config=tiny_llama(20)), tokenizer=tok, streams=_streams(data))
    # a model vocabulary larger than the tokenizer (padded, as many are) is fine
    Surgery(model=load_model(config=tiny_llama(len(tok) + 5)), tokenizer=tok, streams=_streams(data))


def test_float16_mixed_precision_scales_the_loss(tok, data, tmp_path, monkeypatch, caplog):
    """mixed_precision float16 (float32 weights) scales the loss with torch.amp.GradScaler: a step
    whose scaled gradients overflow is skipped (weights unchanged, logged as skipped with grad_norm
    null, the scale halved) instead of stopping the run; the scale is checkpointed, so a resumed run
    equals a straight one bit for bit (here the tiny model's first steps overflow at the default
    scale, 2**16, which the resumed run must not start from again)."""
    def run(steps, out, resume=False):
        r = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data),
                    train=_train(steps=steps, lr=1e-3, mixed_precision="float16"), output_dir=out)
        r.train(resume=resume)
        return r

    straight = run(5, tmp_path / "a")
    h = straight.history
    assert isinstance(straight._scaler, torch.amp.GradScaler)
    assert h[0]["loss_scale"] == 2.0 ** 16 and any(m["skipped"] for m in h) and not h[-1]["skipped"]
    assert all((m["grad_norm"] is None) == m["skipped"] for m in h)
    json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[0], parse_constant=pytest.fail)
    run(3, tmp_path / "b")
    resumed = run(5, tmp_path / "b", resume=True)
    assert [m["loss_scale"] for m in resumed.history] == [m["loss_scale"] for m in h]
    a, b = _params(straight.model), _params(resumed.model)
    assert all(torch.equal(a[n], b[n]) for n in a)
    import functools

    scaler = torch.amp.GradScaler
    # A scale that does not overflow: the gradients are unscaled before the clip and the update, so
    # the run tracks the float32 one (grad norms 16x too large otherwise).
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(scaler, init_scale=2.0 ** 4))
    runs = []
    for mp in (None, "float16"):
        r = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data), train=_train(steps=3, mixed_precision=mp))
        r.train()
        runs.append(r.history)
    assert not any(m["skipped"] for m in runs[1])
    for a, b in zip(*runs):
        # float16 keeps 11 bits of mantissa: losses and norms agree to about a percent.
        assert (b["loss/total"], b["grad_norm"]) == pytest.approx((a["loss/total"], a["grad_norm"]), rel=2e-2)
    # An enormous scale overflows every step: skipped, weights untouched, no NonFiniteLossError.
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(scaler, init_scale=2.0 ** 40))
    r = Surgery(model=_model(tok), tokenizer=tok, streams=_streams(data),
                train=_train(steps=2, mixed_precision="float16"))
    before = _params(r.model)
    caplog.clear()
    with caplog.at_level("WARNING", logger="surgery"):
        r.train()
    assert [(m["skipped"], m["loss_scale"]) for m in r.history] == [(True, 2.0 ** 40), (True, 2.0 ** 39)]
    # a run whose steps were skipped says so at WARNING, not only per step at INFO
    assert "2 of the 2 steps of this run were skipped by the float16 loss scaler" in caplog.text
    assert all(torch.equal(before[n], p) for n, p in _params(r.model).items())
    # float16 weights (model.dtype) cannot be unscaled: a NaN there stops the run saying what to use.
    r = Surgery(model=_model(tok, "float16"), tokenizer=tok, streams=_streams(data), train=_train(steps=1))
    r.model.model.norm.register_forward_hook(lambda m, i, o: o * float("nan"))
    with pytest.raises(NonFiniteLossError, match="float16 weights overflow easily.*model.dtype.*mixed_precision"):
        r.train()


def test_commands_print_the_version(capsys):
    """`surgery --version` and `python -m surgery_kernels --version` print the package's version
    (they were usage errors: a command is required)."""
    import surgery_kernels
    from surgery.cli import main
    from surgery_kernels.__main__ import main as kernels_main

    for call, name in ((main, "surgery (surgery-kernels)"), (kernels_main, "surgery_kernels")):
        with pytest.raises(SystemExit) as exit_:
            call(["--version"])
        assert exit_.value.code == 0
        assert capsys.readouterr().out.strip() == f"{name} {surgery_kernels.__version__}"
