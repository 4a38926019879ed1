"""Fused linear cross-entropy: z = softcap(hidden @ weight.T + bias), ce = lse(z) - z[target].

Forward (``ce_fwd_kernel``): one program per (row block, vocabulary split). It walks the
split's vocabulary blocks, computing each (BLOCK_N, BLOCK_V) logit tile on chip with tl.dot
over H, keeps an online max / sum-exp per row and picks the target logit out of the tile that
holds it. Only per-split row maxima and log-sum-exps of the shifted logits (splits x N) and the
target logit (N) reach memory; a float64 logsumexp over the splits finishes the statistics
(O(N * splits) work), and the backward gets lse as two float32 parts (``common.hi_lo``).

Backward (``ce_bwd_kernel``): one program per (row block, vocabulary block). It recomputes the
tile, forms coeff * (softmax - onehot) * softcap' in registers and adds tile @ W to dH and
tile.T @ hidden to dW with float32 atomics. Not the default gradient path any more (3.8x the
GEMM floor on an H100: atomic-bound); ``surgery_kernels.backends.triton_fused`` says why and
``rows.py`` holds the default.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import accumulate_grads, logit_tile, online_lse, tanh, tanh_dtanh, tile_ids


# The token count varies call to call: no recompilation for its divisibility.
@triton.jit(do_not_specialize=["N", "n_splits"])
def ce_fwd_kernel(h_ptr, w_ptr, b_ptr, target_ptr, pm_ptr, ps_ptr, zt_ptr,
                  N, V, H, split_cols, n_splits, stride_h, stride_w, softcap,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # float32 whatever the caller passed: a float64 scalar would promote the loop-carried statistics.
    softcap = tl.cast(softcap, tl.float32)
    pid = tl.program_id(0)
    pid_n, pid_s = tile_ids(pid, tl.cdiv(N, BLOCK_N), n_splits, GROUP)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    b_t = tl.load(target_ptr + offs_n, mask=mask_n, other=-1)
    v_start = pid_s.to(tl.int64) * split_cols
    v_end = tl.minimum(v_start + split_cols, V)

    b_m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        b_z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_h, stride_w, HAS_BIAS,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_FP32, PRECISION)
        if SOFTCAP:
            b_z = softcap * tanh(b_z / softcap)
        b_z = tl.where(mask_v[None, :], b_z, float("-inf"))
        b_m, b_s = online_lse(b_m, b_s, b_z)
        b_zt += tl.sum(tl.where(offs_v[None, :] == b_t[:, None], b_z, 0.0), axis=1)

    # max and log-sum-exp of the shifted logits kept apart: m + log(s) in float32 would round
    offs = pid_s.to(tl.int64) * N + offs_n
    tl.store(pm_ptr + offs, b_m, mask=mask_n)
    tl.store(ps_ptr + offs, tl.log(b_s), mask=mask_n)
    # Exactly one split holds a valid target's column; ignored targets are never written.
    owns = (b_t >= v_start) & (b_t < v_end)
    tl.store(zt_ptr + offs_n, b_zt, mask=mask_n & owns)


# The token count varies call to call: no recompilation for its divisibility.
@triton.jit(do_not_specialize=["N"])
def ce_bwd_kernel(h_ptr, w_ptr, b_ptr, target_ptr, lse_hi_ptr, lse_lo_ptr, coeff_ptr, dh_ptr, dw_ptr, db_ptr,
                  N, V, H, stride_h, stride_w, stride_dh, stride_dw, softcap, filter_eps,
                  HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
                  NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # float32 whatever the caller passed: a float64 scalar would promote the loop-carried statistics.
    softcap = tl.cast(softcap, tl.float32)
    pid = tl.program_id(0)
    pid_n, pid_v = tile_ids(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    # coeff is 0 for padding rows, ignored and capped tokens: a tile of such rows adds nothing.
    b_c = tl.load(coeff_ptr + offs_n, mask=mask_n, other=0.0)
    live = b_c != 0.0
    if tl.max(live.to(tl.int32), axis=0) > 0:
        b_z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_h, stride_w, HAS_BIAS,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_FP32, PRECISION)
        if SOFTCAP:
            b_tanh, b_dcap = tanh_dtanh(b_z / softcap)
            b_z = softcap * b_tanh
        b_hi = tl.load(lse_hi_ptr + offs_n, mask=mask_n, other=0.0)
        b_lo = tl.load(lse_lo_ptr + offs_n, mask=mask_n, other=0.0)
        b_t = tl.load(target_ptr + offs_n, mask=mask_n, other=-1)
        b_g = tl.exp((b_z - b_hi[:, None]) - b_lo[:, None]) - tl.where(offs_v[None, :] == b_t[:, None], 1.0, 0.0)
        b_g = tl.where(live[:, None] & mask_v[None, :], b_g, 0.0)
        if tl.max(tl.max(tl.abs(b_g), axis=1), axis=0) > filter_eps:
            b_g = b_g * b_c[:, None]
            if SOFTCAP:
                b_g = b_g * b_dcap
            if NEED_DB:
                tl.atomic_add(db_ptr + offs_v, tl.sum(b_g, axis=0), mask=mask_v, sem="relaxed")
            accumulate_grads(b_g, h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, offs_v, N, V, H,
                             stride_h, stride_w, stride_dh, stride_dw, NEED_DH, NEED_DW, BLOCK_K,
                             DOT_FP32, PRECISION)


ce_fwd_tuned = common.autotuned(ce_fwd_kernel, common.CE_FWD_CONFIGS, key=["V", "H"])
ce_bwd_tuned = common.autotuned(ce_bwd_kernel, common.BWD_CONFIGS, key=["V", "H"],
                                accumulators=["dh_ptr", "dw_ptr", "db_ptr"])


def forward(hidden, weight, bias, target, ignore_index, softcap):
    """hidden (N, H), weight (V, H), bias (V,) | None, target (N,) int64 -> (ce float32, lse float64), (N,)."""
    n, h = hidden.shape
    v = weight.shape[0]
    split_cols, n_splits = common.vocab_splits(v)
    pm, ps = (torch.empty((n_splits, n), dtype=torch.float32, device=hidden.device) for _ in range(2))
    zt = torch.empty(n, dtype=torch.float32, device=hidden.device)
    args = (hidden, weight, bias if bias is not None else common.dummy(hidden.device), target, pm, ps, zt,
            n, v, h, split_cols, n_splits, hidden.stride(0), weight.stride(0),
            1.0 if softcap is None else float(softcap))
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, DOT_FP32=common.INTERPRET,
                 PRECISION=common.dot_precision(hidden.dtype))
    if n > 0:
        common.launch(ce_fwd_kernel, ce_fwd_tuned, args, flags, n=n, fp32=hidden.dtype == torch.float32,
                      n_splits=n_splits)
    lse = common.merge_splits(pm, ps)
    live = target != ignore_index
    ce = torch.where(live, lse - zt.double(), torch.zeros_like(lse)).float()
    return ce, lse


def backward(hidden, weight, bias, target, lse, coeff, softcap, needs):
    """Gradient of sum_i coeff_i * ce_i: (dhidden, dweight, dbias), None where needs is False."""
    n, h = hidden.shape
    d = common.dummy(hidden.device)
    hi, lo = common.hi_lo(lse)
    coeff = coeff.float().contiguous()
    flags = dict(HAS_BIAS=bias is not None, SOFTCAP=softcap is not None, NEED_DH=bool(needs[0]),
                 NEED_DW=bool(needs[1]), NEED_DB=bool(needs[2]) and bias is not None, DOT_FP32=common.INTERPRET,
                 PRECISION=common.dot_precision(hidden.dtype))

    def run(v0, v1, dh, dw, db):
        if n == 0 or not (flags["NEED_DH"] or flags["NEED_DW"] or flags["NEED_DB"]):
            return
        # Weight rows [v0, v1): a view; targets shifted to the chunk's columns (others match none).
        args = (hidden, weight[v0:v1], d if bias is None else bias[v0:v1], target - v0 if v0 else target, hi, lo,
                coeff, d if dh is None else dh, d if dw is None else dw, d if db is None else db,
                n, v1 - v0, h, hidden.stride(0), weight.stride(0), h, h,
                1.0 if softcap is None else float(softcap), common.GRAD_FILTER_EPS)
        common.launch(ce_bwd_kernel, ce_bwd_tuned, args, flags, n=n, fp32=hidden.dtype == torch.float32, v=v1 - v0)

    return common.chunked_grads(hidden, weight, bias, needs, run)
