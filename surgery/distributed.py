"""Process-group setup and FSDP (``fully_shard``) for runs under ``torchrun``.

One process per device; world size 1 (no ``torchrun``) needs none of this. Under FSDP every
transformer block is its own shard group and the ``SurgeryObjective`` is the root, so the head
weight is gathered while the objective's ``forward`` runs — where the losses read it.

Gradients: each process's loss is normalized by the *global* token counts and multiplied by the
world size before backward, so FSDP's averaging reduce-scatter yields the gradient of the global
objective — the same as one process holding the whole global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def gather_objects(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def init() -> Dist:
    """Join the process group if launched by torchrun with WORLD_SIZE > 1 (nccl on GPUs, else gloo)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
    return Dist(dist.get_rank(), dist.get_world_size(), local)


def shutdown() -> None:
    """Leave the process group, if any, before the interpreter exits: a gloo group torn down by the
    interpreter's exit races its own threads ('terminate called without an active exception',
    seen on a CPU run of 2 ranks). No barrier: a run ends with one, and on an error path a rank
    must not wait for a peer that may never come."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: modules whose class the model lists in ``_no_split_modules``."""
    from .modeling import unwrap

    names = set(getattr(unwrap(model), "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ValueError(f"cannot find the transformer blocks of {type(unwrap(model)).__name__} to shard "
                         f"(_no_split_modules = {sorted(names)})")
    return blocks


def shard_objective(objective: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """``fully_shard`` every transformer block, then the objective as the root."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else \
        MixedPrecisionPolicy()
    for block in _blocks(objective.model):
        fully_shard(block, mp_policy=mp)
    fully_shard(objective, mp_policy=mp)
    return objective


def shard_frozen(model: nn.Module, param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard a frozen reference copy's blocks; embeddings and head stay whole on every process so the
    head weight can be read outside a forward. ``param_dtype`` (mixed precision): its parameters are
    stored in that dtype, which is what ``shard_objective``'s policy casts the trained model's to for
    every forward — the reference then computes as the trained model does, and their KL starts at 0."""
    from torch.distributed.fsdp import fully_shard

    if param_dtype is not None:
        for p in model.parameters():  # parameters only: the policy leaves buffers (rotary) as they are
            p.data = p.data.to(param_dtype)
    for block in _blocks(model):
        fully_shard(block)
    return model
