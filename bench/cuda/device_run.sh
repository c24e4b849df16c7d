#!/usr/bin/env bash
# What one call of the GPU machine runs (see README "GPU (CUDA)"): the CUDA
# test suite, a compute-sanitizer memcheck of its small tests, the Python GPU
# tests, the end-to-end benchmark and the kernel benchmark. Binaries come from
# a -DAE_CUDA=ON build (BIN, default build/cuda); python, echo and bench need
# the package built with CUDA importable (pip install . -C
# cmake.define.AE_CUDA=ON, or the built package on PYTHONPATH); logs go to OUT
# (default ./cuda-out).
#   bash bench/cuda/device_run.sh [tests] [memcheck] [python] [echo] [bench] [-- bench args]
set -uo pipefail
BIN=${BIN:-build/cuda}
OUT=${OUT:-cuda-out}
mkdir -p "$OUT"
steps=()
while [[ $# -gt 0 && $1 != -- ]]; do steps+=("$1"); shift; done
[[ ${1:-} == -- ]] && shift
[[ ${#steps[@]} -eq 0 ]] && steps=(tests memcheck python echo bench)
# The cuDNN miss opens libcudnn.so.9 at run time: prefer torch's wheel's (the
# version torch's SDPA runs) over a system one.
CUDNN_LIB=$(python3 -c "import nvidia.cudnn, os; print(os.path.join(nvidia.cudnn.__path__[0], 'lib'))" 2>/dev/null) &&
  export LD_LIBRARY_PATH=$CUDNN_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
for step in "${steps[@]}"; do
  case $step in
    tests)
      timeout 300 "$BIN/tests/attention_echo_cuda_tests" 2>&1 | tee "$OUT/tests.log" | grep -E "^\[( +OK|  FAILED|  PASSED|  SKIPPED) |Failure|error|Expected|Which is|rel"
      # The cache's small shapes never earn a cuDNN graph: run them once more with cuDNN forced.
      AE_CUDNN=1 timeout 300 "$BIN/tests/attention_echo_cuda_tests" --gtest_filter='CudaCache*' 2>&1 |
        tee "$OUT/tests-cudnn-forced.log" | grep -E "^\[(  FAILED|  PASSED) |Failure" ;;
    memcheck)
      timeout 300 compute-sanitizer --tool memcheck --error-exitcode 3 "$BIN/tests/attention_echo_cuda_tests" \
        --gtest_filter='-*LongSequence*:*CausalGqaRaggedLengthBf16*' >"$OUT/memcheck.log" 2>&1
      echo "memcheck exit $? ($(grep -c 'Invalid\|ERROR SUMMARY' "$OUT/memcheck.log") report lines)"
      grep -E "ERROR SUMMARY|PASSED|FAILED" "$OUT/memcheck.log" ;;
    python)
      timeout 300 python3 -m pytest -q -o addopts= -p no:cacheprovider --import-mode=importlib tests/python/test_cuda.py \
        2>&1 | tee "$OUT/pytest.log" | tail -3 ;;
    echo)
      PYTHONUNBUFFERED=1 timeout 420 python3 bench/cuda/bench_echo.py --model models/echo-llama-6m/model.bin \
        --json "$OUT/echo.json" 2>&1 | grep -v Warning | tee "$OUT/echo.log" ;;
    bench)
      PYTHONUNBUFFERED=1 timeout 420 python3 bench/cuda/bench_cuda.py --shim "$BIN/libae_cuda_shim.so" \
        --json "$OUT/bench.json" "$@" 2>&1 | grep -v Warning | tee "$OUT/bench.log" ;;
  esac
done
