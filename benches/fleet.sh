#!/usr/bin/env bash
# The `fleet` scenario: one front without a model over two mistral-bot backends, the same
# 16-chat round-robin workload with conversation affinity (the front's rendezvous routing)
# and with a plain round-robin balancer over the same two backends (each request to a
# backend drawn at random, seeded: what a chat sees of a round-robin balancer serving many
# users' interleaved requests; the client sends there directly, so that side skips the
# front's few milliseconds). Figures: time to first token of the returning chats
# (median, p95) and how many of their turns were cache hits on the backend (at least half
# the prompt found in its cache, from the backends' own usage.prompt_tokens_details).
#
#   benches/fleet.sh [model.gguf]
#   (env: CHATS=16 HISTORY_WORDS=600 ROUNDS=2 CHAT_TOKENS=32 THREADS=1 SLOTS=4
#    CTX=2048 MODES="affinity round-robin" OUT_DIR=/tmp/…; results in benches/RESULTS.md)
#
# Each mode starts both backends fresh (empty caches; parking in RAM as by default, on disk
# off: 16 chats on 2×4 slots, so a returning chat's KV is parked on the backend that served
# it) and runs the whole workload; modes run one after the other, never at once. Needs a quiet machine:
# two backends and the client share its cores. The client is benches/vs_llama_server.py.
set -euo pipefail

if [[ ${1:-} == -h || ${1:-} == --help ]]; then
    sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
model="$(realpath "${1:-$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf}")"
chats="${CHATS:-16}"
history_words="${HISTORY_WORDS:-600}"
rounds="${ROUNDS:-2}"
chat_tokens="${CHAT_TOKENS:-32}"
threads="${THREADS:-1}"
slots="${SLOTS:-4}"
ctx="${CTX:-2048}"
modes="${MODES:-affinity round-robin}"
client="$repo/benches/vs_llama_server.py"
bot="$repo/target/release/mistral-bot"

[[ -f $model ]] || { echo "error: no model at $model (bash models/fetch-test-model.sh)" >&2; exit 1; }
if [[ ! -x $bot ]]; then
    (cd "$repo" && cargo build --release) >&2
fi
out="${OUT_DIR:-$(mktemp -d /tmp/fleet-bench.XXXXXX)}"
mkdir -p "$out"
echo "logs and JSON in $out" >&2

pids=()
stop_all() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
trap stop_all EXIT
trap 'exit 130' INT TERM

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

wait_ready() {
    local url=$1
    for _ in $(seq 3600); do
        if python3 - "$url" <<'PY' 2>/dev/null; then return 0; fi
import sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=2) as r:
    sys.exit(0 if r.status == 200 else 1)
PY
        sleep 0.25
    done
    echo "error: $url never got ready" >&2
    return 1
}

# start NAME ARGS...: a mistral-bot in the background, logs in $out/NAME.log.
start() {
    local name=$1
    shift
    RUST_LOG=warn,mistral_bot=info "$bot" "$@" >"$out/$name.log" 2>&1 &
    pids+=($!)
}

for mode in $modes; do
    case $mode in affinity | round-robin) ;; *) echo "error: unknown mode $mode" >&2; exit 2 ;; esac
    b1=$(free_port)
    b2=$(free_port)
    for port in "$b1" "$b2"; do
        start "$mode-backend-$port" --model "$model" --chain local --slots "$slots" \
            --ctx-size "$ctx" --threads "$threads" --temperature 0 \
            --kv-park-disk 0 --http-addr "127.0.0.1:$port" --data-dir "$out/$mode-data-$port"
        wait_ready "http://127.0.0.1:$port/ready"
    done
    target=(--port "$b1" --ports "$b1,$b2")
    if [[ $mode == affinity ]]; then
        front=$(free_port)
        start "$mode-front" --chain openai --openai-model bench --openai-timeout 900 \
            --openai-base-url "http://127.0.0.1:$b1/v1,http://127.0.0.1:$b2/v1" \
            --http-addr "127.0.0.1:$front" --data-dir "$out/$mode-data-front"
        wait_ready "http://127.0.0.1:$front/ready"
        target=(--port "$front")
    fi
    python3 "$client" chats "${target[@]}" --name "$mode" --state "$out/$mode-state.json" \
        --chats "$chats" --history-words "$history_words" --rounds "$rounds" \
        --max-tokens "$chat_tokens" >"$out/$mode.json"
    stop_all
done

python3 - "$out" $modes <<'PY'
import json, sys
out, modes = sys.argv[1], sys.argv[2:]
print(f"| mode | returning TTFT median | p95 | cache hits |")
print("|---|---|---|---|")
for mode in modes:
    r = json.load(open(f"{out}/{mode}.json"))["returning"]
    print(f"| {mode} | {r['median_s']:.2f} s | {r['p95_s']:.2f} s | {r['cache_hits']} of {r['n']} |")
PY
