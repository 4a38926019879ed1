"""A Hugging Face causal-LM training step with ``labels=``: plain vs ``surgery_kernels.hf.patch``.

One step = ``model(input_ids, labels=labels).loss.backward()`` on a randomly initialized
Llama-architecture model; nothing else in the user's code changes between the two rows.

- CPU (default): H 256, 2 layers, V 32000 (Llama-2 vocabulary), batch 2 x 512 tokens, float32.
  Each variant runs in its own process; peak = growth of the process's max RSS during the
  steps (warm-up included: max RSS is a high-water mark) over its level after building the model.
- GPU (``--gpu``): SmolLM2-135M shape (H 576, 30 layers, V 49152), bf16 weights, batch 4 x 2048
  tokens; peak = ``torch.cuda.max_memory_allocated`` during the steps minus the memory held before.

    python benchmarks/hf_patch.py            # CPU
    python benchmarks/hf_patch.py --gpu      # CUDA

Prints one table (variant, backend, median ms per step, peak MiB, loss) headed by the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPES = {
    "cpu": dict(hidden=256, layers=2, heads=4, vocab=32000, batch=2, tokens=512, dtype="float32"),
    "gpu": dict(hidden=576, layers=30, heads=9, vocab=49152, batch=4, tokens=2048, dtype="bfloat16"),
}


def _model(shape, device):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=4 * shape["hidden"],
                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                      num_key_value_heads=shape["heads"], max_position_embeddings=shape["tokens"])
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    return model.to(getattr(torch, shape["dtype"]))


def run_variant(variant: str, device: str, steps: int, backend: str) -> dict:
    """Time ``steps`` training steps (after one warm-up) of one variant in this process."""
    from surgery_kernels import hf

    shape = SHAPES["gpu" if device == "cuda" else "cpu"]
    model = _model(shape, device)
    if variant == "patched":
        hf.patch(model, backend=backend)
    g = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, shape["vocab"], (shape["batch"], shape["tokens"]), device=device, generator=g)

    def step():
        model.zero_grad(set_to_none=True)
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        return loss.detach()

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    loss = step()  # warm-up: allocator, lazy init, extension load
    model.zero_grad(set_to_none=True)
    times = []
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    used = getattr(model, hf._ATTR).backend if variant == "patched" else "-"
    if used == "auto":
        from surgery_kernels.backends import resolve

        used = f"auto={resolve('auto', device)}"
    return dict(variant=variant, backend=used, device=device, shape=shape, ms=1e3 * statistics.median(times),
                peak_mib=peak / 2**20, loss=loss.item(), steps=steps)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backend", default="auto")
    p.add_argument("--variant", choices=["plain", "patched"], help=argparse.SUPPRESS)  # child process
    p.add_argument("--json", type=Path, help="also write the rows here")
    args = p.parse_args(argv)
    device = "cuda" if args.gpu else "cpu"
    if args.variant:
        print(json.dumps(run_variant(args.variant, device, args.steps, args.backend)))
        return
    if device == "cuda":
        rows = []
        for v in ("plain", "patched"):
            rows.append(run_variant(v, device, args.steps, args.backend))
            torch.cuda.empty_cache()
        machine = torch.cuda.get_device_name()
    else:
        # A process per variant: max RSS never goes down, so the second variant would hide behind the first.
        rows = []
        for v in ("plain", "patched"):
            out = subprocess.run([sys.executable, __file__, "--variant", v, "--steps", str(args.steps), "--backend",
                                  args.backend], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    s = rows[0]["shape"]
    print(f"# {machine}; torch {torch.__version__}; Llama-shape H {s['hidden']}, {s['layers']} layers, "
          f"V {s['vocab']}, batch {s['batch']} x {s['tokens']} tokens, {s['dtype']}; {args.steps} steps")
    print(f"{'variant':<8} {'backend':<12} {'ms/step':>9} {'peak MiB':>9} {'loss':>9}")
    for r in rows:
        print(f"{r['variant']:<8} {r['backend']:<12} {r['ms']:9.1f} {r['peak_mib']:9.1f} {r['loss']:9.4f}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
