#!/usr/bin/env bash
# The one prepared script for a lent GPU (DESIGN §7): build the extension, run the CUDA tests,
# run the GPU benchmarks, write everything under $OUT, all within 8 minutes on an H100.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
STEPS=${GPU_CHECK_STEPS:-build tests triton_bench bench info}
# Pure-Python wheels carried to the offline GPU machine (liger-kernel, cut-cross-entropy), unpacked
# after the image's own packages on the path, so those keep precedence.
if compgen -G ".whl/*-py3-none-any.whl" > /dev/null; then
  mkdir -p /tmp/whl_site && for w in .whl/*-py3-none-any.whl; do python3 -m zipfile -e "$w" /tmp/whl_site; done
  export PYTHONPATH=$PYTHONPATH:/tmp/whl_site
fi
status=0
step() {  # step NAME TIMEOUT_S CMD...: run one stage if named in $STEPS, log it, keep going on failure
  local name=$1 limit=$2; shift 2
  [[ " $STEPS " == *" $name "* ]] || return 0
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "=== $name rc=$rc ($(date +%T))"
  [[ $rc == 0 ]] || status=1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|peft|liger|cut)" 
} | tee "$OUT/env.txt"

# 1. build the C++/CUDA extension (prints what was built)
step build ${BUILD_S:-180} python3 -m surgery_kernels build
# 2. Triton backend: issue 4's table (signed CE and KL, N=16384 H=4096 V=32000 bf16, every path and setting)
step triton_bench ${TRITON_BENCH_S:-210} python3 benchmarks/triton_gpu.py --output "$OUT/triton"
# 3. correctness: the tests marked cuda (numerics suite over the cuda and triton backends, CUDA
#    ops, Triton, compile, HF); TESTS narrows them when time is short. Triton autotuning off here:
#    each kernel variant then compiles once, not once per config.
step tests ${TESTS_S:-200} env SURGERY_TRITON_AUTOTUNE=0 python3 -m pytest -q -rf -m cuda --maxfail=40 \
  -p no:cacheprovider ${TESTS:-tests}
# 4. performance: the benchmark suite's GPU table (every backend, naive, liger, cce, the GEMM floor)
step bench ${BENCH_S:-200} python3 -m benchmarks run --device cuda --gpu-check --time-limit $(( ${BENCH_S:-200} - 25 )) --wheels .whl --output "$OUT/bench"
# 5. opt-in (add train_step to GPU_CHECK_STEPS, ~90 s): one trainer step at the Llama-2-7B shape
#    (LoRA, bf16, 4 streams x 4096 tokens): fused, fused in one-row passes (micro_batch_size 1), HF.
mkdir -p "$OUT/train_step"
step train_step ${TRAIN_STEP_S:-150} python3 benchmarks/train_step.py --gpu --variants fused,fused-mb1,hf \
  --json "$OUT/train_step/train_step.json"
[[ -f $OUT/train_step.log ]] && mv "$OUT/train_step.log" "$OUT/train_step/"
rmdir "$OUT/train_step" 2>/dev/null
step info 60 python3 -m surgery_kernels info
# At most 8 files come back from the device machine: fold each results folder into one archive,
# and the logs into one more if that still leaves more than 8 files (the default stages leave 8).
for d in "$OUT"/*/; do [[ -d $d ]] && tar czf "${d%/}.tgz" -C "$OUT" "$(basename "$d")" && rm -rf "$d"; done
if (( $(find "$OUT" -maxdepth 1 -type f | wc -l) > 8 )); then
  (cd "$OUT" && tar czf logs.tgz ./*.log env.txt && rm -f ./*.log env.txt)
fi
exit $status
