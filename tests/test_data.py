"""Data and config: records are validated with file + line + problem before any model loads;
batches mask padding and prompts; sampling is deterministic, resumable and rank-consistent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from surgery import DataError, Stream, Surgery, load_config
from surgery.config import PRESETS, EvalSet, TrainConfig, apply_override, config_from_dict, load_yaml
from surgery.data import IGNORE, StreamSampler, collate, read_records, tokenize_lm
from surgery.testing import all_words, tiny_llama, word_tokenizer



@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(all_words())


def _jsonl(path, lines):
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.parametrize("lines, where, what", [
    (['{"text": "a b"}', '{"text": "c"', '{"text": "d"}'], "line 2", "invalid JSON"),
    (['{"text": "a b"}', '', '{"txt": "c"}'], "line 3", "expected a 'text' field"),
    (['{"text": ""}'], "line 1", "non-empty string"),
    (['{"prompt": "q", "completion": 3}'], "line 1", "'completion' is 3"),
    (['["a"]'], "line 1", "JSON object, got list (JSON Lines hold one object per line; a JSON array"),
    (['{"text": "a"}', '{"text": "a b", "prompt": "q", "completion": "c"}'], "line 2",
     "either 'text' or 'prompt' and 'completion'"),
], ids=["syntax", "missing-text", "empty-text", "bad-completion", "not-object", "text-and-prompt"])
def test_jsonl_errors_name_file_and_line(tmp_path, lines, where, what):
    f = _jsonl(tmp_path / "s.jsonl", lines)
    with pytest.raises(DataError) as e:
        read_records(f, "lm")
    assert f"s.jsonl:{where}" in str(e.value) and what in str(e.value)


def test_json_array_error_line(tmp_path):
    f = tmp_path / "s.json"
    f.write_text('[\n  {"text": "a"},\n  {"text": "b"},\n  {"prompt": "x"}\n]\n')
    with pytest.raises(DataError, match=r"s\.json:line 4: .*'completion'"):
        read_records(f, "lm")
    f.write_text('[\n  {"text": "a"},\n  {"text": "b",}\n]\n')
    with pytest.raises(DataError, match=r"s\.json:line 3: invalid JSON"):
        read_records(f, "lm")


def test_json_file_with_one_record(tmp_path):
    """A .json file holding one pretty-printed record is that record; a .json file of JSON Lines
    still reads line by line."""
    f = tmp_path / "one.json"
    f.write_text('\n{\n  "prompt": "the capital of",\n  "completion": " alba"\n}\n')
    assert read_records(f, "lm") == [{"prompt": "the capital of", "completion": " alba"}]
    f.write_text('{\n  "prompt": "x"\n}\n')
    with pytest.raises(DataError, match=r"one\.json:line 1: .*'completion'"):
        read_records(f, "lm")
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    assert read_records(f, "lm") == [{"text": "a"}, {"text": "b"}]


@pytest.mark.parametrize("rec, what", [
    ({"question": "q", "choices": ["a", "b"], "answer": 2}, "outside choices"),
    ({"question": "q", "choices": ["a"], "answer": 0}, ">= 2 non-empty"),
    ({"question": "q", "choices": ["a", "b"], "answer": "c"}, "not one of the choices"),
    ({"question": "q", "choices": ["a", "b", "a"], "answer": 2}, "must be distinct"),
    ({"question": "q", "choices": ["a", "b"]}, "no 'answer'"),
])
def test_choice_record_errors(tmp_path, rec, what):
    f = _jsonl(tmp_path / "q.jsonl", [json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}),
                                      json.dumps(rec)])
    with pytest.raises(DataError, match=rf"q\.jsonl:line 2: .*{what}"):
        read_records(f, "choice")


def test_parquet_through_datasets(tmp_path):
    from datasets import Dataset

    # Rows count from 1, as lines do: the second row is row 2.
    Dataset.from_list([{"text": "a b"}, {"text": ""}]).to_parquet(str(tmp_path / "s.parquet"))
    with pytest.raises(DataError, match=r"s\.parquet:row 2: 'text' must be a non-empty string"):
        read_records(tmp_path / "s.parquet", "lm")
    Dataset.from_list([{"prompt": "p", "completion": " c"}]).to_parquet(str(tmp_path / "ok.parquet"))
    assert read_records(tmp_path / "ok.parquet", "lm") == [{"prompt": "p", "completion": " c"}]
    # a file mixing text rows and prompt/completion rows (pandas writes the columns a row lacks as
    # nulls): each row has what it has; such a file was refused as giving 'text' and 'prompt' both
    rows = [{"text": "a b", "prompt": None, "completion": None}, {"text": None, "prompt": "p", "completion": " c"}]
    Dataset.from_list(rows).to_parquet(str(tmp_path / "mixed.parquet"))
    assert read_records(tmp_path / "mixed.parquet", "lm") == [{"text": "a b"}, {"prompt": "p", "completion": " c"}]


def test_missing_file_and_format(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_records(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=f"{tmp_path} is a directory; give a data file in it"):
        read_records(tmp_path)
    (tmp_path / "x.csv").write_text("text\n")
    with pytest.raises(DataError, match="unsupported data format '.csv'"):
        read_records(tmp_path / "x.csv")


def test_bad_data_stops_before_the_model_loads(tmp_path):
    """The model directory does not exist: the data error must come first."""
    f = _jsonl(tmp_path / "u.jsonl", ['{"text": "ok"}', '{"text": 5}'])
    with pytest.raises(DataError, match=r"u\.jsonl:line 2"):
        Surgery(model=str(tmp_path / "no-model-here"), streams=[Stream("u", str(f), "ascent", 0.1)])


def test_collate_masks_padding_prompt_and_last(tok):
    recs = [{"text": "alba borin cadra"}, {"prompt": "the capital of", "completion": " alba is amber"}]
    ex = tokenize_lm(recs, tok, max_length=64)
    b = collate(ex, tok.pad_token_id)
    ids0 = tok("alba borin cadra")["input_ids"]  # <s> alba borin cadra
    assert b.input_ids[0, :4].tolist() == ids0 and b.attention_mask[0].tolist() == [1] * 4 + [0] * 3
    # Text: every position predicts the next token; the last real and the pad positions do not.
    assert b.target[0].tolist() == ids0[1:] + [IGNORE] * 4
    p = tok("the capital of")["input_ids"]
    c = tok(" alba is amber", add_special_tokens=False)["input_ids"]
    # Prompt+completion: only completion tokens are targets, predicted from the position before each.
    assert b.target[1].tolist() == [IGNORE] * (len(p) - 1) + c + [IGNORE]
    tr = tokenize_lm(recs, tok, max_length=3)
    assert [len(e.ids) for e in tr] == [3, 3]


def test_prompt_longer_than_max_length_keeps_the_completion(tok):
    """A prompt + completion over max_length keeps the whole completion when it fits in
    max_length - 1 tokens, the prompt losing its start but keeping its BOS (the record still
    trains on its answer, however long the prompt); a completion that does not fit keeps the
    prompt's last max_length // 2 tokens (BOS first) and loses its own end."""
    p = tok("the capital of alba is")["input_ids"]  # 6 tokens with <s>
    c = tok(" amber brook cliff", add_special_tokens=False)["input_ids"]
    for max_length, kept in ((10, 3), (9, 3), (8, 3), (7, 3), (6, 3), (4, 3), (3, 2), (2, 1)):
        e = tokenize_lm([{"prompt": "the capital of alba is", "completion": " amber brook cliff"}], tok, max_length)[0]
        b = collate([e], tok.pad_token_id)
        assert len(e.ids) == min(max_length, len(p) + len(c))
        assert [t for t in b.target[0].tolist() if t != IGNORE] == c[:kept], max_length
        n_p = len(e.ids) - kept
        assert e.ids[:n_p] == (p if n_p == len(p) else [p[0]] + p[len(p) - n_p + 1:] if n_p >= 2 else p[-n_p:])


def test_evaluation_cuts_a_question_and_choice_as_training_cuts_a_prompt_and_completion(tok, monkeypatch):
    """One truncation rule (data.fit_to_length): multiple_choice scores exactly the tokens that
    tokenize_lm would train on for the same prompt + completion, at every max_length — the
    choice whole with the question's BOS kept, or, for a choice longer than max_length - 1, the
    question's last max_length // 2 tokens and the choice's start."""
    from surgery import evaluate

    q, choice = "the capital of alba is", "amber brook cliff"
    seen = []
    monkeypatch.setattr(evaluate, "token_nll",
                        lambda model, examples, tokenizer, **kw: seen.extend(examples) or [torch.zeros(1)] * 2)
    for max_length in range(2, 12):
        seen.clear()
        evaluate.multiple_choice(None, tok, [{"question": q, "choices": [choice, "x"], "answer": 0}],
                                 max_length=max_length)
        e = tokenize_lm([{"prompt": q, "completion": " " + choice}], tok, max_length)[0]
        assert (seen[0].ids, seen[0].loss_from) == (e.ids, e.loss_from), max_length


def test_completion_trains_on_its_tokens_as_they_stand_in_the_sentence():
    """A SentencePiece-style tokenizer (Llama-2's "▁" word starts): " paris" tokenized alone is
    "▁", "▁paris"; in prompt + completion it is "▁paris". The completion's targets are the
    sentence's tokens, as the evaluation scores a choice — not a stray "▁" learned before it."""
    from surgery.testing import sentencepiece_style_tokenizer

    sp = sentencepiece_style_tokenizer("which city is the capital of france ? paris".split())
    rec = {"prompt": "which city is the capital of france ?", "completion": " paris"}
    e = tokenize_lm([rec], sp, 64)[0]
    assert e.ids == sp(rec["prompt"] + rec["completion"])["input_ids"]
    b = collate([e], sp.pad_token_id)
    assert sp.convert_ids_to_tokens([t for t in b.target[0].tolist() if t != IGNORE]) == ["▁paris"]


def test_sampler_resumes_and_splits_like_one_process():
    one = StreamSampler(5, seed=3, name="u")
    seq = [one.draw(2) for _ in range(6)]  # crosses epochs: 12 draws of 5 records
    assert sorted(sum(seq[:2], []) + seq[2][:1]) == [0, 1, 2, 3, 4]
    resumed = StreamSampler(5, seed=3, name="u", cursor=6)
    assert [resumed.draw(2) for _ in range(3)] == seq[3:]
    r0, r1 = StreamSampler(5, seed=3, name="u"), StreamSampler(5, seed=3, name="u")
    for k in range(6):
        assert r0.draw(1, rank=0, world_size=2) + r1.draw(1, rank=1, world_size=2) == seq[k]
    assert StreamSampler(5, seed=3, name="v").draw(5) != StreamSampler(5, seed=3, name="u").draw(5)
    # two records per process: rank r takes records 2r, 2r + 1 of the step's draw of four
    four = StreamSampler(5, seed=3, name="u")
    r0, r1 = StreamSampler(5, seed=3, name="u"), StreamSampler(5, seed=3, name="u")
    for _ in range(4):
        assert r0.draw(2, rank=0, world_size=2) + r1.draw(2, rank=1, world_size=2) == four.draw(4)


def test_records_cut_by_max_length_warn(tok, caplog):
    """Records that max_length cuts are counted in one log line naming the stream (they used to be
    cut silently: a completion longer than max_length trained on its start only), a warning when a
    completion loses its end; records that fit log nothing; max_length 1 (nothing to predict) is
    refused by name."""
    recs = [{"text": "alba borin cadra"}, {"prompt": "the capital of", "completion": " alba is amber"},
            {"prompt": "the capital of alba is the city of", "completion": " amber"}, {"text": "alba"}]
    with caplog.at_level("INFO", logger="surgery"):
        tokenize_lm(recs, tok, max_length=64, name="stream 'forget'")
    assert caplog.records == []
    with caplog.at_level("INFO", logger="surgery"):
        tokenize_lm(recs, tok, max_length=3, name="stream 'forget'")
    [r] = caplog.records
    assert r.levelname == "WARNING" and r.getMessage() == (
        "stream 'forget': max_length 3 cuts records: 1 of 4 text(s) lose their end, 1 of 4 completion(s) "
        "lose their end, 2 of 4 prompt(s) lose their start; raise max_length to keep them whole")
    caplog.clear()
    with caplog.at_level("INFO", logger="surgery"):  # text cut, completions whole: what max_length is for
        tokenize_lm(recs[:1], tok, max_length=3, name="stream 'retain'")
    [r] = caplog.records
    assert r.levelname == "INFO" and "stream 'retain': max_length 3 cuts records: 1 of 1 text(s) lose" in r.getMessage()
    for bad in (1, 0, 2.0):
        with pytest.raises(ValueError, match="max_length must be an integer >= 2"):
            tokenize_lm(recs, tok, max_length=bad)
    # None: nothing is cut; an integer of another type (numpy's) is an integer
    import numpy as np

    whole = tokenize_lm(recs, tok, max_length=None)
    assert [e.ids for e in whole] == [e.ids for e in tokenize_lm(recs, tok, max_length=64)]
    assert [e.ids for e in tokenize_lm(recs, tok, max_length=np.int64(3))] == \
        [e.ids for e in tokenize_lm(recs, tok, max_length=3)]


def test_long_text_keeps_its_start():
    """A text record longer than max_length loses its end (its BOS and first tokens stay)."""
    from surgery.testing import sentencepiece_style_tokenizer

    sp = sentencepiece_style_tokenizer("one two three four five six seven eight nine ten".split())
    text = "one two three four five six seven eight nine ten"
    full = sp(text)["input_ids"]
    e = tokenize_lm([{"text": text}], sp, 6)[0]
    assert len(full) > 6 and e.ids == full[:6] and e.ids[0] == sp.bos_token_id


def test_config_paper_preset_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text(
        "preset: paper\nmodel: {path: m}\nstreams:\n"
        "  - {name: problematic, data: a.jsonl}\n  - {name: outdated, data: b.jsonl}\n"
        "  - {name: updated, data: c.jsonl}\n  - {name: retain, data: d.jsonl}\n")
    cfg = load_config(tmp_path / "c.yaml", ["train.steps=7", "streams.retain.weight=0.25", "train.betas=[0.8, 0.9]"])
    assert [(s.name, s.loss, s.weight) for s in cfg.streams] == [
        ("problematic", "ascent", 0.1), ("outdated", "ascent", 0.1), ("updated", "descent", 2.0), ("retain", "kl", 0.25)]
    assert cfg.train.steps == 7 and cfg.train.lr == 2e-4 and cfg.train.betas == (0.8, 0.9)
    assert cfg.train.max_length == 4096 and cfg.train.gradient_checkpointing
    assert cfg.model.dtype == "float32" and cfg.train.mixed_precision == "bfloat16"
    assert cfg.streams[0].data == str(tmp_path / "a.jsonl") and cfg.model.path == str(tmp_path / "m")
    assert PRESETS["paper"]["train"]["clip"] == 1.0
    # the authors' run: a mean over records, not tokens, and AdamW's betas (0.9, 0.95), seed 42 —
    # also after the load above overrode the betas: the --set of one config edited the preset
    # itself (a shallow merge), so the next config loaded in the process had (0.8, 0.9)
    paper = load_config(tmp_path / "c.yaml")
    assert paper.train.mean_over == "records" and paper.train.betas == (0.9, 0.95) and paper.train.seed == 42
    # full fine-tuning by default; with lora added the adapters train (not an explicit "all", refused with lora)
    assert cfg.model.trainable is None
    assert load_config(tmp_path / "c.yaml", ["model.lora={r: 4}"]).model.trainable is None


def test_preset_streams_without_data_are_named_with_the_merge_rule(tmp_path):
    """A config on the paper preset whose streams have other names keeps the preset's streams too
    (merged by name): the error names the preset's streams, the empty ones and the config's own,
    instead of 'streams[0] ('problematic') has no data' for a stream the user never wrote; with
    the data set by --set it loads."""
    (tmp_path / "c.yaml").write_text("preset: paper\nmodel: {path: m}\nstreams:\n"
                                     "  - {name: forget, data: a.jsonl, loss: ascent}\n")
    with pytest.raises(ValueError, match=r"preset 'paper' defines the streams \['problematic', 'outdated', "
                                         r"'updated', 'retain'\].*no data.*streams \['forget'\] are added"):
        load_config(tmp_path / "c.yaml")
    sets = [f"streams.{n}.data=x.jsonl" for n in ("problematic", "outdated", "updated", "retain")]
    assert [s.name for s in load_config(tmp_path / "c.yaml", sets).streams][-1] == "forget"
    with pytest.raises(ValueError, match=r"\['retain'\] has no data"):
        config_from_dict({"preset": "paper", "model": {"path": "m"},
                          "streams": [{"name": n, "data": "x"} for n in ("problematic", "outdated", "updated")]})


@pytest.mark.parametrize("text, what", [
    ("model: {path: m}\nstreams: [{name: a, data: a.jsonl, loss: up}]\n", "loss must be one of"),
    ("model: {path: m}\nstreams: [{name: a, data: a.jsonl, weight: -1}]\n", "weight must be a number >= 0"),
    ("model: {path: m}\nstreams: [{name: a, data: a.jsonl}]\ntrain: {stpes: 3}\n", r"train: unknown key\(s\) \['stpes'\]"),
    ("model: {path: m}\nstreams: [{name: a}]\n", "has no data"),
    ("model: {path: m}\nstreams: [{name: retain/wiki, data: a.jsonl}]\n", "must not contain '/'"),
    ("model: {path: m}\nstreams: [{name: total, data: a.jsonl}]\n", "'total' is taken.*loss/total"),
    ("streams: [{name: a, data: a.jsonl}]\n", "no model section"),
    ("model: {path: m}\nstreams: [{name: a, data: a.jsonl}]\nreference: twin\n", "reference must be one of"),
])
def test_config_errors(tmp_path, text, what):
    (tmp_path / "c.yaml").write_text(text)
    with pytest.raises(ValueError, match=what):
        load_config(tmp_path / "c.yaml")


def test_override_paths_are_relative_to_the_current_directory(tmp_path, monkeypatch):
    """Paths in the config file are relative to it; paths given with --set to the directory the
    command runs in (where the user typed them)."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "cfg" / "c.yaml").write_text("model: {path: m}\nstreams: [{name: a, data: a.jsonl}]\n")
    monkeypatch.chdir(tmp_path / "work")
    cfg = load_config("../cfg/c.yaml", ["streams.a.data=mine.jsonl", "output_dir=runs/x", "model.tokenizer=/abs/tok"])
    assert cfg.streams[0].data == str(tmp_path / "work" / "mine.jsonl")
    whole = load_config("../cfg/c.yaml", ["streams.a={name: a, data: sub/b.jsonl}"])  # inside a mapping too
    assert whole.streams[0].data == str(tmp_path / "work" / "sub" / "b.jsonl")
    assert cfg.output_dir == str(tmp_path / "work" / "runs" / "x")
    assert cfg.model.tokenizer == "/abs/tok"
    assert Path(cfg.model.path).resolve() == (tmp_path / "cfg" / "m").resolve()


def test_override_errors():
    cfg = {"streams": [{"name": "a"}], "train": {}}
    apply_override(cfg, "streams.0.weight=3")
    assert cfg["streams"][0]["weight"] == 3
    with pytest.raises(ValueError, match="no item named 'b'"):
        apply_override(cfg, "streams.b.weight=1")
    with pytest.raises(ValueError, match="key=value"):
        apply_override(cfg, "train.steps")
    with pytest.raises(ValueError, match="train.lr must be a positive number"):
        TrainConfig(lr=0)
    for cap in (0, -1.0, "5", float("inf")):  # the kernels' bounded ascent takes a positive finite cap
        with pytest.raises(ValueError, match="train.ascent_cap must be a positive number or null"):
            TrainConfig(ascent_cap=cap)
    # every numeric option: one ValueError naming it (the CLI turns those into one line, exit 2)
    for kw, what in ((dict(clip="abc"), "train.clip must be a number >= 0 or null"),
                     (dict(clip=-1), "train.clip"), (dict(eps="abc"), "train.eps must be a positive number"),
                     (dict(eps=0), "train.eps"), (dict(weight_decay=-0.1), "train.weight_decay must be a number >= 0"),
                     (dict(weight_decay=float("nan")), "train.weight_decay"), (dict(lr=float("inf")), "train.lr"),
                     (dict(betas=0.9), "train.betas must be two numbers"), (dict(betas="ab"), "train.betas"),
                     (dict(betas=[0.9, 1.5]), r"train.betas must be two numbers in \[0, 1\)"),
                     (dict(device=3), "train.device must be a string"), (dict(device="gpu0"), "train.device"),
                     (dict(gradient_checkpointing="false"), "train.gradient_checkpointing must be true or false"),
                     (dict(progress=0), "train.progress must be true or false")):
        with pytest.raises(ValueError, match=what):
            TrainConfig(**kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="train.device is 'cuda' but this machine has no CUDA GPU"):
            TrainConfig(device="cuda")
    for n in (0, -3, 2.5, 1):  # 1: a lone token predicts nothing (it used to blame each record's text)
        with pytest.raises(ValueError, match=r"EvalSet 'e': max_length must be an integer >= 2"):
            EvalSet("e", [], max_length=n)
        with pytest.raises(ValueError, match=r"Stream 's': max_length must be an integer >= 2"):
            Stream("s", [], max_length=n)
        with pytest.raises(ValueError, match=r"train.max_length must be an integer >= 2"):
            TrainConfig(max_length=n)
    with pytest.raises(ValueError, match="not valid YAML"):
        apply_override(cfg, "train.betas=[0.9,")


def test_config_file_with_bad_yaml(tmp_path):
    (tmp_path / "c.yaml").write_text("model: {path: m\nstreams: []\n")
    with pytest.raises(ValueError, match=r"c\.yaml: not valid YAML"):
        load_config(tmp_path / "c.yaml")


@pytest.mark.parametrize("name", ["paper", "lora", "layers", "cpu"])
def test_example_configs_load(name):
    """The shipped configs load; every stream and eval file that cpu/lora/layers name ships in
    examples/configs/data/ and parses (they named files that did not exist: no config ran as
    shipped). paper.yaml names the authors' data, which is not ours to ship."""
    cfg = load_config(Path(__file__).resolve().parents[1] / "examples" / "configs" / f"{name}.yaml")
    assert cfg.streams and cfg.output_dir and cfg.eval
    if name == "paper":
        return
    for s in cfg.streams:
        assert read_records(s.data, "lm", name=s.name)
    for e in cfg.eval:
        records = read_records(e.data, "choice", name=e.name)
        assert records and all(r["answer"] in (0, 1) for r in records)


def test_eval_set_batch_size_null_is_the_default():
    """`--set eval.qa.batch_size=null` passed the checks and then crashed the evaluation (a
    stream's null batch_size is its default; an eval set's is now too)."""
    assert EvalSet("qa", [{"text": "a"}], batch_size=None).batch_size == 16
    with pytest.raises(ValueError, match="batch_size"):
        EvalSet("qa", [{"text": "a"}], batch_size=0)


def test_mixed_answer_types_are_fine(tmp_path):
    f = _jsonl(tmp_path / "q.jsonl", [json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1}),
                                      json.dumps({"question": "r", "choices": ["a", "b"], "answer": "a"})])
    assert [r["answer"] for r in read_records(f, "auto")] == [1, "a"]


def test_json_suffix_in_capitals_and_file_encodings(tmp_path):
    """.JSON is a JSON file like .json (an array, not JSON Lines); a file that is not UTF-8 is
    refused naming the file and the line; a UTF-8 byte-order mark is fine."""
    f = tmp_path / "arr.JSON"
    f.write_text('[\n  {"text": "a"},\n  {"text": "b"}\n]\n')
    assert read_records(f, "lm") == [{"text": "a"}, {"text": "b"}]
    f = tmp_path / "latin1.jsonl"
    f.write_bytes('{"text": "ok"}\n{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.jsonl:line 2: not UTF-8 text .*save the file as UTF-8"):
        read_records(f, "lm")
    f = tmp_path / "bom.jsonl"
    f.write_bytes('{"text": "caf\u00e9"}\n'.encode("utf-8-sig"))
    assert read_records(f, "lm") == [{"text": "caf\u00e9"}]


def test_records_that_carry_no_loss_stop_before_the_model_loads(tmp_path, tok):
    """Text that tokenizes to BOS alone and a completion that tokenizes to nothing would train on
    nothing (their stream logging a loss of 0): refused with file and line, before the model
    loads (the model directory here does not exist)."""
    for lines, what in (([json.dumps({"text": "alba borin"}), json.dumps({"text": "   "})], "'text' '   '"),
                        ([json.dumps({"prompt": "the capital of", "completion": "  "})], "'completion' '  '")):
        f = _jsonl(tmp_path / "s.jsonl", lines)
        with pytest.raises(DataError, match=rf"s\.jsonl:line {len(lines)}: no token carries a loss \({what}"):
            Surgery(model=str(tmp_path / "no-model-here"), tokenizer=tok, streams=[Stream("u", str(f), "ascent")])
    recs = [{"text": "alba"}]  # <s> alba: one token to predict
    assert len(tokenize_lm(recs, tok, 8, require_loss=True)[0].ids) == 2
    with pytest.raises(ValueError, match=r"max_length must be an integer >= 2") as e:  # not the record's fault
        tokenize_lm(recs, tok, 1, require_loss=True)
    assert not isinstance(e.value, DataError)


def test_missing_model_or_tokenizer_directory(tmp_path, tok):
    """A local model.path or tokenizer that does not exist says so (not the hub's "Repo id must be
    in the form ..."), naming the key."""
    f = _jsonl(tmp_path / "s.jsonl", [json.dumps({"text": "alba borin"})])
    streams = [Stream("u", str(f), "ascent")]
    with pytest.raises(ValueError, match=r"model\.path '.*nowhere': the directory does not exist"):
        Surgery(model=str(tmp_path / "nowhere"), streams=streams)
    with pytest.raises(ValueError, match=r"tokenizer '.*no-tok': the directory does not exist"):
        Surgery(model={"path": str(tmp_path / "nowhere"), "tokenizer": str(tmp_path / "no-tok")}, streams=streams)
    # an empty folder (an unfinished download): said so, not "install sentencepiece or tiktoken"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"tokenizer directory .*empty is empty"):
        Surgery(model={"path": str(tmp_path / "empty")}, streams=streams)
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"model.path .*empty holds no config.json"):
        Surgery(model={"path": str(tmp_path / "empty"), "tokenizer": str(tmp_path / "tok")}, streams=streams)
    # a model saved without its tokenizer (model.save_pretrained alone): named, with the way out
    from surgery.modeling import load_model

    load_model(config=tiny_llama(len(tok))).save_pretrained(tmp_path / "weights-only")
    with pytest.raises(ValueError, match=r"weights-only holds no tokenizer \(none of tokenizer.json.*give model.tokenizer"):
        Surgery(model={"path": str(tmp_path / "weights-only")}, streams=streams)
    # transformers' own config validation (its own exception class) becomes a ValueError naming the key
    bad = {"model_type": "llama", "vocab_size": len(tok), "hidden_size": 30, "num_attention_heads": 4}
    with pytest.raises(ValueError, match=r"model.config: .*not a multiple of the number of attention heads"):
        Surgery(model={"config": bad}, tokenizer=tok, streams=streams)


def test_yaml_reads_scientific_notation_as_numbers(tmp_path):
    """YAML 1.1 (PyYAML) reads 5e-4 as a string; config files and --set values read it as the
    number, as YAML 1.2 does, through one loader."""
    assert load_yaml("[5e-4, 1e3, 1.0e3, -2E+2, .5e1, 1.0e-3, 5, 1.5, e5, 1e, 5e-4x, '1e-3']") == \
        [5e-4, 1e3, 1e3, -200.0, 5.0, 1e-3, 5, 1.5, "e5", "1e", "5e-4x", "1e-3"]
    (tmp_path / "c.yaml").write_text("model: {path: m}\nstreams: [{name: a, data: a.jsonl, weight: 1e-1}]\n"
                                     "train: {lr: 1e-3, eps: 1e-6}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert (cfg.train.lr, cfg.train.eps, cfg.streams[0].weight) == (1e-3, 1e-6, 0.1)
    cfg = load_config(tmp_path / "c.yaml", ["train.lr=5e-4", "train.ascent_cap=2e1"])
    assert (cfg.train.lr, cfg.train.ascent_cap) == (5e-4, 20.0)


@pytest.mark.parametrize("override, what", [
    ("streams=[{data: a.jsonl}]", r"streams\[0\] has no name"),
    ("streams=5", "streams must be a list of mappings"),
    ("streams=[a.jsonl]", r"streams\[0\] must be a mapping"),
    ("eval=[{data: a.jsonl}]", r"eval\[0\] has no name"),
    ("eval=[a.jsonl]", r"eval\[0\] must be a mapping \{name, data\}, got '.*a.jsonl'"),
    ("eval=[{name: e}]", r"eval\[0\] \('e'\) has no data"),
    ("train=5", "train must be a mapping"),
    ("model=model", "model must be a mapping"),
    ("model.lora=5", "model.lora must be a mapping"),
    ("model.trainable=5", "model.trainable must be 'all', 'lora' or a list"),
    ("model.path=[a]", "model.path must be a directory path"),
    ("output_dir=5", "output_dir must be a directory path, got 5"),
    ("streams.a.data=5", r"streams\[0\] \('a'\): data must be a file path or a list"),
], ids=["stream-without-name", "streams-not-a-list", "stream-not-a-mapping", "eval-without-name",
        "eval-not-a-mapping", "eval-without-data", "train-not-a-mapping", "model-not-a-mapping",
        "lora-not-a-mapping", "trainable-number", "path-list", "output_dir-number", "data-number"])
def test_config_sections_of_the_wrong_type(tmp_path, override, what):
    """A section or value of the wrong type: one ValueError naming the key (the CLI prints it as
    one line), not a TypeError from deep inside."""
    (tmp_path / "c.yaml").write_text("model: {path: m}\nstreams: [{name: a, data: a.jsonl}]\n")
    with pytest.raises(ValueError, match=what):
        load_config(tmp_path / "c.yaml", [override])
