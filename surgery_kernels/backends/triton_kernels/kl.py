"""Fused linear KL: q = softmax(z / T), z = hidden @ weight.T + bias (trained side),
p = softmax(zr / T), zr = ref_hidden @ ref_weight.T + ref_bias (reference, a constant), each
side softcapped first (z -> c * tanh(z / c)) when its SOFTCAP / REF_SOFTCAP flag is set.

Forward (``kl_fwd_kernel``): one program per (row block, vocabulary split) computes both
models' tiles on chip and keeps, per row, the online max / sum-exp of each side and the
running expectation of d = (zr - z) / T under the weighting side (p for forward KL, q for
reverse), rescaled whenever that side's max moves. With lse = lse(z / T), rlse = lse(zr / T):

    forward  KL(p || q) = E_p[d] + lse - rlse
    reverse  KL(q || p) = -E_q[d] + rlse - lse

exactly, in one pass (d and lse - rlse are of the size of the models' disagreement, which
includes any constant offset between the two sides' logits: such an offset c cancels at ulp(c),
~1e-5 of KL at c = 100, review 2026-12-07; plain PyTorch's per-side log-softmax does not). Per
split the kernel stores each side's row max and log-sum-exp of the
shifted logits, and E[d] under the split's own weighting distribution; ``_combine`` weights the
splits by exp(partial lse - lse), in float64.

Backward (``kl_bwd_kernel``): recompute both tiles, form coeff / T * (q - p) (forward) or
coeff / T * q * (log q - log p - kl) (reverse) in registers, times softcap' = 1 - tanh^2 of the
trained side (``common.tanh_dtanh``), then the same dH/dW atomics as CE.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import common
from .common import accumulate_grads, logit_tile, online_kl, tanh, tanh_dtanh, tile_ids


# The token count varies call to call: no recompilation for its divisibility.
@triton.jit(do_not_specialize=["N", "n_splits"])
def kl_fwd_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, pmq_ptr, psq_ptr, pmp_ptr, psp_ptr, pd_ptr,
                  N, V, H, RH, split_cols, n_splits, stride_h, stride_w, stride_rh, stride_rw, inv_t,
                  softcap, ref_softcap,
                  HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, REVERSE: tl.constexpr,
                  SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # Scalars in float32 whatever the caller passed (a float64 scalar would turn the loop-carried
    # statistics into float64, which Triton rejects).
    inv_t = tl.cast(inv_t, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    ref_softcap = tl.cast(ref_softcap, tl.float32)
    pid = tl.program_id(0)
    pid_n, pid_s = tile_ids(pid, tl.cdiv(N, BLOCK_N), n_splits, GROUP)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    v_start = pid_s.to(tl.int64) * split_cols
    v_end = tl.minimum(v_start + split_cols, V)

    b_mq = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_sq = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_mp = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    b_sp = tl.zeros((BLOCK_N,), dtype=tl.float32)
    # sum over columns of exp(a - m_a) * d, a = the weighting side's tempered logits
    b_e = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        mask_v = offs_v < V
        b_z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_h, stride_w, HAS_BIAS,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_FP32, PRECISION)
        b_zr = logit_tile(rh_ptr, rw_ptr, rb_ptr, offs_n, offs_v, N, V, RH, stride_rh, stride_rw,
                          HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_FP32, PRECISION)
        if SOFTCAP:
            b_z = softcap * tanh(b_z / softcap)
        if REF_SOFTCAP:
            b_zr = ref_softcap * tanh(b_zr / ref_softcap)
        b_d = tl.where(mask_v[None, :], (b_zr - b_z) * inv_t, 0.0)
        b_z = tl.where(mask_v[None, :], b_z * inv_t, float("-inf"))
        b_zr = tl.where(mask_v[None, :], b_zr * inv_t, float("-inf"))

        b_mq, b_sq, b_mp, b_sp, b_e = online_kl(b_mq, b_sq, b_mp, b_sp, b_e, b_z, b_zr, b_d, REVERSE)

    offs = pid_s.to(tl.int64) * N + offs_n
    tl.store(pmq_ptr + offs, b_mq, mask=mask_n)
    tl.store(psq_ptr + offs, tl.log(b_sq), mask=mask_n)
    tl.store(pmp_ptr + offs, b_mp, mask=mask_n)
    tl.store(psp_ptr + offs, tl.log(b_sp), mask=mask_n)
    # A split's weighting sum is >= 1 unless the weighting side gives every column of it
    # probability 0 (a -inf bias): then it weighs 0 in the merge, and its expectation is 0, not 0/0.
    if REVERSE:
        b_e = tl.where(b_sq == 0.0, 0.0, b_e / b_sq)
    else:
        b_e = tl.where(b_sp == 0.0, 0.0, b_e / b_sp)
    tl.store(pd_ptr + offs, b_e, mask=mask_n)


# The token count varies call to call: no recompilation for its divisibility.
@triton.jit(do_not_specialize=["N"])
def kl_bwd_kernel(h_ptr, w_ptr, b_ptr, rh_ptr, rw_ptr, rb_ptr, lse_hi_ptr, lse_lo_ptr, rlse_hi_ptr, rlse_lo_ptr,
                  kl_ptr, coeff_ptr,
                  dh_ptr, dw_ptr, db_ptr,
                  N, V, H, RH, stride_h, stride_w, stride_rh, stride_rw, stride_dh, stride_dw, inv_t, softcap,
                  ref_softcap, filter_eps,
                  HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, REVERSE: tl.constexpr,
                  SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr,
                  NEED_DH: tl.constexpr, NEED_DW: tl.constexpr, NEED_DB: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, GROUP: tl.constexpr,
                  DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    # Scalars in float32 whatever the caller passed (a float64 scalar would turn the loop-carried
    # statistics into float64, which Triton rejects).
    inv_t = tl.cast(inv_t, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    ref_softcap = tl.cast(ref_softcap, tl.float32)
    pid = tl.program_id(0)
    pid_n, pid_v = tile_ids(pid, tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_n = offs_n < N
    mask_v = offs_v < V
    # coeff is 0 for padding rows and masked tokens: a tile of such rows adds nothing.
    b_c = tl.load(coeff_ptr + offs_n, mask=mask_n, other=0.0)
    live = b_c != 0.0
    if tl.max(live.to(tl.int32), axis=0) > 0:
        b_z = logit_tile(h_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, H, stride_h, stride_w, HAS_BIAS,
                         BLOCK_N, BLOCK_V, BLOCK_K, DOT_FP32, PRECISION)
        b_zr = logit_tile(rh_ptr, rw_ptr, rb_ptr, offs_n, offs_v, N, V, RH, stride_rh, stride_rw,
                          HAS_REF_BIAS, BLOCK_N, BLOCK_V, BLOCK_K, DOT_FP32, PRECISION)
        if SOFTCAP:
            b_tanh, b_dcap = tanh_dtanh(b_z / softcap)
            b_z = softcap * b_tanh
        if REF_SOFTCAP:
            b_zr = ref_softcap * tanh(b_zr / ref_softcap)
        b_logq = (b_z * inv_t - tl.load(lse_hi_ptr + offs_n, mask=mask_n, other=0.0)[:, None]) \
            - tl.load(lse_lo_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        b_logp = (b_zr * inv_t - tl.load(rlse_hi_ptr + offs_n, mask=mask_n, other=0.0)[:, None]) \
            - tl.load(rlse_lo_ptr + offs_n, mask=mask_n, other=0.0)[:, None]
        b_q = tl.exp(b_logq)
        if REVERSE:
            # kl from the forward's statistics: where q is nearly one-hot and far from p this
            # gradient cancels at ulp(kl) and errs far more than plain PyTorch (the default
            # gradient path sums kl from its own terms, rows.kl_rows_kernel); the logits recomputed
            # here round differently from the forward's anyway, so no kl would cancel exactly.
            b_kl = tl.load(kl_ptr + offs_n, mask=mask_n, other=0.0)
            # q = 0 (a -inf logit) has gradient 0, not 0 * (-inf - log p)
            b_g = tl.where(b_logq == float("-inf"), 0.0, b_q * (b_logq - b_logp - b_kl[:, None]))
        else:
            b_g = b_q - tl.exp(b_logp)
        b_g = tl.where(live[:, None] & mask_v[None, :], b_g, 0.0)
        if tl.max(tl.max(tl.abs(b_g), axis=1), axis=0) > filter_eps:
            b_g = b_g * (b_c * inv_t)[:, None]
            if SOFTCAP:
                b_g = b_g * b_dcap
            if NEED_DB:
                tl.atomic_add(db_ptr + offs_v, tl.sum(b_g, axis=0), mask=mask_v, sem="relaxed")
            accumulate_grads(b_g, h_ptr, w_ptr, dh_ptr, dw_ptr, offs_n, offs_v, N, V, H,
                             stride_h, stride_w, stride_dh, stride_dw, NEED_DH, NEED_DW, BLOCK_K,
                             DOT_FP32, PRECISION)


kl_fwd_tuned = common.autotuned(kl_fwd_kernel, common.KL_FWD_CONFIGS, key=["V", "H", "RH"])
kl_bwd_tuned = common.autotuned(kl_bwd_kernel, common.BWD_CONFIGS, key=["V", "H", "RH"],
                                accumulators=["dh_ptr", "dw_ptr", "db_ptr"])


def _combine(pmq, psq, pmp, psp, pd, mask, reverse):
    """Merge per-split statistics (float64, see ``common.merge_splits``): (kl float32, lse float64,
    rlse float64), kl = 0 where mask is False."""
    plse, prlse = pmq.double() + psq.double(), pmp.double() + psp.double()
    lse, rlse = torch.logsumexp(plse, dim=0), torch.logsumexp(prlse, dim=0)
    if reverse:
        kl = -(torch.exp(plse - lse) * pd.double()).sum(0) + rlse - lse
    else:
        kl = (torch.exp(prlse - rlse) * pd.double()).sum(0) + lse - rlse
    return torch.where(mask, kl, torch.zeros_like(kl)).float(), lse, rlse


def _caps(softcap, ref_softcap):
    """The kernels' softcap scalars (1.0 stands in for an absent one: its flag is off)."""
    return tuple(1.0 if c is None else float(c) for c in (softcap, ref_softcap))


def forward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, direction, temperature, softcap,
            ref_softcap):
    """-> (kl float32, lse float64, ref_lse float64), (N,); lse's of the tempered logits."""
    n, h = hidden.shape
    v, rh = weight.shape[0], ref_weight.shape[1]
    split_cols, n_splits = common.vocab_splits(v)
    stats = [torch.empty((n_splits, n), dtype=torch.float32, device=hidden.device) for _ in range(5)]
    d = common.dummy(hidden.device)
    args = (hidden, weight, d if bias is None else bias, ref_hidden, ref_weight, d if ref_bias is None else ref_bias,
            *stats, n, v, h, rh, split_cols, n_splits, hidden.stride(0), weight.stride(0), ref_hidden.stride(0),
            ref_weight.stride(0), 1.0 / float(temperature), *_caps(softcap, ref_softcap))
    flags = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, REVERSE=direction == "reverse",
                 SOFTCAP=softcap is not None, REF_SOFTCAP=ref_softcap is not None,
                 DOT_FP32=common.INTERPRET, PRECISION=common.dot_precision(hidden.dtype))
    if n > 0:
        common.launch(kl_fwd_kernel, kl_fwd_tuned, args, flags, n=n, fp32=hidden.dtype == torch.float32,
                      n_splits=n_splits)
    return _combine(*stats, mask, direction == "reverse")


def backward(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, lse, ref_lse, kl, coeff, direction, temperature,
             softcap, ref_softcap, needs):
    """Gradient of sum_i coeff_i * kl_i w.r.t. the trained side: (dhidden, dweight, dbias)."""
    n, h = hidden.shape
    rh = ref_weight.shape[1]
    d = common.dummy(hidden.device)
    stats = (*common.hi_lo(lse), *common.hi_lo(ref_lse), kl.float().contiguous(), coeff.float().contiguous())
    flags = dict(HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, REVERSE=direction == "reverse",
                 SOFTCAP=softcap is not None, REF_SOFTCAP=ref_softcap is not None, NEED_DH=bool(needs[0]),
                 NEED_DW=bool(needs[1]), NEED_DB=bool(needs[2]) and bias is not None,
                 DOT_FP32=common.INTERPRET, PRECISION=common.dot_precision(hidden.dtype))

    def run(v0, v1, dh, dw, db):
        if n == 0 or not (flags["NEED_DH"] or flags["NEED_DW"] or flags["NEED_DB"]):
            return
        # Both models' weight rows [v0, v1): views.
        args = (hidden, weight[v0:v1], d if bias is None else bias[v0:v1], ref_hidden, ref_weight[v0:v1],
                d if ref_bias is None else ref_bias[v0:v1], *stats,
                d if dh is None else dh, d if dw is None else dw, d if db is None else db,
                n, v1 - v0, h, rh, hidden.stride(0), weight.stride(0), ref_hidden.stride(0), ref_weight.stride(0), h, h,
                1.0 / float(temperature), *_caps(softcap, ref_softcap), common.GRAD_FILTER_EPS)
        common.launch(kl_bwd_kernel, kl_bwd_tuned, args, flags, n=n, fp32=hidden.dtype == torch.float32, v=v1 - v0)

    return common.chunked_grads(hidden, weight, bias, needs, run)
