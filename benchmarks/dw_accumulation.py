"""How the weight gradient's error grows when it is summed over token chunks in bf16.

The chunked gradient paths add each chunk's ``G_c^T @ hidden_c`` into dW. In a float32
accumulator the finished sum is rounded to bf16 once, as a plain PyTorch backward does; summed in
the bf16 gradient itself (``triton_kernels.rows.DW_ACCUM="input"``) it is rounded once per chunk.
This script measures both against float64 for 1 to 64 chunks, as multiples of plain PyTorch's
own bf16 error (one GEMM over all tokens), on the CPU in seconds (``rows``'s docstring quotes it;
the default is the float32 accumulator). A third column sums in float32 the chunk products
rounded to bf16 (a bf16 GEMM per chunk, then an add): what the CPU backend would get from bf16
GEMMs, since ATen's CPU GEMMs cannot write float32 from bf16 inputs (so it multiplies upcast
operands instead). ``--cancel`` gives ascent rows first and descent rows after on the same tokens
(weights -1 and +1.1), as the surgery objective's one signed call can: the partial sums are then
much larger than the result.

The logit gradient G is the same for every variant (computed once from bf16 logits, float32
softmax, rounded to bf16), so only the summation differs. Usage::

    python benchmarks/dw_accumulation.py [--n 8192 --h 128 --v 2000 --seed 0]
"""

from __future__ import annotations

import argparse

import torch


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--h", type=int, default=128)
    ap.add_argument("--v", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cancel", action="store_true", help="like ascent and descent rows that nearly cancel")
    ap.add_argument("--time", action="store_true",
                    help="also time one chunk's dW GEMM both ways on this CPU (SmolLM2 head, the cpu backend's chunk)")
    args = ap.parse_args(argv)
    if args.time:
        time_chunk_gemm()
    torch.manual_seed(args.seed)
    n, h_dim, v = args.n, args.h, args.v
    h = torch.randn(n, h_dim).bfloat16()
    w = (torch.randn(v, h_dim) * 0.2).bfloat16()
    t = torch.randint(0, v, (n,))
    # signed token weights as in surgery: half ascent (-0.1), half descent (+2), mean over tokens
    coeff = torch.where(torch.arange(n) % 2 == 0, -0.1, 2.0) / n
    if args.cancel:  # the same tokens twice, ascent first: the sum nearly cancels between the halves
        half = n // 2
        shared = torch.randn(h_dim) * 3  # a common direction, as LLM hidden states have
        h = (torch.randn(half, h_dim) + shared).bfloat16().repeat(2, 1)
        t = t[:half].repeat(2)
        coeff = torch.cat([torch.full((half,), -1.0), torch.full((half,), 1.1)]) / half
        n = 2 * half

    def logit_grad(dtype):
        z = h.to(dtype) @ w.to(dtype).T
        p = torch.softmax(z if dtype == torch.float64 else z.float(), 1)
        p[torch.arange(n), t] -= 1
        return (p * coeff[:, None].to(p.dtype)).to(dtype)

    dw64 = logit_grad(torch.float64).T @ h.double()
    g = logit_grad(torch.bfloat16)

    def rel(x):
        return float((x.double() - dw64).norm() / dw64.norm())

    plain = rel(g.T @ h)
    print(f"N={n} H={h_dim} V={v} bf16; plain PyTorch (one GEMM) dW error {plain:.3e}")
    print("| chunks | summed in bf16 | x plain | summed in float32 | x plain | bf16 products summed in float32 | x plain |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for chunks in (1, 2, 4, 8, 16, 32, 64):
        c = -(-n // chunks)
        acc16 = torch.zeros(v, h_dim, dtype=torch.bfloat16)
        acc32 = torch.zeros(v, h_dim)
        acc32p = torch.zeros(v, h_dim)
        for s in range(0, n, c):
            acc16.addmm_(g[s:s + c].T, h[s:s + c])
            acc32.addmm_(g[s:s + c].T.float(), h[s:s + c].float())
            acc32p += g[s:s + c].T @ h[s:s + c]
        e16, e32, e32p = rel(acc16), rel(acc32.bfloat16()), rel(acc32p.bfloat16())
        print(f"| {chunks} | {e16:.3e} | {e16 / plain:.2f} | {e32:.3e} | {e32 / plain:.2f} | {e32p:.3e} | "
              f"{e32p / plain:.2f} |")


def time_chunk_gemm(v=49152, h_dim=576, repeats=7):
    """Median ms of one chunk's dW update, float32 GEMM on upcast operands (what the cpu backend
    does for bf16) against a bf16 GEMM then a float32 add, at the cpu backend's default chunk
    (2**24 // V rows)."""
    import statistics
    import time

    c = 2**24 // v
    g, h = torch.randn(c, v).bfloat16(), torch.randn(c, h_dim).bfloat16()
    acc = torch.zeros(v, h_dim)
    ways = {"float32 GEMM on upcast operands": lambda: acc.addmm_(g.float().T, h.float()),
            "bf16 GEMM, then float32 add": lambda: acc.add_(g.T @ h)}
    ms = {k: [] for k in ways}
    for _ in range(repeats):
        for k, f in ways.items():
            t0 = time.perf_counter()
            f()
            ms[k].append((time.perf_counter() - t0) * 1e3)
    print(f"one chunk's dW update, V={v} H={h_dim} rows={c}, {torch.get_num_threads()} threads, median of {repeats}:")
    for k in ways:
        print(f"  {k}: {statistics.median(ms[k][1:]):.1f} ms")


if __name__ == "__main__":
    main()
