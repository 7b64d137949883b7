#!/usr/bin/env bash
# Side-by-side benchmark: mistral-bot vs llama-server, same GGUF, same machine, both
# through their OpenAI-compatible /v1/chat/completions with stream: true, temperature 0.
#
#   benches/vs-llama-server.sh /path/to/llama-server [model.gguf]
#   (env: REPS=3 MAX_TOKENS=128 COLD_WORDS=1650 THREADS=2 OUT_DIR=/tmp/…)
#
# Measures, for each server in turn (never both running at once: llama.cpp's OpenMP
# threads spin-wait, and two servers would fight over the cores):
#   1. one request alone: generated tokens/s (first token to last) and time to first token;
#   2. 4 concurrent requests: aggregate and per-user generated tokens/s;
#   3. fairness: one request streams, a cold ~2000-token prompt arrives beside it: the
#      largest gap between the streamer's chunks while that prompt is read, and the cold
#      prompt's time to first token.
# Prints a table with both servers and the ratios mistral-bot / llama-server. The client
# is benches/vs_llama_server.py (Python 3 standard library). All traffic is to 127.0.0.1.
#
# llama-server is not part of this repository; pass the path of one you built. The one
# used for the figures in the README was built from the llama.cpp tree that the crate
# llama-cpp-sys-2 0.1.161 vendors (same ggml compute code as mistral-bot), plus
# tools/server, tools/ui and scripts/ui-assets.cmake from the llama-cpp-python 0.3.36
# sdist (`pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36`), whose
# vendor/llama.cpp has the tool sources the crate leaves out, a tools/CMakeLists.txt
# reduced to `add_subdirectory(ui)`, `(mtmd)`, `(server)`, and two one-line fixes for
# API drift between the two trees (server-mcp.cpp: `fs_open_ifstream(...)` → a plain
# `std::ifstream`; server-context.cpp: `mtmd_get_memory_usage(...).backend_mem_usage`):
#   cmake -S combined -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON \
#     -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
#     -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON \
#     -DLLAMA_USE_PREBUILT_UI=OFF -DLLAMA_BUILD_UI=OFF -DBUILD_SHARED_LIBS=OFF
#   cmake --build build --target llama-server -j2
# mistral-bot is built native too (.cargo/config.toml: -C target-cpu=native).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,30p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
llama_server="$(realpath "$1")"
model="$(realpath "${2:-$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf}")"
reps="${REPS:-3}"
max_tokens="${MAX_TOKENS:-128}"
cold_words="${COLD_WORDS:-1650}"
threads="${THREADS:-2}"
client="$repo/benches/vs_llama_server.py"

[[ -x $llama_server ]] || { echo "error: not an executable: $llama_server" >&2; exit 1; }
[[ -f $model ]] || { echo "error: no model at $model (bash models/fetch-test-model.sh)" >&2; exit 1; }

out="${OUT_DIR:-$(mktemp -d /tmp/vs-llama-server.XXXXXX)}"
mkdir -p "$out"
echo "logs and JSON in $out" >&2

server_pid=""
stop_server() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill "$server_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
}
trap stop_server EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# wait_ready URL SECONDS: polls until the URL answers 200, or fails.
wait_ready() {
    local url=$1 limit=$2
    for _ in $(seq $((limit * 4))); do
        if ! kill -0 "$server_pid" 2>/dev/null; then
            echo "error: the server exited during start-up" >&2
            return 1
        fi
        if python3 - "$url" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
        sleep 0.25
    done
    echo "error: $url not ready after ${limit}s" >&2
    return 1
}

load() { cut -d' ' -f1-3 /proc/loadavg; }

# --- mistral-bot --------------------------------------------------------------------------
bot="$repo/target/release/mistral-bot"
echo "building mistral-bot (cargo build --release)..." >&2
(cd "$repo" && cargo build --release --quiet --bin mistral-bot)

port="$(free_port)"
echo "starting mistral-bot on 127.0.0.1:$port (load $(load))" >&2
# From an empty directory (no .env), with no cloud keys and no Telegram token: the chain
# is the local engine alone. Every MISTRAL_BOT_* variable is cleared so only the flags count.
mkdir -p "$out/bot-cwd"
unset_vars=(-u GROQ_API_KEY -u MISTRAL_API_KEY -u GEMINI_API_KEY -u OPENAI_COMPAT_API_KEY
    -u TELEGRAM_BOT_TOKEN)
while IFS= read -r v; do unset_vars+=(-u "$v"); done < <(env | grep -o '^MISTRAL_BOT_[A-Z_]*' || true)
(cd "$out/bot-cwd" && exec env "${unset_vars[@]}" RUST_LOG=warn "$bot" \
    --model "$model" --slots 4 --ctx-size 4096 --threads "$threads" \
    --http-addr "127.0.0.1:$port" --temperature 0 --chain local \
    --data-dir "$out/bot-cwd/data") >"$out/mistral-bot.log" 2>&1 &
server_pid=$!
wait_ready "http://127.0.0.1:$port/ready" 120
echo "measuring mistral-bot (load $(load))" >&2
python3 "$client" measure --port "$port" --name mistral-bot --reps "$reps" \
    --max-tokens "$max_tokens" --cold-words "$cold_words" >"$out/mistral-bot.json"
echo "load after mistral-bot: $(load)" >&2
stop_server

# --- llama-server -------------------------------------------------------------------------
sleep 2
port="$(free_port)"
echo "starting llama-server on 127.0.0.1:$port (load $(load))" >&2
# mmap off, as mistral-bot loads by default. Newer llama.cpp spells it --load-mode none.
if "$llama_server" --help 2>&1 | grep -q -- '--no-mmap'; then
    no_mmap=(--no-mmap)
else
    no_mmap=(--load-mode none)
fi
"$llama_server" -m "$model" --host 127.0.0.1 --port "$port" --parallel 4 -c 16384 \
    -t "$threads" "${no_mmap[@]}" >"$out/llama-server.log" 2>&1 &
server_pid=$!
wait_ready "http://127.0.0.1:$port/health" 120
echo "measuring llama-server (load $(load))" >&2
python3 "$client" measure --port "$port" --name llama-server --reps "$reps" \
    --max-tokens "$max_tokens" --cold-words "$cold_words" >"$out/llama-server.json"
echo "load after llama-server: $(load)" >&2
stop_server

echo
echo "model: $(basename "$model"), $threads threads, max_tokens $max_tokens, cold prompt $cold_words words"
python3 "$client" table "$out/mistral-bot.json" "$out/llama-server.json"
