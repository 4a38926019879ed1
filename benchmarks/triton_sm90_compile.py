"""Compile every Triton kernel config for an H100 (sm_90) without a GPU and print what the
compiler made of it: software pipelining (cp.async), tensor-core MMAs (wgmma), vectorized float32
atomics (red/atom .v4.f32; triton 3.6 emits atom, 3.9 red), shared memory, registers and spilled
bytes (STACK).

The JIT marks integer arguments divisible by 16 and 16-byte-aligned pointers; without those hints
nothing is pipelined, so this script passes them as the Llama shapes would (H, V, strides all
multiples of 16). Usage (any machine with triton):  python benchmarks/triton_sm90_compile.py
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from surgery_kernels.backends.triton_kernels import ce, common, kl, rows  # noqa: E402

TENSOR_ARGS = ("h_ptr", "w_ptr", "b_ptr", "rh_ptr", "rw_ptr", "rb_ptr")
FLOAT_ARGS = ("softcap", "ref_softcap", "filter_eps", "inv_t", "ascent_cap")
# pointer arguments of the row kernels that are not float32 (the logits take the input dtype)
ROW_PTRS = {"lse_ptr": "fp64", "rlse_ptr": "fp64", "mask_ptr": "u8", "target_ptr": "i64"}


def _signature(fn, dtype, consts):
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name == "target_ptr":
            sig[name] = "*i64"
        elif name.endswith("_ptr"):
            sig[name] = "*" + (dtype if name in TENSOR_ARGS else "fp32")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return sig


def _resources(cubin: bytes) -> str:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = "/tmp/_surgery_sm90.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    out = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs {m.group(1)} spill {m.group(2)} B" if m else "regs ?"


def compile_one(fn, dtype, cfg, flags):
    consts = dict(cfg.kwargs, **flags)
    sig = _signature(fn, dtype, consts)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or sig[name] == "i32"}
    t0 = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps,
                                                                       num_stages=cfg.num_stages))
    ptx = k.asm["ptx"]
    loads, mmas, atomics = (len(re.findall(p, ptx))
                            for p in (r"cp\.async\.cg", r"wgmma\.mma_async", r"\b(?:red|atom)\.global"))
    kw = cfg.kwargs
    print(f"| {fn.__name__} | {dtype} | {kw['BLOCK_N']}x{kw['BLOCK_V']}x{kw['BLOCK_K']} w{cfg.num_warps} "
          f"s{cfg.num_stages} | {loads} | {mmas} | {atomics} | "
          f"{k.metadata.shared // 1024} | {_resources(k.asm['cubin'])} | {time.time() - t0:.1f} |", flush=True)


def compile_rows(fn, dtype, cfg, flags):
    """A row kernel of the gradient path (triton_kernels.rows) with one of its GPU configs."""
    consts = dict(flags, BLOCK=cfg.kwargs["BLOCK"], BF16_BY_HAND=False)
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("z_ptr", "zr_ptr"):
            sig[name] = "*" + dtype
        elif name.endswith("_ptr"):
            sig[name] = "*" + ROW_PTRS.get(name, "fp32")
        else:
            sig[name] = "fp32" if name in FLOAT_ARGS else "i32"
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if sig[name].startswith("*") or sig[name] == "i32"}
    t0 = time.time()
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps))
    ptx = k.asm["ptx"]
    vec = len(re.findall(r"ld\.global(?:\.\w+)*\.v\d", ptx))
    print(f"| {fn.__name__} | {dtype} | block {cfg.kwargs['BLOCK']} w{cfg.num_warps} | vector loads {vec} | "
          f"ex2 {len(re.findall(r'ex2', ptx))} | {k.metadata.shared // 1024} | {_resources(k.asm['cubin'])} | "
          f"{time.time() - t0:.1f} |", flush=True)


def main():
    print(f"triton {triton.__version__}, target sm_90\n")
    print("| kernel | dtype | tile, warps, stages | cp.async | wgmma | red (atomics) | smem KiB | ptxas | compile s |")
    print("|---|---|---|---:|---:|---:|---:|---|---:|")
    grad = dict(NEED_DH=True, NEED_DW=True, NEED_DB=True)
    caps = dict(SOFTCAP=False, REF_SOFTCAP=False)  # the KL as the Llama-2 heads run it
    kernels = [
        (ce.ce_fwd_kernel, common.CE_FWD_CONFIGS, dict(HAS_BIAS=True, SOFTCAP=True)),
        (ce.ce_bwd_kernel, common.BWD_CONFIGS, dict(HAS_BIAS=True, SOFTCAP=True, **grad)),
        (kl.kl_fwd_kernel, common.KL_FWD_CONFIGS, dict(HAS_BIAS=True, HAS_REF_BIAS=True, REVERSE=True, **caps)),
        (kl.kl_bwd_kernel, common.BWD_CONFIGS, dict(HAS_BIAS=True, HAS_REF_BIAS=True, REVERSE=True, **caps,
                                                    **grad)),
        # Gemma-2's softcap on both sides (first configs only): the backward keeps tanh's tile alive
        (kl.kl_fwd_kernel, common.KL_FWD_CONFIGS[:1], dict(HAS_BIAS=False, HAS_REF_BIAS=False, REVERSE=False,
                                                           SOFTCAP=True, REF_SOFTCAP=True)),
        (kl.kl_bwd_kernel, common.BWD_CONFIGS[:1], dict(HAS_BIAS=False, HAS_REF_BIAS=False, REVERSE=False,
                                                        SOFTCAP=True, REF_SOFTCAP=True, **grad)),
    ]
    for fn, cfgs, flags in kernels:
        for cfg in cfgs:
            compile_one(fn, "bf16", cfg, dict(flags, DOT_FP32=False, PRECISION="tf32"))
        compile_one(fn, "fp32", common.FP32_CONFIGS[0], dict(flags, DOT_FP32=False, PRECISION="ieee"))
    print("\n| row kernel | dtype | block, warps | vector loads | ex2 | smem KiB | ptxas | compile s |")
    print("|---|---|---|---:|---:|---:|---|---:|")
    stats_grad = dict(WRITE_STATS=True, WRITE_GRAD=True)
    for cfg in rows.ROW_CONFIGS:
        for dtype in ("bf16", "fp32"):
            compile_rows(rows.ce_rows_kernel, dtype, cfg, dict(SOFTCAP=True, ASCENT_CAP=True, **stats_grad))
            compile_rows(rows.ce_rows_kernel, dtype, cfg, dict(SOFTCAP=False, ASCENT_CAP=False, **stats_grad))
            for reverse in (False, True):
                compile_rows(rows.kl_rows_kernel, dtype, cfg, dict(REVERSE=reverse, HAS_MASK=True, SOFTCAP=False,
                                                                   REF_SOFTCAP=False, **stats_grad))


if __name__ == "__main__":
    main()
