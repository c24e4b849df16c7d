#!/usr/bin/env bash
# Every test on a fresh machine: installs what is needed, then
#   1. the C++ suite (ctest) in Release,
#   2. the same suite under AddressSanitizer + UBSan (LeakSanitizer on), and
#      under ThreadSanitizer, then each libFuzzer target for 60 s (fuzz.sh),
#   3. cmake --install + a find_package(attention_echo) consumer, two aecho
#      processes sharing one Redis (the shared L2 store, short form),
#   4. the Python wheel (pip wheel .), installed into the venv, its pytest
#      suite run against the installed package, and each example once.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
JOBS=${JOBS:-$(nproc)}
step() { printf '\n==== %s ====\n' "$*"; }

step "C++ tests (Release)"
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j "$JOBS"
ctest --test-dir build/release --output-on-failure -j "$JOBS"

step "C++ tests under AddressSanitizer + UBSan"
cmake -S . -B build/asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAE_SANITIZE=address,undefined \
  -DAE_BUILD_EXAMPLES=OFF -DAE_BUILD_CLI=OFF >/dev/null
cmake --build build/asan -j "$JOBS"
# LeakSanitizer is ASan's default on Linux; said explicitly so a leak fails CI.
ASAN_OPTIONS=detect_leaks=1 ctest --test-dir build/asan --output-on-failure -j "$JOBS"

step "C++ tests under ThreadSanitizer"
cmake -S . -B build/tsan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DAE_SANITIZE=thread \
  -DAE_BUILD_EXAMPLES=OFF -DAE_BUILD_CLI=OFF >/dev/null
cmake --build build/tsan -j "$JOBS"
TSAN_OPTIONS="halt_on_error=1 second_deadlock_stack=1" ctest --test-dir build/tsan --output-on-failure -j "$JOBS"

step "fuzzing: each libFuzzer target for ${AE_FUZZ_SECONDS:-60} s under ASan + UBSan"
bash tools/fuzz.sh "${AE_FUZZ_SECONDS:-60}"

step "install + find_package consumer"
rm -rf build/prefix build/consumer
cmake --install build/release --prefix build/prefix >/dev/null
cmake -S tests/consumer -B build/consumer -G Ninja -DCMAKE_PREFIX_PATH="$PWD/build/prefix" >/dev/null
cmake --build build/consumer
./build/consumer/consumer
./build/release/basic_usage

step "shared store: two aecho processes on one Redis (short form)"
REQUESTS=4 CONTEXT=256 bash tools/bench_shared_store.sh build/release

step "engine logits vs PyTorch reference"
AECHO="$PWD/build/release/aecho" .venv/bin/python -m pytest -q tests/engine

step "Python wheel: build, install, test the installed package"
rm -rf wheelhouse
.venv/bin/pip wheel . -w wheelhouse --no-deps -q
.venv/bin/pip install --force-reinstall --no-deps -q wheelhouse/attention_echo-*.whl
# From outside the repository, so the tests import the installed package.
(cd /tmp && "$OLDPWD/.venv/bin/python" -m pytest -q -p no:cacheprovider "$OLDPWD/tests/python")

step "Python examples (smoke)"
for example in examples/basic_usage.py examples/torch_integration.py examples/benchmark.py \
               examples/multi_user_serving.py; do
  echo "-- $example"
  .venv/bin/python "$example"
done
