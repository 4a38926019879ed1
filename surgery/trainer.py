"""``Surgery``: one run of LLM Surgery — evaluate, train on the streams, evaluate, save.

    from surgery import Surgery, Stream
    run = Surgery(model=model, tokenizer=tok, streams=[
        Stream("unlearn", "u.jsonl", loss="ascent", weight=0.1),
        Stream("update", "p.jsonl", loss="descent", weight=2.0),
        Stream("retain", "r.jsonl", loss="kl", weight=0.5)],
        reference="copy", train={"steps": 120}, eval=[EvalSet("facts", "q.jsonl")], output_dir="runs/x")
    summary = run.run()

``model`` is trained **in place** (LoRA adapters are injected into it): to train several fresh
copies of one loaded model, pass ``copy.deepcopy(model)`` each time. It may also be a local
directory, a :class:`~surgery.config.ModelConfig` or its dict.

Each step: one batch per stream (``StreamSampler``), all streams padded to one length and run
through the model once (when short CE rows sit next to long KL rows: the CE rows and the KL rows
as two batches of their own lengths, ``SPLIT_PADDING_RATIO``), the loss of ``SurgeryObjective``,
backward, clip, AdamW. With ``train.micro_batch_size`` the step's rows go through the model and
backward in passes of that many rows whose gradients add up (the per-stream token counts are
the step's, so it is the same objective), before the one clip and AdamW step. Per step one line
in ``metrics.jsonl``: ``step``, ``loss/total``, ``loss/<stream>`` (that stream's own mean CE or
KL — over its tokens, or of its records' means with ``train.mean_over: records`` — before sign
and weight; with ``ascent_cap``, capped tokens count at their real CE), with
``ascent_cap`` ``capped/<stream>`` (the fraction of an ascent stream's tokens past the cap, which
no longer train), ``grad_norm``, ``lr``, ``tokens``, ``tokens_per_s``, ``time_s``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from . import checkpoint as ckpt
from . import distributed
from .config import REFERENCES, EvalSet, ModelConfig, Stream, TrainConfig, as_dataclass, check_trainable
from .data import Batch, StreamSampler, collate, read_records, tokenize_lm
from .evaluate import evaluate_set
from .modeling import (add_lora, is_peft, is_saved_model, load_model, load_tokenizer, lora_differences, output_layer,
                       select_trainable, unwrap)
from .objective import SurgeryObjective, live_index
from .reference import (AdapterReference, CacheReference, CopyReference, config_difference, config_identity,
                        examples_digest, first_weight_difference, weights_digest)

log = logging.getLogger("surgery")


def enable_checkpointing(model) -> None:
    """Non-reentrant activation checkpointing (transformers >= 5.2x renamed the method; 5.17 has the old name)."""
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def _lora_and_base_weights(what: str, lost: list[str]) -> str:
    """Why LoRA and trained base-model weights do not go together, and what to do instead."""
    which = f" ({len(lost)} base-model parameters, e.g. {lost[0]})" if lost else ""
    return (f"{what} with LoRA trains base-model weights{which}, but a LoRA run's final/ holds only the "
            f"adapters (peft save_pretrained), so their training would be lost: use trainable: lora (the "
            f"default with lora), list whole modules in lora.modules_to_save (e.g. [lm_head]), or drop lora to "
            f"fine-tune the weights themselves")


def _not_saved_by_peft(model, names: list[str]) -> list[str]:
    """The trained parameters (``names``) that peft's ``save_pretrained`` would not write: those
    whose storage is in no adapter's ``get_peft_model_state_dict`` (its tensors alias the
    parameters; every adapter, whatever its name, as save_pretrained writes them all). Embedding
    layers are left out of that state dict: deciding whether peft would add them ("auto") looks the
    base model up on the Hub when its path is not local."""
    from peft import get_peft_model_state_dict

    saved = {t.data_ptr() for a in model.peft_config
             for t in get_peft_model_state_dict(model, adapter_name=a, save_embedding_layers=False).values()
             if torch.is_tensor(t)}
    params = dict(model.named_parameters())
    return [n for n in names if params[n].data_ptr() not in saved]


def _check_local_dir(path, key: str) -> None:
    """A model or tokenizer folder that does not exist: say so, instead of the hub's "Repo id must be
    in the form ..." error, when the value is clearly a local path (config paths always are)."""
    p = str(path)
    local = os.path.isabs(p) or p.startswith((".", "~")) or p.count("/") > 1 or os.sep != "/" and os.sep in p
    if local and not os.path.isdir(os.path.expanduser(p)):
        what = "is a file, not a directory" if os.path.exists(os.path.expanduser(p)) else "does not exist"
        raise ValueError(f"{key} {p!r}: the directory {what} (a local folder such as one written by "
                         f"save_pretrained is expected)")


def _check_final_dir(path) -> None:
    """final/ is replaced whole: refuse a folder that holds something other than a saved model."""
    path = Path(path).resolve()
    if path.exists() and not path.is_dir():
        raise ValueError(f"save_final: {path} is a file; the model is saved as a folder there, so move that file "
                         f"or give another output_dir")
    if path.is_dir() and any(path.iterdir()) and not is_saved_model(path):
        raise ValueError(f"save_final: {path} is a folder that holds no saved model; it would be replaced whole, "
                         f"so give a new or model folder")


def _check_vocabulary(model, tokenizer) -> None:
    """Every token id the tokenizer can give must have a row in the model's embedding: a larger
    tokenizer would fail mid-forward with an index error."""
    get = getattr(unwrap(model), "get_input_embeddings", None)
    emb = get() if callable(get) else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {rows} rows "
                         f"(vocab_size): ids >= {rows} have no embedding; use the model's own tokenizer "
                         f"(model.tokenizer) or a model whose vocab_size covers it")


@dataclasses.dataclass
class _Pass:
    """One forward/backward pass of a step: its rows (CE rows first) as one batch, or as ``batch``
    (CE rows) and ``kl_batch`` (KL rows) at their own lengths; ``rows``: per stream, its rows in
    the pass ((a, a) where it has none); ``start``, ``stop``: the pass's rows in the step;
    ``ce_index``, ``kl_index``: the flat positions of the CE rows' and the KL rows' live tokens
    (``objective.live_index``), found on the host and moved with the batch."""

    batch: Batch
    kl_batch: Batch | None
    rows: list[tuple[int, int]]
    n_ce: int
    start: int
    stop: int
    ce_index: torch.Tensor
    kl_index: torch.Tensor

    @property
    def live_ce(self) -> torch.Tensor:
        """Live-token mask of the CE rows."""
        return self.batch.mask[:self.n_ce]

    @property
    def live_kl(self) -> torch.Tensor:
        """Live-token mask of the KL rows."""
        return self.batch.mask[self.n_ce:] if self.kl_batch is None else self.kl_batch.mask

    def live(self, a: int, z: int) -> torch.Tensor:
        """Live-token mask of the pass's rows [a, z) (all CE rows or all KL rows)."""
        return self.live_ce[a:z] if z <= self.n_ce else self.live_kl[a - self.n_ce:z - self.n_ce]


class _Once(logging.Filter):
    """Lets each distinct message through once."""

    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if msg in self.seen:
            return False
        self.seen.add(msg)
        return True


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the weights were not updated."""


class TrainingInterrupted(KeyboardInterrupt):
    """``train()`` stopped on SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) at the end of
    a whole step, after saving a checkpoint there: ``step``, ``checkpoint`` (its folder; None
    without an output_dir) and ``signum``, the signal. ``train(resume=True)`` (``surgery train ...
    --resume``) continues exactly. A KeyboardInterrupt, so code that stops on Ctrl-C still does."""

    def __init__(self, step: int, checkpoint: Path | None, signum: int = signal.SIGINT):
        self.step, self.checkpoint, self.signum = step, checkpoint, int(signum)
        if checkpoint is None:
            where = "no output_dir, so nothing was saved"
        else:
            where = f"checkpoint saved to {checkpoint}; continue with resume=True (surgery train ... --resume)"
        super().__init__(f"interrupted ({signal.Signals(self.signum).name}) after step {step}: {where}")

    def __reduce__(self):  # pickling and copying (e.g. back from a worker process)
        return type(self), (self.step, self.checkpoint, self.signum)


def check_output_dir(output_dir: str | Path | None, resume: bool, own_run: bool = False) -> None:
    """The output_dir checks of a training run, which need no model (the command line makes them
    before loading one): a directory (or one to be made: no file on its path), not one that holds
    another run's checkpoint unless the run resumes it, and not a finished run's final/ or
    summary.json without the checkpoint to continue it (a run there would start over and overwrite
    them). ``own_run``: a second train() on the same object, which continues its own run."""
    if output_dir is None:
        return
    output_dir = Path(output_dir)
    for d in (output_dir, *output_dir.parents):
        if d.exists():
            if not d.is_dir():
                where = "" if d == output_dir else f" ({d} on its path)"
                raise ValueError(f"output_dir {output_dir} is a file, not a directory{where}")
            break
    if own_run:
        return
    has_checkpoint = ckpt.exists(output_dir / "checkpoint")
    if not resume and has_checkpoint:
        if (output_dir / "summary.json").is_file():
            raise ValueError(f"{output_dir} holds a finished run (summary.json, checkpoint/): start a new run "
                             f"in another output_dir, or --resume (resume=True) with train.steps above its last "
                             f"step to train it further")
        raise ValueError(f"{output_dir / 'checkpoint'} holds an earlier run's checkpoint: continue it with "
                         f"--resume (resume=True), or start over in another output_dir (or delete that "
                         f"checkpoint folder)")
    finished = ["summary.json"] if (output_dir / "summary.json").is_file() else []
    finished += ["final/"] if is_saved_model(output_dir / "final") else []
    if not has_checkpoint and finished:
        raise ValueError(f"{output_dir} holds a finished run ({', '.join(finished)}) without the checkpoint to "
                         f"continue it: a run there would start over and overwrite {' and '.join(finished)}; "
                         f"give another output_dir (or move them away)")


class Surgery:
    """A surgery run. See the module docstring.

    model: ``nn.Module`` (a causal LM, trained in place), a local directory, a ModelConfig or dict.
    streams: list of :class:`Stream` (or dicts); empty for a run that only evaluates (``evaluate()``;
    ``train()`` and ``run()`` refuse it). tokenizer: object or directory (default: the model's).
    reference: "copy" | "adapter" | "cache". train: :class:`TrainConfig` or dict. eval: list of
    :class:`EvalSet` (or dicts). output_dir: where metrics.jsonl, checkpoint/, final/ and
    summary.json go (None: nothing is written, no checkpoints).
    trainable: "all" | "lora" | list of fnmatch patterns over parameter names (default: "lora"
    when ``lora`` is given or the model is already a peft model, else "all"). With LoRA, "all" or
    patterns that reach base-model weights are refused: final/ (peft's save_pretrained) would hold
    only the adapters; ``lora["modules_to_save"]`` trains whole modules and saves them.
    lora: {r, alpha, dropout, target_modules, modules_to_save} to add LoRA adapters.
    on_step: called with each step's metrics dict (on rank 0).
    """

    def __init__(self, model, streams: Sequence[Stream | dict], *, tokenizer=None, reference: str = "copy",
                 train: TrainConfig | dict | None = None, eval: Sequence[EvalSet | dict] = (),
                 output_dir: str | os.PathLike | None = None, trainable=None, lora: dict | None = None,
                 on_step: Callable[[dict], None] | None = None):
        self.cfg = as_dataclass(TrainConfig, train, "train")
        if reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
        self.reference_mode = reference
        self.streams = [s if isinstance(s, Stream) else Stream(**s) for s in streams]
        names = [s.name for s in self.streams]
        if len(set(names)) != len(names):
            raise ValueError(f"stream names must be unique, got {names}")
        self.eval_sets = [e if isinstance(e, EvalSet) else EvalSet(**e) for e in eval]
        names = [e.name for e in self.eval_sets]
        if len(set(names)) != len(names):  # results are keyed by name: one would replace the other
            raise ValueError(f"eval set names must be unique, got {names}")
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.on_step = on_step
        self.dist = distributed.init()
        self.history: list[dict] = []

        # Data first: a malformed file stops the run before any model loads.
        self._records = [read_records(s.data, "lm", name=f"stream {s.name!r}") for s in self.streams]
        self._eval_records = [read_records(e.data, "choice" if e.kind == "choice" else
                                           ("lm" if e.kind == "perplexity" else "auto"), name=f"eval {e.name!r}")
                              for e in self.eval_sets]
        # Validated records replace paths in our own copies (the caller's EvalSets stay as given).
        self.eval_sets = [dataclasses.replace(e, data=recs) for e, recs in zip(self.eval_sets, self._eval_records)]

        model_cfg = None
        if isinstance(model, (str, os.PathLike)):
            model = ModelConfig(path=str(model))
        if isinstance(model, dict):
            model = ModelConfig(**model)
        if isinstance(model, ModelConfig):
            model_cfg = model
            if tokenizer is None:
                tokenizer = model.tokenizer or model.path
            if lora is None:
                lora = model.lora
            if trainable is None:
                trainable = model.trainable
        check_trainable(trainable)
        if lora is not None and trainable == "all":
            # Before the model loads: an explicit "all" next to lora can only lose work.
            raise ValueError(_lora_and_base_weights("trainable 'all'", []))
        # The tokenizer and the tokenized data before the model: both are cheap, and a record left
        # with nothing to train on stops the run before a large model loads.
        if tokenizer is None:
            raise ValueError("tokenizer: pass a tokenizer object or directory with an nn.Module model")
        if isinstance(tokenizer, (str, os.PathLike)):
            _check_local_dir(tokenizer, "tokenizer" if model_cfg is None or model_cfg.tokenizer else "model.path")
            try:
                self.tokenizer = load_tokenizer(tokenizer)
            except OSError as e:
                raise ValueError(f"tokenizer {str(tokenizer)!r}: {' '.join(str(e).split())}") from e
        else:
            self.tokenizer = tokenizer
        if self.tokenizer.pad_token_id is None:
            raise ValueError("tokenizer has no pad_token_id (set tokenizer.pad_token)")
        self._said = _Once()
        self._examples = [tokenize_lm(r, self.tokenizer, s.max_length or self.cfg.max_length, require_loss=True,
                                      name=f"stream {s.name!r}") for s, r in zip(self.streams, self._records)]
        if model_cfg is not None:
            if model_cfg.path is not None:
                _check_local_dir(model_cfg.path, "model.path")
            try:
                model = load_model(model_cfg.path, model_cfg.config, model_cfg.dtype, seed=self.cfg.seed)
            except OSError as e:  # transformers' "not a local folder nor a model id on the hub" and friends
                raise ValueError(f"model.path {model_cfg.path!r}: {' '.join(str(e).split())}") from e
        self.model_config = model_cfg
        _check_vocabulary(model, self.tokenizer)

        self.device = self._pick_device(model)
        if trainable is None:
            trainable = "lora" if (lora is not None or is_peft(model)) else "all"
        if lora is not None and not is_peft(model):
            model = add_lora(model, lora, seed=self.cfg.seed)
        elif lora is not None and (differ := lora_differences(model, lora)):
            # The same config evaluating or continuing its own run's final/ agrees: nothing to say.
            log.warning("the model already carries LoRA adapters (a peft model, or model.path holds an adapter) "
                        "that differ from the lora settings (%s): the adapters are used as they are and the "
                        "lora settings are ignored", "; ".join(differ))
        if reference == "adapter" and not is_peft(model):
            raise ValueError("reference='adapter' needs LoRA: pass lora={...} or a peft model")
        self.trainable_names = select_trainable(model, trainable)
        if is_peft(model):
            # final/ is peft's save_pretrained: the adapter's state dict (adapters, modules_to_save,
            # biases with bias="lora_only", trainable tokens, IA3 vectors ...), nothing else.
            lost = _not_saved_by_peft(model, self.trainable_names)
            if lost:
                raise ValueError(_lora_and_base_weights(f"trainable {trainable!r}", lost))
        if reference == "adapter" and any(s.loss == "kl" for s in self.streams) \
                and output_layer(model).weight.requires_grad:
            # Said here, before the first evaluation, not at the first step (the objective checks too).
            raise ValueError("reference='adapter' needs a frozen lm_head (the head is trained — e.g. lm_head in "
                             "lora.modules_to_save — so the adapters-off model is not the original); use "
                             "reference='copy' or 'cache'")
        model.to(self.device)
        if self.cfg.gradient_checkpointing:
            enable_checkpointing(unwrap(model))
        unwrap(model).config.use_cache = False
        self.model = model
        self.objective = SurgeryObjective(model, backend=self.cfg.backend, kl_direction=self.cfg.kl_direction,
                                          ascent_cap=self.cfg.ascent_cap)
        self._reference = None
        self.optimizer = None
        self._scaler = None
        self._origin = None
        self.step = 0
        # What started this run (set by the surgery command: its arguments and the resolved config);
        # train() appends it to output_dir/runs.jsonl.
        self.command: dict | None = None
        self._before: dict | None = None

    def _pick_device(self, model) -> torch.device:
        if self.cfg.device is not None:
            return torch.device(self.cfg.device)
        if self.dist.enabled and torch.cuda.is_available():
            return torch.device("cuda", self.dist.local_rank)
        for p in model.parameters():
            return p.device
        return torch.device("cpu")

    def _setup(self):
        """Reference, FSDP, optimizer — once, before the first step (the reference sees the untrained model)."""
        if self.optimizer is not None:
            return
        kl = [i for i, s in enumerate(self.streams) if s.loss == "kl"]
        if kl:
            if self.reference_mode == "copy":
                shard = functools.partial(distributed.shard_frozen, param_dtype=self._mp_dtype) \
                    if self.dist.enabled else None
                self._reference = CopyReference(self.model, shard=shard)
            elif self.reference_mode == "adapter":
                self._reference = AdapterReference()
        if self.dist.enabled:
            distributed.shard_objective(self.objective, self._mp_dtype)
        # What a resumed run must start from too (_check_resume): the untrained weights (the frozen
        # ones and the reference are rebuilt from them, not restored), each stream's examples (the
        # data positions index them) and the seed (the samplers' order).
        self._origin = None if self.output_dir is None else {
            "model": config_identity(self.objective.model),
            "weights": weights_digest(self.objective.model, self.dist.all_reduce_sum),
            "data": {s.name: examples_digest(ex) for s, ex in zip(self.streams, self._examples)},
            "seed": self.cfg.seed}
        # The optimizer must hold the sharded parameters: create it before any forward (FSDP keeps
        # the root's parameters unsharded after a forward, and they are swapped in as module attributes).
        params = [p for p in self.objective.parameters() if p.requires_grad]
        # The per-token stream weights: float32 (the kernels' accumulation type), float64 for a
        # float64 model (a reference run).
        wide = any(p.dtype == torch.float64 for p in self.objective.parameters())
        self._weight_dtype = torch.float64 if wide else torch.float32
        self.optimizer = torch.optim.AdamW(params, lr=self.cfg.lr, betas=self.cfg.betas, eps=self.cfg.eps,
                                           weight_decay=self.cfg.weight_decay)
        # float16 autocast over float32 weights: small gradients underflow in float16, so the loss is
        # scaled up before the backward and the gradients down before the clip; a step whose scaled
        # gradients overflowed is skipped and the scale lowered (torch.amp.GradScaler). float16
        # weights (model.dtype) cannot be unscaled in place and keep the unscaled path. Under FSDP
        # the gradients are float32 DTensor shards (reduce_dtype) and DTensor reduces the scaler's
        # overflow flag over the mesh, so every rank skips the same steps.
        self._scaler = None
        if self._mp_dtype == torch.float16 and all(p.dtype == torch.float32 for p in params):
            self._scaler = torch.amp.GradScaler(self.device.type)
        if kl and self.reference_mode == "cache":
            if self.output_dir is None:
                raise ValueError("reference='cache' stores hidden states under output_dir; give an output_dir")
            head = output_layer(self.model)
            with self._autocast():  # the hidden states the steps' forwards compute (mixed_precision)
                self._reference = CacheReference(
                self.output_dir / "reference_cache", self.objective,
                    {self.streams[i].name: self._examples[i] for i in kl}, pad_id=self.tokenizer.pad_token_id,
                    device=self.device, head_trainable=head.weight.requires_grad, rank=self.dist.rank,
                    world_size=self.dist.world_size, barrier=self.dist.barrier, all_reduce=self.dist.all_reduce_sum,
                    weights=self._origin["weights"], precision=self.cfg.mixed_precision)
        self._samplers = [StreamSampler(len(ex), self.cfg.seed, s.name) for s, ex in zip(self.streams, self._examples)]

    def _seed(self):
        s = self.cfg.seed
        random.seed(s)
        torch.manual_seed(s)
        try:
            import numpy as np

            np.random.seed(s)
        except ImportError:  # pragma: no cover
            pass

    # CE rows and KL rows go through the model as two batches, each padded to its own longest row,
    # when padding them to one length would cost more than this many times the padded tokens of the
    # two (short fact statements next to long retain paragraphs); otherwise one batch, one forward
    # (under FSDP every forward gathers the sharded weights once more).
    SPLIT_PADDING_RATIO = 1.25

    def _draw(self) -> tuple[list, list[int], list[tuple[int, int]], int]:
        """This process's records for the step, CE streams first, then KL streams: (examples, their
        record indices, rows (start, stop) of each stream, number of CE rows)."""
        order = [i for i, s in enumerate(self.streams) if s.loss != "kl"] + \
                [i for i, s in enumerate(self.streams) if s.loss == "kl"]
        examples, index, rows = [], [], {}
        for i in order:
            bs = self.streams[i].batch_size or self.cfg.batch_size
            idx = self._samplers[i].draw(bs, self.dist.rank, self.dist.world_size)
            rows[i] = (len(examples), len(examples) + len(idx))
            examples += [self._examples[i][j] for j in idx]
            index += idx
        n_ce = sum(z - a for i, (a, z) in rows.items() if self.streams[i].loss != "kl")
        return examples, index, [rows[i] for i in range(len(self.streams))], n_ce

    def _collate(self, examples, index, n_ce) -> tuple[Batch, Batch | None]:
        """One forward pass's rows (CE rows first, n_ce of them) as (batch, kl_batch): kl_batch is
        None when all rows share ``batch``; otherwise ``batch`` holds the CE rows and ``kl_batch``
        the KL rows, each at its own length."""
        pad = self.tokenizer.pad_token_id
        if 0 < n_ce < len(examples):
            len_ce = max(len(e.ids) for e in examples[:n_ce])
            len_kl = max(len(e.ids) for e in examples[n_ce:])
            # Padded tokens as one batch and as two, summed over processes: every process must
            # make the same choice (FSDP's collectives run once per forward).
            cost = torch.tensor([len(examples) * max(len_ce, len_kl), n_ce * len_ce + (len(examples) - n_ce) * len_kl],
                                dtype=torch.float64, device=self.device)
            self.dist.all_reduce_sum(cost)
            one, two = cost.tolist()
            if one > self.SPLIT_PADDING_RATIO * two:
                return collate(examples[:n_ce], pad, index[:n_ce]), collate(examples[n_ce:], pad, index[n_ce:])
        return collate(examples, pad, index), None

    def _passes(self) -> tuple[list[_Pass], list[tuple[int, int]]]:
        """The step's forward/backward passes, ``train.micro_batch_size`` rows each (all rows in one
        pass when it is None) in the order of ``_draw``, and the rows of each stream in the step."""
        examples, index, rows, n_ce = self._draw()
        n = len(examples)
        m = self.cfg.micro_batch_size or n
        out = []
        for r0 in range(0, n, m):
            r1 = min(r0 + m, n)
            nc = min(max(n_ce - r0, 0), r1 - r0)
            b, kb = self._collate(examples[r0:r1], index[r0:r1], nc)
            # The live tokens' positions from the host's targets: on the device, finding them would
            # wait for the model's forward in the middle of the pass (SurgeryObjective._loss).
            ce_index = live_index(b.target[:nc]).to(self.device)
            kl_index = live_index(b.target[nc:] if kb is None else kb.target).to(self.device)
            b, kb = b.to(self.device), None if kb is None else kb.to(self.device)
            out.append(_Pass(b, kb, [(min(max(a, r0), r1) - r0, min(max(z, r0), r1) - r0) for a, z in rows],
                             nc, r0, r1, ce_index, kl_index))
        return out, rows

    def _train_step(self) -> dict:
        t0 = time.perf_counter()
        lr = self.cfg.lr * min(1.0, (self.step + 1) / self.cfg.warmup_steps) if self.cfg.warmup_steps else self.cfg.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        passes, rows = self._passes()
        # Per row of the step, in draw order (CE streams first; rows[k] is stream k's place there,
        # not its config order): its stream and its live tokens, built on the device (no host sync).
        row_stream = torch.empty(max((z for _, z in rows), default=0), dtype=torch.long)
        for k, (a, z) in enumerate(rows):
            row_stream[a:z] = k
        row_stream = row_stream.to(self.device)
        row_tokens = torch.cat([torch.cat([p.live_ce.sum(1), p.live_kl.sum(1)]) for p in passes]).to(self.device)
        # Per stream, over all passes and processes (one collective): live tokens, and records with
        # a live token. The per-stream means are global means, so the passes' losses add up to the
        # one-pass objective (and their gradients too).
        per_stream = torch.zeros(2, len(self.streams), dtype=torch.float64, device=self.device)
        per_stream[0].index_add_(0, row_stream, row_tokens.to(torch.float64))
        per_stream[1].index_add_(0, row_stream, (row_tokens > 0).to(torch.float64))
        self.dist.all_reduce_sum(per_stream)
        counts, records = per_stream
        # Per row: sign_s / N_s (token weight; "records": sign_s / (R_s * n_row)) and c_s (coefficient).
        wdt = self._weight_dtype
        sign = torch.tensor([-1.0 if s.loss == "ascent" else 1.0 for s in self.streams], device=self.device,
                            dtype=wdt)
        coef = torch.tensor([s.weight for s in self.streams], device=self.device, dtype=wdt)
        if self.cfg.mean_over == "records":
            row_w = sign[row_stream] / (records.clamp_min(1)[row_stream] * row_tokens.clamp_min(1)).to(wdt)
        else:
            row_w = (sign / counts.clamp_min(1).to(wdt))[row_stream]
        row_c = coef[row_stream]
        stats = torch.zeros(1 + 2 * len(self.streams), dtype=torch.float64, device=self.device)
        for p in passes:
            b, kb, nc = p.batch, p.kl_batch, p.n_ce
            w, c = row_w[p.start:p.stop], row_c[p.start:p.stop]
            L_ce, L_kl = p.live_ce.shape[1], p.live_kl.shape[1]
            ce_w = w[:nc, None].expand(-1, L_ce).contiguous()
            ce_c = c[:nc, None].expand(-1, L_ce)
            kl_w = w[nc:, None].expand(-1, L_kl).contiguous()
            kl_c = c[nc:, None].expand(-1, L_kl)
            ref = (None, None, None)
            kl_rows = b.rows(nc) if kb is None else kb
            with self._autocast():
                if kl_rows.input_ids.shape[0]:
                    ref = self._reference_hidden(kl_rows, p.rows, nc, L_kl)
                self.objective.train()
                total, terms, capped = self.objective(
                    "loss", b.input_ids, b.attention_mask, b.target, n_ce_rows=nc, ce_weight=ce_w, ce_coeff=ce_c,
                    kl_weight=kl_w, kl_coeff=kl_c, ref_hidden=ref[0], ref_weight=ref[1], ref_bias=ref[2],
                    stream_rows=p.rows, kl_batch=None if kb is None else (kb.input_ids, kb.attention_mask, kb.target),
                    ce_index=p.ce_index, kl_index=p.kl_index)
            # FSDP averages gradients over processes; each process's loss is already a share of the
            # global objective, so scale back up to get its sum. Passes add their gradients.
            loss = total * self.dist.world_size
            (loss if self._scaler is None else self._scaler.scale(loss)).backward()
            stats += torch.cat([total.detach().reshape(1).to(torch.float64), terms.detach().to(torch.float64),
                                capped.to(torch.float64)])
            del total, terms, capped, ref, loss
        scale = None
        if self._scaler is not None:
            scale = self._scaler.get_scale()
            self._scaler.unscale_(self.optimizer)
        clip = self.cfg.clip if self.cfg.clip else float("inf")
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
        self.dist.all_reduce_sum(stats)
        gn = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        # The step's one read of the device: every metric in one copy (a float() each would wait
        # for the device once per stream).
        n = len(self.streams)
        gn, *stats = torch.cat([gn.reshape(1).to(torch.float64), stats, counts]).tolist()
        stats, counts = stats[:1 + 2 * n], stats[1 + 2 * n:]
        m = {"step": self.step + 1, "loss/total": stats[0]}
        for k, s in enumerate(self.streams):
            # terms hold sign_s * mean for CE streams: report the plain mean CE / KL.
            m[f"loss/{s.name}"] = stats[1 + k] * (-1.0 if s.loss == "ascent" else 1.0)
        if self.cfg.ascent_cap is not None:
            for k, s in enumerate(self.streams):
                if s.loss == "ascent":
                    m[f"capped/{s.name}"] = stats[1 + n + k] / max(counts[k], 1.0)
        bad = [k for k, v in m.items() if k.startswith("loss/") and not math.isfinite(v)]
        # With loss scaling, gradients past float16's range and finite losses are an overflow of
        # the scaled gradients: the scaler skips the update and lowers the scale.
        skipped = self._scaler is not None and not bad and not math.isfinite(gn)
        if not math.isfinite(gn) and not skipped:
            bad.append("grad_norm")
        if bad:
            self.optimizer.zero_grad(set_to_none=True)
            last = self._last_checkpoint_note()
            if any(p.dtype == torch.float16 for p in params):
                last += (" float16 weights overflow easily in training (AdamW's eps of 1e-8 is 0 in float16): "
                         "train float32 weights (model.dtype) with train.mixed_precision float16 or bfloat16.")
            raise NonFiniteLossError(
                f"step {self.step + 1}: non-finite {', '.join(bad)} "
                f"({', '.join(f'{k}={m[k]}' for k in m if k != 'step')}, grad_norm={gn}); stopped before updating "
                f"the weights. {last}")
        if self._scaler is None:
            self.optimizer.step()
        else:
            self._scaler.step(self.optimizer)
            self._scaler.update()
            if skipped:
                log.info("step %d: float16 gradients overflowed at loss scale %g; the update was skipped and the "
                         "scale lowered to %g", self.step + 1, scale, self._scaler.get_scale())
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        dt = time.perf_counter() - t0
        ntok = int(sum(counts))
        # A skipped step logs grad_norm null (not Infinity, which is not JSON).
        m.update({"grad_norm": None if skipped else gn, "lr": lr, "tokens": ntok, "tokens_per_s": ntok / dt,
                  "time_s": dt})
        if self._scaler is not None:
            m.update({"loss_scale": scale, "skipped": skipped})
        return m

    @property
    def _mp_dtype(self):
        return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.cfg.mixed_precision)

    def _autocast(self):
        """One process with mixed_precision: autocast (under FSDP the policy casts the parameters)."""
        if self._mp_dtype is None or self.dist.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self._mp_dtype)

    def _reference_hidden(self, kb: Batch, rows, n_ce: int, L: int):
        """The reference's final hidden states (and head) for the KL rows ``kb`` (rows n_ce... of the pass)."""
        if isinstance(self._reference, AdapterReference):
            return None, None, None
        if isinstance(self._reference, CopyReference):
            return self._reference.hidden("", kb, L)
        # Cache: per KL stream, its records' stored states, padded to L.
        outs, w, bias = [], None, None
        for k, (s, (a, z)) in enumerate(zip(self.streams, rows)):
            if s.loss != "kl" or a == z:
                continue
            a, z = a - n_ce, z - n_ce
            h, w, bias = self._reference.hidden(s.name, kb.rows(a, z), L)
            outs.append((a, h))
        outs.sort(key=lambda t: t[0])
        h = torch.cat([o[1] for o in outs], 0).to(dtype=next(self.model.parameters()).dtype)
        return h, w, bias

    def _last_checkpoint_note(self) -> str:
        if self.output_dir is not None and ckpt.exists(self.output_dir / "checkpoint"):
            try:
                step = torch.load(self.output_dir / "checkpoint" / ckpt.STATE, map_location="cpu",
                                  weights_only=False)["step"]
            except Exception:  # pragma: no cover - the note must not hide the real error
                step = "?"
            return f"The last good checkpoint is {self.output_dir / 'checkpoint'} (step {step}), left untouched."
        return "No checkpoint was written (output_dir unset or save_every not reached)."

    def evaluate(self) -> dict[str, dict]:
        """Every eval set on the current model: ``{name: {"accuracy", ...} | {"perplexity", ...}}``,
        in the training's precision (``mixed_precision``: under autocast, as the steps; under FSDP
        the policy casts the parameters either way)."""
        out = {}
        log.addFilter(self._said)  # an eval set's notes (records cut by max_length): once a run, not every evaluation
        try:
            with self._autocast():
                for e in self.eval_sets:
                    out[e.name] = evaluate_set(self.objective, self.tokenizer, e, backend=self.cfg.backend,
                                               device=self.device, max_length=self.cfg.max_length)
        finally:
            log.removeFilter(self._said)
        return out

    def save_checkpoint(self) -> Path:
        if self.output_dir is None:
            raise ValueError("save_checkpoint needs an output_dir")
        return ckpt.save(self.output_dir / "checkpoint", self.objective, self.optimizer, step=self.step,
                         cursors=[s.cursor for s in self._samplers],
                         extra={"before": self._before, "history": self.history, "run": self._identity(),
                                "grad_scaler": None if self._scaler is None else self._scaler.state_dict()},
                         dist=self.dist)

    def _identity(self) -> dict:
        """What a resumed run must share with the checkpoint's: the streams (their data positions
        are restored by order) and their examples, the trained parameters (the optimizer state is
        theirs), the model's config, the untrained model's weights and the seed. Stream weights, lr,
        steps, batch sizes, precision and the optimizer settings may change."""
        return {"streams": [[s.name, s.loss] for s in self.streams], "trainable": list(self.trainable_names),
                **(self._origin or {})}

    def _check_resume(self, path, state: dict) -> None:
        if state["step"] > self.cfg.steps:
            raise ValueError(f"resume: {path} is at step {state['step']}, past train.steps={self.cfg.steps}: nothing "
                             f"would train and final/ would be rewritten; set train.steps above {state['step']} to "
                             f"train more")
        saved, now = state["extra"].get("run"), self._identity()
        if saved is None:  # a checkpoint from before the identity was stored
            return
        for key, what in (("streams", "streams (name, loss)"), ("trainable", "trained parameters")):
            if saved[key] != now[key]:
                a, b = saved[key], now[key]
                if key == "trainable":
                    a, b = sorted(set(a) - set(b))[:3], sorted(set(b) - set(a))[:3]
                    detail = f"only in the checkpoint: {a}, only in this run: {b}"
                else:
                    detail = f"checkpoint {a}, this run {b}"
                raise ValueError(f"resume: {path} was written by a run with other {what} ({detail}); resume "
                                 f"with the same ones, or start a new run in another output_dir")
        # Checkpoints from before these were stored lack them.
        changed = config_difference(saved["model"], now.get("model") or {}) if "model" in saved else []
        if changed:
            raise ValueError(f"resume: {path} was written by a run of the model with another config "
                             f"({'; '.join(changed[:4])}); the trained weights would compute something else. Resume "
                             f"with the same model.path and model.config, or start a new run in another output_dir")
        diff = first_weight_difference(saved["weights"], now.get("weights")) if "weights" in saved else None
        if diff is not None:
            raise ValueError(f"resume: {path} was written by a run that started from other weights (first "
                             f"difference: {diff}); the frozen weights and the reference would now come from "
                             f"these, the trained ones from the checkpoint. Resume with the same model.path or "
                             f"model.config (and train.seed for a config), or start a new run in another output_dir")
        if "data" in saved and saved["data"] != now.get("data"):
            names = [n for n in saved["data"] if saved["data"][n] != now["data"].get(n)]
            raise ValueError(f"resume: {path} was written by a run with other examples in stream(s) {names} (their "
                             f"data file, or max_length, changed); the data positions restored would index other "
                             f"examples. Resume with the same data, or start a new run in another output_dir")
        if "seed" in saved and saved["seed"] != now.get("seed"):
            raise ValueError(f"resume: {path} was written by a run with train.seed={saved['seed']}, this one has "
                             f"{now.get('seed')} (the order the streams are sampled in); resume with the same seed")

    def _resume(self) -> bool:
        d = self.output_dir / "checkpoint" if self.output_dir is not None else None
        if d is None or not ckpt.exists(d):
            log.warning("resume: no checkpoint under %s; starting from step 0", d)
            return False
        st = ckpt.load(d, self.objective, self.optimizer, dist=self.dist,
                       check=lambda state: self._check_resume(d, state))
        # The optimizer's settings come from this run's config, not the checkpoint (lr is set per step).
        for g in self.optimizer.param_groups:
            g.update(betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay)
        self.step = st["step"]
        for s, c in zip(self._samplers, st["cursors"]):
            s.cursor = c
        if self._scaler is not None and st["extra"].get("grad_scaler"):
            self._scaler.load_state_dict(st["extra"]["grad_scaler"])
        self._before = st["extra"].get("before")
        self.history = list(st["extra"].get("history") or [])
        return True

    def train(self, resume: bool = False) -> list[dict]:
        """Train up to ``train.steps`` steps (continuing from the checkpoint with ``resume=True``).
        Returns the per-step metrics of this run (also in ``self.history`` and metrics.jsonl)."""
        self._check_before_training(resume)
        if self.step == 0:  # a second train() on this object continues its RNG streams, as one run would
            self._seed()
        self._setup()
        resumed = resume and self._resume()
        if not resumed and self.step == 0 and self.output_dir is not None and self.dist.main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            (self.output_dir / "metrics.jsonl").write_text("")
        if resumed and self.output_dir is not None and self.dist.main:
            # Drop lines past the checkpoint (a crash after it) so the log matches the resumed run.
            ckpt.write_text(self.output_dir / "metrics.jsonl", "".join(json.dumps(m) + "\n" for m in self.history))
        if self.command is not None and self.output_dir is not None and self.dist.main:
            # One line per start (the first and every --resume): how to repeat or continue it.
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "runs.jsonl", "a") as f:
                f.write(json.dumps(dict(self.command, resume=resume, from_step=self.step,
                                        started=time.strftime("%Y-%m-%dT%H:%M:%S%z")), default=str) + "\n")
        bar = None
        if self.cfg.progress and self.dist.main:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.cfg.steps, initial=self.step, desc="surgery", dynamic_ncols=True)
        new = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(self._stop_on_signal())
            if bar is not None:
                stack.callback(bar.close)
            while self.step < self.cfg.steps:
                m = self._train_step()
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.steps:
                    for name, res in self.evaluate().items():
                        for k, v in res.items():
                            if isinstance(v, (int, float)):
                                m[f"eval/{name}/{k}"] = v
                self.history.append(m)
                new.append(m)
                if self.dist.main:
                    if self.output_dir is not None:
                        with open(self.output_dir / "metrics.jsonl", "a") as f:
                            f.write(json.dumps(m) + "\n")
                    if self.on_step is not None:
                        self.on_step(m)
                    if bar is not None:
                        bar.update(1)
                        bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in m.items()
                                         if k.startswith("loss/") and k != "loss/total"})
                saved = self.output_dir is not None and self.cfg.save_every and self.step % self.cfg.save_every == 0
                if saved:
                    self.save_checkpoint()
                self._stop_if_asked(saved)
            # The last save under the same handlers: a signal now waits for it, then stops the run
            # (run() would go on to evaluate and write final/).
            if self.output_dir is not None and (not self.cfg.save_every or self.step % self.cfg.save_every):
                self.save_checkpoint()
            self._stop_if_asked(saved=True)
        skipped = sum(bool(m.get("skipped")) for m in new)
        if skipped and self.dist.main:
            # each skip is logged at INFO; a run that mostly did not train says so louder
            log.warning("%d of the %d steps of this run were skipped by the float16 loss scaler (gradients "
                        "overflowed at its scale; it lowers the scale after each), so %d updated the weights: "
                        "a short float16 run may need more steps, or bfloat16 / float32", skipped, len(new),
                        len(new) - skipped)
        return new

    @contextlib.contextmanager
    def _stop_on_signal(self):
        """While training: a first SIGINT or SIGTERM asks to stop at the end of the current step
        (``_stop_agreed``: checkpoint, then TrainingInterrupted). A second Ctrl-C does what it would
        have done without this (the handler before: KeyboardInterrupt at once, by default); a
        repeated SIGTERM changes nothing (schedulers and torchrun may each send one, and follow
        with SIGKILL when their grace period ends). The handler that was there is not called on
        the first signal; a signal the process ignores (SIG_IGN, e.g. SIGINT for a background job)
        stays ignored. Handlers are set from the main thread only, and put back on the way out."""
        self._stop_requested, self._stop_signal = False, signal.SIGINT
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        # Only what we can put back: a handler set outside Python reads as None.
        before = {s: h for s, h in before.items() if h is not None and h != signal.SIG_IGN}

        def handler(signum, frame):
            if not self._stop_requested:
                self._stop_requested, self._stop_signal = True, signum
                again = "press Ctrl-C again to stop at once" if signum == signal.SIGINT else "a repeat changes nothing"
                log.warning("%s: stopping at the end of this step, after a checkpoint (%s)",
                            signal.Signals(signum).name, again)
                return
            if signum != signal.SIGINT:
                return
            for s, h in before.items():
                signal.signal(s, h)
            prev = before[signum]
            if callable(prev):
                prev(signum, frame)
            elif prev == signal.SIG_DFL:
                signal.raise_signal(signum)

        for s in before:
            signal.signal(s, handler)
        try:
            yield
        finally:
            for s, h in before.items():
                signal.signal(s, h)

    def _stop_if_asked(self, saved: bool) -> None:
        """After a whole step: if a signal asked to stop (``_stop_agreed``), save a checkpoint
        unless this step's is ``saved`` already, and raise TrainingInterrupted."""
        if not self._stop_agreed():
            return
        path = None
        if self.output_dir is not None:
            path = self.output_dir / "checkpoint"
            if not saved:
                self.save_checkpoint()
        raise TrainingInterrupted(self.step, path, self._stop_signal)

    def _stop_agreed(self) -> bool:
        """Whether to stop after this step: asked by a signal here or, under torchrun, on any
        process (all of them then stop after the same step, so the checkpoint's collectives match)."""
        if not self.dist.enabled:
            return self._stop_requested
        # Processes asked by SIGINT, by SIGTERM; the stop reports SIGTERM if any process had it.
        asked = [self._stop_requested and self._stop_signal == s for s in (signal.SIGINT, signal.SIGTERM)]
        flag = torch.tensor(asked, dtype=torch.float64, device=self.device)
        self.dist.all_reduce_sum(flag)
        by_int, by_term = flag.tolist()
        if by_term:
            self._stop_signal = signal.SIGTERM
        elif by_int:
            self._stop_signal = signal.SIGINT
        return bool(by_int or by_term)

    def _check_before_training(self, resume: bool) -> None:
        """Checks a training run makes before any work (evaluate() alone needs none): streams to
        train on, a fresh run does not take over an output_dir with another run's checkpoint in it,
        and the cache reference needs an output_dir."""
        if not self.streams:
            raise ValueError("streams: give at least one Stream to train on (a run without streams can only "
                             "evaluate())")
        if self.reference_mode == "cache" and self.output_dir is None and any(s.loss == "kl" for s in self.streams):
            raise ValueError("reference='cache' stores hidden states under output_dir; give an output_dir")
        # a second train() on this object continues its own run (step > 0): its checkpoint is no other's
        check_output_dir(self.output_dir, resume, own_run=self.step > 0)

    def run(self, resume: bool = False) -> dict[str, Any]:
        """Evaluate before, train, evaluate after; write final/ and summary.json. Returns the summary:
        steps, the evaluations before and after, the first and final step's losses, the streams,
        ``time_s`` (this call, evaluations included) and ``train_time_s`` (the steps of the whole run,
        across resumes)."""
        t0 = time.perf_counter()
        self._check_before_training(resume)  # before the evaluation, not after it
        if self.output_dir is not None:
            # Refused now, not after the training it would have to throw away.
            _check_final_dir(self.output_dir / "final")
        if self._before is None and not (resume and self.output_dir is not None
                                         and ckpt.exists(self.output_dir / "checkpoint")):
            self._before = self.evaluate()
        self.train(resume=resume)
        after = self.evaluate()
        last = self.history[-1] if self.history else {}
        summary = {
            "steps": self.step,
            "before": self._before,
            "after": after,
            "final": {k: v for k, v in last.items() if k.startswith("loss/")},
            "first": {k: v for k, v in (self.history[0] if self.history else {}).items() if k.startswith("loss/")},
            "streams": [{"name": s.name, "loss": s.loss, "weight": s.weight} for s in self.streams],
            "reference": self.reference_mode,
            "trainable_parameters": len(self.trainable_names),
            "world_size": self.dist.world_size,
            # This call's wall time (after a resume: the resumed part only), and the training steps'
            # time over the whole run, resumed runs included.
            "time_s": time.perf_counter() - t0,
            "train_time_s": sum(m.get("time_s", 0.0) for m in self.history),
        }
        if self.output_dir is not None:
            self.save_final(self.output_dir / "final")
            if self.dist.main:
                ckpt.write_text(self.output_dir / "summary.json", json.dumps(summary, indent=2))
        return summary

    def save_final(self, path) -> Path:
        """The trained model (or LoRA adapter) and tokenizer, loadable with transformers / peft."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        path = Path(path).resolve()
        _check_final_dir(path)
        sd = None
        if self.dist.enabled:
            full = get_model_state_dict(self.objective, options=StateDictOptions(full_state_dict=True,
                                                                                 cpu_offload=True))
            sd = {k[len("model."):]: v for k, v in full.items()}
        if self.dist.main:
            # Written beside and swapped in, so that path holds this model only (a full model after a
            # LoRA run in the same output_dir must not sit next to the old adapter files, which
            # would load instead) and a crash mid-write leaves the previous one whole.
            tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
            if old.is_dir() and not path.exists():  # a crash between the two renames: the old one back
                old.rename(path)
            for d in (tmp, old):
                shutil.rmtree(d, ignore_errors=True)
            tmp.mkdir(parents=True)
            if sd is not None:
                self.model.save_pretrained(tmp, state_dict=sd)
            else:
                self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.dist.barrier()
        return path
