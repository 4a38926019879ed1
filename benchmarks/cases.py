"""What is measured: ops, modes, lm-head shapes, presets, and the random inputs of a case.

A case is one (op, mode, N, H, V, dtype). Inputs are random (never zeros) and seeded, so every
provider, in whatever process it runs, sees the same tensors and must return the same loss.

- ``ce``: signed linear cross-entropy, the LLM Surgery way: the first half of the tokens is an
  *unlearn* stream (token weight -0.1, gradient ascent), the second half an *update* stream
  (+2.0, descent); 5% of the tokens are padding (``ignore_index``). Mean over live tokens.
- ``kl``: forward token-level KL(p_ref || p) to a frozen reference whose hidden states and head
  weight are close to the trained ones (a separate tensor, as with a full-fine-tuning copy).
- ``fwd``: the loss value only, under ``torch.no_grad()`` (evaluation). ``fwd+bwd``: loss and
  the gradients w.r.t. hidden and weight (a training step's loss part).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

OPS = ("ce", "kl")
MODES = ("fwd", "fwd+bwd")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# lm-head shapes (H, V) of the models the project targets.
SHAPES = {"llama2-7b": (4096, 32000), "llama3-8b": (4096, 128256), "smollm2": (576, 49152),
          # not a model: for the smoke test of the harness itself
          "tiny": (64, 1000)}

# Token weights of the signed CE: the paper's unlearn (alpha = 0.1, ascent) and update (beta = 2.0).
UNLEARN_WEIGHT, UPDATE_WEIGHT = -0.1, 2.0
IGNORE_INDEX = -100
PAD_FRACTION = 0.05
SEED = 1234


@dataclass(frozen=True)
class Case:
    op: str
    mode: str
    shape: str
    n: int
    h: int
    v: int
    dtype: str

    @property
    def key(self) -> str:
        return f"{self.op}/{self.mode}/{self.shape}/N={self.n}/{self.dtype}"

    def as_dict(self) -> dict:
        return asdict(self)


def case(op: str, mode: str, shape: str, n: int, dtype: str) -> Case:
    h, v = SHAPES[shape]
    return Case(op, mode, shape, n, h, v, dtype)


def _grid(ops, modes, shapes_n, dtypes):
    return [case(op, mode, shape, n, dt) for shape, ns in shapes_n for n in ns for dt in dtypes for op in ops
            for mode in modes]


# Presets. Sizes are set by what the machine can do in the stated time:
# - quick: the CPU backends' goal measurement, CE and KL forward+backward at the SmolLM2 head,
#   N = 4096, float32 (about 3 s per GEMM on the 2-core development CPU): <= 5 minutes.
# - cpu: an N sweep at the SmolLM2 head, its forward and bf16, and the 7B/8B heads in bf16 at small N
#   (one float32 GEMM of the Llama-3-8B head at N = 512 already takes ~7 s there; bf16 GEMMs are
#   ~5x faster on that AVX512-BF16 CPU).
# - gpu-check: what benchmarks/gpu_check.sh runs on a lent H100 in ~3 minutes.
# - gpu: the full GPU table (sweep of N, both dtypes and modes, all three heads).
# - smoke: seconds; the harness's own end-to-end test.
PRESETS = {
    "smoke": lambda: _grid(OPS, MODES, [("tiny", (64, 128))], ("float32",)),
    "quick": lambda: _grid(OPS, ("fwd+bwd",), [("smollm2", (4096,))], ("float32",)),
    "cpu": lambda: (
        _grid(OPS, ("fwd+bwd",), [("smollm2", (1024, 2048, 4096))], ("float32",))
        + _grid(OPS, ("fwd",), [("smollm2", (4096,))], ("float32",))
        + _grid(OPS, ("fwd+bwd",), [("smollm2", (4096,)), ("llama2-7b", (1024,)), ("llama3-8b", (512,))],
                ("bfloat16",))
    ),
    "gpu-check": lambda: _grid(OPS, ("fwd+bwd",), [("llama2-7b", (16384,)), ("llama3-8b", (16384,)),
                                                   ("smollm2", (16384,))], ("bfloat16",)),
    "gpu": lambda: (
        _grid(OPS, MODES, [("llama2-7b", (2048, 4096, 8192, 16384, 32768))], ("bfloat16", "float32"))
        + _grid(OPS, MODES, [("llama3-8b", (4096, 16384)), ("smollm2", (4096, 16384, 65536))],
                ("bfloat16", "float32"))
    ),
}


def make_inputs(c: Case, device: str, n: int | None = None) -> dict:
    """Random inputs of case ``c`` on ``device`` (``n`` overrides N, for priming at a small size).

    hidden (N, H) and weight (V, H) require grad; logits come out with a standard deviation of
    about 2. For ``ce``: target (N,) and token_weight (N,); for ``kl``: ref_hidden, ref_weight.
    """
    n = c.n if n is None else n
    dt = DTYPES[c.dtype]
    g = torch.Generator(device=device).manual_seed(SEED)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dt)

    hidden = randn(n, c.h)
    weight = randn(c.v, c.h, scale=2.0 / c.h ** 0.5)
    out = {"hidden": hidden.requires_grad_(), "weight": weight.requires_grad_()}
    if c.op == "ce":
        target = torch.randint(0, c.v, (n,), generator=g, device=device)
        pad = torch.rand(n, generator=g, device=device) < PAD_FRACTION
        target = torch.where(pad, IGNORE_INDEX, target)
        half = n // 2
        tw = torch.full((n,), UPDATE_WEIGHT, device=device)
        tw[:half] = UNLEARN_WEIGHT
        out.update(target=target, token_weight=tw, half=half)
    else:
        out["ref_hidden"] = (hidden.detach().float() + randn(n, c.h, scale=0.1).float()).to(dt)
        out["ref_weight"] = (weight.detach().float() + randn(c.v, c.h, scale=0.1 / c.h ** 0.5).float()).to(dt)
    return out


def gemm_flops(c: Case) -> int:
    """FLOPs of the floor: 2NHV per GEMM; CE fwd 1 GEMM, fwd+bwd 3; KL adds the reference GEMM."""
    gemms = {"fwd": 1, "fwd+bwd": 3}[c.mode] + (1 if c.op == "kl" else 0)
    return 2 * c.n * c.h * c.v * gemms
