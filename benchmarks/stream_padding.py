"""Trainer steps with short CE rows next to long KL rows: one padded batch vs two batches.

Streams: forget (ascent) and learn (descent), 8 records each of ~16 tokens; retain (KL), 4
records of --retain-length tokens. ``Surgery.SPLIT_PADDING_RATIO`` = inf forces the one-batch
path (every row padded to the retain length); the default splits CE and KL rows into two
batches of their own lengths. Small random Llama (V = 32000), float32, on the CPU; the two
variants' timed steps alternate so machine load hits both alike.

    python benchmarks/stream_padding.py --retain-length 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from surgery import Stream, Surgery
from surgery.modeling import load_model
from surgery.testing import tiny_llama, word_tokenizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--retain-length", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    a = p.parse_args()
    words = [f"w{i}" for i in range(400)]
    tok = word_tokenizer(words)
    g = torch.Generator().manual_seed(0)
    text = lambda n: " ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g))  # noqa: E731
    forget = [{"text": text(16)} for _ in range(32)]
    learn = [{"prompt": text(12), "completion": " " + text(4)} for _ in range(32)]
    retain = [{"text": text(a.retain_length)} for _ in range(16)]
    cfg = tiny_llama(32000, hidden=a.hidden, layers=a.layers, intermediate_size=4 * a.hidden,
                     max_position_embeddings=max(512, a.retain_length + 8))
    runs = {}
    for name, ratio in (("one batch", float("inf")), ("two batches", Surgery.SPLIT_PADDING_RATIO)):
        model = load_model(config=cfg, seed=0)
        run = Surgery(model=model, tokenizer=tok, streams=[
            Stream("forget", forget, "ascent", 1.0, batch_size=8), Stream("learn", learn, "descent", 1.0, batch_size=8),
            Stream("retain", retain, "kl", 1.0, batch_size=4, max_length=a.retain_length)],
            train={"steps": 10**6, "lr": 1e-4, "progress": False, "max_length": a.retain_length})
        run.SPLIT_PADDING_RATIO = ratio
        run._setup()
        run._train_step()  # warm-up
        runs[name] = (run, [])
    for _ in range(a.steps):
        for name, (run, times) in runs.items():
            t = time.perf_counter()
            run._train_step()
            times.append(time.perf_counter() - t)
            runs[name] = (run, times)
    print(f"CE rows 2 x 8 of ~16 tokens, KL rows 4 x {a.retain_length} tokens; H={a.hidden}, {a.layers} layers, "
          f"V=32000, float32, torch {torch.__version__}, {torch.get_num_threads()} threads")
    base = None
    for name, (run, times) in runs.items():
        med = statistics.median(times)
        base = base or med
        print(f"{name:12s} median step {med * 1e3:8.1f} ms  ({med / base:.2f}x)  steps: "
              + ", ".join(f"{t * 1e3:.0f}" for t in times))


if __name__ == "__main__":
    main()
