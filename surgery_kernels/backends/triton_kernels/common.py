"""Pieces shared by the CE and KL kernels: tile scheduling, the on-chip logit tile, the gradient
accumulation, softcap's tanh, the launch configurations.

Index arithmetic is 64-bit: row and column offsets are int64 before they meet a stride, so
N * H, V * H and splits * N above 2**31 are safe.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .._ops import device_of

# TRITON_INTERPRET must be set before triton is imported; read it the same way triton does.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")

# Gradient filtering (skip the dH/dW update of a logit tile whose |softmax - onehot| (CE) or
# |dKL/dz| (KL) is below this everywhere, tested before the token weight is applied).
# 0 = exact: only tiles that are exactly zero (all tokens ignored/capped/masked) are skipped.
# Set with SURGERY_TRITON_GRAD_FILTER=2e-5 or by assigning this attribute before a call.
GRAD_FILTER_EPS = float(os.environ.get("SURGERY_TRITON_GRAD_FILTER", "0"))

# SURGERY_TRITON_AUTOTUNE=0 uses the first config of each list (no tuning runs).
AUTOTUNE = os.environ.get("SURGERY_TRITON_AUTOTUNE", "1") != "0"

# Upper bound on the number of vocabulary splits of a forward pass: each split of each row
# block is one program; partial statistics cost splits * N float32 per statistic (64 splits
# at N = 16384: 4 MiB). Under the interpreter keep programs few.
MAX_SPLITS = 2 if INTERPRET else 64
# A split covers a multiple of this many columns, so every BLOCK_V of the configs divides it.
SPLIT_QUANTUM = 256


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs get IEEE products (the fp32 contract is 1e-5 relative; TF32 is ~1e-3) unless
    the caller allowed TF32 for float32 matmuls (``torch.backends.cuda.matmul.allow_tf32``,
    ``torch.set_float32_matmul_precision("high")``): the gradient path's cuBLAS GEMMs follow that
    setting, and the fused kernels follow it with them, so that a forward and a forward+backward
    give the same values. 16-bit inputs: exact products in the float32 accumulator either way."""
    return "ieee" if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else "tf32"


def vocab_splits(v: int) -> tuple[int, int]:
    """(columns per split, number of splits) for the forward kernels; every split is non-empty."""
    quanta = triton.cdiv(v, SPLIT_QUANTUM)
    split_cols = SPLIT_QUANTUM * triton.cdiv(quanta, MAX_SPLITS)
    return split_cols, triton.cdiv(v, split_cols)


@triton.jit
def tanh_dtanh(x):
    # tanh(x) and d tanh / dx = 1 - tanh(x)^2, from one exp.
    # tanh from exp: libdevice's tanh does not run under the interpreter. e = exp(-2|x|) lies in
    # (0, 1], so nothing overflows for large |x|. Its absolute error is ~1 ulp of 1, which near 0
    # is a large relative error (softcap * tanh(z / softcap) multiplies it by softcap: 2.6e-5 of
    # the loss at softcap 1e4, review 2026-11-28), so below |x| = 1/4 the odd Taylor polynomial
    # to x**9 is used: its first omitted term, 1382/155925 x**11, is < 1e-8 of tanh there.
    # The derivative is not formed from the rounded tanh: near saturation tanh rounds towards 1
    # and 1 - t*t loses its digits (-0.5 % on average at |x| in [6, 8]; plain float32 PyTorch's
    # torch.tanh keeps few more, review 2026-12-07). 1 - t^2 = 4e / (1 + e)^2 has no cancellation;
    # below |x| = 1/4, 1 - p^2 of the polynomial (>= 0.94, none either).
    e = tl.exp(-2.0 * tl.abs(x))
    one_e = 1.0 + e
    t = (1.0 - e) / one_e
    x2 = x * x
    p = x * (1.0 + x2 * (-1.0 / 3.0 + x2 * (2.0 / 15.0 + x2 * (-17.0 / 315.0 + x2 * (62.0 / 2835.0)))))
    small = tl.abs(x) < 0.25
    return tl.where(small, p, tl.where(x < 0, -t, t)), tl.where(small, 1.0 - p * p, 4.0 * e / (one_e * one_e))


@triton.jit
def tanh(x):
    # tanh_dtanh's tanh (the compiler drops the unused derivative)
    t, _ = tanh_dtanh(x)
    return t


@triton.jit
def round_bf16_by_hand(x, ON: tl.constexpr):
    """With ON (the interpreter, bf16 output): float32 x rounded to the nearest bf16 (ties to
    even), still float32, so that the truncating conversion the interpreter does next is exact.
    The interpreter's float32 -> bf16 conversion truncates (2x the error of the GPU's rounding,
    checked with TRITON_INTERPRET=1 on triton 3.6); finite x only."""
    if ON:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x


@triton.jit
def _finite_or_zero(m):
    """The running max to shift by: 0 while every logit seen so far is -inf (a block banned by a
    -inf bias, or masked columns), where exp(z - m) would be exp(-inf + inf) = NaN."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def online_lse(m, s, z):
    """One vocabulary block of a running log-sum-exp, per row of the (R, C) tile ``z`` (-inf in
    masked columns): the row max ``m`` and the sum ``s`` of exp(z - m) so far, (R,) each ->
    updated. A row with no finite logit yet keeps m = -inf and s = 0 (its lse m + log s: -inf)."""
    m_new = tl.maximum(m, tl.max(z, axis=1))
    shift = _finite_or_zero(m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(z - shift[:, None]), axis=1)
    return m_new, s


@triton.jit
def online_kl(mq, sq, mp, sp, e, x, y, d, REVERSE: tl.constexpr):
    """One vocabulary block of the KL's running statistics, per row of (R, C) tiles: ``x``, ``y``
    the trained and the reference side's tempered logits (-inf in masked columns), ``d = y - x``
    (0 there). Each side's running max and sum of exp(. - max) (mq, sq; mp, sp) and ``e``, the
    sum of exp(a - max_a) * d under the weighting side a (p forward, q reverse), (R,) each ->
    updated. A side with no finite logit yet keeps max -inf and sum 0 (as ``online_lse``)."""
    # one side after the other: on the fused forward's 128x128 tiles this order spills least
    # (16 B against 152 B interleaved, ptxas for sm_90)
    mq_new = tl.maximum(mq, tl.max(x, axis=1))
    shift = _finite_or_zero(mq_new)  # (as in online_lse)
    eq = tl.exp(x - shift[:, None])
    aq = tl.exp(mq - shift)
    sq = sq * aq + tl.sum(eq, axis=1)
    mp_new = tl.maximum(mp, tl.max(y, axis=1))
    shift = _finite_or_zero(mp_new)
    ep = tl.exp(y - shift[:, None])
    ap = tl.exp(mp - shift)
    sp = sp * ap + tl.sum(ep, axis=1)
    # 0 * log 0 = 0: a column the weighting side gives probability 0 (a -inf logit) adds nothing,
    # whatever d is there (-inf - -inf is NaN); one the other side gives 0 makes the KL +inf.
    if REVERSE:
        e = e * aq + tl.sum(eq * tl.where(x == float("-inf"), 0.0, d), axis=1)
    else:
        e = e * ap + tl.sum(ep * tl.where(y == float("-inf"), 0.0, d), axis=1)
    return mq_new, sq, mp_new, sp, e


@triton.jit
def tile_ids(pid, n_row_blocks, n_col_blocks, GROUP: tl.constexpr):
    """Grouped ordering (as in the Triton matmul tutorial): GROUP row blocks sweep the columns
    together, so programs running at the same time share hidden rows and weight rows in L2."""
    per_group = GROUP * n_col_blocks
    group = pid // per_group
    first = group * GROUP
    size = tl.minimum(n_row_blocks - first, GROUP)
    local = pid % per_group
    return first + local % size, local // size


@triton.jit
def logit_tile(x_ptr, w_ptr, b_ptr, offs_n, offs_v, N, V, K, stride_x, stride_w, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
               DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """x[offs_n, :K] @ w[offs_v, :K].T (+ b[offs_v] with HAS_BIAS) as a float32 (BLOCK_N, BLOCK_V)
    tile; out-of-range rows and columns come out 0. offs_n, offs_v: int64."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_v = offs_v < V
    p_x = x_ptr + offs_n[:, None] * stride_x + offs_k[None, :]
    p_w = w_ptr + offs_v[None, :] * stride_w + offs_k[:, None]
    b_z = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        mask_k = offs_k < K - k
        b_x = tl.load(p_x, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        b_w = tl.load(p_w, mask=mask_k[:, None] & mask_v[None, :], other=0.0)
        if DOT_FP32:
            b_x = b_x.to(tl.float32)
            b_w = b_w.to(tl.float32)
        b_z = tl.dot(b_x, b_w, b_z, input_precision=PRECISION)
        p_x += BLOCK_K
        p_w += BLOCK_K
    if HAS_BIAS:
        b_z += tl.load(b_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)[None, :]
    return b_z


@triton.jit
def accumulate_grads(b_g, x_ptr, w_ptr, dx_ptr, dw_ptr, offs_n, offs_v, N, V, K,
                     stride_x, stride_w, stride_dx, stride_dw,
                     NEED_DX: tl.constexpr, NEED_DW: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr, PRECISION: tl.constexpr):
    """dx[offs_n] += g @ w[offs_v]; dw[offs_v] += g.T @ x[offs_n] for a float32 logit-gradient tile
    g (BLOCK_N, BLOCK_V), with float32 atomics into float32 buffers.

    g is rounded to the input dtype first, as a plain PyTorch backward in that dtype would do
    (the products then accumulate in float32 inside tl.dot)."""
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    mask_v = offs_v < V
    b_gc = b_g.to(x_ptr.dtype.element_ty)
    if DOT_FP32:
        b_gc = b_gc.to(tl.float32)
    for k in range(0, K, BLOCK_K):
        cols = k + offs_k
        mask_k = cols < K
        if NEED_DX:
            b_w = tl.load(w_ptr + offs_v[:, None] * stride_w + cols[None, :],
                          mask=mask_v[:, None] & mask_k[None, :], other=0.0)
            if DOT_FP32:
                b_w = b_w.to(tl.float32)
            b_dx = tl.dot(b_gc, b_w, input_precision=PRECISION)
            tl.atomic_add(dx_ptr + offs_n[:, None] * stride_dx + cols[None, :], b_dx,
                          mask=mask_n[:, None] & mask_k[None, :], sem="relaxed")
        if NEED_DW:
            b_x = tl.load(x_ptr + offs_n[:, None] * stride_x + cols[None, :],
                          mask=mask_n[:, None] & mask_k[None, :], other=0.0)
            if DOT_FP32:
                b_x = b_x.to(tl.float32)
            b_dw = tl.dot(tl.trans(b_gc), b_x, input_precision=PRECISION)
            tl.atomic_add(dw_ptr + offs_v[:, None] * stride_dw + cols[None, :], b_dw,
                          mask=mask_v[:, None] & mask_k[None, :], sem="relaxed")


def merge_splits(pm: torch.Tensor, ps: torch.Tensor) -> torch.Tensor:
    """Per-split row max ``pm`` and log-sum-exp of the shifted logits ``ps`` (splits, N) float32 ->
    the row's log-sum-exp (N,) in float64.

    float64 on purpose: at |z| ~ 1e4 a float32 lse is off by up to half an ulp (~5e-4), which
    would scale every softmax value of the row by ~1 +- 5e-4 in the backward; m + s in float64 is
    exact, and ``hi_lo`` hands it to the backward kernels as two float32 parts."""
    return torch.logsumexp(pm.double() + ps.double(), dim=0)


def hi_lo(lse: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """lse (N,) float64 (or float32) -> (hi, lo) float32 with hi + lo = lse to ~2**-48 relative;
    the kernels compute (z - hi) - lo, exact where z is close to hi."""
    hi = lse.float()
    lo = (lse.double() - hi.double()).float()
    return hi.contiguous(), lo.contiguous()


# The backward of 16-bit weights accumulates dW in float32 for at most this many elements at a
# time (2**24 = 64 MiB), one vocabulary chunk per launch, each chunk written into the 16-bit
# gradient once it is complete; dH accumulates in one float32 (N, H) buffer over all chunks.
DW_CHUNK_ELEMENTS = 1 << 24


def vocab_chunks(v: int, h: int) -> list[tuple[int, int]]:
    """[(v0, v1)): row ranges of the weight, DW_CHUNK_ELEMENTS // H rows each (a multiple of 256)."""
    step = max(SPLIT_QUANTUM, DW_CHUNK_ELEMENTS // max(h, 1) // SPLIT_QUANTUM * SPLIT_QUANTUM)
    return [(v0, min(v0 + step, v)) for v0 in range(0, v, step)]


def chunked_grads(hidden, weight, bias, needs, run):
    """The gradients (dhidden, dweight, dbias), None where not needed, from float32 accumulators
    that ``run(v0, v1, dh, dw, db)`` fills with atomics for weight rows [v0, v1) (dw and db are
    that chunk's buffers). float32 weights are their own accumulator, in one chunk."""
    v, h = weight.shape
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh = torch.zeros(hidden.shape, **f32) if needs[0] else None
    db = torch.zeros(v, **f32) if (needs[2] and bias is not None) else None
    dw = None
    if needs[1]:
        dw = torch.zeros(weight.shape, **f32) if weight.dtype == torch.float32 else \
            torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)
    in_place = dw is None or dw.dtype == torch.float32
    for v0, v1 in ([(0, v)] if in_place else vocab_chunks(v, h)):
        acc = dw[v0:v1] if in_place and dw is not None else (None if dw is None else torch.zeros((v1 - v0, h), **f32))
        run(v0, v1, dh, acc, None if db is None else db[v0:v1])
        if not in_place:
            dw[v0:v1].copy_(acc)
            del acc
    return (None if dh is None else dh.to(hidden.dtype), dw, None if db is None else db.to(bias.dtype))


def dummy(device) -> torch.Tensor:
    """Stands in for an absent tensor argument (never dereferenced: its constexpr flag is off)."""
    return torch.zeros(1, dtype=torch.float32, device=device)


# Interpreter: one fixed config with big blocks (cost grows with programs x ops); BLOCK_N = 32
# still gives odd N several row blocks, so the row masking and grouping are exercised.
INTERPRET_META = dict(BLOCK_N=32, BLOCK_V=128, BLOCK_K=32, GROUP=4)


def _cfg(bn, bv, bk, warps, stages, group=8):
    return triton.Config(dict(BLOCK_N=bn, BLOCK_V=bv, BLOCK_K=bk, GROUP=group), num_warps=warps, num_stages=stages)


# GPU configs (H100 first guesses; the first of each list is used when SURGERY_TRITON_AUTOTUNE=0).
# Checked by compiling for sm_90 here (no GPU): all software-pipelined (cp.async + wgmma), float32
# atomics vectorized (red.v4.f32); ptxas spills noted per line for bf16 without bias or softcap,
# triton 3.9 / 3.6 (benchmarks/results/2026-12-07-cpu/triton_sm90_compile.md; they move between
# triton versions).
# Lists kept short: every config is one more compile (~2-5 s) on the first call of each variant.
# CE forward: a GEMM main loop with a light epilogue.
CE_FWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),  # no spill
    _cfg(128, 256, 64, 8, 3),  # 1192 / 656 B spilled
]
# KL forward holds two logit tiles: 128x256 spills 1.7 KB, so smaller tiles.
KL_FWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),  # 40 / 128 B spilled (both softcaps: 504 / 232 B)
    _cfg(64, 128, 64, 4, 3),
]
# Backward: the recomputed tile stays in registers through the dH/dW loop. BLOCK_K is also the
# width of each atomic update. The atomic traffic is proportional to 1/BLOCK_N + 1/BLOCK_V, so
# the 256-row tile (16 warps, 168 KiB shared memory, 184 / 224 B spilled for CE and 512 B for KL)
# cuts it by a quarter;
# 128x256 would need 232 KiB of shared memory, over the H100's 227.
BWD_CONFIGS = [
    _cfg(128, 128, 64, 8, 3),  # CE no spill, KL 24 / 0 B
    _cfg(128, 128, 32, 8, 4),
    _cfg(256, 128, 32, 16, 3),
]
# float32 inputs: IEEE dots run on FMA units, not tensor cores (the 1e-5 contract rules out
# TF32 unless the caller allows it: dot_precision); large tiles make ptxas spill kilobytes and
# compile for 30 s, so one small tile. This path is for exactness, not speed: use bf16/fp16 for speed.
FP32_CONFIGS = [_cfg(64, 64, 32, 4, 2)]


def configs(which):
    return which if AUTOTUNE else which[:1]


def autotuned(kernel, lists, key, accumulators=None, do_bench=None):
    """{is_float32: autotuned kernel}: float32 inputs get FP32_CONFIGS, 16-bit ones ``lists``.

    ``accumulators``: arguments the kernel adds into. The tuning runs must leave them as they
    were (restore_value, not reset_to_zero): the dW chunks of one backward call share the dH
    buffer, and a chunk of a new width is tuned while dH holds the earlier chunks' sums."""
    extra = {} if do_bench is None else {"do_bench": do_bench}
    return {fp32: triton.autotune(configs(FP32_CONFIGS if fp32 else lists), key=key, restore_value=accumulators,
                                  **extra)(kernel) for fp32 in (False, True)}


def launch(kernel, tuned, args, flags, *, n, fp32, n_splits=None, v=None):
    """Run ``kernel`` over row blocks x (``n_splits`` vocabulary splits, or the vocabulary blocks
    of ``v`` columns): the fixed interpreter config, or the autotuned one on a GPU."""
    def grid(meta):
        cols = n_splits if n_splits is not None else triton.cdiv(v, meta["BLOCK_V"])
        return (triton.cdiv(n, meta["BLOCK_N"]) * cols,)

    if INTERPRET:
        kernel[grid(INTERPRET_META)](*args, **flags, **INTERPRET_META)
    else:
        tuned[fp32][grid](*args, **flags)


@triton.jit
def _scale_kernel(g_ptr, s_ptr, n, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    keep = offs < n
    g = tl.load(g_ptr + offs, mask=keep).to(tl.float32) * tl.load(s_ptr)
    tl.store(g_ptr + offs, round_bf16_by_hand(g, BF16_BY_HAND).to(g_ptr.dtype.element_ty), mask=keep)


def scale_(g: torch.Tensor, s: torch.Tensor) -> None:
    """g *= s in place for a contiguous 16-bit g, the product in float32 with s a float32 0-dim
    tensor read on the device (no host synchronization): ATen would round s to g's dtype first
    (65536, GradScaler's first scale, is inf in float16)."""
    n = g.numel()
    if n:
        block = 4096 if INTERPRET else 2048
        with device_of(g):  # Triton launches on the current device: make g's current
            _scale_kernel[(triton.cdiv(n, block),)](g, s.reshape(1).to(torch.float32), n,
                                                    BF16_BY_HAND=INTERPRET and g.dtype == torch.bfloat16, BLOCK=block)
