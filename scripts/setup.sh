#!/usr/bin/env bash
# Prepares a fresh machine: the build tools llama-cpp-sys-2 needs (cmake builds llama.cpp,
# libclang generates its bindings) and headless Chromium (the dashboard's browser test),
# installed with apt only when missing, the test model, the `openai` Python SDK (the
# HTTP compatibility tests validate responses with it) and the `gguf` package (the
# `--repack` test writes a Q4_0 copy of the test model). Idempotent.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

missing=()
command -v cmake >/dev/null || missing+=(cmake)
command -v clang >/dev/null || missing+=(clang)
if ! compgen -G "/usr/lib/llvm-*/lib/libclang*.so*" >/dev/null \
    && ! compgen -G "/usr/lib/*-linux-gnu/libclang*.so*" >/dev/null; then
    missing+=(libclang-dev)
fi
if ! command -v chromium >/dev/null && ! command -v chromium-browser >/dev/null; then
    missing+=(chromium)
fi
if ((${#missing[@]})); then
    echo "installing: ${missing[*]}" >&2
    sudo=""
    [[ $(id -u) -eq 0 ]] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get update -qq
    $sudo apt-get install -y -qq "${missing[@]}"
fi

# The HTTP compatibility tests parse every response with the `openai` SDK's typed models.
if ! python3 -c "import openai" 2>/dev/null; then
    echo "installing the openai Python SDK (for the compatibility tests)" >&2
    python3 -m pip install --quiet --disable-pip-version-check openai \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages openai
fi

# The `--repack` test makes a Q4_0 copy of the test model with the `gguf` package.
if ! python3 -c "import gguf" 2>/dev/null; then
    echo "installing the gguf Python package (for the --repack test)" >&2
    python3 -m pip install --quiet --disable-pip-version-check gguf \
        || python3 -m pip install --quiet --disable-pip-version-check --break-system-packages gguf
fi

bash models/fetch-test-model.sh
