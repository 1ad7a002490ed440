"""Output throughput, time to first token and inter-token latency of `dsv3 serve` beside `transformers serve`.

Both servers load the same checkpoint (default: the random `bench` preset written once in the Hugging Face
layout, with a word-level tokenizer: one word per token id, no end-of-sequence token, so every reply runs to
--max-tokens and every streamed chunk is one token). Each server is a fresh subprocess with --threads torch
threads; before timing, both must give the same greedy tokens for one prompt. Then, per repeat and engine
(engines alternating), a warm-up request and, for each concurrency C, C users that each stream --rounds
greedy /v1/completions requests over HTTP one after the other, from a fixed prompt set. Reported per C:
output tokens per second over the wall time of the whole load, TTFT (request sent to first text chunk) and
inter-token latency (between a reply's chunks) at p50/p90/p99, each the median over --repeats, and the
dsv3/transformers ratios. transformers runs with --continuous-batching when it can (--transformers-cb
auto: tried first, and when it fails on this model the failure is printed and transformers runs without it).

Notes: `transformers serve` needs `pip install "dsv3[bench]"` (transformers[serving]: fastapi, uvicorn,
openai, accelerate); `dsv3 serve` needs the `serve` extra.
"""

from __future__ import annotations

from dsv3.options import integer_list, positive, real

HELP = "Output throughput, time to first token and inter-token latency of `dsv3 serve` beside `transformers serve`."


def add_args(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="a Hugging Face DeepSeek-V3 directory with a tokenizer")
    src.add_argument("--preset", default="bench", help="write a random checkpoint of this preset once (default: bench)")
    p.add_argument("--concurrency", type=integer_list(1), default=(1, 2, 4, 8, 16, 32),
                   help="comma-separated numbers of concurrent users (default 1,2,4,8,16,32)")
    p.add_argument("--rounds", type=positive, default=2, help="requests each user sends, one after the other (default 2)")
    p.add_argument("--prompt-len", type=positive, default=64, help="prompt length in tokens (default 64)")
    p.add_argument("--max-tokens", type=positive, default=32, help="tokens generated per request (default 32)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights and activations")
    p.add_argument("--threads", type=positive, default=1, help="torch threads of each server process")
    p.add_argument("--engines", default="dsv3,transformers", help="comma-separated: dsv3, transformers")
    p.add_argument("--transformers-cb", default="auto", choices=["auto", "on", "off"],
                   help="transformers serve --continuous-batching: auto (try, fall back if it fails), on, off")
    p.add_argument("--max-batch", type=positive, default=32, help="dsv3 serve --max-batch (default 32)")
    p.add_argument("--cache-gb", type=real(0, lo_open=True), default=0.25, help="dsv3 serve --cache-gb (default 0.25)")
    p.add_argument("--repeats", type=positive, default=2, help="fresh servers per engine (median reported)")
    p.add_argument("--startup-timeout", type=real(0, lo_open=True), default=300.0, help="seconds a server may take to start")
    p.add_argument("--no-check", action="store_true", help="time even when the greedy tokens differ")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run(ns) -> int:
    from dsv3.bench import serve

    return serve.run(ns)
