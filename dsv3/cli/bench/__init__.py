"""benchmarks: FP8 kernels, decoding speed, MTP speculative decoding, serving, a full-width FP8 slice (`dsv3 bench kernels|decode|mtp|serve|slice`).

Speed and memory are measured here, never in the tests; `dsv3 bench BENCHMARK --help` says what each
one times and against what.

Notes: each sub-benchmark is a module `dsv3.cli.bench.<name>` registered like a top-level command
(HELP, docstring, `add_args(parser)`, `run(namespace) -> int`); its `run` calls the work in
`dsv3.bench.<name>`.
"""

from __future__ import annotations

import argparse

from dsv3.cli import add_commands

HELP = "benchmarks: FP8 kernels, decoding speed, MTP speculative decoding, serving, a full-width FP8 slice (`dsv3 bench kernels|decode|mtp|serve|slice`)."

# sub-benchmark -> module, imported only when the parser is built
BENCHMARKS = {
    "kernels": "dsv3.cli.bench.kernels",
    "decode": "dsv3.cli.bench.decode",
    "mtp": "dsv3.cli.bench.mtp",
    "serve": "dsv3.cli.bench.serve",
    "slice": "dsv3.cli.bench.slice",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    add_commands(sub, BENCHMARKS, "bench_func")


def run(ns: argparse.Namespace) -> int:
    return ns.bench_func(ns)
