"""The server's Prometheus metrics: counters, gauges and two latency histograms, rendered as text.

Updated by the engine's thread (`worker`) as tokens come out and read by `GET /metrics`; a lock keeps a
scrape from seeing half an update. Names follow Prometheus conventions (`_total` counters, `_seconds`).
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS):
        self.buckets, self.counts, self.sum, self.n = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]


class Metrics:
    COUNTERS = {
        "dsv3_requests_total": "requests accepted by the engine",
        "dsv3_requests_finished_total": "requests that ended (any reason)",
        "dsv3_requests_rejected_total": "requests refused (bad input, queue full)",
        "dsv3_prompt_tokens_total": "prompt tokens of accepted requests",
        "dsv3_generation_tokens_total": "tokens generated",
    }

    def __init__(self):
        self.lock = threading.Lock()
        self.counters = dict.fromkeys(self.COUNTERS, 0)
        self.ttft = Histogram()
        self.itl = Histogram()
        self.gauges = {"running": 0, "waiting": 0, "blocks_total": 0, "blocks_used": 0, "blocks_free": 0}

    def count(self, name: str, by: int = 1) -> None:
        with self.lock:
            self.counters[name] += by

    def observe(self, ttft: float | None = None, itl: float | None = None) -> None:
        with self.lock:
            if ttft is not None:
                self.ttft.observe(ttft)
            if itl is not None:
                self.itl.observe(itl)

    def set_stats(self, stats: dict) -> None:
        with self.lock:
            self.gauges.update({k: stats[k] for k in self.gauges})

    def render(self) -> str:
        g = self.gauges
        gauges = {
            "dsv3_requests_running": ("sequences in the running batch", g["running"]),
            "dsv3_queue_length": ("requests waiting for admission", g["waiting"]),
            "dsv3_cache_blocks_total": ("blocks of the paged latent cache", g["blocks_total"]),
            "dsv3_cache_blocks_used": ("blocks held by sequences", g["blocks_used"]),
            "dsv3_cache_blocks_free": ("blocks on the free list", g["blocks_free"]),
        }
        with self.lock:
            lines = []
            for name, text in self.COUNTERS.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} counter", f"{name} {self.counters[name]}"]
            for name, (text, v) in gauges.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} gauge", f"{name} {v}"]
            for name, h, text in (("dsv3_time_to_first_token_seconds", self.ttft, "arrival to first token"),
                                  ("dsv3_inter_token_latency_seconds", self.itl, "between a request's tokens")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram", *h.lines(name)]
        return "\n".join(lines) + "\n"
