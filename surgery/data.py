"""Data: read and validate records, tokenize them, and draw deterministic, resumable batches.

Records come from local files — Parquet through ``datasets``; JSON arrays and JSON lines parsed
here, line by line, because only that knows the line of a bad record (``datasets``' JSON loader
reports Arrow errors without one, and would refuse records whose ``answer`` mixes ints and
strings) — or from an in-memory list. Every record is checked before any model loads; a bad one
stops the run with the file, the line (JSON/JSONL) or row (Parquet), and what is wrong.

LM records: ``{"text": str}`` or ``{"prompt": str, "completion": str}`` (prompt tokens get no loss).
Evaluation records: ``{"question": str, "choices": [str, ...], "answer": int | str}``.

Batches are right-padded; ``target[b, t]`` is the token the model should predict at position ``t``
(``input_ids[b, t + 1]``) or ``IGNORE`` where there is no loss (padding, prompt, the last position),
so the hidden states never need shifting.
"""

from __future__ import annotations

import json
import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .config import check_max_length

log = logging.getLogger("surgery")

IGNORE = -100
FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


class DataError(ValueError):
    """A data file or record is malformed; the message names the file, the line and the problem."""


def _where(source: str, line: int | None, kind: str = "line") -> str:
    return f"{source}:{kind} {line}" if line is not None else source


def _object(rec: Any, where: str) -> None:
    if not isinstance(rec, dict):
        hint = (" (JSON Lines hold one object per line; a JSON array of records goes in a .json file)"
                if isinstance(rec, list) else "")
        raise DataError(f"{where}: a record must be a JSON object, got {type(rec).__name__}{hint}")


def _check_lm(rec: Any, where: str) -> None:
    _object(rec, where)
    if "text" in rec and ("prompt" in rec or "completion" in rec):
        # Which one to train on (all of the text, or the completion only) would be a guess.
        raise DataError(f"{where}: a record has either 'text' or 'prompt' and 'completion', got all of "
                        f"{sorted(k for k in rec if k in ('text', 'prompt', 'completion'))}")
    if "text" in rec:
        if not isinstance(rec["text"], str) or not rec["text"]:
            raise DataError(f"{where}: 'text' must be a non-empty string, got {rec['text']!r:.80}")
        return
    if "prompt" in rec or "completion" in rec:
        for k in ("prompt", "completion"):
            if not isinstance(rec.get(k), str):
                raise DataError(f"{where}: a prompt/completion record needs string 'prompt' and 'completion', "
                                f"'{k}' is {rec.get(k)!r:.80}")
        if not rec["completion"]:
            raise DataError(f"{where}: 'completion' is empty (nothing to train on)")
        return
    raise DataError(f"{where}: expected a 'text' field or 'prompt' and 'completion', got keys {sorted(rec)}")


def _check_choice(rec: Any, where: str) -> None:
    _object(rec, where)
    for k in ("question", "choices", "answer"):
        if k not in rec:
            raise DataError(f"{where}: multiple-choice record has no '{k}' (needs question, choices, answer)")
    if not isinstance(rec["question"], str):
        raise DataError(f"{where}: 'question' must be a string, got {rec['question']!r:.80}")
    ch = rec["choices"]
    if not isinstance(ch, (list, tuple)) or len(ch) < 2 or not all(isinstance(c, str) and c for c in ch):
        raise DataError(f"{where}: 'choices' must be a list of >= 2 non-empty strings, got {ch!r:.80}")
    if len(set(ch)) != len(ch):  # equal scores: the first would always win, whichever the answer
        raise DataError(f"{where}: 'choices' must be distinct, got {list(ch)!r:.120}")
    a = rec["answer"]
    if isinstance(a, bool) or not isinstance(a, (int, str)):
        raise DataError(f"{where}: 'answer' must be an index into choices or one of the choices, got {a!r}")
    if isinstance(a, int) and not 0 <= a < len(ch):
        raise DataError(f"{where}: 'answer' index {a} is outside choices (0..{len(ch) - 1})")
    if isinstance(a, str) and a not in ch:
        raise DataError(f"{where}: 'answer' {a!r} is not one of the choices {list(ch)!r:.120}")


def _read_text(path: Path) -> str:
    """The file as UTF-8 text (a leading byte-order mark dropped); other encodings are refused
    naming the file and the line of the first byte that is not UTF-8."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"{path}:line {line}: not UTF-8 text (byte {raw[e.start]:#04x} at offset {e.start}: "
                        f"{e.reason}); save the file as UTF-8") from None


def _json_records(path: Path) -> list[tuple[Any, int]]:
    """(record, line) pairs of a JSON array file or a JSONL file, with precise syntax errors."""
    text = _read_text(path)
    stripped = text.lstrip()
    is_json = path.suffix.lower() == ".json"
    if is_json and stripped.startswith("["):
        dec = json.JSONDecoder()
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:line {e.lineno}: invalid JSON ({e.msg}, column {e.colno})") from None
        # Walk the array to know which line each record starts on.
        out, pos = [], text.index("[") + 1
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if text[pos] == "]":
                return out
            rec, end = dec.raw_decode(text, pos)
            out.append((rec, text.count("\n", 0, pos) + 1))
            pos = end
    if is_json and stripped.startswith("{"):
        # One record, possibly over several lines (else the file is JSON Lines named .json).
        try:
            return [(json.loads(text), text[:len(text) - len(stripped)].count("\n") + 1)]
        except json.JSONDecodeError:
            pass
    out = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), i))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:line {i}: invalid JSON ({e.msg}, column {e.colno})") from None
    return out


def read_records(data: Any, kind: str = "lm", *, name: str = "data") -> list[dict]:
    """Read and validate the records of one stream or eval set.

    data: a path (``.json`` array or JSON lines, ``.jsonl``, ``.parquet``) or a list of dicts.
    kind: ``"lm"`` (text / prompt+completion), ``"choice"`` (multiple choice) or ``"auto"``
    (decided by the first record). Returns plain dicts; raises :class:`DataError`.
    """
    if isinstance(data, (str, Path)):
        path = Path(data)
        if path.is_dir():
            raise DataError(f"{name}: {path} is a directory; give a data file in it (.json, .jsonl or .parquet)")
        if not path.is_file():
            raise DataError(f"{name}: data file not found: {path}")
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise DataError(f"{path}: unsupported data format {path.suffix!r}; use .json, .jsonl or .parquet")
        if fmt == "json":
            # Syntax and schema errors with line numbers first, then load through datasets.
            pairs = _json_records(path)
            unit = "line"
        else:
            from datasets import Dataset

            try:
                ds = Dataset.from_parquet(str(path))
            except Exception as e:
                raise DataError(f"{path}: cannot read Parquet file ({type(e).__name__}: {e})") from None
            # Rows counted from 1, as lines are. A column a row has no value in reads as None (a file
            # mixing text rows with prompt/completion rows, as pandas writes it): absent, not given.
            pairs = [({k: v for k, v in r.items() if v is not None}, i) for i, r in enumerate(ds.to_list(), 1)]
            unit = "row"
        src = str(path)
    elif isinstance(data, Sequence) and not isinstance(data, (str, bytes)):
        pairs = [(r, i) for i, r in enumerate(data)]
        src, unit = name, "record"
    else:
        raise DataError(f"{name}: data must be a file path or a list of records, got {type(data).__name__}")
    if not pairs:
        raise DataError(f"{src}: no records")
    if kind == "auto":
        first = pairs[0][0]
        kind = "choice" if isinstance(first, dict) and "question" in first else "lm"
    check = _check_choice if kind == "choice" else _check_lm
    where = [_where(src, line, unit) for _, line in pairs]
    for (rec, _), w in zip(pairs, where):
        check(rec, w)
    return Records([dict(r) for r, _ in pairs], where)


class Records(list):
    """A list of validated records that also knows where each came from (``where[i]``: file and
    line or row, or the list's name and index), for errors found later, e.g. at tokenization."""

    def __init__(self, records=(), where: Sequence[str] | None = None):
        super().__init__(records)
        self.where = list(where) if where is not None else None


@dataclass
class Example:
    """One tokenized LM record: ``ids`` and, per position, whether the *next* token carries loss."""

    ids: list[int]
    loss_from: int  # first token index that is predicted with loss (1 for plain text)


def tokens_after(tokenizer, prefix: str, rest: str, prefix_ids: list[int] | None = None) -> tuple[list, list]:
    """Token ids of ``prefix`` (with special tokens; ``prefix_ids`` if already known) and of ``rest``
    as it stands in ``prefix + rest``: the joint tokens after the prefix's own, so a tokenizer
    that marks word starts (Llama-2's "▁") gives the rest's tokens as in the sentence. Where the
    joint tokens do not begin with the prefix's (a merge across the boundary, an appended EOS),
    ``rest`` is tokenized alone without special tokens."""
    p = list(tokenizer(prefix)["input_ids"]) if prefix_ids is None else prefix_ids
    whole = list(tokenizer(prefix + rest)["input_ids"])
    if len(whole) > len(p) and whole[:len(p)] == p:
        return p, whole[len(p):]
    return p, list(tokenizer(rest, add_special_tokens=False)["input_ids"])


def fit_to_length(prefix: list[int], rest: list[int], max_length: int, bos_token_id) -> tuple[list[int], list[int]]:
    """A prefix (prompt, question) and what follows it (completion, answer: the scored tokens) cut
    to ``max_length`` tokens together — the one rule of training and evaluation. The whole of
    ``rest`` stays when it fits in ``max_length - 1`` tokens, the prefix losing its start but not
    its BOS (the model has always seen one first) to make room; a longer ``rest`` keeps the
    prefix's last ``max_length // 2`` tokens (or all of a shorter prefix) and loses its own end."""
    if len(prefix) + len(rest) <= max_length:
        return prefix, rest
    keep = max_length - len(rest) if len(rest) < max_length else min(len(prefix), max_length // 2)
    keep = max(0, min(len(prefix), keep))
    if 2 <= keep < len(prefix) and prefix[0] == bos_token_id:
        prefix = prefix[:1] + prefix[len(prefix) - keep + 1:]  # the start goes, BOS stays
    else:
        prefix = prefix[len(prefix) - keep:]
    return prefix, rest[:max_length - keep]


def tokenize_lm(records: list[dict], tokenizer, max_length: int | None, *, require_loss: bool = False,
                name: str = "records") -> list[Example]:
    """Tokenize LM records: text as one sequence; prompt + completion with the completion's tokens
    as they stand in the sentence (``tokens_after``), as the evaluation scores a choice. At most
    ``max_length`` tokens: text loses its end; a prompt + completion keeps the whole completion
    (what carries the loss) when it fits in ``max_length - 1`` tokens, the prompt losing its start
    but not its BOS to make room, as the evaluation does for a long question; a longer completion
    keeps the prompt's last ``max_length // 2`` tokens (or all of a shorter prompt) and loses its
    own end. ``max_length`` None: no cut.

    require_loss: a record left with no token that carries a loss (text that tokenizes to one token,
    e.g. BOS only; a completion that tokenizes to nothing) raises :class:`DataError` naming it (its
    file and line when ``records`` came from ``read_records``) — training on it would add nothing
    while its stream's log shows a loss of 0.

    Records that ``max_length`` cuts are counted in one log line naming ``name`` (texts and
    completions that lose their end, prompts that lose their start), a warning when a completion
    loses its end (part of an answer trained on or scored), info otherwise."""
    check_max_length("max_length", max_length)
    where = getattr(records, "where", None)
    out = []
    cut = {"text(s) lose their end": 0, "completion(s) lose their end": 0, "prompt(s) lose their start": 0}
    for i, rec in enumerate(records):
        if "text" in rec:
            ids = list(tokenizer(rec["text"])["input_ids"])
            if max_length is not None:
                cut["text(s) lose their end"] += len(ids) > max_length
                ids = ids[:max_length]
            start = 1
        else:
            p0, c0 = tokens_after(tokenizer, rec["prompt"], rec["completion"])
            p, c = (p0, c0) if max_length is None else fit_to_length(p0, c0, max_length, tokenizer.bos_token_id)
            cut["completion(s) lose their end"] += len(c) < len(c0)
            cut["prompt(s) lose their start"] += len(p) < len(p0)
            ids, start = p + c, max(len(p), 1)
        if require_loss and len(ids) <= start:
            at = where[i] if where is not None else f"record {i}"
            if "text" in rec:
                why = f"'text' {rec['text']!r:.60} tokenizes to {len(ids)} token(s) {ids[:4]}, nothing to predict"
            else:
                why = (f"'completion' {rec['completion']!r:.60} tokenizes to {len(c)} token(s) after "
                       f"{len(p)} prompt token(s) (max_length {max_length})")
            raise DataError(f"{at}: no token carries a loss ({why}); drop the record or give it text the "
                            f"tokenizer keeps")
        out.append(Example(ids, start))
    if any(cut.values()):
        # A completion losing its end trains on (or scores) part of an answer: a warning. Text cut at
        # max_length is what max_length is for (and what the demo does on purpose): info.
        level = logging.WARNING if cut["completion(s) lose their end"] else logging.INFO
        log.log(level, "%s: max_length %d cuts records: %s; raise max_length to keep them whole", name, max_length,
                ", ".join(f"{k} of {len(records)} {what}" for what, k in cut.items() if k))
    return out


@dataclass
class Batch:
    """A padded batch. input_ids, attention_mask, target: (B, L); ``target`` is IGNORE where no loss."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target: torch.Tensor
    index: list[int]  # record indices, for the reference cache

    def to(self, device) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target.to(device), self.index)

    def rows(self, start: int, stop: int | None = None) -> "Batch":
        """Rows [start, stop) as a Batch (views, same length)."""
        sl = slice(start, stop)
        return Batch(self.input_ids[sl], self.attention_mask[sl], self.target[sl], self.index[sl])

    @property
    def mask(self) -> torch.Tensor:
        return self.target != IGNORE


def collate(examples: list[Example], pad_id: int, index: list[int] | None = None) -> Batch:
    n = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(examples), n), dtype=torch.long)
    tgt = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    for b, e in enumerate(examples):
        L = len(e.ids)
        row = torch.tensor(e.ids, dtype=torch.long)
        ids[b, :L] = row
        att[b, :L] = 1
        # Position t predicts token t + 1; loss on tokens loss_from .. L-1.
        s = max(e.loss_from, 1)
        if s < L:
            tgt[b, s - 1:L - 1] = row[s:L]
    return Batch(ids, att, tgt, list(index) if index is not None else list(range(len(examples))))


class StreamSampler:
    """Deterministic, resumable sampling of one stream.

    Record order is a fresh permutation per epoch drawn from (seed, stream name, epoch) — adding or
    removing another stream (an ablation) does not change this stream's records. The only
    state is ``cursor``, the number of records drawn so far across all processes. Step ``k`` of a run
    with global batch G = batch_size x world_size uses records ``cursor .. cursor + G``; process r
    takes its slice ``[r * batch_size, (r + 1) * batch_size)``. So one process with batch 2 sees the
    same records as two processes with batch 1.
    """

    def __init__(self, n: int, seed: int, name: str, cursor: int = 0):
        self.n, self.seed, self.cursor = n, seed, cursor
        self.key = zlib.crc32(name.encode())
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.key * 7919 + epoch) % 2**63)
            self._perm, self._perm_epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def draw(self, batch_size: int, rank: int = 0, world_size: int = 1) -> list[int]:
        """Record indices for this process's share of the next global batch; advances the cursor."""
        out = []
        for j in range(rank * batch_size, (rank + 1) * batch_size):
            c = self.cursor + j
            out.append(int(self._order(c // self.n)[c % self.n]))
        self.cursor += batch_size * world_size
        return out
