"""One LLM Surgery training step, 4 streams: the fused losses vs the Hugging Face ``labels=`` path.

- ``fused``: the trainer's own step (``Surgery._train_step``): one forward of all streams through the
  base model, one signed ``linear_cross_entropy`` for the 3 CE streams, one ``linear_kl_div`` for
  the retain stream; no logits.
- ``fused-mb1``: the same step with ``train.micro_batch_size=1``: one forward/backward pass per row
  (here: per stream), so the activations of one row at a time (``hf`` runs a forward per stream
  but one backward, so it holds all of them, or with gradient checkpointing their layer inputs).
- ``hf``: what the authors' code does: per stream ``model(input_ids, attention_mask, labels=...)``
  (its ``.loss`` is the mean CE over materialized logits) and, for the retain stream, the
  ``.logits`` of the model and of the reference turned into the token-level KL; the same signed,
  weighted total; one backward; the same clip and AdamW step.

Streams: problematic (ascent 0.1), outdated (ascent 0.1), updated (descent 2.0), retain (KL 0.5),
batch 1 each, every record ``--length`` tokens of random words.

CPU (default): a small Llama with a Llama-2 vocabulary (V = 32000), full fine-tuning, reference =
frozen copy, float32. GPU (``--gpu``): Llama-2-7B shape (H 4096, 32 layers, V 32000) with random
weights made on the GPU, bf16, LoRA r=16 on q/k/v/o/gate/up/down, gradient checkpointing,
reference = adapters off.

All variants run in one process on one model: the warm-up step of each starts from the same
parameters, optimizer state and records (their first-step losses are printed and must agree), then
the timed steps alternate between the variants so changes in machine load hit all alike. Peak
memory of a step is measured over what is held just before it (weights, reference, optimizer
state): ``torch.cuda.max_memory_allocated`` on a GPU; on a CPU the resident size sampled every
millisecond, with glibc told to return freed blocks at once (``MALLOC_MMAP_THRESHOLD_``).

    python benchmarks/train_step.py                     # CPU table
    python benchmarks/train_step.py --gpu --json out.json   # the H100 row (about a minute)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STREAMS = [("problematic", "ascent", 0.1), ("outdated", "ascent", 0.1), ("updated", "descent", 2.0),
           ("retain", "kl", 0.5)]


def _words(v: int) -> list[str]:
    from surgery.testing import SPECIALS

    return [f"w{i}" for i in range(v - len(SPECIALS))]


def _records(words, n: int, length: int, seed: int):
    import random

    rng = random.Random(seed)
    # length - 1 words: the tokenizer adds <s>.
    return [{"text": " ".join(rng.choice(words) for _ in range(length - 1))} for _ in range(n)]


def _build(args, device: str):
    from surgery import Stream, Surgery
    from surgery.testing import word_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    words = _words(args.vocab)
    tok = word_tokenizer(words)
    cfg = AutoConfig.for_model("llama", vocab_size=len(tok), hidden_size=args.hidden,
                               intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                               num_attention_heads=args.heads, num_key_value_heads=args.heads,
                               max_position_embeddings=max(4096, args.length), tie_word_embeddings=False,
                               pad_token_id=0)
    dtype = torch.bfloat16 if args.gpu else torch.float32
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    streams = [Stream(n, _records(words, 4, args.length, i), loss, w) for i, (n, loss, w) in enumerate(STREAMS)]
    lora = {"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                      "down_proj"]} if args.gpu else None
    run = Surgery(model=model, tokenizer=tok, streams=streams, reference="adapter" if args.gpu else "copy", lora=lora,
                  train={"steps": 10**6, "lr": 2e-4, "batch_size": 1, "max_length": args.length, "progress": False,
                         "gradient_checkpointing": args.gpu, "device": device, "backend": args.backend})
    run._seed()
    run._setup()
    return run


def _hf_step(run):
    """The labels= path on the same batch, loss and optimizer as the trainer's step."""
    from surgery.data import IGNORE
    from surgery.modeling import is_peft

    (p,), rows = run._passes()  # micro_batch_size is None outside the fused-mb1 step: one pass
    b, kb, n_ce = p.batch, p.kl_batch, p.n_ce
    model = run.model
    model.train()
    total = 0.0
    out = {}
    for s, (a, z) in zip(run.streams, rows):
        # KL rows live in kb when the trainer split the step into CE and KL batches.
        src, a, z = (b, a, z) if kb is None or z <= n_ce else (kb, a - n_ce, z - n_ce)
        ids, att, tgt = src.input_ids[a:z], src.attention_mask[a:z], src.target[a:z]
        if s.loss != "kl":
            # HF shifts labels itself: label at t is the token at t, predicted from t - 1.
            labels = torch.full_like(tgt, IGNORE)
            labels[:, 1:] = tgt[:, :-1]
            ce = model(input_ids=ids, attention_mask=att, labels=labels).loss
            total = total + (-s.weight if s.loss == "ascent" else s.weight) * ce
            out[s.name] = float(ce.detach())
        else:
            logq = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits.float(), -1)
            with torch.no_grad():
                if is_peft(model):
                    with model.disable_adapter():
                        ref_logits = model(input_ids=ids, attention_mask=att).logits
                else:
                    ref_logits = run._reference.model(input_ids=ids, attention_mask=att).logits
                logp = torch.log_softmax(ref_logits.float(), -1)
            m = tgt != IGNORE
            kl = (logp.exp() * (logp - logq)).sum(-1)[m].mean()
            total = total + s.weight * kl
            out[s.name] = float(kl.detach())
    total.backward()
    params = [p for g in run.optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, run.cfg.clip)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    out["total"] = float(total.detach())
    return out


class _RssPeak:
    """Peak resident memory of this process, sampled every millisecond by a thread (main() runs the
    benchmark with MALLOC_MMAP_THRESHOLD_ set so that freed tensors leave the RSS at once)."""

    def __init__(self):
        import threading

        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.peak = 0

    @staticmethod
    def now() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.now())
            time.sleep(0.001)

    def start(self) -> int:
        base = self.now()
        self._thread.start()
        return base

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, self.now())


def _sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _mem_start(device):
    if device == "none":
        return 0, None
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated(), None
    rss = _RssPeak()
    return rss.start(), rss


def _mem_peak(device, tracker) -> int:
    if device == "none":
        return 0
    return torch.cuda.max_memory_allocated() if device.startswith("cuda") else tracker.stop()


def measure(args, run, variants) -> list[dict]:
    """Warm-up: each variant's first step from the same parameters, optimizer state and records
    (their losses must agree). Then the timed steps alternate between the variants, so a change in
    machine load hits both alike. Peak memory per step is over the memory held just before it
    (weights, reference, optimizer state; gradients are freed between steps)."""
    device = args.device
    def fused(micro_batch_size):
        run.cfg.micro_batch_size = micro_batch_size
        try:
            return run._train_step()
        finally:
            run.cfg.micro_batch_size = None

    steps = {"fused": lambda: fused(None), "fused-mb1": lambda: fused(1), "hf": lambda: _hf_step(run)}
    start = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
    losses = {}
    for v in variants:
        with torch.no_grad():
            for n, p in run.model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        run.optimizer.state.clear()
        for smp in run._samplers:
            smp.cursor = 0
        for _ in range(args.warmup):
            m = steps[v]()
            losses.setdefault(v, {k.replace("loss/", ""): round(float(x), 4) for k, x in m.items()
                                  if k.startswith("loss/") or k == "total" or k in {s[0] for s in STREAMS}})
    del start
    times = {v: [] for v in variants}
    peaks = {v: 0 for v in variants}
    for _ in range(args.steps):
        for v in variants:
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
            _sync(device)
            mem = "none" if args.time_only else device
            base, tracker = _mem_start(mem)
            t0 = time.perf_counter()
            steps[v]()
            _sync(device)
            times[v].append(time.perf_counter() - t0)
            peaks[v] = max(peaks[v], _mem_peak(mem, tracker) - base)
    tokens = args.length * len(STREAMS)
    return [{"variant": v, "median_s": statistics.median(times[v]), "min_s": min(times[v]), "times_s": times[v],
             "peak_extra_mib": peaks[v] / 2**20, "tokens": tokens, "first_step_losses": losses.get(v)}
            for v in variants]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="Llama-2-7B shape on CUDA, bf16, LoRA, length 4096")
    p.add_argument("--variants", default="fused,hf", help="comma-separated: fused, fused-mb1, hf")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 3)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--hidden", type=int)
    p.add_argument("--intermediate", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--length", type=int)
    p.add_argument("--threads", type=int, default=None, help="torch threads on CPU")
    p.add_argument("--backend", default="auto", help="surgery_kernels backend of the fused variant")
    p.add_argument("--json", help="write the rows here")
    p.add_argument("--time-only", action="store_true",
                   help="CPU: no memory sampling and default malloc (mmap for every large block slows the "
                        "variant that allocates more, so time and memory are best measured in separate runs)")
    p.add_argument("--device", help="default: cuda with --gpu, else cpu (--gpu --device cpu with small sizes "
                                    "smoke-tests the GPU recipe on a CPU)")
    args = p.parse_args(argv)
    unknown = set(args.variants.split(",")) - {"fused", "fused-mb1", "hf"}
    if unknown:
        p.error(f"--variants: unknown {sorted(unknown)}; choose from fused, fused-mb1, hf")
    big = dict(hidden=4096, intermediate=11008, layers=32, heads=32, length=4096)
    small = dict(hidden=512, intermediate=1376, layers=4, heads=8, length=256)
    for k, v in (big if args.gpu else small).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.steps = args.steps or 3
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.time_only and os.environ.get("MALLOC_MMAP_THRESHOLD_") is None:
        # Large blocks through mmap, so a freed tensor leaves the resident size at once and the
        # sampled RSS follows live memory. glibc reads this at start-up: run again with it set.
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
        return subprocess.run([sys.executable, __file__] + list(argv if argv is not None else sys.argv[1:]),
                              env=env).returncode
    run = _build(args, args.device)
    rows = measure(args, run, args.variants.split(","))
    if args.device.startswith("cuda"):
        machine = torch.cuda.get_device_name()
    else:
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    from surgery_kernels.backends import resolve

    backend = resolve(args.backend, torch.device(args.device).type)
    shape = (f"fused backend {backend!r}; Llama H={args.hidden} layers={args.layers} V={args.vocab}, 4 streams x {args.length} tokens, "
             + ("bf16, LoRA r=16, gradient checkpointing, reference=adapter" if args.gpu else
                "float32, full fine-tuning, reference=copy"))
    print(f"# one surgery step — {machine} — torch {torch.__version__}")
    print(f"# {shape}; median of {args.steps} steps per variant, alternating, after {args.warmup} warm-up")
    mem = not (args.time_only and args.device == "cpu")
    print(f"{'variant':<10} {'step s':>9} {'tokens/s':>10} {'peak extra MiB':>15}  first-step losses")
    for r in rows:
        peak = f"{r['peak_extra_mib']:>15.0f}" if mem else f"{'-':>15}"
        print(f"{r['variant']:<10} {r['median_s']:>9.3f} {r['tokens'] / r['median_s']:>10.0f} {peak}  "
              f"{r['first_step_losses']}")
    f = rows[0]
    for h in rows[1:]:
        ratio = f", peak memory x{h['peak_extra_mib'] / max(f['peak_extra_mib'], 1e-9):.2f}" if mem else ""
        print(f"# {h['variant']} / {f['variant']}: time x{h['median_s'] / f['median_s']:.2f}{ratio}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "shape": shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
