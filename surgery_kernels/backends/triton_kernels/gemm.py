"""dW += G.T @ H for one chunk of tokens, as a Triton GEMM that reads the accumulator inside the
kernel, before its main loop (``rows.DW_GEMM = "triton"``; the default ``"cublas"`` is addmm).

Why (to be measured: not yet run on a GPU). The chunked gradient path adds every chunk's
``G_c.T @ H_c`` into the whole (V, H) dW, so each chunk reads and writes dW once more. On the H100
(benchmarks/results/2026-11-27-h100-triton/run2, Llama-2-7B head, 16 chunks of 64 MiB) summing in
a float32 accumulator instead of bf16 — 512 MiB more dW traffic per chunk — cost 2.82 ms more over
16 chunks: 0.18 ms per chunk, 3.0 TB/s, the full HBM bandwidth. So cuBLAS's beta = 1 epilogue is
not hidden behind its main loop at this shape (K = 1024 tokens: each output tile's read-modify-write
of C is ~16 % of its operand traffic, and comes after the tile's math). Here every tile loads its
C before the main loop, with the first stages of A and B, and with three pipeline stages of
128x128x64 tiles two programs fit one SM, so one program's accumulator load and store run under the
other's MMAs. If that holds, the per-chunk cost of dW (0.35 ms of math per 1024 tokens at the
Llama-2-7B head, 0.17 / 0.33 ms of bf16 / float32 accumulator traffic) becomes max(math, traffic)
instead of their sum, which is what small workspaces (many chunks, e.g. <= 64 MiB) pay for.
``benchmarks/triton_gpu.py`` measures it both ways (rows "dW GEMM ...").

Operands as the chunk holds them: G (c, V) and H (c, H) row-major, so the product contracts their
leading dimension (A is read transposed: M-major tiles, which wgmma takes from shared memory for
16-bit types). 16-bit inputs only: float32 weights keep cuBLAS (an IEEE float32 GEMM; TF32 would
break the float32 contract).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import round_bf16_by_hand

# The launch configuration on a GPU (a module attribute, so benchmarks can try others). 128x128x64
# tiles, 8 warps, 3 stages: 96 KiB of shared memory; ptxas for sm_90 (benchmarks/
# triton_sm90_compile.py): 126 registers with a bf16 accumulator, so two programs per SM, 146 with
# a float32 one (one program per SM; capped at 128 it spills 24 bytes). PREFETCH: see the kernel.
# Under the interpreter: one small config (cost grows with programs x ops).
CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, PREFETCH=False, num_warps=8, num_stages=3)
# Others the GPU benchmark tries against it (benchmarks/triton_gpu.py, "dW GEMM" rows): registers
# capped for two programs per SM with a float32 accumulator; the accumulator read under the main
# loop (168 / 222 registers with bf16 / float32 C: one program per SM); a wider tile (less
# operand traffic per product, 236 / 255 registers, one program per SM).
CANDIDATES = [CONFIG, dict(CONFIG, maxnreg=128), dict(CONFIG, PREFETCH=True), dict(CONFIG, BLOCK_N=256)]
INTERPRET_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, PREFETCH=False)


@triton.jit(do_not_specialize=["K"])
def gemm_tn_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_a, stride_b, stride_c,
                   ACCUMULATE: tl.constexpr, PREFETCH: tl.constexpr, DOT_FP32: tl.constexpr,
                   BF16_BY_HAND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """C (M, N) = A.T @ B (+ C with ACCUMULATE) for A (K, M), B (K, N), C (M, N), all with unit
    column stride; float32 products and sums, one rounding to C's dtype. One program per (BLOCK_M,
    BLOCK_N) tile of C, row-major over the tiles: the programs running at once share A's columns
    and all of B (c x H, 8 MiB at 1024 tokens of H = 4096) stays in L2.

    Addresses: each tile's origin in 64 bits, offsets inside a tile in 32 (BLOCK_K * stride_a and
    BLOCK_M * stride_c stay far below 2**31; gemm_tn checks), which keeps the 64-bit pointer
    tensors out of the registers held across the main loop (175 -> 146 registers, float32 C)."""
    pid = tl.program_id(0)
    tiles_n = tl.cdiv(N, BLOCK_N)
    m0 = (pid // tiles_n) * BLOCK_M
    n0 = (pid % tiles_n) * BLOCK_N
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mask_m = rm < M - m0
    mask_n = rn < N - n0
    p_c = c_ptr + m0.to(tl.int64) * stride_c + n0 + (rm[:, None] * stride_c + rn[None, :])
    mask_c = mask_m[:, None] & mask_n[None, :]
    # How C's read meets the main loop (both measured on the GPU, see CANDIDATES). PREFETCH:
    # issued before the loop, added after it, so the read runs under this program's MMAs, at
    # the cost of the registers that hold it through the loop. Otherwise the accumulator starts
    # from C: the program waits for the read (and its change of register layout, through shared
    # memory) before the pipeline's first loads, and a second program on the SM computes meanwhile.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACCUMULATE:
        if PREFETCH:
            b_c = tl.load(p_c, mask=mask_c, other=0.0)
        else:
            acc = tl.load(p_c, mask=mask_c, other=0.0).to(tl.float32)
    p_a = a_ptr + m0
    p_b = b_ptr + n0
    step_a = tl.full((), BLOCK_K, tl.int64) * stride_a
    step_b = tl.full((), BLOCK_K, tl.int64) * stride_b
    for k in range(0, K, BLOCK_K):
        mask_k = rk < K - k
        b_a = tl.load(p_a + (rk[:, None] * stride_a + rm[None, :]), mask=mask_k[:, None] & mask_m[None, :], other=0.0)
        b_b = tl.load(p_b + (rk[:, None] * stride_b + rn[None, :]), mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        acc = tl.dot(tl.trans(b_a), b_b, acc)
        p_a += step_a
        p_b += step_b
    if ACCUMULATE and PREFETCH:
        acc += b_c.to(tl.float32)
    acc = round_bf16_by_hand(acc, BF16_BY_HAND)
    tl.store(p_c, acc.to(c_ptr.dtype.element_ty), mask=mask_c)


def gemm_tn(c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """c (M, N) = a.T @ b, or c += a.T @ b with ``accumulate``, in place: a (K, M), b (K, N) of one
    16-bit dtype, c float32 or that dtype; all row-major (unit column stride)."""
    k, m = a.shape
    n = b.shape[1]
    if a.dtype not in (torch.bfloat16, torch.float16) or b.dtype != a.dtype:
        raise TypeError(f"gemm_tn takes 16-bit a and b of one dtype, got {a.dtype} and {b.dtype}")
    if c.dtype not in (torch.float32, a.dtype):
        raise TypeError(f"gemm_tn: c must be float32 or {a.dtype}, got {c.dtype}")
    if b.shape[0] != k or tuple(c.shape) != (m, n):
        raise ValueError(f"gemm_tn: shapes a {tuple(a.shape)}, b {tuple(b.shape)}, c {tuple(c.shape)} do not match")
    if min(t.stride(-1) for t in (a, b, c)) != 1 or max(t.stride(-1) for t in (a, b, c)) != 1:
        raise ValueError("gemm_tn: a, b and c need unit column stride")
    cfg = INTERPRET_CONFIG if common.INTERPRET else CONFIG
    if max(cfg["BLOCK_K"] * max(a.stride(0), b.stride(0)), cfg["BLOCK_M"] * c.stride(0)) >= 2**31:
        raise ValueError(f"gemm_tn: row strides {a.stride(0)}, {b.stride(0)}, {c.stride(0)} too large for 32-bit "
                         "offsets inside a tile")
    if m == 0 or n == 0:
        return
    if k == 0:
        if not accumulate:
            c.zero_()
        return
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    gemm_tn_kernel[grid](a, b, c, m, n, k, a.stride(0), b.stride(0), c.stride(0), ACCUMULATE=accumulate,
                         DOT_FP32=common.INTERPRET,
                         BF16_BY_HAND=common.INTERPRET and c.dtype == torch.bfloat16, **cfg)
