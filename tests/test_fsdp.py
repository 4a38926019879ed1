"""FSDP (``fully_shard``) on the CPU: ``torchrun`` with 2 gloo ranks, batch 1 each, through the real CLI,
against one process with batch 2 — the same records, so the same loss trajectory and parameters
within float tolerance (only the padding length of each rank's batch differs)."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from surgery import load_config
from surgery.testing import all_words, fact_streams, tiny_llama, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _config(tmp_path: Path, tok, *, reference: str, batch_size: int, out: str, micro_batch_size=None,
            mean_over="tokens") -> Path:
    import yaml

    u, p, r, q = fact_streams()
    for name, recs in (("u", u), ("p", p), ("r", r), ("q", q)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in recs))
    cfg = {
        "model": {"config": tiny_llama(len(tok)), "tokenizer": "tok"},
        "streams": [{"name": "unlearn", "data": "u.jsonl", "loss": "ascent", "weight": 0.1},
                    {"name": "update", "data": "p.jsonl", "loss": "descent", "weight": 2.0},
                    {"name": "retain", "data": "r.jsonl", "loss": "kl", "weight": 0.5}],
        "eval": [{"name": "qa", "data": "q.jsonl"}, {"name": "ppl", "data": "r.jsonl"}],
        "reference": reference,
        "train": {"steps": 4, "lr": 1e-2, "batch_size": batch_size, "progress": False, "device": "cpu",
                  "micro_batch_size": micro_batch_size, "mean_over": mean_over},
        "output_dir": out,
    }
    path = tmp_path / f"{out}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("reference,micro_batch_size,mean_over", [("copy", None, "tokens"), ("cache", None, "tokens"),
                                                                 ("copy", 2, "tokens"), ("copy", None, "records")])
def test_fsdp_two_ranks_match_one(tmp_path, reference, micro_batch_size, mean_over):
    """micro_batch_size 2: each rank's 3 rows (one per stream) in two forward/backward passes per
    step, [unlearn, update] and [retain], each with its own forward of the sharded reference copy
    (sharded gradients add up over the passes). mean_over records: the records counted over ranks."""
    tok = word_tokenizer(all_words(), save_dir=tmp_path / "tok")
    two = _config(tmp_path, tok, reference=reference, batch_size=1, out="two", micro_batch_size=micro_batch_size,
                  mean_over=mean_over)
    one = _config(tmp_path, tok, reference=reference, batch_size=2, out="one", mean_over=mean_over)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    rc, _, err = _torchrun(["-m", "surgery.cli", "train", str(two)], env, tmp_path)
    assert rc == 0, err[-4000:]

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        from surgery import from_config

        single = from_config(load_config(one))
        single_summary = single.run()
    finally:
        torch.set_num_threads(n)
    dist_lines = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert len(dist_lines) == 4
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Evaluation on the sharded model (after) and the unsharded one (before) agree with one process.
    for when in ("before", "after"):
        assert summary[when]["qa"]["accuracy"] == single_summary[when]["qa"]["accuracy"]
        assert summary[when]["ppl"]["perplexity"] == pytest.approx(single_summary[when]["ppl"]["perplexity"], rel=1e-4)
    for a, b in zip(single.history, dist_lines):
        for k in ("loss/total", "loss/unlearn", "loss/update", "loss/retain", "grad_norm"):
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-6), (a["step"], k)
        assert a["tokens"] == b["tokens"]
    assert dist_lines[-1]["loss/retain"] > 0
    # final/ written by rank 0 from the gathered FSDP state: same weights as the single process.
    from transformers import AutoModelForCausalLM

    back = AutoModelForCausalLM.from_pretrained(tmp_path / "two" / "final")
    ref = dict(single.model.named_parameters())
    for name, p in back.named_parameters():
        assert torch.allclose(p, ref[name], rtol=1e-4, atol=1e-5), name


WORKER = """
import os, signal, sys
import surgery.trainer as trainer
from surgery import cli

init = trainer.Surgery.__init__

def with_signal(self, *args, **kwargs):
    # on_step runs on rank 0 only: SIGTERM there alone, during step 2.
    kwargs["on_step"] = lambda m: m["step"] == 2 and os.kill(os.getpid(), signal.SIGTERM)
    init(self, *args, **kwargs)

trainer.Surgery.__init__ = with_signal
sys.exit(cli.main())  # the surgery command itself, arguments from sys.argv
"""


def _torchrun(args, env, cwd, timeout=180):
    """torchrun with 2 ranks; on a timeout it gets SIGTERM first, so it stops its workers (they
    run in sessions of their own and would outlive a SIGKILL of torchrun)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] + args
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        pytest.fail(f"torchrun {args} timed out:\n{err[-4000:]}")
    return proc.returncode, out, err


def test_fsdp_sigterm_on_one_rank_stops_all_after_the_same_step(tmp_path):
    """surgery train under torchrun, SIGTERM on rank 0 only during step 2: both ranks stop after
    step 2 (they agree through a collective, so the checkpoint's gathers match), save the
    checkpoint, say so, and end by SIGTERM; --resume then ends where an uninterrupted two-rank run
    ends."""
    tok = word_tokenizer(all_words(), save_dir=tmp_path / "tok")
    cut = _config(tmp_path, tok, reference="copy", batch_size=1, out="cut")
    whole = _config(tmp_path, tok, reference="copy", batch_size=1, out="whole")
    (tmp_path / "worker.py").write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    rc, out, err = _torchrun([str(tmp_path / "worker.py"), "train", str(cut)], env, tmp_path)
    assert rc != 0
    assert err.count("surgery: interrupted (SIGTERM) after step 2: checkpoint saved") == 2, err[-4000:]
    assert err.count("exitcode  : -15") == 2  # each rank ended by the signal, after its message
    assert torch.load(tmp_path / "cut" / "checkpoint" / "state.pt", weights_only=False)["step"] == 2
    for args in ([str(cut), "--resume"], [str(whole)]):
        rc, out, err = _torchrun(["-m", "surgery.cli", "train"] + args, env, tmp_path)
        assert rc == 0, err[-4000:]
    lines = {name: [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
             for name in ("cut", "whole")}
    assert [m["step"] for m in lines["cut"]] == [1, 2, 3, 4]
    for a, b in zip(lines["cut"], lines["whole"]):
        for k in ("loss/total", "loss/unlearn", "loss/update", "loss/retain", "grad_norm"):
            assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), (a["step"], k)


FP16_WORKER = """
import functools, os, sys
import torch, torch.distributed as dist
from surgery import cli

# A small first scale (no overflow of its own in this tiny model), and an inf planted in rank 1's
# gradient shard only, at step 2.
scaler = torch.amp.GradScaler
torch.amp.GradScaler = functools.partial(scaler, init_scale=2.0 ** 4)
unscale, calls = scaler.unscale_, []


def unscale_(self, optimizer):
    calls.append(1)
    if len(calls) == 2 and dist.get_rank() == 1:
        grads = [p.grad.to_local() for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        next(g for g in grads if g.numel()).view(-1)[0] = float("inf")
    return unscale(self, optimizer)


scaler.unscale_ = unscale_
sys.exit(cli.main())
"""


def test_fsdp_float16_scales_the_loss_and_skips_on_every_rank(tmp_path):
    """mixed_precision float16 under torchrun: torch.amp.GradScaler over the float32 DTensor
    gradient shards. An overflow in rank 1's shard alone makes rank 0 skip that step too and lower
    its scale (DTensor reduces the overflow flag over the ranks, by max), so the shards stay one model.
    The frozen reference copy computes in float16 as the trained model does: their KL is 0 at the
    first step (a float32 reference would give the distance of float16 compute to float32)."""
    import yaml

    tok = word_tokenizer(all_words(), save_dir=tmp_path / "tok")
    path = _config(tmp_path, tok, reference="copy", batch_size=1, out="fp16")
    cfg = yaml.safe_load(path.read_text())
    cfg["train"]["mixed_precision"] = "float16"
    path.write_text(yaml.safe_dump(cfg))
    (tmp_path / "worker.py").write_text(FP16_WORKER)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1",
               TOKENIZERS_PARALLELISM="false")
    rc, out, err = _torchrun([str(tmp_path / "worker.py"), "train", str(path)], env, tmp_path)
    assert rc == 0, err[-4000:]
    lines = [json.loads(x) for x in (tmp_path / "fp16" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["skipped"], m["loss_scale"]) for m in lines] == [(False, 16.0), (True, 16.0), (False, 8.0),
                                                                (False, 8.0)]
    assert lines[1]["grad_norm"] is None and all(m["grad_norm"] > 0 for m in lines if not m["skipped"])
    assert all(math.isfinite(m["loss/total"]) for m in lines)
    assert lines[0]["loss/retain"] == 0.0, lines[0]["loss/retain"]
    assert "without loss scaling" not in err


DDP_WORKER = """
import gc, os, sys
import torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from surgery_kernels import hf
from surgery.testing import tiny_llama
from surgery.modeling import load_model

dist.init_process_group("gloo")
rank = dist.get_rank()
make = lambda seed: hf.patch(load_model(config=tiny_llama(50), dtype="float32", seed=seed), backend="torch")
reference = make(1)
g = torch.Generator().manual_seed(rank)  # each rank its own batch
ids = torch.randint(3, 50, (2, 9), generator=g)
weights = torch.tensor([1.0, -0.5])
worst = 0.0
# The head is untied (tiny_llama): with find_unused_parameters DDP must still find it, although
# token_kl uses it after the forward.
for find_unused in (False, True):
    model, local = make(0), make(0)
    ddp = DDP(model, find_unused_parameters=find_unused)
    for m in (ddp, local):  # an NPO-like sequence term and a retain KL, through DDP and locally
        loss = (hf.token_nll(m, input_ids=ids, labels=ids).sum(-1) * weights).sum()
        (loss + hf.token_kl(m, reference, input_ids=ids).sum()).backward()
    for (n, p), q in zip(model.named_parameters(), local.parameters()):
        mean = q.grad.clone()
        dist.all_reduce(mean)
        mean /= dist.get_world_size()
        worst = max(worst, ((p.grad - mean).norm() / mean.norm().clamp_min(1e-30)).item())
    del ddp
sys.stdout.write(f"rank {rank} worst {worst:.3e}\\n")
sys.stdout.flush()
gc.collect()  # the DDP objects before the process group (gloo aborted at exit otherwise)
dist.destroy_process_group()
os._exit(0)  # no interpreter teardown either (as surgery.cli does under torchrun)
"""


def test_token_nll_under_ddp_averages_gradients(tmp_path):
    """hf.token_nll and hf.token_kl on a DDP model go through DDP's forward, so the backward
    averages the gradients over the ranks (each rank's equal to the mean of the ranks' local
    gradients)."""
    worst, out = _worst_per_rank(tmp_path, "ddp.py", DDP_WORKER)
    assert set(worst) == {0, 1} and max(worst.values()) < 1e-5, out


def _worst_per_rank(tmp_path, name: str, source: str):
    """Run a 2-rank worker script that prints "rank R worst E": ({rank: E}, its stdout)."""
    (tmp_path / name).write_text(source)
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    rc, out, err = _torchrun([str(tmp_path / name)], env, tmp_path)
    assert rc == 0, err[-4000:]
    # The two ranks print concurrently: their lines may run together.
    return {int(r): float(w) for r, w in re.findall(r"rank (\d) worst (\d\.\d+e[+-]\d+)", out)}, out


FSDP2_HEAD_WORKER = """
import os, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from surgery_kernels import hf
from surgery.testing import tiny_llama
from surgery.modeling import load_model

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
make = lambda seed: hf.patch(load_model(config=tiny_llama(50), dtype="float32", seed=seed), backend="torch")


def shard(m):  # every block, the (untied) head as a unit of its own, then the root
    for block in m.model.layers:
        fully_shard(block)
    fully_shard(m.lm_head)
    fully_shard(m)
    return m


model, local, reference, local_ref = shard(make(0)), make(0), shard(make(1)), make(1)
g = torch.Generator().manual_seed(rank)  # each rank its own batch
ids = torch.randint(3, 50, (2, 9), generator=g)
weights = torch.tensor([1.0, -0.5])
worst, lr = 0.0, 0.5
for step in range(2):
    for m, ref in ((model, reference), (local, local_ref)):
        # the patched mean CE, an NPO-like sequence term and a retain KL to a no_grad reference
        loss = m(input_ids=ids, labels=ids).loss + (hf.token_nll(m, input_ids=ids, labels=ids).sum(-1) * weights).sum()
        (loss + hf.token_kl(m, ref, input_ids=ids).sum()).backward()
    # the reference's head was resharded after its no_grad forwards, the model's after the backward
    assert isinstance(reference.lm_head.weight, DTensor) and isinstance(model.lm_head.weight, DTensor)
    with torch.no_grad():
        for (n, p), q in zip(model.named_parameters(), local.parameters()):
            mean = q.grad.clone()
            dist.all_reduce(mean)
            mean /= world
            got = p.grad.full_tensor()
            worst = max(worst, ((got - mean).norm() / mean.norm().clamp_min(1e-30)).item())
            p -= lr * p.grad  # the same SGD step on the shard and on the whole parameter
            q -= lr * mean
            p.grad = q.grad = None
try:  # with gradients the weight would be freed before the caller could use it: refused
    hf.head_inputs(model, input_ids=ids)
    raise AssertionError("head_inputs with gradients on a resharded head was not refused")
except NotImplementedError as e:
    assert "reshard_after_forward=False" in str(e)
with torch.no_grad():  # a snapshot under no_grad: the whole weight, the head resharded after it
    snap = hf.head_inputs(model, input_ids=ids).weight
    assert not isinstance(snap, DTensor) and isinstance(model.lm_head.weight, DTensor)
    worst = max(worst, ((snap - local.lm_head.weight).norm() / local.lm_head.weight.norm()).item())
sys.stdout.write(f"rank {rank} worst {worst:.3e}\\n")
sys.stdout.flush()
dist.destroy_process_group()
os._exit(0)
"""


def test_patched_model_with_the_head_as_its_own_fsdp2_unit(tmp_path):
    """fully_shard(model.lm_head) reshards the head after its forward, before the patched loss,
    token_nll, token_kl and head_inputs read its weight: they all-gather it again, the backward
    reduce-scatters its gradient (two SGD steps match one process per rank with the ranks'
    gradients averaged), and a no_grad call (the reference, a head_inputs snapshot) reshards it."""
    worst, out = _worst_per_rank(tmp_path, "fsdp2.py", FSDP2_HEAD_WORKER)
    assert set(worst) == {0, 1} and max(worst.values()) < 1e-5, out
