"""One LLM Surgery training step, 4 streams: the fused losses vs the Hugging Face ``labels=`` path.

- ``fused``: the trainer's own step (``Surgery._train_step``): one forward of all streams through the
  base model, one signed ``linear_cross_entropy`` for the 3 CE streams, one ``linear_kl_div`` for
  the retain stream; no logits.
- ``hf``: what the authors' code does: per stream ``model(input_ids, attention_mask, labels=...)``
  (its ``.loss`` is the mean CE over materialized logits) and, for the retain stream, the
  ``.logits`` of the model and of the reference turned into the token-level KL; the same signed,
  weighted total; one backward; the same clip and AdamW step.

Streams: problematic (ascent 0.1), outdated (ascent 0.1), updated (descent 2.0), retain (KL 0.5),
batch 1 each, every record ``--length`` tokens of random words.

CPU (default): a small Llama with a Llama-2 vocabulary (V = 32000), full fine-tuning, reference =
frozen copy, float32. Each variant runs in its own process (glibc told to return freed blocks at
once); peak memory is the highest resident size sampled during the timed steps minus the size
after the warm-up step (weights, reference copy and optimizer state are in the baseline).

    python benchmarks/train_step.py                     # CPU table
    python benchmarks/train_step.py --gpu               # Llama-2-7B shape, bf16, LoRA, length 4096

GPU (``--gpu``): Llama-2-7B shape (H 4096, 32 layers, V 32000) with random weights made on the GPU,
bf16, LoRA r=16 on q/k/v/o/gate/up/down, gradient checkpointing, reference = adapters off; both
variants in one process from the same starting adapters, peak = ``torch.cuda.max_memory_allocated``
during the timed steps minus the memory held after the warm-up step. Prints one table; ``--json FILE`` writes the rows.
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

    b, rows, n_ce = run._batch()
    b = b.to(run.device)
    model = run.model
    model.train()
    total = 0.0
    out = {}
    for s, (a, z) in zip(run.streams, rows):
        ids, att, tgt = b.input_ids[a:z], b.attention_mask[a:z], b.target[a:z]
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
    """Peak resident memory of this process, sampled every millisecond by a thread. The parent
    runs children with MALLOC_MMAP_THRESHOLD_ so that freed tensors leave the RSS at once."""

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


def measure(args, variant: str, run=None) -> dict:
    device = args.device
    run = run or _build(args, device)
    step = (lambda: run._train_step()) if variant == "fused" else (lambda: _hf_step(run))
    times, losses = [], None
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            # Baseline after warm-up: weights, reference, optimizer state exist; gradients are freed.
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            else:
                rss = _RssPeak()
                base = rss.start()
        _sync(device)
        t0 = time.perf_counter()
        m = step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
        if losses is None:
            # First step's losses (same weights, same batch in both variants): a correctness check.
            losses = {k.replace("loss/", ""): round(float(v), 4) for k, v in m.items()
                      if k.startswith("loss/") or k in ("total",) or k in dict.fromkeys(s[0] for s in STREAMS)}
    peak = (torch.cuda.max_memory_allocated() if device.startswith("cuda") else rss.stop()) - base
    tokens = args.length * len(STREAMS)
    return {"variant": variant, "median_s": statistics.median(times), "min_s": min(times),
            "peak_extra_mib": peak / 2**20, "tokens": tokens, "first_step_losses": losses}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gpu", action="store_true", help="Llama-2-7B shape on CUDA, bf16, LoRA, length 4096")
    p.add_argument("--variants", default="fused,hf")
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
    p.add_argument("--device", help="default: cuda with --gpu, else cpu (--gpu --device cpu with small sizes "
                                    "smoke-tests the GPU recipe on a CPU)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    big = dict(hidden=4096, intermediate=11008, layers=32, heads=32, length=4096)
    small = dict(hidden=512, intermediate=1376, layers=4, heads=8, length=256)
    for k, v in (big if args.gpu else small).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.steps = args.steps or 3
    args.device = args.device or ("cuda" if args.gpu else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        print("RESULT " + json.dumps(measure(args, args.child)))
        return 0

    rows = []
    if args.gpu:
        run = _build(args, args.device)
        # Both variants start from the same adapters, optimizer state and records.
        start = {n: p.detach().clone() for n, p in run.model.named_parameters() if p.requires_grad}
        for v in args.variants.split(","):
            with torch.no_grad():
                for n, p in run.model.named_parameters():
                    if n in start:
                        p.copy_(start[n])
            run.optimizer.state.clear()
            for s in run._samplers:
                s.cursor = 0
            rows.append(measure(args, v, run))
        machine = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU (GPU recipe smoke test)"
    else:
        # One process per variant: max RSS cannot be reset within a process.
        for v in args.variants.split(","):
            cmd = [sys.executable, __file__, "--child", v] + [a for a in (argv if argv is not None else sys.argv[1:])]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT),
                                                                            MALLOC_MMAP_THRESHOLD_="65536"))
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                print(proc.stderr[-3000:], file=sys.stderr)
                return 1
            rows.append(json.loads(line[0][7:]))
        machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads"
    from surgery_kernels.backends import resolve

    backend = resolve(args.backend, torch.device(args.device).type)
    shape = (f"fused backend {backend!r}; Llama H={args.hidden} layers={args.layers} V={args.vocab}, 4 streams x {args.length} tokens, "
             + ("bf16, LoRA r=16, gradient checkpointing, reference=adapter" if args.gpu else
                "float32, full fine-tuning, reference=copy"))
    print(f"# one surgery step — {machine} — torch {torch.__version__}")
    print(f"# {shape}; median of {args.steps} steps after {args.warmup} warm-up")
    print(f"{'variant':<8} {'step s':>9} {'tokens/s':>10} {'peak extra MiB':>15}  first-step losses")
    for r in rows:
        print(f"{r['variant']:<8} {r['median_s']:>9.3f} {r['tokens'] / r['median_s']:>10.0f} "
              f"{r['peak_extra_mib']:>15.0f}  {r['first_step_losses']}")
    if len(rows) == 2:
        f, h = rows
        print(f"# hf / fused: time x{h['median_s'] / f['median_s']:.2f}, peak memory x"
              f"{h['peak_extra_mib'] / max(f['peak_extra_mib'], 1e-9):.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "shape": shape, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
