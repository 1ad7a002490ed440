"""benchmarks: FP8 kernels, decoding speed, MTP speculative decoding (`dsv3 bench kernels|decode|mtp`).

Speed and memory are measured here, never in the tests; `dsv3 bench BENCHMARK --help` says what each
one times and against what.

Notes: each sub-benchmark is a module `dsv3.bench.<name>` with `add_args(parser)` and
`run(namespace) -> int`, like the top-level commands.
"""

from __future__ import annotations

import argparse
import importlib

from dsv3.options import user_description

# sub-benchmark -> module, imported only when the parser is built
BENCH_MODULES = {
    "kernels": "dsv3.bench.kernels",
    "decode": "dsv3.bench.decode",
    "mtp": "dsv3.bench.mtp",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, module in BENCH_MODULES.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=user_description(mod.__doc__))
        mod.add_args(p)
        p.set_defaults(bench_func=mod.run)


def run(ns: argparse.Namespace) -> int:
    return ns.bench_func(ns)
