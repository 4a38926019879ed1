"""Run configuration: the dataclasses behind ``Surgery(...)`` and the YAML loader behind the CLI.

A YAML config has the sections ``model``, ``streams``, ``eval``, ``reference``, ``train``,
``output_dir`` and optionally ``preset`` (a built-in base config, e.g. ``paper``). ``--set
key=value`` overrides use dotted paths (``train.steps=10``, ``streams.0.weight=0.2``,
``streams.retain.data=r.jsonl``); values are parsed as YAML. YAML is read by ``load_yaml`` for both:
PyYAML's YAML 1.1 rules plus YAML 1.2's scientific notation (``5e-4``, ``1e3`` are numbers, not
strings).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

LOSSES = ("ascent", "descent", "kl")
REFERENCES = ("copy", "adapter", "cache")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class Stream:
    """One data stream of a surgery run.

    name: shown in logs and metrics (``loss/<name>``); unique within a run.
    data: a JSON / JSONL / Parquet file, or an in-memory list of records ``{"text": ...}`` or
        ``{"prompt": ..., "completion": ...}`` (prompt tokens are masked from the loss).
    loss: ``"ascent"`` (gradient ascent: forget), ``"descent"`` (learn) or ``"kl"`` (retain: token-level
        KL to the frozen reference).
    weight: the stream's coefficient (alpha, beta or gamma of the paper); >= 0, the sign comes from ``loss``.
    batch_size / max_length: per-stream overrides of ``TrainConfig.batch_size`` / ``max_length``.
    """

    name: str
    data: Any
    loss: str = "descent"
    weight: float = 1.0
    batch_size: int | None = None
    max_length: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"Stream name must be a non-empty string, got {self.name!r}")
        if any(c in self.name for c in "/\\") or self.name in (".", ".."):
            # It names metrics keys (loss/<name>) and the reference cache's folder.
            raise ValueError(f"Stream name {self.name!r} must not contain '/' or '\\' (it names metrics keys "
                             f"such as loss/<name> and a folder of the reference cache)")
        if self.name == "total":
            raise ValueError("Stream name 'total' is taken: metrics log the objective as loss/total next to each "
                             "stream's loss/<name>; name the stream otherwise")
        if self.loss not in LOSSES:
            raise ValueError(f"Stream {self.name!r}: loss must be one of {LOSSES}, got {self.loss!r}")
        if isinstance(self.weight, bool) or not isinstance(self.weight, (int, float)) or self.weight < 0:
            raise ValueError(f"Stream {self.name!r}: weight must be a number >= 0 (the sign comes from loss=), "
                             f"got {self.weight!r}")
        self.weight = float(self.weight)
        _positive_int_or_none(f"Stream {self.name!r}: batch_size", self.batch_size)
        check_max_length(f"Stream {self.name!r}: max_length", self.max_length)


@dataclass
class EvalSet:
    """An evaluation set.

    data: file or list of records. ``{"question", "choices", "answer"}`` records are scored as
    multiple choice (``answer``: index into ``choices`` or the text of the right choice);
    ``{"text"}`` / ``{"prompt", "completion"}`` records give a perplexity.
    kind: ``"auto"`` (from the first record), ``"choice"`` or ``"perplexity"``.
    """

    name: str
    data: Any
    kind: str = "auto"
    batch_size: int = 16
    max_length: int | None = None

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EvalSet name must be a non-empty string, got {self.name!r}")
        if self.kind not in ("auto", "choice", "perplexity"):
            raise ValueError(f"EvalSet {self.name!r}: kind must be 'auto', 'choice' or 'perplexity', got {self.kind!r}")
        _positive_int_or_none(f"EvalSet {self.name!r}: batch_size", self.batch_size)
        check_max_length(f"EvalSet {self.name!r}: max_length", self.max_length)
        if self.batch_size is None:  # null in a config: the default, as for a stream's batch_size
            self.batch_size = 16


@dataclass
class TrainConfig:
    """Optimization and run options. The defaults are the paper's optimizer, schedule, clip, steps
    and length; ``preset: paper`` sets the rest of the authors' run (seed 42, mean_over records,
    gradient checkpointing, bf16 compute), which default here to a plain float32 run."""

    steps: int = 120
    lr: float = 2.0e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1.0e-8
    weight_decay: float = 0.01
    # Gradient-norm clip; None or 0 disables it.
    clip: float | None = 1.0
    # Linear warm-up steps, then constant (the authors' schedule is constant).
    warmup_steps: int = 0
    # Records per stream per step (per process under torchrun).
    batch_size: int = 1
    # Rows (records of all streams, CE streams first; per process under torchrun) per forward/backward
    # pass; a step's passes add their gradients before the one optimizer step, and each stream's mean
    # still runs over all its tokens of the step: the same objective and gradient as one pass (with
    # dropout, each pass draws its own masks), with the activations of only micro_batch_size rows
    # held at a time. None: all rows of a step in one pass (fastest).
    micro_batch_size: int | None = None
    # Each stream's mean in the objective: "tokens", over all its live tokens of the step (over all
    # processes), so a long record weighs more; "records", each record's own token mean averaged over
    # the stream's records of the step, so every record counts equally — the authors' runs (one
    # record per GPU, the GPUs' gradients averaged). The same with one record per stream per step.
    mean_over: str = "tokens"
    max_length: int = 4096
    seed: int = 0
    gradient_checkpointing: bool = False
    # Compute dtype over float32 weights: "bfloat16" | "float16" | None. One process: torch.autocast
    # around the forward; under torchrun: FSDP MixedPrecisionPolicy(param_dtype, reduce_dtype=float32),
    # as the authors ran Llama-2-7B (fp32 master weights, bf16 compute).
    mixed_precision: str | None = None
    # Evaluate every k steps (0: only before and after); checkpoint every k steps (0: at the end only).
    eval_every: int = 0
    save_every: int = 0
    progress: bool = True
    # Kernel options passed to surgery_kernels.
    backend: str = "auto"
    kl_direction: str = "forward"
    # Bounded ascent: ascent tokens whose CE exceeds this stop contributing (None: unbounded, as the paper).
    ascent_cap: float | None = None
    # "cpu", "cuda", "cuda:1", ... (None: the model's device; under torchrun cuda:LOCAL_RANK when available).
    device: str | None = None

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            _positive_int_or_none(f"train.{name}", getattr(self, name), allow_none=False)
        check_max_length("train.max_length", self.max_length, allow_none=False)
        _positive_int_or_none("train.micro_batch_size", self.micro_batch_size)
        if self.mean_over not in ("tokens", "records"):
            raise ValueError(f"train.mean_over must be 'tokens' or 'records', got {self.mean_over!r}")
        for name in ("warmup_steps", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"train.{name} must be an integer >= 0, got {v!r}")
        for name in ("gradient_checkpointing", "progress"):
            v = getattr(self, name)
            if not isinstance(v, bool):  # a quoted "false" is a true string
                raise ValueError(f"train.{name} must be true or false (unquoted), got {v!r}")
        _number("train.lr", self.lr, low=0.0, low_ok=False)
        _number("train.eps", self.eps, low=0.0, low_ok=False)
        _number("train.weight_decay", self.weight_decay, low=0.0)
        if self.clip is not None:
            _number("train.clip", self.clip, low=0.0, what="a number >= 0 or null")
        betas = self.betas
        if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
            raise ValueError(f"train.betas must be two numbers in [0, 1), got {betas!r}")
        for b in betas:
            _number("train.betas", b, low=0.0, high=1.0, what="two numbers in [0, 1)")
        self.betas = tuple(float(b) for b in betas)
        if self.device is not None:
            if not isinstance(self.device, str):
                raise ValueError(f"train.device must be a string such as 'cpu' or 'cuda:0', or null, got {self.device!r}")
            try:
                dev = torch.device(self.device)
            except RuntimeError as e:
                raise ValueError(f"train.device: {e}") from None
            if dev.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"train.device is {self.device!r} but this machine has no CUDA GPU "
                                 f"(torch {torch.__version__})")
        if self.mixed_precision not in (None, "bfloat16", "float16"):
            raise ValueError(f"train.mixed_precision must be null, 'bfloat16' or 'float16', got {self.mixed_precision!r}")
        if self.kl_direction not in ("forward", "reverse"):
            raise ValueError(f"train.kl_direction must be 'forward' or 'reverse', got {self.kl_direction!r}")
        if self.ascent_cap is not None:  # the kernels take a positive finite cap; null = unbounded
            _number("train.ascent_cap", self.ascent_cap, low=0.0, low_ok=False, what="a positive number or null")


@dataclass
class ModelConfig:
    """Which model to train (used by the CLI and when ``Surgery(model=...)`` gets a dict or a path).

    path: a local directory ``AutoModelForCausalLM.from_pretrained`` reads; or config: a dict with
    ``model_type`` and config fields for a randomly initialised model (seeded by train.seed).
    tokenizer: directory of the tokenizer (default: path).
    dtype: storage dtype of the weights.
    trainable: "all" | "lora" | list of parameter-name patterns (fnmatch, e.g. ``"*layers.1[01].*"``);
        None (the default): "lora" with LoRA (``lora`` set, or model.path holding an adapter), else "all".
        With LoRA only the adapters (and ``lora.modules_to_save``) are saved to final/, so "all" or
        patterns that reach base-model weights are refused; patterns match names with or without
        peft's ``base_model.model.`` prefix.
    lora: {r, alpha, dropout, target_modules, modules_to_save}.
    """

    path: str | None = None
    config: dict | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    trainable: Any = None
    lora: dict | None = None

    def __post_init__(self):
        if (self.path is None) == (self.config is None):
            raise ValueError("model: give exactly one of model.path (a local directory) or model.config "
                             "(a dict with model_type for random init)")
        for key in ("path", "tokenizer"):
            v = getattr(self, key)
            if v is not None and not isinstance(v, (str, os.PathLike)):
                raise ValueError(f"model.{key} must be a directory path, got {v!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.config is not None and not isinstance(self.config, Mapping):
            raise ValueError(f"model.config must be a mapping with model_type and config fields, got {self.config!r}")
        if self.config is not None and "model_type" not in self.config:
            raise ValueError("model.config must contain model_type (e.g. llama)")
        if self.lora is not None and not isinstance(self.lora, Mapping):
            raise ValueError(f"model.lora must be a mapping such as {{r: 8, alpha: 16, target_modules: [q_proj]}}, "
                             f"got {self.lora!r}")
        check_trainable(self.trainable, "model.trainable")


def check_trainable(trainable, where: str = "trainable") -> None:
    """None, "all", "lora" or a non-empty list of fnmatch patterns (strings)."""
    if trainable is None or trainable in ("all", "lora"):
        return
    if isinstance(trainable, (list, tuple)) and trainable and all(isinstance(p, str) for p in trainable):
        return
    raise ValueError(f"{where} must be 'all', 'lora' or a list of parameter-name patterns, got {trainable!r}")


@dataclass
class SurgeryConfig:
    """A whole run, as loaded from YAML. ``output_dir`` None writes nothing (allowed from Python:
    ``Surgery(..., output_dir=None)`` trains the model object in place); ``surgery train`` refuses it,
    since it would train and then keep nothing."""

    model: ModelConfig
    streams: list[Stream]
    eval: list[EvalSet] = field(default_factory=list)
    reference: str = "copy"
    train: TrainConfig = field(default_factory=TrainConfig)
    output_dir: str | None = None


def _number(name, v, *, low=None, high=None, low_ok=True, what=None):
    """A finite real number (not a bool) with low <= v (low < v if not low_ok) and v < high."""
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if ok and low is not None:
        ok = v >= low if low_ok else v > low
    if ok and high is not None:
        ok = v < high
    if not ok:
        if what is None:
            what = "a positive number" if (low == 0 and not low_ok) else f"a number >= {low}"
        raise ValueError(f"{name} must be {what}, got {v!r}")


def _positive_int_or_none(name, v, allow_none=True):
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive integer, got {v!r}")


def check_max_length(name, v, allow_none=True):
    """The one rule for a max_length (train's, a stream's, an eval set's, the evaluation functions')."""
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 2:
        # One token leaves nothing to predict: every record would carry no loss, every score no token.
        raise ValueError(f"{name} must be an integer >= 2 (a token to predict from and one predicted), got {v!r}")


PRESETS: dict[str, dict] = {
    # The authors' setup (arXiv 2409.13054, akshajkumarv/llm_surgery_code config_surgery.yaml):
    # four streams, AdamW 2e-4 (0.9, 0.95), wd 0.01, clip 1.0, 120 steps, length 4096, batch 1,
    # constant learning rate, bf16 compute over fp32 weights (their FSDP MixedPrecision: param bf16,
    # reduce fp32), gradient checkpointing, full fine-tuning, every record's token mean weighing
    # the same (one record per GPU, gradients averaged). Model and data paths must be given.
    "paper": {
        # trainable left to its default: "all" (full fine-tuning), or the adapters when lora is added.
        "model": {"dtype": "float32"},
        "streams": [
            {"name": "problematic", "loss": "ascent", "weight": 0.1},
            {"name": "outdated", "loss": "ascent", "weight": 0.1},
            {"name": "updated", "loss": "descent", "weight": 2.0},
            {"name": "retain", "loss": "kl", "weight": 0.5},
        ],
        "reference": "copy",
        "train": {"steps": 120, "lr": 2.0e-4, "betas": [0.9, 0.95], "eps": 1.0e-8, "weight_decay": 0.01,
                  "clip": 1.0, "warmup_steps": 0, "batch_size": 1, "mean_over": "records", "max_length": 4096,
                  "seed": 42,
                  "gradient_checkpointing": True, "mixed_precision": "bfloat16"},
    },
}


# YAML 1.2 reads 1e-3, 5e-4 and 1.0e3 as numbers; YAML 1.1 (PyYAML) needs a dot and a signed
# exponent (1.0e-3), and would hand those values on as strings.
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
_LOADER = None


def load_yaml(text):
    """Parse YAML (a string or a file object) as ``yaml.safe_load`` does, but with YAML 1.2's
    scientific notation: ``5e-4`` is the float 0.0005, not the string '5e-4'."""
    global _LOADER
    import yaml

    if _LOADER is None:
        class Loader(yaml.SafeLoader):
            pass

        Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))
        _LOADER = Loader
    return yaml.load(text, Loader=_LOADER)


def _merge(base, over):
    """Deep merge into a new object (``--set`` then edits it in place: nothing of ``base``, a
    preset, may be shared with it); lists of named streams/eval sets merge by name, other lists
    are replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        # each of base's values copied once, by the merge where over has the key (base's key order,
        # over's new keys after)
        out = {k: _merge(v, over[k]) if k in over else copy.deepcopy(v) for k, v in base.items()}
        out.update((k, copy.deepcopy(v)) for k, v in over.items() if k not in base)
        return out
    if (isinstance(base, list) and isinstance(over, list) and all(isinstance(x, dict) and "name" in x for x in base)
            and all(isinstance(x, dict) and "name" in x for x in over)):
        out = copy.deepcopy(base)
        names = [x["name"] for x in out]
        for x in over:
            if x["name"] in names:
                i = names.index(x["name"])
                out[i] = _merge(out[i], x)
            else:
                out.append(copy.deepcopy(x))
        return out
    return copy.deepcopy(over)


def _absolute(p, base: str | Path):
    """A path value (str or Path; anything else, e.g. None or inline records, as it is) as an
    absolute path string, relative ones taken from ``base``. Absolute, because a LoRA run's adapter
    records its base model's path, which must not depend on the directory the run started from."""
    if not isinstance(p, (str, Path)):
        return p
    p = Path(p).expanduser()
    return str(p if p.is_absolute() else (Path(base) / p).resolve())


# The keys whose values are file or directory paths.
PATH_KEYS = ("path", "tokenizer", "data", "output_dir")


def apply_override(cfg: dict, assignment: str, cwd: str | Path | None = None) -> None:
    """Apply one ``key.sub=value`` override in place (value parsed as YAML). List items are addressed
    by index or, for streams and eval sets, by name. ``cwd``: a relative path given for a path key
    (model.path, model.tokenizer, a stream's or eval set's data, output_dir) is taken relative to
    it — on the command line, the directory the command runs in, not the config file's."""
    import yaml

    if "=" not in assignment:
        raise ValueError(f"--set expects key=value, got {assignment!r}")
    key, raw = assignment.split("=", 1)
    try:
        value = load_yaml(raw)
    except yaml.YAMLError as e:
        raise ValueError(f"--set {assignment!r}: the value is not valid YAML: {' '.join(str(e).split())}") from None
    parts = key.strip().split(".")
    if cwd is not None:
        value = _paths_from(value, parts[-1], cwd)
    node = cfg
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            idx = _list_index(node, part, key)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"--set {key}: {'.'.join(parts[:i])} is not a section")


def _paths_from(value, key: str, cwd):
    """``value`` given for ``key`` on the command line with its relative paths taken from ``cwd``:
    a path key's string, and the path keys inside a mapping or a list of mappings (``--set
    'streams.retain={name: retain, data: mine.jsonl}'``)."""
    if isinstance(value, dict):
        return {k: _paths_from(v, k, cwd) for k, v in value.items()}
    if isinstance(value, list):
        return [_paths_from(v, key, cwd) if isinstance(v, dict) else v for v in value]
    if key in PATH_KEYS and value:
        return _absolute(value, cwd)
    return value


def _list_index(node: list, part: str, key: str) -> int:
    if part.lstrip("-").isdigit():
        idx = int(part)
        if not -len(node) <= idx < len(node):
            raise ValueError(f"--set {key}: index {idx} out of range (list has {len(node)} items)")
        return idx
    for j, item in enumerate(node):
        if isinstance(item, dict) and item.get("name") == part:
            return j
    raise ValueError(f"--set {key}: no item named {part!r}")


def _stream_names(streams) -> set:
    return {x.get("name") for x in streams if isinstance(x, Mapping)} if isinstance(streams, list) else set()


def _check_preset_streams(name: str, merged: Mapping, own: set) -> None:
    """A preset stream left without data, named with the merge rule: a config whose streams have
    other names keeps the preset's streams too (merged by name), which is rarely what was meant."""
    names = [x["name"] for x in PRESETS[name].get("streams", ())]
    streams = merged.get("streams")
    given = {x.get("name"): x.get("data") for x in streams if isinstance(x, Mapping)} if isinstance(streams, list) else {}
    empty = [n for n in names if given.get(n) is None]
    if not empty:
        return
    mine = sorted(str(n) for n in own if n not in names)
    raise ValueError(
        f"preset {name!r} defines the streams {names}, merged with the config's by name, and {empty} "
        f"{'has' if len(empty) == 1 else 'have'} no data: set streams.{empty[0]}.data=FILE"
        + (f"; the config's streams {mine} are added to the preset's, not put in their place (to use only "
           f"yours, drop the preset and give its train settings yourself)" if mine else ""))


def config_from_dict(raw: Mapping, base_dir: str | Path | None = None, *, evaluate_only: bool = False) -> SurgeryConfig:
    """Build a :class:`SurgeryConfig` from a plain dict (preset merged, paths relative to ``base_dir``).
    ``evaluate_only``: the streams are not read (``streams == []``; what ``surgery eval`` loads)."""
    raw = dict(raw)
    preset = raw.pop("preset", None)
    if preset is not None:
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        own = _stream_names(raw.get("streams"))
        raw = _merge(PRESETS[preset], raw)
        if not evaluate_only:
            _check_preset_streams(preset, raw, own)
    if evaluate_only:
        raw.pop("streams", None)
    known = {"model", "streams", "eval", "reference", "train", "output_dir"}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown config section(s) {sorted(unknown)}; expected {sorted(known)}")
    if "model" not in raw:
        raise ValueError("config has no model section (model: {path: DIR} or {config: {...}})")
    if not raw.get("streams") and not evaluate_only:
        raise ValueError("config has no streams")

    def rel(p):
        return p if base_dir is None else _absolute(p, base_dir)

    m = dict(_section(raw["model"], "model", "a mapping such as {path: DIR} or {config: {model_type: ...}}"))
    _only(m, ModelConfig, "model")
    m["path"], m["tokenizer"] = rel(m.get("path")), rel(m.get("tokenizer"))
    streams = [Stream(**_named(s, f"streams[{i}]", Stream, rel))
               for i, s in enumerate(_list(raw.get("streams") or [], "streams", "{name, data, loss, weight}"))]
    evals = [EvalSet(**_named(e, f"eval[{i}]", EvalSet, rel))
             for i, e in enumerate(_list(raw.get("eval") or [], "eval", "{name, data}"))]
    t = dict(_section(raw.get("train") or {}, "train", "a mapping such as {steps: 10, lr: 1.0e-4}"))
    _only(t, TrainConfig, "train")
    reference = raw.get("reference", "copy")
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    output_dir = raw.get("output_dir")
    if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
        raise ValueError(f"output_dir must be a directory path, got {output_dir!r}")
    return SurgeryConfig(model=ModelConfig(**m), streams=streams, eval=evals, reference=reference,
                         train=TrainConfig(**t), output_dir=rel(output_dir))


def _section(value, where: str, what: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where} must be {what}, got {value!r:.80}")
    return value


def _list(value, where: str, what: str) -> list:
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where} must be a list of mappings {what}, got {value!r:.80}")
    return list(value)


def _named(item, where: str, cls, rel) -> dict:
    """A stream's or eval set's mapping, checked: a mapping of known keys with a name and data
    (paths made absolute by ``rel``)."""
    what = "{name, data, loss, weight}" if cls is Stream else "{name, data}"
    _section(item, where, f"a mapping {what}")
    _only(item, cls, where)
    if item.get("name") is None:
        raise ValueError(f"{where} has no name (each needs a name: {what})")
    if item.get("data") is None:
        section = where.split("[")[0]
        raise ValueError(f"{where} ({item.get('name')!r}) has no data (set {section}.{item['name']}.data=FILE)")
    data = item["data"]
    if not isinstance(data, (str, os.PathLike, list, tuple)):
        raise ValueError(f"{where} ({item['name']!r}): data must be a file path or a list of records, got {data!r:.80}")
    return {**item, "data": rel(data)}


def _only(d: Mapping, cls, where: str) -> None:
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {sorted(unknown)}; expected some of {sorted(names)}")


def load_config(path: str | Path, overrides: Sequence[str] = (), *, evaluate_only: bool = False) -> SurgeryConfig:
    """Read a YAML config, apply ``key=value`` overrides, merge its preset, validate.

    Relative data/model paths in the file are resolved against its directory; those given in
    ``overrides`` against the current directory. ``evaluate_only``: the streams are neither read
    nor required (``streams == []``), for evaluating a model with the config's eval sets.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    with open(path) as f:
        try:
            raw = load_yaml(f) or {}
        except yaml.YAMLError as e:
            raise ValueError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a config must be a YAML mapping, got {type(raw).__name__}")
    preset = raw.get("preset")
    own = _stream_names(raw.get("streams"))
    if preset is not None and preset in PRESETS:
        # Overrides address the merged config (e.g. streams.retain.data on the paper preset).
        raw = _merge(PRESETS[preset], {k: v for k, v in raw.items() if k != "preset"})
    for o in overrides:
        apply_override(raw, o, cwd=Path.cwd())
    if preset is not None and preset in PRESETS and not evaluate_only:
        _check_preset_streams(preset, raw, own)
    return config_from_dict(raw, base_dir=path.parent, evaluate_only=evaluate_only)


def as_dataclass(cls, value, where: str):
    """``value`` as an instance of ``cls`` (dicts are converted, instances passed through)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        _only(value, cls, where)
        return cls(**value)
    raise TypeError(f"{where} must be a {cls.__name__} or a dict, got {type(value).__name__}")
