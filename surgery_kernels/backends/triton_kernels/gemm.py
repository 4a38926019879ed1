"""dW += G.T @ H for one chunk of tokens, as a Triton GEMM that reads and writes the accumulator
inside the kernel (``rows.DW_GEMM = "triton"``; the default ``"cublas"`` is addmm with beta = 1).

Why (a hypothesis until measured: not yet run on a GPU). The chunked gradient path adds every
chunk's ``G_c.T @ H_c`` into the whole (V, H) dW, so each chunk reads and writes dW once more. On
the H100 (benchmarks/results/2026-11-27-h100-triton/run2, Llama-2-7B head, 16 chunks of 64 MiB)
summing in a float32 accumulator instead of bf16 — 500 MiB (524 MB) more dW traffic per chunk —
cost 2.82 ms more over 16 chunks: 0.18 ms per chunk, 3.0 TB/s, the full HBM bandwidth. So cuBLAS's
beta = 1 epilogue is not hidden behind its main loop at this shape (K = 1024 tokens per chunk: each
output tile's read-modify-write of C comes after its math). Here a program holds at most 128
registers per thread (CONFIG), so two share an SM and one's read and write of C run under the
other's MMAs; with PREFETCH a program also issues its own read before its main loop. If that
holds, the per-chunk cost of dW (0.35 ms of math per 1024 tokens at the Llama-2-7B head, 0.17 /
0.33 ms of bf16 / float32 accumulator traffic) becomes max(math, traffic) instead of their sum,
which is what small workspaces (many chunks, e.g. <= 64 MiB) pay. ``benchmarks/triton_gpu.py``
measures it (rows "dW alone", and the CE and KL rows "Triton dW GEMM").

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

# The launch configuration on a GPU (a module attribute, so benchmarks can try others): 128x128x64
# tiles, 8 warps, 3 stages (96 KiB of shared memory), A and B fetched by the copy engine (TMA:
# host-side tensor descriptors, when their rows are 16-byte aligned; else pointer loads), C read
# as the accumulator's start, registers capped at 128 so that two programs share an SM. ptxas for
# sm_90 (benchmarks/triton_sm90_compile.py): 103 / 106 registers with a bf16 C (triton 3.6 / 3.9),
# 128 / 126 with a float32 one, nothing spilled (130 uncapped). Under the interpreter: one small config
# (cost grows with programs x ops).
CONFIG = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, TMA=True, PREFETCH=False, num_warps=8, num_stages=3,
              maxnreg=128)
# Others the GPU benchmark tries against it (benchmarks/triton_gpu.py, "dW alone" rows): C read
# under the main loop (PREFETCH, uncapped: 126 / 202 registers with bf16 / float32 C); a wider tile
# (less operand traffic per product, 207 / 234 registers, one program per SM); pointer loads
# (cp.async; 126 / 146 registers).
_UNCAPPED = {k: v for k, v in CONFIG.items() if k != "maxnreg"}
CANDIDATES = [CONFIG, dict(_UNCAPPED, PREFETCH=True), dict(_UNCAPPED, BLOCK_N=256), dict(_UNCAPPED, TMA=False)]
INTERPRET_CONFIG = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, TMA=False, PREFETCH=False)


def for_device(cfg: dict, device: torch.device) -> dict:
    """``cfg`` without TMA and the register cap where the GPU is not an NVIDIA one of compute
    capability 9 or later (ROCm's triton rejects ``maxnreg``; older NVIDIA chips have no TMA)."""
    if common.INTERPRET or device.type != "cuda":
        return cfg
    if torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9:
        return cfg
    return dict({k: v for k, v in cfg.items() if k != "maxnreg"}, TMA=False)


def tma_ok(cfg: dict, a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``cfg`` asks for TMA and a and b can be read by it: 16-byte aligned starts and rows."""
    return bool(cfg.get("TMA")) and all(t.data_ptr() % 16 == 0 and (t.stride(0) * t.element_size()) % 16 == 0
                                        for t in (a, b))


@triton.jit(do_not_specialize=["K"])
def gemm_tn_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_a, stride_b, stride_c,
                   ACCUMULATE: tl.constexpr, PREFETCH: tl.constexpr, TMA: tl.constexpr, DOT_FP32: tl.constexpr,
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
    # memory; PTX for sm_90) before the pipeline's first loads, while the SM's other program computes.
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if ACCUMULATE:
        if PREFETCH:
            b_c = tl.load(p_c, mask=mask_c, other=0.0)
        else:
            acc = tl.load(p_c, mask=mask_c, other=0.0).to(tl.float32)
    if not TMA:
        p_a = a_ptr + m0
        p_b = b_ptr + n0
        step_a = tl.full((), BLOCK_K, tl.int64) * stride_a
        step_b = tl.full((), BLOCK_K, tl.int64) * stride_b
    for k in range(0, K, BLOCK_K):
        if TMA:
            # a_ptr, b_ptr are tensor descriptors (blocks (BLOCK_K, BLOCK_M), (BLOCK_K, BLOCK_N)):
            # the copy engine fetches the tiles, zeros past the edges
            b_a = a_ptr.load([k, m0])
            b_b = b_ptr.load([k, n0])
        else:
            mask_k = rk < K - k
            b_a = tl.load(p_a + (rk[:, None] * stride_a + rm[None, :]), mask=mask_k[:, None] & mask_m[None, :],
                          other=0.0)
            b_b = tl.load(p_b + (rk[:, None] * stride_b + rn[None, :]), mask=mask_k[:, None] & mask_n[None, :],
                          other=0.0)
        if DOT_FP32:
            b_a = b_a.to(tl.float32)
            b_b = b_b.to(tl.float32)
        acc = tl.dot(tl.trans(b_a), b_b, acc)
        if not TMA:
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
    cfg = INTERPRET_CONFIG if common.INTERPRET else for_device(CONFIG, c.device)
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
    cfg = dict(cfg, TMA=tma_ok(cfg, a, b))
    if cfg["TMA"]:
        from triton.tools.tensor_descriptor import TensorDescriptor

        a = TensorDescriptor.from_tensor(a, [cfg["BLOCK_K"], cfg["BLOCK_M"]])
        b = TensorDescriptor.from_tensor(b, [cfg["BLOCK_K"], cfg["BLOCK_N"]])
    gemm_tn_kernel[grid](a, b, c, m, n, k, a.strides[0] if cfg["TMA"] else a.stride(0),
                         b.strides[0] if cfg["TMA"] else b.stride(0), c.stride(0), ACCUMULATE=accumulate,
                         DOT_FP32=common.INTERPRET, BF16_BY_HAND=common.INTERPRET and c.dtype == torch.bfloat16, **cfg)
