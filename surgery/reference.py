"""The frozen reference for the KL (retain) streams: ``copy``, ``adapter`` or ``cache``.

- ``copy``: a frozen deep copy of the model as it was before training (no grad, eval mode), on
  the same device; its final hidden states and head weight feed ``linear_kl_div``.
- ``adapter``: nothing is stored; the trained LoRA model runs with its adapters disabled inside
  the objective (see ``SurgeryObjective._adapter_reference``). No extra weights.
- ``cache``: before the first step the untrained model computes the final hidden state of every
  retain record once; they are stored under ``<output_dir>/reference_cache/`` (one safetensors
  file per record, written atomically) and read back per batch. No reference model is in memory
  while training; a trained head's original weight is kept (``head.safetensors``).

Each reference answers ``hidden(stream, batch, length) -> (ref_hidden (B, L, H), ref_weight,
ref_bias)``; ``None`` for ``adapter`` (the objective computes it), and ``ref_weight=None`` means
"the trained model's own, frozen head".
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from pathlib import Path

import torch

from .checkpoint import write_text
from .data import collate
from .modeling import final_hidden, output_layer

log = logging.getLogger(__name__)


class CopyReference:
    def __init__(self, model, shard=None):
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        if shard is not None:
            shard(self.model)

    @torch.no_grad()
    def hidden(self, stream: str, batch, length: int):
        h = final_hidden(self.model, batch.input_ids, batch.attention_mask)
        head = output_layer(self.model)
        return h, head.weight, getattr(head, "bias", None)


class AdapterReference:
    def hidden(self, stream, batch, length):
        return None, None, None


def weights_digest(model, all_reduce=None) -> list:
    """Per parameter: name, shape, and the float64 sum and sum of squares of its values, to 9
    significant digits (the same under FSDP, where each process sums its shard and ``all_reduce``
    adds them, and whatever the summation order). Read in slices: no float64 copy of a parameter.
    Fresh LoRA adapters (every lora_B zero) leave the model as it is, so they do not count:
    another seed or rank of them keeps the untrained model's hidden states valid."""
    names, sums = [], []
    for name, p in model.named_parameters():
        t = (p.to_local() if hasattr(p, "to_local") else p).detach().reshape(-1)
        acc = torch.zeros(2, dtype=torch.float64, device=t.device)
        for part in t.split(1 << 24):
            part = part.double()
            acc += torch.stack([part.sum(), part.square().sum()])
        names.append((name, list(p.shape)))
        sums.append(acc)
    total = torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.float64)
    if all_reduce is not None:
        all_reduce(total)
    rows = [(name, shape, a, b) for (name, shape), (a, b) in zip(names, total.tolist())]
    lora = [r for r in rows if "lora_" in r[0]]
    if lora and all(b == 0.0 for name, _, _, b in lora if "lora_B" in name):
        rows = [r for r in rows if "lora_" not in r[0]]
    return [[name, shape, f"{a:.9e}", f"{b:.9e}"] for name, shape, a, b in rows]


# Run-time switches of a transformers config (what a forward returns, the dtype it was loaded in:
# compared on its own), not what the model computes.
_RUNTIME_KEYS = {"transformers_version", "dtype", "torch_dtype", "use_cache", "return_dict", "output_hidden_states",
                 "output_attentions"}


def config_identity(model) -> dict:
    """The model's config, as a resumed run must find it again: the same weights under another
    ``rope_theta`` or norm epsilon compute something else. Private keys (``_name_or_path``, the
    attention implementation) and run-time switches are left out, in nested configs too."""
    def keep(d):
        return {k: keep(v) if isinstance(v, dict) else v for k, v in d.items()
                if not str(k).startswith("_") and k not in _RUNTIME_KEYS}

    cfg = getattr(model, "config", None)
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else {}
    return json.loads(json.dumps(keep(d), sort_keys=True, default=str))


def config_difference(saved: dict, now: dict) -> list[str]:
    """The keys two config_identity results give different values, as ``key: saved -> now``. A key
    only one side has is left out: a newer transformers adds keys, with defaults, to the same model."""
    return [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in sorted(set(saved) & set(now)) if saved[k] != now[k]]


def first_weight_difference(saved: list, now: list | None) -> str | None:
    """The first parameter whose weights_digest row differs (None: the same weights). The float64
    sums are compared to their rounding, not digit for digit: another summation order (another
    device or thread count) may move the last digits of a sum whose terms cancel."""
    if now is None or len(saved) != len(now):
        return "the parameter list"
    for (name, shape, s1, q1), (name2, shape2, s2, q2) in zip(saved, now):
        if name != name2 or shape != shape2:
            return name
        s1, q1, s2, q2 = map(float, (s1, q1, s2, q2))
        n = math.prod(shape) or 1
        # sum of squares: no cancellation, 1e-6 relative; sum: its error bound scales with the
        # magnitude of its terms, sqrt(n * sum of squares)
        if abs(q1 - q2) > 1e-6 * max(q1, q2) or abs(s1 - s2) > 1e-6 * math.sqrt(n * max(q1, q2)):
            return name
    return None


def examples_digest(examples) -> str:
    """A stream's tokenized examples (ids and where the loss starts), as 16 hex digits."""
    h = hashlib.sha256()
    for e in examples:
        h.update(repr((e.ids, e.loss_from)).encode())
    return h.hexdigest()[:16]


def _fingerprint(model_config, stream_examples: dict, weights=None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(model_config, sort_keys=True, default=str).encode())
    h.update(json.dumps(weights).encode())
    for name in sorted(stream_examples):
        h.update(name.encode())
        for e in stream_examples[name]:  # (not examples_digest: caches written before it keep their key)
            h.update(repr((e.ids, e.loss_from)).encode())
    return h.hexdigest()[:16]


def _readable(path: Path, rows: int) -> bool:
    """Whether ``path`` holds a whole cache file of ``rows`` hidden states. A file damaged after it
    was written (truncated, emptied) is logged and computed again: its group recomputes the same
    values. (The files themselves are written whole: a temporary file, then a rename.)"""
    if not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            shape = f.get_slice("hidden").get_shape()
    except Exception as exc:  # safetensors' errors for a damaged header or body, a missing key
        log.warning("reference cache: %s cannot be read (%s); computing it again", path, exc)
        return False
    if len(shape) != 2 or shape[0] != rows:
        log.warning("reference cache: %s holds hidden states of shape %s, its record has %d tokens; computing it "
                    "again", path, shape, rows)
        return False
    return True


def _write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj))


class CacheReference:
    """Reference hidden states computed once by the untrained model and read from disk."""

    def __init__(self, directory: str | Path, objective, stream_examples: dict, *, pad_id: int, device,
                 head_trainable: bool, batch_size: int = 4, rank: int = 0, world_size: int = 1, barrier=None,
                 all_reduce=None, weights: list | None = None, precision: str | None = None):
        from safetensors.torch import load_file, save_file

        self.dir = Path(directory)
        self.device = device
        model_config = getattr(getattr(objective.model, "config", None), "to_dict", dict)()
        # The weights count too: the same config with other weights (another seed, a model directory
        # overwritten in place, an in-memory model) must not reuse the hidden states.
        if weights is None:  # (the trainer passes the digest it took for resume: one pass over the weights)
            weights = weights_digest(objective.model, all_reduce)
        # The model's config and the data, hashed; the weights digest beside it, compared to the
        # rounding of its sums (first_weight_difference: another device sums in another order).
        fp = _fingerprint(model_config, stream_examples)
        # The fingerprint is written before the first hidden state, so that a build stopped part way
        # (killed, out of memory) resumes only with the model and data it began with.
        meta = self.dir / "meta.json"
        if meta.is_file():
            try:
                saved = json.loads(meta.read_text())
            except (ValueError, UnicodeDecodeError) as exc:
                raise ValueError(f"{meta} cannot be read ({exc}): the reference cache's record of the model and "
                                 f"data it was computed from is damaged; delete {self.dir} (it is computed again)") \
                    from None
            if "weights" in saved:
                same = saved.get("fingerprint") == fp and first_weight_difference(saved["weights"], weights) is None
            else:  # written before the weights were stored apart: one hash of everything
                same = saved.get("fingerprint") == _fingerprint(model_config, stream_examples, weights)
            if not same:
                raise ValueError(f"{self.dir} holds a reference cache of another model (config or weights) or data; "
                                 f"delete it or use another output_dir (a run resumed with another model or data is "
                                 f"refused anyway)")
            # (caches written before the precision was stored were computed without mixed precision
            # on one process)
            if saved.get("precision") != precision:
                raise ValueError(f"{self.dir} holds a reference cache computed with mixed_precision "
                                 f"{saved.get('precision')}, this run's is {precision}; delete it or use another "
                                 f"output_dir")
        elif self.dir.is_dir() and any(not p.name.startswith(".") for p in self.dir.iterdir()):
            raise ValueError(f"{self.dir} holds files but no meta.json, the fingerprint of the model and data they "
                             f"were computed from (a build stopped by an older version?); delete it or use another "
                             f"output_dir")
        if barrier is not None:
            barrier()  # every process has checked before the first one writes
        if rank == 0 and not meta.is_file():
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_json(meta, {"fingerprint": fp, "weights": weights, "precision": precision, "complete": False})
        if barrier is not None:
            barrier()
        self.dir.mkdir(parents=True, exist_ok=True)
        was_training = objective.training
        objective.eval()
        head = None
        with torch.no_grad():
            for name, examples in stream_examples.items():
                d = self.dir / name
                d.mkdir(exist_ok=True)
                # Records go through the model in fixed groups (batch_size consecutive records, padded
                # to the group's longest), the same whichever of them a stopped build left missing:
                # another grouping pads to another length, and the hidden states move by an ulp or so
                # (other GEMM shapes), so a resumed run would no longer repeat an uninterrupted one.
                missing = [not _readable(d / f"{i:07d}.safetensors", len(e.ids)) for i, e in enumerate(examples)]
                todo = [range(k, min(k + batch_size, len(examples))) for k in range(0, len(examples), batch_size)
                        if any(missing[k:k + batch_size])]
                # Under FSDP every process must run the same number of forwards: each lists what is
                # missing before any writes (the same list everywhere), and the split is padded.
                if barrier is not None:
                    barrier()
                per = -(-len(todo) // world_size)
                mine = todo[rank::world_size]
                for j in range(per):
                    idx = list(mine[j]) if j < len(mine) else [todo[0][0]]
                    b = collate([examples[i] for i in idx], pad_id, idx).to(device)
                    h, w, bias = objective("hidden", b.input_ids, b.attention_mask, with_head=head is None)
                    if head is None:
                        head = (w, bias)
                    if j >= len(mine):
                        continue
                    for r, i in enumerate(idx):
                        if not missing[i]:
                            continue
                        n = len(examples[i].ids)
                        tmp = d / f".{i:07d}.tmp"
                        save_file({"hidden": h[r, :n].contiguous().cpu()}, str(tmp))
                        os.replace(tmp, d / f"{i:07d}.safetensors")
            if head is None:
                h, w, bias = objective("hidden", *self._dummy(stream_examples, pad_id, device))
                head = (w, bias)
        objective.train(was_training)
        head_file = self.dir / "head.safetensors"
        if head_trainable:
            if rank == 0 and not head_file.is_file():
                t = {"weight": head[0].cpu()}
                if head[1] is not None:
                    t["bias"] = head[1].cpu()
                save_file(t, str(self.dir / ".head.tmp"))
                os.replace(self.dir / ".head.tmp", head_file)
        if barrier is not None:
            barrier()
        if head_trainable:
            t = load_file(str(head_file), device=str(device))
            self.weight, self.bias = t["weight"], t.get("bias")
        else:
            self.weight = self.bias = None
        del head
        if rank == 0:
            _write_json(meta, {**json.loads(meta.read_text()), "complete": True,
                               "streams": {k: len(v) for k, v in stream_examples.items()}})

    @staticmethod
    def _dummy(stream_examples, pad_id, device):
        ex = next(iter(stream_examples.values()))[:1]
        b = collate(ex, pad_id).to(device)
        return b.input_ids, b.attention_mask

    def hidden(self, stream: str, batch, length: int):
        from safetensors.torch import load_file

        hs = [load_file(str(self.dir / stream / f"{i:07d}.safetensors"))["hidden"] for i in batch.index]
        out = hs[0].new_zeros((len(hs), length, hs[0].shape[-1]))
        for r, h in enumerate(hs):
            out[r, :h.shape[0]] = h
        return out.to(self.device), self.weight, self.bias
