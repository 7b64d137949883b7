#!/usr/bin/env python3
"""Client half of benches/vs-llama-server.sh: measures one OpenAI-compatible server.

Python 3.11 standard library only. Talks to 127.0.0.1 only. Every request has a socket
timeout and every loop a count. Prints one JSON object (the figures) on stdout; progress
goes to stderr.

    vs_llama_server.py measure --port P --name NAME [--reps 3] [--max-tokens 128]
    vs_llama_server.py table A.json B.json      # side-by-side table, ratios A / B
"""

import argparse
import http.client
import json
import random
import statistics
import sys
import threading
import time

PROMPT = "Write the numbers from 1 to 300 in words, separated by commas."
HOST = "127.0.0.1"
TIMEOUT = 120.0  # seconds, per socket operation
MAX_LINES = 100_000  # SSE lines read per response, at most


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def stream_chat(port, content, max_tokens, on_chunk=None):
    """POSTs one streamed chat completion; returns its timings.

    Times are time.monotonic() values: `sent`, `first` (first non-empty content delta),
    `chunks` (the time of every non-empty content delta), `end` ([DONE] or end of body).
    `tokens` is usage.completion_tokens of the final chunk when present, else the number
    of content deltas.
    """
    body = json.dumps(
        {
            "model": "bench",
            "messages": [{"role": "user", "content": content}],
            "stream": True,
            "stream_options": {"include_usage": True},
            "temperature": 0,
            "max_tokens": max_tokens,
        }
    )
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
            raise RuntimeError(f"HTTP {resp.status}: {resp.read(2000)!r}")
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
    finally:
        conn.close()
    tokens = usage.get("completion_tokens") if usage else None
    return {
        "sent": sent,
        "first": chunks[0] if chunks else None,
        "chunks": chunks,
        "end": end,
        "tokens": tokens if tokens is not None else len(chunks),
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "text": "".join(text),
    }


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


def concurrent(port, max_tokens, rep, users=4):
    results = [None] * users
    errors = []
    barrier = threading.Barrier(users, timeout=TIMEOUT)

    def user(i):
        try:
            barrier.wait()
            results[i] = stream_chat(port, PROMPT, max_tokens)
        except Exception as e:  # reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=user, args=(i,), daemon=True) for i in range(users)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT * 2)
    if errors or any(r is None for r in results):
        raise RuntimeError(f"concurrent requests failed: {errors}")
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


def fairness(port, rep, cold_words, stream_tokens=1000, after_chunks=20):
    """One chat streams; after `after_chunks` deltas a cold long prompt arrives."""
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
    return {
        "max_gap_s": max(during) if during else float("nan"),
        "median_gap_s": statistics.median(during) if during else float("nan"),
        "gap_before_s": max(before) if before else float("nan"),
        "cold_ttft_s": c1 - c0,
        "cold_prompt_tokens": cold["prompt_tokens"],
        # The streamer must still be streaming when the cold prompt's first token comes.
        "covered": bool(ch) and ch[-1] >= c1,
    }


def median_of(runs, key):
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def measure(args):
    port = args.port
    log(f"[{args.name}] warm-up")
    for i in range(2):
        stream_chat(port, PROMPT, 16)
    out = {"name": args.name, "max_tokens": args.max_tokens, "reps": args.reps}

    runs = []
    for rep in range(args.reps):
        runs.append(single(port, args.max_tokens, rep))
        log(f"[{args.name}] single {rep}: {runs[-1]}")
    out["single"] = {k: median_of(runs, k) for k in runs[0]}
    out["single_runs"] = runs

    runs = []
    for rep in range(args.reps):
        runs.append(concurrent(port, args.max_tokens, rep))
        log(f"[{args.name}] 4 concurrent {rep}: {runs[-1]}")
    out["concurrent"] = {k: median_of(runs, k) for k in runs[0]}
    out["concurrent_runs"] = runs

    runs = []
    for rep in range(args.reps):
        runs.append(fairness(port, rep, args.cold_words))
        log(f"[{args.name}] fairness {rep}: {runs[-1]}")
    out["fairness"] = {k: median_of(runs, k) for k in runs[0] if k != "covered"}
    out["fairness"]["covered"] = all(r["covered"] for r in runs)
    out["fairness_runs"] = runs
    print(json.dumps(out))


def table(args):
    a = json.load(open(args.a))
    b = json.load(open(args.b))
    rows = [
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
        ("fairness: cold prompt tokens", "fairness", "cold_prompt_tokens", "{:.0f}"),
    ]

    def fmt(f, v):
        return "-" if v is None else f.format(v)

    w = max(len(r[0]) for r in rows)
    print(f"{'median of ' + str(a['reps']) + ' runs':<{w}}  {a['name']:>12}  {b['name']:>12}  {'ratio':>7}")
    for label, group, key, f in rows:
        va, vb = a[group].get(key), b[group].get(key)
        ratio = f"{va / vb:.2f}" if va is not None and vb else "-"
        print(f"{label:<{w}}  {fmt(f, va):>12}  {fmt(f, vb):>12}  {ratio:>7}")
    for side in (a, b):
        if not side["fairness"]["covered"]:
            print(f"note: {side['name']}: the streaming request ended before the cold "
                  "prompt's first token in some run; its gap covers part of the prefill")
    print(f"ratio = {a['name']} / {b['name']}; tok/s higher is better, seconds lower is better")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("measure")
    m.add_argument("--port", type=int, required=True)
    m.add_argument("--name", required=True)
    m.add_argument("--reps", type=int, default=3)
    m.add_argument("--max-tokens", type=int, default=128)
    m.add_argument("--cold-words", type=int, default=1650)
    t = sub.add_parser("table")
    t.add_argument("a")
    t.add_argument("b")
    args = p.parse_args()
    measure(args) if args.cmd == "measure" else table(args)


if __name__ == "__main__":
    main()
