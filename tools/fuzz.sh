#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/) with clang under ASan + UBSan and runs
# each for SECONDS (default 60) from its committed seed corpus; fails on the
# first finding (crash, sanitizer report, leak, timeout, out-of-memory),
# leaving the input under build/fuzz/findings/. New inputs the fuzzer finds
# go to build/fuzz/corpus/<target>, never into the committed corpus.
#   tools/fuzz.sh [SECONDS] [TARGET...]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_EACH=${1:-60}
shift || true
JOBS=${JOBS:-$(nproc)}

cmake -S . -B build/fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_COMPILER=clang++ -DAE_FUZZ=ON -DAE_SANITIZE=address,undefined \
  -DAE_BUILD_TESTS=OFF -DAE_BUILD_EXAMPLES=OFF -DAE_BUILD_CLI=OFF >/dev/null
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for source in fuzz/fuzz_*.cpp; do targets+=("$(basename "$source" .cpp)"); done
fi
cmake --build build/fuzz -j "$JOBS" --target "${targets[@]}"

mkdir -p build/fuzz/findings
for target in "${targets[@]}"; do
  name=${target#fuzz_}
  mkdir -p "build/fuzz/corpus/$name"
  echo "-- $target: ${SECONDS_EACH}s"
  # -rss_limit_mb: an input that makes the library allocate without bound
  # is a finding; -timeout: so is one that hangs.
  log="build/fuzz/$name.log"
  if ! ASAN_OPTIONS=detect_leaks=1 "build/fuzz/fuzz/$target" -max_total_time="$SECONDS_EACH" -timeout=10 \
         -rss_limit_mb=2048 -print_final_stats=1 -artifact_prefix="build/fuzz/findings/$name-" \
         "build/fuzz/corpus/$name" "fuzz/corpus/$name" >"$log" 2>&1; then
    tail -n 80 "$log"
    echo "FAIL: $target found a bug; the input is in build/fuzz/findings/ (rerun: build/fuzz/fuzz/$target FILE)"
    exit 1
  fi
  grep -E '^(stat::number_of_executed_units|stat::peak_rss_mb|#[0-9]+ *DONE)' "$log" || true
done
echo "fuzzing: no findings"
