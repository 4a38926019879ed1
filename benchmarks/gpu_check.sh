#!/usr/bin/env bash
# The one prepared script for a GPU machine: build the extension, run the CUDA tests,
# run the GPU benchmarks, write everything under $OUT, all within GPU_CHECK_TOTAL_S (450 s) on an H100.
#
# Before the device call, on the development machine (the GPU machine has no internet; the two
# comparison packages are pure Python and only need torch and triton):
#   pip download --no-deps -d .whl liger-kernel==0.8.5 cut-cross-entropy==25.1.1
# then call with carry [".whl"] (an ignored folder) and the commit in the environment:
#   GPU_CHECK_COMMIT=<git rev-parse --short HEAD> bash benchmarks/gpu_check.sh
# and a device timeout above GPU_CHECK_TOTAL_S (the archives are packed after the last step).
#
# Every step runs under `timeout -s INT` with the smaller of its own limit and the time left: an
# interrupted pytest still prints its failure summary, an interrupted extension build releases
# its lock (a killed one leaves it, and every later process that loads the extension waits on it).
set -uo pipefail
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
# In the order they run.
STEPS=${GPU_CHECK_STEPS:-build triton_bench tests bench info}
TOTAL=${GPU_CHECK_TOTAL_S:-450}
START=$SECONDS
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
  local left=$(( TOTAL - (SECONDS - START) - 10 ))
  if (( left < 20 )); then
    echo "=== $name skipped: ${left}s left of GPU_CHECK_TOTAL_S=$TOTAL" | tee -a "$OUT/env.txt"
    status=1
    return 0
  fi
  (( limit > left )) && limit=$left
  echo "=== $name ($(date -u +%T), limit ${limit}s)"
  local t0=$SECONDS
  timeout -s INT -k 15 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 30 "$OUT/$name.log"
  echo "=== $name rc=$rc ($(date -u +%T))"
  echo "step $name rc=$rc $(( SECONDS - t0 ))s (limit ${limit}s)" >> "$OUT/env.txt"
  [[ $rc == 0 ]] || status=1
  return $rc
}

{ date -u +"%Y-%m-%d %H:%M:%S UTC"
  echo "commit ${GPU_CHECK_COMMIT:-unknown}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -m pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|peft|liger|cut)"
  ls .whl 2>/dev/null | sed 's/^/carried wheel: /'
} | tee "$OUT/env.txt"

# 1. build the C++/CUDA extension (prints what was built). A failed or interrupted build must not
#    leave a lock behind for the steps after it.
step build ${BUILD_S:-180} python3 -m surgery_kernels build || find "$TORCH_EXTENSIONS_DIR" -name lock -delete 2>/dev/null
# 2. Triton backend: its GPU table (signed CE and KL, N=16384 H=4096 V=32000 bf16, every path and setting)
step triton_bench ${TRITON_BENCH_S:-210} python3 benchmarks/triton_gpu.py --output "$OUT/triton"
# 3. correctness: the tests marked cuda (numerics suite over the cuda and triton backends, CUDA
#    ops, Triton, HF, trainer, compile), the files that matter most first so a time limit cuts the
#    others; TESTS narrows them. Triton autotuning off here: each kernel variant compiles once.
TESTS=${TESTS:-tests/test_numerics.py tests/test_triton.py tests/test_cuda_ops.py tests/test_api.py tests/test_hf.py tests/test_trainer.py tests/test_compile.py tests}
per_test=()
python3 -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120)
step tests ${TESTS_S:-200} env SURGERY_TRITON_AUTOTUNE=0 python3 -m pytest -q -rf -m cuda --maxfail=40 \
  -p no:cacheprovider --durations=15 "${per_test[@]}" $TESTS
# 4. performance: the benchmark suite's GPU table (every backend, naive, liger, cce, the GEMM floor);
#    its own --time-limit stops starting new rows 25 s before the step's limit, so the report is written.
left=$(( TOTAL - (SECONDS - START) - 10 ))
bench_s=$(( ${BENCH_S:-200} < left ? ${BENCH_S:-200} : left ))
step bench $bench_s python3 -m benchmarks run --device cuda --gpu-check --time-limit $(( bench_s > 45 ? bench_s - 25 : 20 )) --wheels .whl \
  --output "$OUT/bench"
# 5. opt-in (add train_step to GPU_CHECK_STEPS, ~90 s): one trainer step at the Llama-2-7B shape
#    (LoRA, bf16, 4 streams x 4096 tokens): fused, fused in one-row passes (micro_batch_size 1), HF.
mkdir -p "$OUT/train_step"
step train_step ${TRAIN_STEP_S:-150} python3 benchmarks/train_step.py --gpu --variants fused,fused-mb1,hf \
  --json "$OUT/train_step/train_step.json"
[[ -f $OUT/train_step.log ]] && mv "$OUT/train_step.log" "$OUT/train_step/"
rmdir "$OUT/train_step" 2>/dev/null
step info 60 python3 -m surgery_kernels info
echo "total $(( SECONDS - START ))s" >> "$OUT/env.txt"
# At most 8 files come back from the device machine: fold each results folder into one archive,
# and the logs into one more if that still leaves more than 8 files (the default stages leave 8).
for d in "$OUT"/*/; do [[ -d $d ]] && tar czf "${d%/}.tgz" -C "$OUT" "$(basename "$d")" && rm -rf "$d"; done
if (( $(find "$OUT" -maxdepth 1 -type f | wc -l) > 8 )); then
  (cd "$OUT" && tar czf logs.tgz ./*.log env.txt && rm -f ./*.log env.txt)
fi
exit $status
