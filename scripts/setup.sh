#!/usr/bin/env bash
# Prepares a fresh machine: the build tools llama-cpp-sys-2 needs (cmake builds llama.cpp,
# libclang generates its bindings) and headless Chromium (the dashboard's browser test),
# installed with apt only when missing, and the test model. Idempotent.
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

bash models/fetch-test-model.sh
