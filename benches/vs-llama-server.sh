#!/usr/bin/env bash
# Side-by-side benchmark: mistral-bot vs llama-server, same GGUF, same machine, both
# through their OpenAI-compatible /v1/chat/completions with stream: true, temperature 0.
#
#   benches/vs-llama-server.sh /path/to/llama-server [model.gguf]
#   (env: SCENARIOS="basic chats restart long" THREADS=2 OUT_DIR=/tmp/… and per scenario
#    below; results in benches/RESULTS.md)
#
# Each scenario runs on each server in turn (never both at once: llama.cpp's OpenMP
# threads spin-wait, and two servers would fight over the cores), same client, same model:
#   basic    1 request alone: generated tok/s and time to first token; 4 concurrent
#            requests: aggregate and per-user tok/s; fairness: one request streams while a
#            cold ~2000-token prompt arrives: the streamer's largest gap, the cold prompt's
#            time to first token.  (REPS=3 MAX_TOKENS=128 COLD_WORDS=1650)
#   fairness basic's fairness part alone (the step budget's figures), its streamer
#            STREAM_TOKENS=1000 long, forced to that length with CHAT_IGNORE_EOS=1 (random-
#            weight models). COLD_WORDS=870 makes the ~2000-token prompt of issue 17 on the
#            Mistral-7B shape (its synthetic tokenizer spends ~2.3 tokens a word).
#   chats    CHATS=16 chats taking turns on 4 slots, each opened with a HISTORY_WORDS=1250
#            word message (~1500 tokens), then ROUNDS=2 rounds of one short question each:
#            median / p95 time to first token of the returning chats.  (CHAT_TOKENS=32
#            tokens per reply; CHAT_IGNORE_EOS=1 forces their length)
#   restart  the same chats (opened with ROUNDS=0 when `chats` is not selected), then the
#            server stopped with SIGTERM (STOP_GRACE=300 s before SIGKILL), started again
#            with the same --data-dir, and one more turn per chat: median time to first
#            token. mistral-bot keeps its parked KV under --data-dir/kv; llama-server's
#            prompt cache is in RAM only.
#   long     one chat of LONG_TURNS=40 short turns with a LONG_CTX=1024-token window per
#            slot, LONG_TOKENS=48 per reply: median and largest turn time to first token.
#            llama-server refuses a prompt longer than its window: there the client drops
#            the oldest exchange and sends again, as a simple client would.
#   forced   FORCED_TOKENS=64 tokens exactly (ignore_eos) for 1 and then 4 streams at once,
#            FORCED_REPS=5: aggregate tok/s. For random-weight models, which answer
#            end-of-sequence at once under greedy sampling.
#   deadline mistral-bot against itself (llama-server has no fallback): a fake OpenAI-
#            compatible cloud answering after CLOUD_DELAY=0.5 s is the chain's second
#            provider; DEADLINE_CHATS=8 chats at once, DEADLINE_COLD=2 of them new with a
#            COLD_WORDS message, the others returning (opened with DEADLINE_WARM_WORDS=200
#            words; ~60 on the 7B shape, where 200 words take over 20 s), DEADLINE_REPS=3
#            rounds: p50/p95 time
#            to first token and the share the cloud answered, with --local-max-wait
#            DEADLINE_WAIT=20 vs 0 (off). (CHAT_IGNORE_EOS=1 forces reply lengths.)
# The step budget (issue 17) is in `basic`'s fairness rows: the streamer's largest gap, its
# rate while the cold prompt is read as a share of its rate alone, the cold prompt's time to
# first token. BOT_ARGS="--step-target-ms T" measures another target (0: fixed chunks).
# Servers: mistral-bot --slots 4 --ctx-size C; llama-server --parallel 4 -c 4C (the same
# C tokens per slot; llama-server's default RAM prompt cache). Extra flags: BOT_ARGS,
# LLAMA_ARGS; READY_LIMIT=900 s for a model to load; BOT_LOG=warn,mistral_bot=info;
# SERVERS="mistral-bot llama-server" (one of them to re-run a side into the same OUT_DIR).
# Prints one table per scenario with both servers and the ratios mistral-bot /
# llama-server; logs and JSON stay in OUT_DIR. The client is benches/vs_llama_server.py
# (Python 3 standard library). All traffic is to 127.0.0.1.
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
# (benches/RESULTS.md also adds tools/quantize and `add_subdirectory(quantize)` to build
# llama-quantize, for the Mistral-7B-shaped model: `--target llama-server llama-quantize`.)
# mistral-bot is built native too (.cargo/config.toml: -C target-cpu=native).
set -euo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,70p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
fi

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
llama_server="$(realpath "$1")"
model="$(realpath "${2:-$repo/models/SmolLM2-135M-Instruct.Q4_1.gguf}")"
scenarios="${SCENARIOS:-basic chats restart long}"
threads="${THREADS:-2}"
reps="${REPS:-3}"
max_tokens="${MAX_TOKENS:-128}"
stream_tokens="${STREAM_TOKENS:-1000}"
cold_words="${COLD_WORDS:-1650}"
chats="${CHATS:-16}"
history_words="${HISTORY_WORDS:-1250}"
rounds="${ROUNDS:-2}"
chat_tokens="${CHAT_TOKENS:-32}"
chat_ignore_eos="${CHAT_IGNORE_EOS:-0}"
long_turns="${LONG_TURNS:-40}"
long_ctx="${LONG_CTX:-1024}"
long_tokens="${LONG_TOKENS:-48}"
forced_tokens="${FORCED_TOKENS:-64}"
forced_reps="${FORCED_REPS:-5}"
stop_grace="${STOP_GRACE:-300}"
ready_limit="${READY_LIMIT:-900}"
bot_log="${BOT_LOG:-warn,mistral_bot=info}"
read -r -a bot_args <<<"${BOT_ARGS:-}"
read -r -a llama_args <<<"${LLAMA_ARGS:-}"
cloud_delay="${CLOUD_DELAY:-0.5}"
deadline_chats="${DEADLINE_CHATS:-8}"
deadline_cold="${DEADLINE_COLD:-2}"
deadline_reps="${DEADLINE_REPS:-3}"
deadline_wait="${DEADLINE_WAIT:-20}"
deadline_warm_words="${DEADLINE_WARM_WORDS:-200}"
# The chain of mistral-bot: the local engine alone, except in the deadline scenario.
bot_chain=(--chain local)
client="$repo/benches/vs_llama_server.py"

[[ -x $llama_server ]] || { echo "error: not an executable: $llama_server" >&2; exit 1; }
[[ -f $model ]] || { echo "error: no model at $model (bash models/fetch-test-model.sh)" >&2; exit 1; }
for s in $scenarios; do
    case $s in
        basic | fairness | chats | restart | long | forced | deadline) ;;
        *) echo "error: unknown scenario '$s' (basic fairness chats restart long forced deadline)" >&2; exit 2 ;;
    esac
done
selected() { [[ " $scenarios " == *" $1 "* ]]; }

out="${OUT_DIR:-$(mktemp -d /tmp/vs-llama-server.XXXXXX)}"
mkdir -p "$out"
echo "logs and JSON in $out" >&2

server_pid=""
server_name=""
# stop_server: SIGTERM, then up to STOP_GRACE seconds (mistral-bot writes its parked KV
# on the way out), then SIGKILL. Logs how long the shutdown took.
stop_server() {
    if [[ -n $server_pid ]] && kill -0 "$server_pid" 2>/dev/null; then
        local t0 t1
        t0=$(date +%s.%N)
        kill "$server_pid" 2>/dev/null || true
        for _ in $(seq $((stop_grace * 10))); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
        if kill -0 "$server_pid" 2>/dev/null; then
            echo "warning: $server_name did not stop within ${stop_grace}s; SIGKILL" >&2
            kill -9 "$server_pid" 2>/dev/null || true
        fi
        wait "$server_pid" 2>/dev/null || true
        t1=$(date +%s.%N)
        echo "$server_name stopped in $(python3 -c "print(f'{$t1 - $t0:.1f}')") s" | tee -a "$out/events.log" >&2
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
note() { echo "$(date -u +%H:%M:%S) $* (load $(load))" | tee -a "$out/events.log" >&2; }

bot="$repo/target/release/mistral-bot"
if [[ " ${SERVERS:-mistral-bot} " == *" mistral-bot "* ]]; then
    echo "building mistral-bot (cargo build --release)..." >&2
    (cd "$repo" && cargo build --release --quiet --bin mistral-bot)
fi

# mmap off, as mistral-bot loads by default. Newer llama.cpp spells it --load-mode none.
if "$llama_server" --help 2>&1 | grep -q -- '--no-mmap'; then
    no_mmap=(--no-mmap)
else
    no_mmap=(--load-mode none)
fi

# start_server NAME CTX_PER_SLOT DATA_DIR LOG: starts one server on a free port (sets
# $port and $server_pid) and waits until it is ready.
start_server() {
    local name=$1 ctx=$2 data=$3 log=$4 t0
    port="$(free_port)"
    server_name=$name
    note "starting $name on 127.0.0.1:$port, $ctx tokens per slot"
    t0=$(date +%s.%N)
    if [[ $name == mistral-bot ]]; then
        # From an empty directory (no .env), with no cloud keys and no Telegram token: the
        # chain is the local engine alone. Every MISTRAL_BOT_* variable is cleared so only
        # the flags count.
        mkdir -p "$data"
        local unset_vars=(-u GROQ_API_KEY -u MISTRAL_API_KEY -u GEMINI_API_KEY
            -u OPENAI_COMPAT_API_KEY -u TELEGRAM_BOT_TOKEN)
        while IFS= read -r v; do unset_vars+=(-u "$v"); done < <(env | grep -o '^MISTRAL_BOT_[A-Z_]*' || true)
        (cd "$data" && exec env "${unset_vars[@]}" RUST_LOG="$bot_log" "$bot" \
            --model "$model" --slots 4 --ctx-size "$ctx" --max-tokens $((ctx / 2)) \
            --threads "$threads" --http-addr "127.0.0.1:$port" --temperature 0 \
            "${bot_chain[@]}" --local-timeout 3600 --data-dir "$data" "${bot_args[@]}") \
            >>"$log" 2>&1 &
        server_pid=$!
        wait_ready "http://127.0.0.1:$port/ready" "$ready_limit"
    else
        "$llama_server" -m "$model" --host 127.0.0.1 --port "$port" --parallel 4 \
            -c $((ctx * 4)) -t "$threads" "${no_mmap[@]}" "${llama_args[@]}" >>"$log" 2>&1 &
        server_pid=$!
        wait_ready "http://127.0.0.1:$port/health" "$ready_limit"
    fi
    note "$name ready after $(python3 -c "print(f'{$(date +%s.%N) - $t0:.1f}')") s"
}

read -r -a servers <<<"${SERVERS:-mistral-bot llama-server}"

# basic, or its fairness part alone (scenario `fairness`).
run_basic() {
    local name=$1 scenario=$2 parts=single,concurrent,fairness eos=()
    [[ $scenario == fairness ]] && parts=fairness
    [[ $chat_ignore_eos == 1 ]] && eos=(--ignore-eos)
    start_server "$name" 4096 "$out/$name-$scenario" "$out/$name-$scenario.log"
    note "$scenario: measuring $name"
    python3 "$client" measure --port "$port" --name "$name" --reps "$reps" \
        --max-tokens "$max_tokens" --cold-words "$cold_words" --parts "$parts" \
        --stream-tokens "$stream_tokens" "${eos[@]}" >"$out/$scenario-$name.json"
    note "$scenario: $name done"
    stop_server
}

# chats, and restart: the same data directory before and after the restart.
run_chats() {
    local name=$1 data="$out/$name-chats" state="$out/chats-$name.state.json" first_rounds=0
    local eos=()
    [[ $chat_ignore_eos == 1 ]] && eos=(--ignore-eos)
    selected chats && first_rounds=$rounds
    start_server "$name" 4096 "$data" "$out/$name-chats.log"
    note "chats: $chats chats, $first_rounds rounds on $name"
    python3 "$client" chats --port "$port" --name "$name" --state "$state" \
        --chats "$chats" --history-words "$history_words" --rounds "$first_rounds" \
        --max-tokens "$chat_tokens" "${eos[@]}" >"$out/chats-$name.json"
    note "chats: $name done"
    stop_server
    if [[ -d $data/kv ]]; then
        note "$name: $(du -sb "$data/kv" | cut -f1) bytes in $(find "$data/kv" -type f | wc -l) files under --data-dir/kv after the stop"
    fi
    selected restart || return 0
    start_server "$name" 4096 "$data" "$out/$name-chats.log"
    note "restart: one more turn per chat on $name"
    python3 "$client" chats --port "$port" --name "$name" --state "$state" --resume \
        --rounds 1 --max-tokens "$chat_tokens" "${eos[@]}" >"$out/restart-$name.json"
    note "restart: $name done"
    stop_server
}

run_long() {
    local name=$1 trim=()
    [[ $name == llama-server ]] && trim=(--client-trim)
    start_server "$name" "$long_ctx" "$out/$name-long" "$out/$name-long.log"
    note "long: $long_turns turns on $name"
    python3 "$client" longchat --port "$port" --name "$name" --turns "$long_turns" \
        --max-tokens "$long_tokens" "${trim[@]}" >"$out/long-$name.json"
    note "long: $name done"
    stop_server
}

run_forced() {
    local name=$1
    start_server "$name" 4096 "$out/$name-forced" "$out/$name-forced.log"
    note "forced: $forced_tokens tokens, 1 and 4 streams on $name"
    python3 "$client" forced --port "$port" --name "$name" --reps "$forced_reps" \
        --max-tokens "$forced_tokens" >"$out/forced-$name.json"
    note "forced: $name done"
    stop_server
}

# deadline: mistral-bot twice, with and without --local-max-wait, a fake cloud second.
run_deadline() {
    local cloud_port cloud_pid side wait eos=()
    [[ $chat_ignore_eos == 1 ]] && eos=(--ignore-eos)
    cloud_port="$(free_port)"
    python3 "$client" fakecloud --port "$cloud_port" --delay "$cloud_delay" &
    cloud_pid=$!
    for side in max-wait no-max-wait; do
        wait=$deadline_wait
        [[ $side == no-max-wait ]] && wait=0
        bot_chain=(--chain local,openai --openai-base-url "http://127.0.0.1:$cloud_port/v1"
            --openai-model fake --local-max-wait "$wait")
        start_server mistral-bot 4096 "$out/deadline-$side" "$out/deadline-$side.log"
        note "deadline: $deadline_chats chats ($deadline_cold cold), --local-max-wait $wait"
        python3 "$client" deadline --port "$port" --name "$side" --chats "$deadline_chats" \
            --cold "$deadline_cold" --cold-words "$cold_words" --reps "$deadline_reps" \
            --warm-words "$deadline_warm_words" \
            --max-tokens "$chat_tokens" "${eos[@]}" >"$out/deadline-$side.json"
        stop_server
    done
    bot_chain=(--chain local)
    kill "$cloud_pid" 2>/dev/null || true
    wait "$cloud_pid" 2>/dev/null || true
}

note "model $(basename "$model"), $threads threads, scenarios: $scenarios"
for name in "${servers[@]}"; do
    selected basic && run_basic "$name" basic
    selected fairness && run_basic "$name" fairness
    if selected chats || selected restart; then run_chats "$name"; fi
    selected long && run_long "$name"
    selected forced && run_forced "$name"
done
selected deadline && run_deadline

echo
echo "model: $(basename "$model"), $threads threads; events in $out/events.log"
for s in basic fairness chats restart long forced; do
    selected "$s" || continue
    [[ -f $out/$s-mistral-bot.json && -f $out/$s-llama-server.json ]] || continue
    echo
    python3 "$client" table --scenario "$s" "$out/$s-mistral-bot.json" "$out/$s-llama-server.json"
done
if selected deadline && [[ -f $out/deadline-max-wait.json && -f $out/deadline-no-max-wait.json ]]; then
    echo
    python3 "$client" table --scenario deadline "$out/deadline-max-wait.json" "$out/deadline-no-max-wait.json"
fi
