#!/usr/bin/env python3
"""Client half of benches/vs-llama-server.sh: measures one OpenAI-compatible server.

Python 3.11 standard library only. Talks to 127.0.0.1 only. Every request has a socket
timeout and every loop a count. Prints one JSON object (the figures) on stdout; progress
goes to stderr.

    vs_llama_server.py measure --port P --name NAME [--reps 3] [--max-tokens 128]
    vs_llama_server.py chats --port P --name NAME --state S.json [--resume] [--rounds 2]
                             [--ports P1,P2]   # plain round-robin over servers instead
    vs_llama_server.py longchat --port P --name NAME [--turns 40] [--client-trim]
    vs_llama_server.py forced --port P --name NAME [--max-tokens 64] [--reps 2]
    vs_llama_server.py deadline --port P --name NAME [--chats 8] [--cold 2] [--reps 3]
    vs_llama_server.py fakecloud --port P [--delay 0.5]   # an OpenAI-compatible fake cloud
    vs_llama_server.py table A.json B.json      # side-by-side table, ratios A / B

`chats` keeps every chat's history in the --state file, so a second run with --resume
after both servers restarted continues the same conversations.
"""

import argparse
import http.client
import itertools
import json
import os
import random
import statistics
import sys
import threading
import time

PROMPT = "Write the numbers from 1 to 300 in words, separated by commas."
HOST = "127.0.0.1"
# Seconds per socket operation: a 7B reads a cold 2500-token prompt for ~2 minutes on 2
# cores before its first byte.
TIMEOUT = float(os.environ.get("BENCH_TIMEOUT", "900"))
MAX_LINES = 100_000  # SSE lines read per response, at most


def log(*args):
    print(*args, file=sys.stderr, flush=True)


class ContextFull(RuntimeError):
    """The server refused the prompt as longer than its context window."""


def stream_chat(port, content, max_tokens, on_chunk=None, messages=None, ignore_eos=False):
    """POSTs one streamed chat completion; returns its timings.

    `content` is a single user message, or `messages` the whole conversation.
    Times are time.monotonic() values: `sent`, `first` (first non-empty content delta),
    `chunks` (the time of every non-empty content delta), `end` ([DONE] or end of body).
    `tokens` is usage.completion_tokens of the final chunk when present, else the number
    of content deltas.
    """
    request = {
        "model": "bench",
        "messages": messages if messages is not None else [{"role": "user", "content": content}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    if ignore_eos:
        # llama-server's field; mistral-bot accepts the same extension.
        request["ignore_eos"] = True
    body = json.dumps(request)
    conn = http.client.HTTPConnection(HOST, port, timeout=TIMEOUT)
    chunks = []
    usage = None
    text = []
    try:
        sent = time.monotonic()
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=body,
            headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
        )
        resp = conn.getresponse()
        if resp.status != 200:
            detail = resp.read(2000)
            if resp.status == 400 and b"context" in detail:
                raise ContextFull(f"HTTP 400: {detail!r}")
            raise RuntimeError(f"HTTP {resp.status}: {detail!r}")
        for _ in range(MAX_LINES):
            line = resp.readline()
            if not line:
                break
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            now = time.monotonic()
            event = json.loads(data)
            if event.get("usage"):
                usage = event["usage"]
            for choice in event.get("choices") or []:
                piece = (choice.get("delta") or {}).get("content")
                if piece:
                    chunks.append(now)
                    text.append(piece)
                    if on_chunk:
                        on_chunk(len(chunks))
        end = time.monotonic()
        provider = resp.getheader("x-mistral-bot-provider")
    finally:
        conn.close()
    tokens = usage.get("completion_tokens") if usage else None
    details = (usage or {}).get("prompt_tokens_details") or {}
    return {
        "sent": sent,
        "first": chunks[0] if chunks else None,
        "chunks": chunks,
        "end": end,
        "tokens": tokens if tokens is not None else len(chunks),
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "cached_tokens": details.get("cached_tokens"),
        "text": "".join(text),
        "provider": provider,
    }


def ttft(r):
    """Time to the first content delta; for a reply with no text (a 1-token forced reply
    whose token has no text), time to the end of the response."""
    return (r["first"] if r["first"] is not None else r["end"]) - r["sent"]


def p95(values):
    """Nearest-rank 95th percentile."""
    ordered = sorted(values)
    return ordered[max(0, -(-95 * len(ordered) // 100) - 1)]


def decode_rate(r):
    """Generated tokens/s from the first content delta to the last."""
    span = r["chunks"][-1] - r["first"] if len(r["chunks"]) > 1 else 0.0
    return (r["tokens"] - 1) / span if span > 0 else float("nan")


def single(port, max_tokens, rep):
    # The same prompt every time: with any other opening the small model may stop early
    # (greedy, this one counts on to max_tokens). After the warm-up both servers have it
    # in their prefix cache, so the time to first token is the servers' own latency.
    r = stream_chat(port, PROMPT, max_tokens)
    return {
        "tok_s": decode_rate(r),
        "ttft_s": r["first"] - r["sent"],
        "tokens": r["tokens"],
        "prompt_tokens": r["prompt_tokens"],
    }


def at_once(port, users, max_tokens, what, join_timeout, ignore_eos=False):
    """`users` identical PROMPT requests released together; their stream_chat results.
    Raises if any failed or had not ended after `join_timeout` seconds."""
    results = [None] * users
    errors = []
    barrier = threading.Barrier(users, timeout=TIMEOUT)

    def user(i):
        try:
            barrier.wait()
            results[i] = stream_chat(port, PROMPT, max_tokens, ignore_eos=ignore_eos)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(join_timeout)
    if errors or any(r is None for r in results):
        raise RuntimeError(f"{what} requests failed: {errors}")
    return results


def concurrent(port, max_tokens, rep, users=4):
    results = at_once(port, users, max_tokens, "concurrent", TIMEOUT * 2)
    start = min(r["sent"] for r in results)
    end = max(r["chunks"][-1] for r in results)
    total = sum(r["tokens"] for r in results)
    return {
        "agg_tok_s": total / (end - start),
        "per_user_tok_s": statistics.mean(decode_rate(r) for r in results),
        "ttft_s": statistics.mean(r["first"] - r["sent"] for r in results),
        "tokens": total,
    }


VOCAB = (
    "river mountain engine violet market signal harbor lantern orbit meadow copper "
    "window garden silver thunder pencil castle forest winter bridge candle planet "
    "marble rocket valley shadow ticket wagon anchor basket"
).split()


def cold_prompt(words, rng):
    """About `words` words (≈ 1.2 tokens each for SmolLM2), unique per call."""
    parts = [f"Session {rng.randrange(10**12)}. Summarize the following notes.\n"]
    for i in range(words):
        parts.append(rng.choice(VOCAB))
        parts.append("." if i % 12 == 11 else " ")
    return "".join(parts)


def fairness(port, rep, cold_words, stream_tokens=1000, after_chunks=20, ignore_eos=False):
    """One chat streams; after `after_chunks` deltas a cold long prompt arrives. With
    `ignore_eos` (random-weight models) the streamer's reply is forced to its length."""
    rng = random.Random()
    cold_text = cold_prompt(cold_words, rng)
    go = threading.Event()
    box = {}

    def streamer():
        try:
            box["stream"] = stream_chat(
                port,
                PROMPT,
                stream_tokens,
                on_chunk=lambda n: go.set() if n >= after_chunks else None,
                ignore_eos=ignore_eos,
            )
        except Exception as e:
            box["stream_error"] = repr(e)
        go.set()

    t = threading.Thread(target=streamer, daemon=True)
    t.start()
    if not go.wait(TIMEOUT):
        raise RuntimeError("the streaming request produced no tokens")
    cold = stream_chat(port, cold_text, 8)
    t.join(TIMEOUT * 2)
    if "stream_error" in box or "stream" not in box:
        raise RuntimeError(f"streaming request failed: {box.get('stream_error')}")
    s = box["stream"]
    c0, c1 = cold["sent"], cold["first"]
    ch = s["chunks"]
    during = [b - a for a, b in zip(ch, ch[1:]) if b > c0 and a < c1]
    before = [b - a for a, b in zip(ch, ch[1:]) if b <= c0]
    # The streamer's token rate while the cold prompt is read, as a share of its rate
    # alone before (issue 17: at least 25 % on the 7B shape; llama-server: 0).
    tokens_during = sum(1 for t in ch if c0 < t <= c1)
    solo_rate = len(before) / sum(before) if before and sum(before) > 0 else float("nan")
    share = (tokens_during / (c1 - c0)) / solo_rate if c1 > c0 and solo_rate > 0 else float("nan")
    return {
        "stream_share": share,
        "max_gap_s": max(during) if during else float("nan"),
        "median_gap_s": statistics.median(during) if during else float("nan"),
        "gap_before_s": max(before) if before else float("nan"),
        "cold_ttft_s": c1 - c0,
        "cold_prompt_tokens": cold["prompt_tokens"],
        # The streamer must still be streaming when the cold prompt's first token comes.
        "covered": bool(ch) and ch[-1] >= c1,
    }


SYSTEM = "You are a helpful assistant. Answer briefly."
QUESTIONS = [
    "Which three words come up most often in the notes? Answer in one line.",
    "Name two words from the notes that start with the letter m.",
    "Write one sentence that uses four words from the notes.",
    "Which word of the notes is the longest? Answer briefly.",
]


# The history's stand-in for a forced reply (see chat_turn).
FORCED_REPLY = "Noted."


def chat_turn(port, messages, max_tokens, ignore_eos):
    """One turn of a conversation: sends `messages`, appends the reply, returns figures.

    With `ignore_eos` (random-weight models) the history keeps FORCED_REPLY instead of the
    reply: such a model answers control tokens, which mistral-bot shows as their text and
    llama-server drops, so the next prompts would differ between the servers."""
    r = stream_chat(port, None, max_tokens, messages=messages, ignore_eos=ignore_eos)
    messages.append({"role": "assistant", "content": FORCED_REPLY if ignore_eos else r["text"]})
    return {
        "ttft_s": ttft(r),
        "prompt_tokens": r["prompt_tokens"],
        "cached_tokens": r["cached_tokens"],
        "tokens": r["tokens"],
    }


def summary(runs, key="ttft_s"):
    values = [r[key] for r in runs]
    return {
        "median_s": statistics.median(values) if values else None,
        "p95_s": p95(values) if values else None,
        "max_s": max(values) if values else None,
        "n": len(values),
        "prompt_tokens": median_of(runs, "prompt_tokens"),
        "cached_tokens": median_of(runs, "cached_tokens"),
        # Turns that found at least half their prompt in the server's cache.
        "cache_hits": sum(
            1 for r in runs if (r.get("cached_tokens") or 0) * 2 >= (r.get("prompt_tokens") or 1)
        ),
    }


def chats(args):
    """Many chats taking turns on few slots.

    Without --resume: each chat opens with a ~`history_words`-word message (its history;
    the first turn reads it cold), then `rounds` rounds in which every chat, in turn, asks
    one short question: each returning chat finds its slot taken by others since. With
    --resume: the chats of the --state file continue for `rounds` more rounds (after a
    restart of the server). The conversations are the same for every server: the text is
    drawn from generators seeded by the chat number, the replies are the server's own.
    """
    if args.resume:
        with open(args.state) as f:
            state = json.load(f)
    else:
        state = {"chats": [], "rounds": 0}
        for i in range(args.chats):
            rng = random.Random(f"chat-{i}")
            notes = cold_prompt(args.history_words, rng)
            state["chats"].append(
                [{"role": "system", "content": SYSTEM}, {"role": "user", "content": notes}]
            )
    out = {"name": args.name, "chats": len(state["chats"])}
    # --ports: a balancer without affinity over several servers, request by request; else
    # every request to --port. A round-robin balancer serving many users' interleaved
    # requests sends a chat's next turn to any of its servers: a seeded draw per request
    # models that (a strict cycle with this one client in lockstep would send chat i to
    # server i mod N every time, by accident, whenever the chat count is a multiple of N).
    if args.ports:
        servers = [int(p) for p in args.ports.split(",")]
        draw = random.Random("balancer")
        ports = iter(lambda: draw.choice(servers), None)
    else:
        ports = itertools.repeat(args.port)
    if not args.resume:
        cold = []
        for i, messages in enumerate(state["chats"]):
            cold.append(chat_turn(next(ports), messages, args.max_tokens, args.ignore_eos))
            log(f"[{args.name}] chat {i} opened: {cold[-1]}")
        out["cold"] = summary(cold)
        out["cold_runs"] = cold
    returning = []
    for _ in range(args.rounds):
        k = state["rounds"]
        for i, messages in enumerate(state["chats"]):
            messages.append({"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]})
            returning.append(chat_turn(next(ports), messages, args.max_tokens, args.ignore_eos))
            log(f"[{args.name}] round {k} chat {i}: {returning[-1]}")
        state["rounds"] = k + 1
    out["returning"] = summary(returning)
    out["returning_runs"] = returning
    with open(args.state, "w") as f:
        json.dump(state, f)
    print(json.dumps(out))


def longchat(args):
    """One chat of `turns` short turns, past a small context window.

    With --client-trim (for a server that refuses an over-long prompt, as llama-server
    does), the client drops the oldest exchange and sends again until the server takes
    it, as a simple client would; the time to first token then counts from the first try.
    """
    rng = random.Random("long-chat")
    messages = [{"role": "system", "content": SYSTEM}]
    runs = []
    for t in range(args.turns):
        words = " ".join(rng.choice(VOCAB) for _ in range(args.turn_words))
        messages.append({"role": "user", "content": f"Turn {t}: {words}. Reply with a short story."})
        started = time.monotonic()
        rejected = 0
        for _ in range(args.turns * 2 + 2):
            try:
                r = stream_chat(args.port, None, args.max_tokens, messages=messages)
                break
            except ContextFull:
                if not args.client_trim or len(messages) < 4:
                    raise
                del messages[1:3]  # the oldest user message and its reply
                rejected += 1
        else:
            raise RuntimeError("the server never accepted the trimmed conversation")
        first = r["first"] if r["first"] is not None else r["end"]
        messages.append({"role": "assistant", "content": r["text"]})
        runs.append({
            "ttft_s": first - started,
            "prompt_tokens": r["prompt_tokens"],
            "cached_tokens": r["cached_tokens"],
            "tokens": r["tokens"],
            "rejected": rejected,
        })
        log(f"[{args.name}] turn {t}: {runs[-1]}")
    out = {"name": args.name, "turns": args.turns, "long": summary(runs)}
    out["long"]["rejected"] = sum(r["rejected"] for r in runs)
    # Turns that read more than their new message: the prefix cache did not cover them.
    new_only = [r for r in runs[1:] if r["cached_tokens"] is not None]
    out["long"]["reread_turns"] = (
        sum(1 for r in new_only if r["prompt_tokens"] - r["cached_tokens"] > 200)
        if new_only else None
    )
    out["long_runs"] = runs
    print(json.dumps(out))


def forced_run(port, max_tokens, users):
    """`users` identical requests at once, each generating exactly `max_tokens` tokens."""
    results = at_once(port, users, max_tokens, "forced", TIMEOUT * 20, ignore_eos=True)
    # From the earliest first token to the last end; the first tokens are not counted.
    start = min(r["sent"] + ttft(r) for r in results)
    end = max(r["end"] for r in results)
    total = sum(r["tokens"] for r in results)
    return {
        "agg_tok_s": (total - users) / (end - start) if end > start else float("nan"),
        "ttft_s": statistics.mean(ttft(r) for r in results),
        "tokens": total,
        "exact": all(r["tokens"] == max_tokens for r in results),
    }


def forced(args):
    """1 and 4 streams of exactly --max-tokens tokens each (ignore_eos)."""
    # Warm-up with all four streams: the first batch of four sequences makes llama.cpp
    # size its compute graph for them, which would otherwise land in the first timed run.
    log(f"[{args.name}] warm-up")
    forced_run(args.port, 8, 4)
    out = {"name": args.name, "max_tokens": args.max_tokens, "reps": args.reps}
    for users in (1, 4):
        runs = []
        for rep in range(args.reps):
            runs.append(forced_run(args.port, args.max_tokens, users))
            log(f"[{args.name}] forced x{users} {rep}: {runs[-1]}")
        key = f"forced{users}"
        out[key] = {k: median_of(runs, k) for k in runs[0] if k != "exact"}
        out[key]["exact"] = all(r["exact"] for r in runs)
        out[key + "_runs"] = runs
    print(json.dumps(out))


def deadline(args):
    """Issue 17 part 4: `chats` short chats (opened first, unmeasured) and `cold` new chats
    with a ~`cold_words`-word first message, all at once, `reps` times: time to first token
    of every request and who answered (the `x-mistral-bot-provider` header). Run against
    mistral-bot with a fake cloud after the local engine, with and without
    --local-max-wait."""
    rng = random.Random("deadline")
    warm = [[{"role": "system", "content": SYSTEM},
             {"role": "user", "content": cold_prompt(args.warm_words, random.Random(f"w{i}"))}]
            for i in range(args.chats - args.cold)]
    log(f"[{args.name}] opening {len(warm)} chats")
    for messages in warm:
        chat_turn(args.port, messages, args.max_tokens, args.ignore_eos)
    out = {"name": args.name, "reps": args.reps}
    runs = {"all": [], "cold": [], "warm": []}
    answered_by = {}
    for rep in range(args.reps):
        jobs = [("warm", m) for m in warm] + [
            ("cold", [{"role": "system", "content": SYSTEM},
                      {"role": "user", "content": cold_prompt(args.cold_words, rng)}])
            for _ in range(args.cold)]
        for kind, messages in jobs:
            if kind == "warm":
                messages.append({"role": "user", "content": QUESTIONS[rep % len(QUESTIONS)]})
        results = [None] * len(jobs)

        def run(i):
            kind, messages = jobs[i]
            r = stream_chat(args.port, None, args.max_tokens, messages=messages,
                            ignore_eos=args.ignore_eos)
            results[i] = (kind, r)

        threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(TIMEOUT * 2)
        for (kind, messages), result in zip(jobs, results):
            if result is None:
                raise RuntimeError("a request did not finish")
            _, r = result
            if kind == "warm":
                messages.append({"role": "assistant",
                                 "content": FORCED_REPLY if args.ignore_eos else r["text"]})
            figures = {"ttft_s": ttft(r), "prompt_tokens": r["prompt_tokens"],
                       "cached_tokens": r["cached_tokens"]}
            runs[kind].append(figures)
            runs["all"].append(figures)
            answered_by[r["provider"]] = answered_by.get(r["provider"], 0) + 1
        log(f"[{args.name}] round {rep}: {answered_by}")
    for kind, values in runs.items():
        out[kind] = summary(values)
    out["answered_by"] = answered_by
    total = sum(answered_by.values())
    out["all"]["cloud_share"] = 1 - answered_by.get("local", 0) / total if total else None
    print(json.dumps(out))


def fakecloud(args):
    """An OpenAI-compatible chat completions server answering after `delay` seconds, for
    the deadline scenario (loopback only)."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model"}]})
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

        def do_POST(self):
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(min(length, 10 << 20))
            time.sleep(args.delay)
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for piece in ["From ", "the ", "cloud."]:
                chunk = {"id": "c", "object": "chat.completion.chunk", "model": "fake",
                         "choices": [{"index": 0, "delta": {"content": piece},
                                      "finish_reason": None}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            end = {"id": "c", "object": "chat.completion.chunk", "model": "fake",
                   "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                   "usage": {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}}
            self.wfile.write(f"data: {json.dumps(end)}\n\ndata: [DONE]\n\n".encode())

    http.server.ThreadingHTTPServer((HOST, args.port), Handler).serve_forever()


def median_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def measure(args):
    port = args.port
    parts = args.parts.split(",")
    log(f"[{args.name}] warm-up")
    for i in range(2):
        stream_chat(port, PROMPT, 16)
    out = {"name": args.name, "max_tokens": args.max_tokens, "reps": args.reps}

    def repeat(part, label, run):
        """`args.reps` runs of one part: their medians in out[part], each in out[part_runs]."""
        runs = []
        for rep in range(args.reps):
            runs.append(run(rep))
            log(f"[{args.name}] {label} {rep}: {runs[-1]}")
        out[part] = {k: median_of(runs, k) for k in runs[0] if k != "covered"}
        out[f"{part}_runs"] = runs
        return runs

    if "single" in parts:
        repeat("single", "single", lambda rep: single(port, args.max_tokens, rep))
    if "concurrent" in parts:
        repeat("concurrent", "4 concurrent", lambda rep: concurrent(port, args.max_tokens, rep))
    if "fairness" in parts:
        runs = repeat("fairness", "fairness",
                      lambda rep: fairness(port, rep, args.cold_words, args.stream_tokens,
                                           ignore_eos=args.ignore_eos))
        out["fairness"]["covered"] = all(r["covered"] for r in runs)
    print(json.dumps(out))


def returning_rows(ttft, count, tokens):
    """Table rows of the returning turns' summary (the `chats` and `restart` scenarios)."""
    return [
        (f"{ttft}, median (s)", "returning", "median_s", "{:.3f}"),
        (f"{ttft}, p95 (s)", "returning", "p95_s", "{:.3f}"),
        (f"{ttft}, largest (s)", "returning", "max_s", "{:.3f}"),
        (count, "returning", "n", "{:.0f}"),
        (f"{tokens} prompt tokens, median", "returning", "prompt_tokens", "{:.0f}"),
        (f"{tokens} cached tokens, median", "returning", "cached_tokens", "{:.0f}"),
    ]


TABLES = {
    "basic": [
        ("1 request: generated tok/s", "single", "tok_s", "{:.1f}"),
        ("1 request: time to first token (s)", "single", "ttft_s", "{:.3f}"),
        ("1 request: completion tokens", "single", "tokens", "{:.0f}"),
        ("1 request: prompt tokens", "single", "prompt_tokens", "{:.0f}"),
        ("4 concurrent: aggregate tok/s", "concurrent", "agg_tok_s", "{:.1f}"),
        ("4 concurrent: per-user tok/s", "concurrent", "per_user_tok_s", "{:.1f}"),
        ("4 concurrent: mean time to first token (s)", "concurrent", "ttft_s", "{:.3f}"),
        ("fairness: largest gap while cold prompt read (s)", "fairness", "max_gap_s", "{:.3f}"),
        ("fairness: median gap while cold prompt read (s)", "fairness", "median_gap_s", "{:.3f}"),
        ("fairness: largest gap before it arrived (s)", "fairness", "gap_before_s", "{:.3f}"),
        ("fairness: cold prompt time to first token (s)", "fairness", "cold_ttft_s", "{:.2f}"),
        ("fairness: streamer's rate while it is read / alone", "fairness", "stream_share", "{:.2f}"),
        ("fairness: cold prompt tokens", "fairness", "cold_prompt_tokens", "{:.0f}"),
    ],
    "chats": [
        ("chats: first turn (cold) TTFT, median (s)", "cold", "median_s", "{:.3f}"),
        ("chats: first turn prompt tokens, median", "cold", "prompt_tokens", "{:.0f}"),
    ] + returning_rows("chats: returning chat TTFT", "chats: returning turns measured",
                       "chats: returning"),
    "restart": returning_rows("after restart: TTFT", "after restart: turns measured",
                              "after restart:"),
    "long": [
        ("long chat: turn TTFT, median (s)", "long", "median_s", "{:.3f}"),
        ("long chat: turn TTFT, largest (s)", "long", "max_s", "{:.3f}"),
        ("long chat: turns", "long", "n", "{:.0f}"),
        ("long chat: prompt tokens, median", "long", "prompt_tokens", "{:.0f}"),
        ("long chat: cached tokens, median", "long", "cached_tokens", "{:.0f}"),
        ("long chat: turns re-reading > 200 tokens", "long", "reread_turns", "{:.0f}"),
        ("long chat: requests refused as too long", "long", "rejected", "{:.0f}"),
    ],
    "deadline": [
        ("deadline: every request TTFT, median (s)", "all", "median_s", "{:.2f}"),
        ("deadline: every request TTFT, p95 (s)", "all", "p95_s", "{:.2f}"),
        ("deadline: cold chats TTFT, median (s)", "cold", "median_s", "{:.2f}"),
        ("deadline: cold chats TTFT, p95 (s)", "cold", "p95_s", "{:.2f}"),
        ("deadline: returning chats TTFT, median (s)", "warm", "median_s", "{:.2f}"),
        ("deadline: returning chats TTFT, p95 (s)", "warm", "p95_s", "{:.2f}"),
        ("deadline: share answered by the cloud", "all", "cloud_share", "{:.2f}"),
    ],
    "forced": [
        ("forced, 1 stream: tok/s", "forced1", "agg_tok_s", "{:.2f}"),
        ("forced, 1 stream: time to first token (s)", "forced1", "ttft_s", "{:.2f}"),
        ("forced, 4 streams: aggregate tok/s", "forced4", "agg_tok_s", "{:.2f}"),
        ("forced, 4 streams: mean time to first token (s)", "forced4", "ttft_s", "{:.2f}"),
        ("forced, 4 streams: tokens in all", "forced4", "tokens", "{:.0f}"),
    ],
}


TABLES["fairness"] = [row for row in TABLES["basic"] if row[1] == "fairness"]


def table(args):
    with open(args.a) as f:
        a = json.load(f)
    with open(args.b) as f:
        b = json.load(f)
    rows = TABLES[args.scenario]

    def fmt(f, v):
        return "-" if v is None else f.format(v)

    def value(side, group, key):
        v = (side.get(group) or {}).get(key)
        return None if isinstance(v, float) and v != v else v  # NaN: no figure

    w = max(len(r[0]) for r in rows)
    head = f"median of {a['reps']} runs" if "reps" in a else args.scenario
    print(f"{head:<{w}}  {a['name']:>12}  {b['name']:>12}  {'ratio':>7}")
    for label, group, key, f in rows:
        va, vb = value(a, group, key), value(b, group, key)
        ratio = f"{va / vb:.2f}" if va is not None and vb else "-"
        print(f"{label:<{w}}  {fmt(f, va):>12}  {fmt(f, vb):>12}  {ratio:>7}")
    if args.scenario in ("basic", "fairness"):
        for side in (a, b):
            if not side["fairness"]["covered"]:
                print(f"note: {side['name']}: the streaming request ended before the cold "
                      "prompt's first token in some run; its gap covers part of the prefill")
    if args.scenario == "forced":
        for side in (a, b):
            for key in ("forced1", "forced4"):
                if not side[key]["exact"]:
                    print(f"note: {side['name']}: some {key} reply was not exactly "
                          f"{side['max_tokens']} tokens")
    print(f"ratio = {a['name']} / {b['name']}; tok/s higher is better, seconds lower is better")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    def server_command(name):
        sp = sub.add_parser(name)
        sp.add_argument("--port", type=int, required=True)
        sp.add_argument("--name", required=True)
        return sp

    m = server_command("measure")
    m.add_argument("--reps", type=int, default=3)
    m.add_argument("--max-tokens", type=int, default=128)
    m.add_argument("--cold-words", type=int, default=1650)
    m.add_argument("--parts", default="single,concurrent,fairness",
                   help="which of single,concurrent,fairness to run")
    m.add_argument("--stream-tokens", type=int, default=1000,
                   help="the fairness streamer's reply length")
    m.add_argument("--ignore-eos", action="store_true", help="force the fairness streamer's length")
    c = server_command("chats")
    c.add_argument("--state", required=True, help="JSON file holding the conversations")
    c.add_argument("--resume", action="store_true", help="continue the chats of --state")
    c.add_argument("--chats", type=int, default=16)
    c.add_argument("--history-words", type=int, default=1250)
    c.add_argument("--rounds", type=int, default=2)
    c.add_argument("--max-tokens", type=int, default=32)
    c.add_argument("--ignore-eos", action="store_true")
    c.add_argument("--ports", help="P1,P2,...: round-robin each request over these instead of --port")
    lc = server_command("longchat")
    lc.add_argument("--turns", type=int, default=40)
    lc.add_argument("--turn-words", type=int, default=20)
    lc.add_argument("--max-tokens", type=int, default=48)
    lc.add_argument("--client-trim", action="store_true")
    fo = server_command("forced")
    fo.add_argument("--reps", type=int, default=5)
    fo.add_argument("--max-tokens", type=int, default=64)
    d = server_command("deadline")
    d.add_argument("--chats", type=int, default=8)
    d.add_argument("--cold", type=int, default=2)
    d.add_argument("--cold-words", type=int, default=1650)
    d.add_argument("--warm-words", type=int, default=200)
    d.add_argument("--reps", type=int, default=3)
    d.add_argument("--max-tokens", type=int, default=32)
    d.add_argument("--ignore-eos", action="store_true")
    fc = sub.add_parser("fakecloud")
    fc.add_argument("--port", type=int, required=True)
    fc.add_argument("--delay", type=float, default=0.5)
    t = sub.add_parser("table")
    t.add_argument("a")
    t.add_argument("b")
    t.add_argument("--scenario", choices=sorted(TABLES), default="basic")
    args = p.parse_args()
    {"measure": measure, "chats": chats, "longchat": longchat, "forced": forced,
     "deadline": deadline, "fakecloud": fakecloud, "table": table}[args.cmd](args)


if __name__ == "__main__":
    main()
