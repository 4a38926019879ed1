"""float16 gradients under a loss scale (GradScaler): the fused losses against plain PyTorch.

A mean/sum call with gradients normally forms them in its forward at scale 1 and the backward
only scales them; in float16 the small components of a logit gradient formed at scale 1 fall
below float16's range before GradScaler's scale (65536 at first) can lift them, so float16
mean/sum recompute in the backward instead (``surgery_kernels/autograd.py``, ``_fused``). This
prints the relative error of dhidden and dweight against float64 for plain PyTorch (logits in
float16, loss in float32) and each CPU backend, at scale 1 and 65536.

    python benchmarks/fp16_scale.py [--n 8192] [--v 2000] [--h 64]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from surgery_kernels import available_backends, linear_cross_entropy  # noqa: E402
from surgery_kernels.reference import linear_cross_entropy_ref  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--v", type=int, default=2000)
    p.add_argument("--h", type=int, default=64)
    args = p.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(args.n, args.h, generator=g) * 0.5).half()
    w = (torch.randn(args.v, args.h, generator=g) * 0.5).half()
    t = torch.randint(0, args.v, (args.n,), generator=g)
    h64, w64 = h.double().requires_grad_(), w.double().requires_grad_()
    linear_cross_entropy_ref(h64, w64, t).backward()

    def err(got, ref, scale):
        return ((got.double() / scale - ref).norm() / ref.norm()).item()

    backends = [b for b, why in available_backends("cpu").items() if why == "available"]
    print(f"# float16 CE, mean over N={args.n} tokens, V={args.v}, H={args.h}; relative error vs float64")
    print("| scale | provider | dhidden | dweight |\n|---:|---|---:|---:|")
    for scale in (1.0, 65536.0):
        for name in ["plain"] + backends:
            hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
            if name == "plain":
                loss = torch.nn.functional.cross_entropy((hh @ ww.t()).float(), t)
            else:
                loss = linear_cross_entropy(hh, ww, t, backend=name)
            (loss * scale).backward()
            print(f"| {scale:g} | {name} | {err(hh.grad, h64.grad, scale):.2e} | {err(ww.grad, w64.grad, scale):.2e} |")


if __name__ == "__main__":
    main()
