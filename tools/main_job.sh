#!/usr/bin/env bash
# The main job on a fresh machine: installs what is needed, builds, and runs
# the end-to-end evaluation on the bundled model (models/echo-llama-6m):
# every scenario served with no reuse, exact prefix reuse and AttentionEcho,
# once with the sparse echo tier and once with the dense one, then plots
# speedup against fidelity. Extra arguments go to both `aecho bench` runs
# (e.g. --requests 8, or --repeats 1: each request timed once, a third of
# the time, its ratios then a few percent noisier).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
cmake -S . -B build/release -G Ninja -DCMAKE_BUILD_TYPE=Release >/dev/null
cmake --build build/release -j "$(nproc)"
mkdir -p build/results
for mode in sparse dense; do
  ./build/release/aecho bench --scenario all --mode "$mode" --json "build/results/bench-$mode.json" "$@"
done
.venv/bin/python tools/plot_bench.py build/results/bench-sparse.json build/results/bench-dense.json \
  -o build/results/bench.png
echo "results: build/results/bench-{sparse,dense}.json, build/results/bench.png"
