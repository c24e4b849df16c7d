#!/usr/bin/env bash
# What one call of the GPU machine runs (see README "GPU (CUDA)"): the CUDA
# test suite, a compute-sanitizer memcheck of its small tests, and the
# benchmark. Binaries come from a -DAE_CUDA=ON build (BIN, default
# build/cuda); logs go to OUT (default ./cuda-out).
#   bash bench/cuda/device_run.sh [tests] [memcheck] [bench] [-- bench args]
set -uo pipefail
BIN=${BIN:-build/cuda}
OUT=${OUT:-cuda-out}
mkdir -p "$OUT"
steps=()
while [[ $# -gt 0 && $1 != -- ]]; do steps+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#steps[@]} -eq 0 ]] && steps=(tests memcheck bench)
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for step in "${steps[@]}"; do
  case $step in
    tests)
      timeout 300 "$BIN/tests/attention_echo_cuda_tests" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[( +OK|  FAILED|  PASSED|  SKIPPED) |Failure|error|Expected|Which is|rel" ;;
    memcheck)
      timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/tests/attention_echo_cuda_tests" \
        --gtest_filter='-*LongSequence*:*CausalGqaRaggedLengthBf16*' >"$OUT/memcheck.log" 2>&1
      echo "memcheck exit $? ($(grep -c 'Invalid\|ERROR SUMMARY' "$OUT/memcheck.log") report lines)"
      grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" ;;
    bench)
      PYTHONUNBUFFERED=1 timeout 420 python3 bench/cuda/bench_cuda.py --shim "$BIN/libae_cuda_shim.so" \
        --json "$OUT/bench.json" "$@" 2>&1 | grep -v Warning | tee "$OUT/bench.log" ;;
  esac
done
