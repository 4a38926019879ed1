"""Atomic checkpoints with everything an exact resume needs.

``<output_dir>/checkpoint/state.pt`` holds the trainable parameters, the optimizer state, the step,
every process's RNG states, the data position of every stream and the evaluation results so far.
It is written to ``state.pt.tmp`` and renamed over the old file (``os.replace`` is atomic on
POSIX), so a crash mid-write leaves the last good checkpoint intact. Under FSDP the full
(unsharded) state is gathered to rank 0, which writes; loading broadcasts from rank 0.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import torch

STATE = "state.pt"


def rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        s["numpy"] = np.random.get_state()
    except ImportError:  # pragma: no cover
        pass
    return s


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state(s["cuda"])
    if "numpy" in s:
        import numpy as np

        np.random.set_state(s["numpy"])


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)


def write_text(path: str | Path, text: str) -> None:
    """``path`` holds ``text`` whole or what it held before: a temporary file beside it, then a rename."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save(directory: str | Path, objective, optimizer, *, step: int, cursors: list[int], extra: dict, dist) -> Path:
    """Write the checkpoint (collective under FSDP: every process must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    model_sd = get_model_state_dict(objective, options=_options(ignore_frozen_params=True))
    optim_sd = get_optimizer_state_dict(objective, optimizer, options=_options())
    rngs = dist.gather_objects(rng_state())
    directory = Path(directory)
    path = directory / STATE
    if dist.main:
        directory.mkdir(parents=True, exist_ok=True)
        tmp = directory / (STATE + ".tmp")
        with open(tmp, "wb") as f:
            torch.save({"model": model_sd, "optimizer": optim_sd, "step": step, "rng": rngs, "cursors": cursors,
                        "extra": extra, "world_size": dist.world_size}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    dist.barrier()
    return path


KEYS = ("model", "optimizer", "step", "rng", "cursors", "extra")


def read(path: str | Path) -> dict:
    """The contents of a ``state.pt``; a file that cannot be read (truncated, damaged, not ours)
    raises ValueError naming it."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises RuntimeError, EOFError, UnpicklingError, ... for a bad file
        msg = " ".join(str(e).split())
        raise ValueError(f"resume: cannot read checkpoint {path} ({type(e).__name__}: {msg[:160]}); the file is "
                         f"damaged or truncated: restore it, or start over in another output_dir (or delete that "
                         f"checkpoint folder)") from None
    missing = [k for k in KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"resume: {path} is not a surgery checkpoint (no {', '.join(missing)}); restore it, or "
                         f"start over in another output_dir (or delete that checkpoint folder)")
    return state


def load(directory: str | Path, objective, optimizer, *, dist, check=None) -> dict:
    """Restore parameters, optimizer and RNG; return ``{"step", "cursors", "extra"}``.
    Every saved parameter's shape and dtype is compared with the model's (e.g. another LoRA rank
    or model.dtype); then ``check(state)`` runs (it raises to refuse the checkpoint), before
    anything is restored."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    path = Path(directory) / STATE
    state = read(path)
    if state.get("world_size", 1) != dist.world_size:
        raise ValueError(f"{path} was written by {state['world_size']} process(es); resume with the same world size")
    # Full (unsharded) shapes: under FSDP a parameter is a DTensor whose shape is the global one.
    params = dict(objective.named_parameters())
    pairs = [(n, t, params[n]) for n, t in state["model"].items() if n in params and torch.is_tensor(t)]
    bad = [(n, tuple(t.shape), tuple(p.shape)) for n, t, p in pairs if tuple(t.shape) != tuple(p.shape)]
    if bad:
        n, a, b = bad[0]
        raise ValueError(f"resume: {path} holds {n} with shape {list(a)}, this run's is {list(b)} ({len(bad)} "
                         f"parameter(s) differ: another model or LoRA setting such as lora.r); resume with the "
                         f"checkpoint's settings, or start a new run in another output_dir")
    cast = [(n, t.dtype, p.dtype) for n, t, p in pairs if t.dtype != p.dtype]
    if cast:
        # Loading would round (float32 -> bfloat16) silently and the run would not continue exactly.
        n, a, b = cast[0]
        raise ValueError(f"resume: {path} holds {n} in {a}, this run's model is {b} ({len(cast)} parameter(s) "
                         f"differ: another model.dtype); resume with the checkpoint's model.dtype")
    if check is not None:
        check(state)
    set_model_state_dict(objective, state["model"], options=_options(strict=False))
    set_optimizer_state_dict(objective, optimizer, state["optimizer"], options=_options())
    set_rng_state(state["rng"][dist.rank])
    return {"step": state["step"], "cursors": state["cursors"], "extra": state["extra"]}


def exists(directory: str | Path) -> bool:
    return (Path(directory) / STATE).is_file()
