"""The gradient path of backend ``triton``: a bounded chunk of logits through memory, cuBLAS GEMMs,
one fused Triton row kernel.

Per chunk of ``c`` tokens (``c * V`` logits of the input dtype within ``WORKSPACE_BYTES``,
allocated once per call and reused by every chunk):

1. ``z = hidden_c @ weight.T (+ bias)``: cuBLAS, into the workspace (for KL the reference side's
   logits into a second one);
2. one program per row (``ce_rows_kernel`` / ``kl_rows_kernel``): a pass over the row for the
   online max / sum-exp (and the target logit, or for KL both sides and the expectation of the
   logit difference), the value, the ascent cap, then a second pass that overwrites the row with
   its logit gradient ``coeff * dloss/dz`` in the input dtype;
3. ``dhidden_c = G @ weight`` (cuBLAS, straight into the rows of dhidden),
   ``dweight += G.T @ hidden_c`` (cuBLAS; summed in float32 or in the input dtype, see
   ``DW_ACCUM``),
   ``dbias += G.sum(0)``.

That is the three GEMMs of the floor (KL: four) at cuBLAS speed plus two passes over the chunk.
Why not the fully fused backward of ``ce.py`` / ``kl.py`` (logits recomputed on chip, dH and dW
added with float32 atomics): measured on an H100 (benchmarks/results/2026-11-27-h100) at the
Llama-2-7B head it ran 3.7x the GEMM floor. Its atomic traffic is N*H*V*4*(1/BLOCK_N + 1/BLOCK_V)
bytes, ~128 GiB at N = 16384, whatever the shape, because a tile's gradient must reach an
(N, H) and a (V, H) accumulator that no chip can hold; and an owning kernel (no atomics) would
recompute every tile H / BLOCK_K times. A logit gradient that goes through memory once, in 16
bits, costs 2 bytes per logit instead.

Chunk size is the trade-off, measured on an H100 (benchmarks/results/2026-11-27-h100-triton,
Llama-2-7B head, N = 16384, bf16, signed CE forward+backward): every chunk reads and writes the
whole dW once more (cuBLAS's beta = 1 epilogue; 500 MiB in bf16, 1000 MiB in float32, not hidden
behind the GEMMs), so 16 chunks of 64 MiB ran 1.28x the GEMM floor with dW summed in bf16 and
1.44x in float32, 4 chunks of 256 MiB 1.10x either way. ``WORKSPACE_BYTES`` is therefore 256 MiB
for both sides together (2**27 bf16 logits for CE; the ``torch`` and ``cuda`` backends allot
2**27 elements per side and dtype-independent, so twice that for KL or float32); a call's
``chunk_size`` sets smaller chunks where memory matters more. Re-measured on 2026-11-28
(benchmarks/results/2026-11-28-h100, CE and Liger in one group): 4 chunks of 256 MiB 1.15x the
floor (Liger 1.17x at 126 MiB), 16 of 64 MiB 1.28x in bf16; dW alone over 16 chunks costs 1.47 ms
(bf16) / 4.40 ms (float32) more than one GEMM over all tokens. A Triton GEMM that reads and writes
dW inside the kernel, so that two programs per SM overlap that traffic with their MMAs, was slower
than cuBLAS in every config tried (16 chunks into bf16: 8.55 ms at best against 7.66) and was
removed (it is in the history at 44eccca, ``triton_kernels/gemm.py``).

``DW_ACCUM`` (16-bit weights; float32 weights always accumulate in place, exactly):
``"float32"`` (default) keeps a float32 (V, H) accumulator (4*V*H bytes, 500 MiB at the
Llama-2-7B head, 2 GiB at Llama-3's V = 128256) and rounds the finished sum once, like a plain
PyTorch backward and like the ``torch`` and ``cuda`` backends; ``"input"`` accumulates into the
16-bit gradient itself, one rounding per chunk, no accumulator: the memory of the 64 MiB setting.
Its error is relative to the partial sums, not to the result, so it grows with the number of
chunks and with cancellation between them: ``python benchmarks/dw_accumulation.py`` (CPU, N =
8192, H = 128, V = 2000, bf16, signed weights -0.1 / +2, the same logit gradient summed both
ways) measured 1.25x the error of one GEMM over all tokens with 4 chunks, 2.0x with 16 (seeds
0-2); and where ascent and descent rows nearly cancel (``--cancel``: one signed call with ascent
rows first, as the surgery objective makes, weights -1 and +1.1 on like rows) 8-10x plain
PyTorch's error with 4 chunks and 15-19x with 16 (benchmarks/results/2026-12-07-cpu/dw-accumulation;
a review on 2026-11-28 had quoted 1.6-4.4x and 2.5-9.1x, which the script does not reproduce) —
past the 2x every 16-bit path here is held to. Hence float32 by default. (From 2026-11-27 to 28 the default
took ``"input"`` up to 4, then 16 chunks; measured on the H100, the float32 accumulator costs
little time at 4 to 8 chunks — 21.34 against 21.78 ms for the CE, 29.70 against 29.91 ms for the
KL in one group — and 3.0 ms at 16 chunks, 25.50 against 22.47 ms.)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import common
from .common import online_kl, online_lse, round_bf16_by_hand, tanh, tanh_dtanh

# Bytes of logits one call keeps in memory when it passes no chunk_size (both sides together for KL).
WORKSPACE_BYTES = 256 << 20
# "float32" | "input": how 16-bit dW accumulates over chunks (module docstring).
DW_ACCUM = os.environ.get("SURGERY_TRITON_DW_ACCUM", "float32")
# Whether the chunks' logits go into the not yet written rows of dhidden and WORKSPACE_BYTES after
# it (``Workspace``), "1", or into WORKSPACE_BYTES of their own, "0" (default).
TAIL_WORKSPACE = os.environ.get("SURGERY_TRITON_TAIL_WORKSPACE", "0") == "1"
# Columns per step of the row loops and warps per row: autotuned on the GPU (per V, on the first
# call: the kernels overwrite the chunk, so the tuning runs restore it); the interpreter takes one
# small block. SURGERY_TRITON_AUTOTUNE=0 takes the first config.
ROW_CONFIGS = [triton.Config({"BLOCK": b}, num_warps=w) for b, w in ((8192, 16), (16384, 16), (16384, 32),
                                                                     (32768, 32), (4096, 8))]
INTERPRET_BLOCK = 512


def chunk_rows(n: int, v: int, itemsize: int, sides: int, chunk_size: int | None) -> int:
    """Tokens per chunk: ``chunk_size`` if given, else as many as fit ``WORKSPACE_BYTES``
    (a multiple of 128 when that is at least 128, for the GEMMs' tiles); between 1 and N."""
    if chunk_size:
        rows = chunk_size
    else:
        rows = WORKSPACE_BYTES // max(1, sides * v * itemsize)
        if rows >= 128:
            rows = rows // 128 * 128
    return max(1, min(n, rows))


# Elements every chunk's logits start on in the tail layout (128 bytes of 16-bit logits), as a
# buffer of its own would for the GEMMs' vectorized and TMA accesses.
ALIGN = 64


def _align(x: int) -> int:
    return -(-x // ALIGN) * ALIGN


class Workspace:
    """Where each chunk's logits (and for KL the reference's) live, and dhidden.

    Separate (the default): one buffer of ``chunk_rows`` x V per side, reused by every chunk and
    freed with the call; dhidden a tensor of its own.

    Tail (``TAIL_WORKSPACE``, taken when dhidden is wanted, no ``chunk_size`` is given, both KL
    sides share a dtype, and it makes fewer chunks than the separate layout): one buffer holds
    dhidden in its first N*H elements and, for the chunk of rows [s, e), that chunk's logits right
    after dhidden's row e: in the rows of dhidden that no chunk has written yet, then at most
    WORKSPACE_BYTES more. A chunk writes dhidden's rows [s, e) while it reads its logits from
    beyond them, and a later chunk overwrites the logits' place only after this one's GEMMs
    (stream order). So the first chunks, with most of dhidden still free, take more rows,
    ``(rows left * H + extra) // (H + sides * V)`` each: 10 chunks instead of 16 at the Llama-2-7B
    head (N = 16384) with 64 MiB, 6 instead of 8 with 128 MiB (4 either way with 256 MiB, where
    the separate layout is taken). The price, why it is not the default until a GPU has measured
    the gain: dhidden is a view of the whole buffer, so the extra bytes live as long as dhidden —
    saved from a "mean"/"sum" forward to its backward (two calls before one backward hold two
    extras), and as ``.grad`` of a leaf — not only during the call; and the first call's autotuning
    copy (see README) is of a first chunk larger than WORKSPACE_BYTES.
    """

    def __init__(self, hidden, v, dtypes, chunk_size, want_dh):
        n, h = hidden.shape
        sides = len(dtypes)
        self.v, self.dtypes = v, dtypes
        itemsize = max(dt.itemsize for dt in dtypes)
        rows = chunk_rows(n, v, itemsize, sides, chunk_size)
        self.bounds = [(s, min(s + rows, n)) for s in range(0, n, rows)]
        self.tail = False
        if TAIL_WORKSPACE and want_dh and not chunk_size and n and len(set(dtypes)) == 1:
            bounds, offsets, end = tail_plan(n, h, v, sides, WORKSPACE_BYTES // itemsize)
            if len(bounds) < len(self.bounds):
                self.tail, self.bounds, self.offsets = True, bounds, offsets
                self.flat = torch.empty(end, dtype=dtypes[0], device=hidden.device)
                self.dh = self.flat[:n * h].view(n, h)
                return
        self.rows, self.device, self.bufs = min(rows, n), hidden.device, None
        self.dh = torch.empty_like(hidden) if want_dh else None

    def logits(self, i):
        """The buffers (rows of chunk ``i``, V), one per side, for that chunk's logits."""
        s, e = self.bounds[i]
        c = e - s
        if not self.tail:
            if self.bufs is None:  # allocated at the first chunk: a call with no chunk to run allocates none
                self.bufs = [torch.empty((self.rows, self.v), dtype=dt, device=self.device) for dt in self.dtypes]
            return [buf[:c] for buf in self.bufs]
        return [self.flat[off:off + c * self.v].view(c, self.v) for off in self.offsets[i]]


def tail_plan(n: int, h: int, v: int, sides: int, extra: int):
    """The tail layout for N rows of H (dhidden) and at most ``extra`` elements after them:
    (bounds [(s, e)], per chunk the start of each side's logits, the buffer's length), the
    buffer only as long as the chunks need."""
    slack = sides * ALIGN  # every side starts aligned
    extra = max(extra, sides * v + slack)  # at least one row of logits per side: rows >= 1 below
    bounds, offsets, end = [], [], n * h
    s = 0
    while s < n:
        rows = ((n - s) * h + extra - slack) // (h + sides * v)
        if rows >= n - s:
            rows = n - s
        elif rows >= 128:  # a multiple of 128 for the GEMMs' tiles, unless it is the last chunk
            rows = rows // 128 * 128
        e = s + rows
        starts, off = [], _align(e * h)
        for _ in range(sides):
            starts.append(off)
            end = max(end, off + (e - s) * v)
            off = _align(off + (e - s) * v)
        assert end <= n * h + extra
        bounds.append((s, e))
        offsets.append(starts)
        s = e
    return bounds, offsets, end


@triton.jit
def _softcapped(z, softcap, SOFTCAP: tl.constexpr):
    if SOFTCAP:
        z = softcap * tanh(z / softcap)
    return z


@triton.jit
def _log_probs(p_z, p_zr, offs, mask, mq, log_sq, mp, log_sp, inv_t, softcap, ref_softcap,
               SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr):
    """A block of a row's trained logits (raw), log q and log p (each from its side's max:
    exact for logits of any size); one function for every pass that uses them, so all compute the
    same values."""
    b_raw = tl.load(p_z + offs, mask=mask, other=0.0).to(tl.float32)
    b_lq = _softcapped(b_raw, softcap, SOFTCAP) * inv_t - mq - log_sq
    b_lp = _softcapped(tl.load(p_zr + offs, mask=mask, other=0.0).to(tl.float32), ref_softcap, REF_SOFTCAP) \
        * inv_t - mp - log_sp
    return b_raw, b_lq, b_lp


# V and ignore_index vary call to call: not specialized (stride_z, = V for the workspace, still is,
# so V % 16 splits variants).
@triton.jit(do_not_specialize=["V", "ignore_index"])
def ce_rows_kernel(z_ptr, target_ptr, coeff_ptr, ce_ptr, lse_ptr, V, stride_z, ignore_index, softcap, ascent_cap,
                   SOFTCAP: tl.constexpr, ASCENT_CAP: tl.constexpr, WRITE_STATS: tl.constexpr,
                   WRITE_GRAD: tl.constexpr, BF16_BY_HAND: tl.constexpr, BLOCK: tl.constexpr):
    """Row ``program_id`` of the logits ``z`` (c, V): ce and lse (WRITE_STATS) and, in place,
    coeff * (softmax - onehot) * softcap' (WRITE_GRAD), with coeff set to 0 for an ignored
    target and, with ASCENT_CAP, for coeff < 0 and ce > ascent_cap."""
    softcap = tl.cast(softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    p_z = z_ptr + row * stride_z
    t = tl.load(target_ptr + row)
    cols = tl.arange(0, BLOCK)
    # Running max and sum-exp of the row (common.online_lse on the row as a (1, BLOCK) tile): every
    # step covers a live column (v0 < V).
    m = tl.full((1,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((1,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + cols[None, :]
        mask = offs < V
        b_z = _softcapped(tl.load(p_z + offs, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP)
        m, s = online_lse(m, s, tl.where(mask, b_z, float("-inf")))
    m = tl.max(m, axis=0)
    s = tl.sum(s, axis=0)
    live = t != ignore_index
    # the target's logit: one scalar load (targets are checked to lie in [0, V) or be ignore_index)
    in_range = live & (t >= 0) & (t < V)
    zt = _softcapped(tl.load(p_z + t, mask=in_range, other=0.0).to(tl.float32), softcap, SOFTCAP)
    ce = tl.where(live, m + tl.log(s) - zt, 0.0)
    if WRITE_STATS:
        tl.store(ce_ptr + row, ce)
        tl.store(lse_ptr + row, m.to(tl.float64) + tl.log(s).to(tl.float64))
    if WRITE_GRAD:
        c = tl.load(coeff_ptr + row)
        c = tl.where(live, c, 0.0)
        if ASCENT_CAP:
            c = tl.where((c < 0.0) & (ce > ascent_cap), 0.0, c)
        inv_s = 1.0 / s
        # Every warp has read z[t] before any overwrites it below: without this barrier a warp
        # running ahead could store the gradient over the target's logit while a late one still
        # had to load it (its ce, and the ascent cap, from a gradient value).
        tl.debug_barrier()
        for v0 in range(0, V, BLOCK):
            offs = v0 + cols
            mask = offs < V
            b_raw = tl.load(p_z + offs, mask=mask, other=0.0).to(tl.float32)
            b_z = _softcapped(b_raw, softcap, SOFTCAP)
            # softmax from the row max, not from lse: exact for logits of any size
            b_g = tl.exp(b_z - m) * inv_s - tl.where(offs == t, 1.0, 0.0)
            b_g = b_g * c
            if SOFTCAP:
                _, b_dcap = tanh_dtanh(b_raw / softcap)
                b_g = b_g * b_dcap
            b_g = round_bf16_by_hand(b_g, BF16_BY_HAND)
            tl.store(p_z + offs, b_g.to(p_z.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["V"])
def kl_rows_kernel(z_ptr, zr_ptr, mask_ptr, coeff_ptr, kl_ptr, lse_ptr, rlse_ptr, V, stride_z, stride_zr, inv_t,
                   softcap, ref_softcap,
                   REVERSE: tl.constexpr, HAS_MASK: tl.constexpr, SOFTCAP: tl.constexpr, REF_SOFTCAP: tl.constexpr,
                   WRITE_STATS: tl.constexpr, WRITE_GRAD: tl.constexpr, BF16_BY_HAND: tl.constexpr,
                   BLOCK: tl.constexpr):
    """Row ``program_id`` of the trained logits ``z`` and the reference's ``zr`` (c, V), each
    softcapped (SOFTCAP, REF_SOFTCAP) and tempered by 1/T: kl, lse, rlse (WRITE_STATS) and, in
    place in z, coeff/T * (q - p) (forward KL(p||q)) or coeff/T * q * (log q - log p - kl)
    (reverse KL(q||p); its kl summed from the same terms in one more pass), times softcap' of z;
    kl and coeff are 0 where mask is False (HAS_MASK)."""
    inv_t = tl.cast(inv_t, tl.float32)
    softcap = tl.cast(softcap, tl.float32)
    ref_softcap = tl.cast(ref_softcap, tl.float32)
    row = tl.program_id(0).to(tl.int64)
    p_z = z_ptr + row * stride_z
    p_zr = zr_ptr + row * stride_zr
    cols = tl.arange(0, BLOCK)
    # Running max and sum-exp of both sides and, under the weighting side (p forward, q reverse),
    # the sum of exp(a - max_a) * d, d = (zr - z) / T (common.online_kl on the row as a (1, BLOCK)
    # tile); every step covers a live column (v0 < V).
    mq = tl.full((1,), float("-inf"), dtype=tl.float32)
    mp = tl.full((1,), float("-inf"), dtype=tl.float32)
    sq = tl.zeros((1,), dtype=tl.float32)
    sp = tl.zeros((1,), dtype=tl.float32)
    e = tl.zeros((1,), dtype=tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + cols[None, :]
        mask = offs < V
        b_x = _softcapped(tl.load(p_z + offs, mask=mask, other=0.0).to(tl.float32), softcap, SOFTCAP) * inv_t
        b_y = _softcapped(tl.load(p_zr + offs, mask=mask, other=0.0).to(tl.float32), ref_softcap,
                          REF_SOFTCAP) * inv_t
        b_d = tl.where(mask, b_y - b_x, 0.0)
        mq, sq, mp, sp, e = online_kl(mq, sq, mp, sp, e, tl.where(mask, b_x, float("-inf")),
                                      tl.where(mask, b_y, float("-inf")), b_d, REVERSE)
    mq = tl.max(mq, axis=0)
    mp = tl.max(mp, axis=0)
    sq = tl.sum(sq, axis=0)
    sp = tl.sum(sp, axis=0)
    e = tl.sum(e, axis=0)
    log_sq = tl.log(sq)
    log_sp = tl.log(sp)
    if REVERSE:
        # KL(q || p) = E_q[log q - log p] = -E_q[d] + (mp + log sp) - (mq + log sq)
        kl = -e / sq + (mp - mq) + (log_sp - log_sq)
    else:
        # KL(p || q) = E_p[d] + (mq + log sq) - (mp + log sp)
        kl = e / sp + (mq - mp) + (log_sq - log_sp)
    c = 0.0
    if WRITE_GRAD:
        c = tl.load(coeff_ptr + row) * inv_t
    if HAS_MASK:
        live = tl.load(mask_ptr + row) != 0
        kl = tl.where(live, kl, 0.0)
        c = tl.where(live, c, 0.0)
    if WRITE_STATS:
        tl.store(kl_ptr + row, kl)
        tl.store(lse_ptr + row, mq.to(tl.float64) + log_sq.to(tl.float64))
        tl.store(rlse_ptr + row, mp.to(tl.float64) + log_sp.to(tl.float64))
    if WRITE_GRAD:
        kl_g = kl
        if REVERSE:
            # The gradient q * (log q - log p - kl) cancels where q is nearly one-hot: kl must be
            # the sum of the very terms it is subtracted from, sum q * (log q - log p) as the next
            # pass computes them. The closed form above rounds otherwise (its terms are of the
            # logits' size), which made the gradient thousands of times plain PyTorch's error on a
            # peaked q far from p. One more read of the two rows, for reverse KL's gradient only.
            acc = tl.zeros((BLOCK,), dtype=tl.float32)
            for v0 in range(0, V, BLOCK):
                offs = v0 + cols
                mask = offs < V
                _, b_lq, b_lp = _log_probs(p_z, p_zr, offs, mask, mq, log_sq, mp, log_sp, inv_t, softcap,
                                           ref_softcap, SOFTCAP, REF_SOFTCAP)
                # 0 * log 0 = 0 where q has a -inf logit
                acc += tl.where(mask & (b_lq != float("-inf")), tl.exp(b_lq) * (b_lq - b_lp), 0.0)
            kl_g = tl.sum(acc, axis=0)
        for v0 in range(0, V, BLOCK):
            offs = v0 + cols
            mask = offs < V
            b_raw, b_lq, b_lp = _log_probs(p_z, p_zr, offs, mask, mq, log_sq, mp, log_sp, inv_t, softcap,
                                          ref_softcap, SOFTCAP, REF_SOFTCAP)
            if REVERSE:  # q = 0, or a token of coefficient 0 (its kl may be inf: inf - inf): gradient 0
                b_g = tl.where(b_lq == float("-inf"), 0.0, tl.exp(b_lq) * ((b_lq - b_lp) - kl_g))
                b_g = tl.where(c == 0.0, 0.0, b_g)
            else:
                b_g = tl.exp(b_lq) - tl.exp(b_lp)
            b_g = b_g * c
            if SOFTCAP:
                _, b_dcap = tanh_dtanh(b_raw / softcap)
                b_g = b_g * b_dcap
            b_g = round_bf16_by_hand(b_g, BF16_BY_HAND)
            tl.store(p_z + offs, b_g.to(p_z.dtype.element_ty), mask=mask)


def row_autotuner(kernel, configs, do_bench=None):
    """``kernel`` autotuned over ``configs`` per V and variant. The kernels overwrite their chunk
    of logits with the gradient, so every tuning run starts from a restored copy of it (the
    first call per key clones the chunk once)."""
    extra = {} if do_bench is None else {"do_bench": do_bench}
    return triton.autotune(configs, key=["V", "WRITE_STATS", "WRITE_GRAD"], restore_value=["z_ptr"],
                           **extra)(kernel)


ce_rows_tuned = row_autotuner(ce_rows_kernel, common.configs(ROW_CONFIGS))
kl_rows_tuned = row_autotuner(kl_rows_kernel, common.configs(ROW_CONFIGS))


def _row_launch(kernel, tuned, rows, args, flags, dtype):
    if not rows:
        return
    if common.INTERPRET:
        kernel[(rows,)](*args, **flags, BF16_BY_HAND=dtype == torch.bfloat16, BLOCK=INTERPRET_BLOCK)
    else:
        tuned[(rows,)](*args, **flags, BF16_BY_HAND=False)


# -- gradients: dhidden per chunk, dweight and dbias accumulated over chunks ---------------------

# Whether torch.addmm takes out_dtype=float32 for 16-bit inputs here (CUDA, torch >= 2.8);
# None until the first try. Where it does not (CPU, older torch), dW's chunk products are float32
# GEMMs of the upcast operands, one slice of the vocabulary at a time (scratch of at most the
# workspace size): slower, as exact.
_ADDMM_OUT_DTYPE: bool | None = None


def _addmm_float32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, first: bool) -> None:
    """acc (V, H) float32 += a (V, c) @ b (c, H) (``first``: acc = a @ b), a and b 16-bit, the
    chunk's product added unrounded (float32 products and sums of the 16-bit operands)."""
    global _ADDMM_OUT_DTYPE
    if _ADDMM_OUT_DTYPE is not False:
        try:
            # beta=0 on the first chunk: acc is not read (it is uninitialized)
            torch.addmm(acc, a, b, beta=0.0 if first else 1.0, out_dtype=torch.float32, out=acc)
            _ADDMM_OUT_DTYPE = True
            return
        except (RuntimeError, TypeError, NotImplementedError):
            if _ADDMM_OUT_DTYPE:
                raise
            _ADDMM_OUT_DTYPE = False
    bf = b.float()
    step = max(1, WORKSPACE_BYTES // (4 * max(1, a.shape[1] + bf.shape[1])))
    for v0 in range(0, a.shape[0], step):
        if first:
            torch.mm(a[v0:v0 + step].float(), bf, out=acc[v0:v0 + step])
        else:
            acc[v0:v0 + step].addmm_(a[v0:v0 + step].float(), bf)


def accumulate_in_input_dtype(dtype: torch.dtype, chunks: int) -> bool:
    """Whether dW of ``dtype`` weights sums over the call's ``chunks`` chunks in that dtype (see
    DW_ACCUM): float32 weights always, 16-bit ones with "input" or when there is one chunk (one
    GEMM, one rounding, as plain PyTorch)."""
    if DW_ACCUM not in ("float32", "input"):
        raise ValueError(f"SURGERY_TRITON_DW_ACCUM must be 'float32' or 'input', got {DW_ACCUM!r}")
    return dtype == torch.float32 or DW_ACCUM == "input" or chunks <= 1


class _Grads:
    """dhidden (written chunk by chunk), dweight and dbias (accumulated) of one call."""

    def __init__(self, dh, weight, bias, needs, chunks):
        self.dh = dh
        self.dw = self.dw_acc = None
        # dW and dbias start at the first chunk's product (no zero fill, no read of zeros)
        self.first = True
        if needs[1]:
            if accumulate_in_input_dtype(weight.dtype, chunks):
                self.dw = self.dw_acc = torch.empty_like(weight)
            else:
                self.dw_acc = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
        self.db = torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device) \
            if (needs[2] and bias is not None) else None
        self.bias = bias
        self.weight = weight

    def any(self):
        return self.dh is not None or self.dw_acc is not None or self.db is not None

    def add(self, g, h, s, e):
        if self.dh is not None:
            torch.mm(g, self.weight, out=self.dh[s:e])
        first, self.first = self.first, False
        if self.dw_acc is not None:
            if self.dw_acc.dtype == g.dtype:
                if first:
                    torch.mm(g.t(), h, out=self.dw_acc)
                else:
                    self.dw_acc.addmm_(g.t(), h)
            else:
                _addmm_float32_(self.dw_acc, g.t(), h, first)
        if self.db is not None:
            if first:
                torch.sum(g, 0, dtype=torch.float32, out=self.db)
            else:
                self.db += g.sum(0, dtype=torch.float32)

    def finish(self):
        if self.first:  # no chunk ran (N = 0): the sums are empty, so zero
            for t in (self.dw_acc, self.db):
                if t is not None:
                    t.zero_()
        if self.dw_acc is not None and self.dw is None:
            self.dw = self.dw_acc.to(self.weight.dtype)
            self.dw_acc = None
        db = None if self.db is None else self.db.to(self.bias.dtype)
        return self.dh, self.dw, db


def _logits_into(out, h, w, b):
    """out = h @ w.T (+ b): one cuBLAS GEMM, the bias added before the one rounding (as F.linear)."""
    if b is None:
        torch.mm(h, w.t(), out=out)
    else:
        torch.addmm(b, h, w.t(), out=out)
    return out


def ce(hidden, weight, bias, target, coeff, *, ignore_index, softcap, ascent_cap, needs, chunk_size, stats):
    """Chunked CE: (ce float32, lse float64) when ``stats`` (else None, None), and the gradient of
    sum_i coeff_i * ce_i as (dhidden, dweight, dbias), None where not needed."""
    n, v = hidden.shape[0], weight.shape[0]
    ws = Workspace(hidden, v, [hidden.dtype], chunk_size, needs[0])
    grads = _Grads(ws.dh, weight, bias, needs, len(ws.bounds))
    ce_out = torch.zeros(n, dtype=torch.float32, device=hidden.device) if stats else None
    lse = torch.zeros(n, dtype=torch.float64, device=hidden.device) if stats else None
    want_grad = grads.any()
    if n == 0 or not (stats or want_grad):
        return (ce_out, lse) + grads.finish()
    d = common.dummy(hidden.device)
    coeff = d if coeff is None else coeff.float().contiguous()
    flags = dict(SOFTCAP=softcap is not None, ASCENT_CAP=ascent_cap is not None, WRITE_STATS=stats,
                 WRITE_GRAD=want_grad)
    for i, (s, e) in enumerate(ws.bounds):
        z, = ws.logits(i)
        _logits_into(z, hidden[s:e], weight, bias)
        args = (z, target[s:e], coeff[s:e] if want_grad else d, ce_out[s:e] if stats else d,
                lse[s:e] if stats else d, v, z.stride(0), ignore_index, 1.0 if softcap is None else float(softcap),
                0.0 if ascent_cap is None else float(ascent_cap))
        _row_launch(ce_rows_kernel, ce_rows_tuned, e - s, args, flags, z.dtype)
        if want_grad:
            grads.add(z, hidden[s:e], s, e)
    return (ce_out, lse) + grads.finish()


def kl(hidden, weight, bias, ref_hidden, ref_weight, ref_bias, mask, coeff, *, direction, temperature, softcap,
       ref_softcap, needs, chunk_size, stats):
    """Chunked KL: (kl float32, lse float64, ref_lse float64) when ``stats`` (else Nones) and the
    gradient of sum_i coeff_i * kl_i w.r.t. the trained side; ``mask`` None = every token."""
    n, v = hidden.shape[0], weight.shape[0]
    ws = Workspace(hidden, v, [hidden.dtype, ref_hidden.dtype], chunk_size, needs[0])
    grads = _Grads(ws.dh, weight, bias, needs, len(ws.bounds))
    f64 = dict(dtype=torch.float64, device=hidden.device)
    kl_out = torch.zeros(n, dtype=torch.float32, device=hidden.device) if stats else None
    lse, rlse = (torch.zeros(n, **f64), torch.zeros(n, **f64)) if stats else (None, None)
    want_grad = grads.any()
    if n == 0 or not (stats or want_grad):
        return (kl_out, lse, rlse) + grads.finish()
    d = common.dummy(hidden.device)
    coeff = d if coeff is None else coeff.float().contiguous()
    mask = None if mask is None else mask.to(torch.uint8)
    flags = dict(REVERSE=direction == "reverse", HAS_MASK=mask is not None, SOFTCAP=softcap is not None,
                 REF_SOFTCAP=ref_softcap is not None, WRITE_STATS=stats, WRITE_GRAD=want_grad)
    for i, (s, e) in enumerate(ws.bounds):
        z, zr = ws.logits(i)
        _logits_into(z, hidden[s:e], weight, bias)
        _logits_into(zr, ref_hidden[s:e], ref_weight, ref_bias)
        args = (z, zr, d if mask is None else mask[s:e], coeff[s:e] if want_grad else d,
                kl_out[s:e] if stats else d, lse[s:e] if stats else d, rlse[s:e] if stats else d, v, z.stride(0),
                zr.stride(0), 1.0 / float(temperature), 1.0 if softcap is None else float(softcap),
                1.0 if ref_softcap is None else float(ref_softcap))
        _row_launch(kl_rows_kernel, kl_rows_tuned, e - s, args, flags, z.dtype)
        if want_grad:
            grads.add(z, hidden[s:e], s, e)
    return (kl_out, lse, rlse) + grads.finish()
