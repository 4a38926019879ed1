#!/usr/bin/env bash
# The one prepared script for a lent GPU (DESIGN §7): build the extension, run the CUDA tests,
# run the GPU benchmarks, write everything under $OUT, all within 8 minutes on an H100.
# Usage on the device machine, from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-$PWD/out/gpu}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
status=0
step() {  # step NAME TIMEOUT_S CMD...: run one stage, log it, keep going on failure
  local name=$1 limit=$2; shift 2
  echo "=== $name ($(date +%T))"
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "=== $name rc=$rc"
  [[ $rc == 0 ]] || status=1
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  python3 -m surgery_kernels info 2>/dev/null || python3 -c "import surgery_kernels as s; print(s.available_backends())"
} | tee "$OUT/env.txt"

# 1. build the C++/CUDA extension (prints what was built)
step build 240 python3 -m surgery_kernels build
# 2. correctness: every test marked cuda (numerics suite over the cuda and triton backends);
#    Triton autotuning off here: each kernel variant then compiles once, not once per config
step tests 240 env SURGERY_TRITON_AUTOTUNE=0 python3 -m pytest -x -q -m cuda tests
# 3. performance: kernel benchmarks on the GPU
step bench 240 python3 -m benchmarks run --device cuda --gpu-check --wheels .whl --output "$OUT/bench"
# 4. fused Triton kernels: issue 4's table (signed CE and KL, N=16384 H=4096 V=32000 bf16, < 2 min)
step triton_bench 150 python3 benchmarks/triton_gpu.py --output "$OUT/triton"
exit $status
