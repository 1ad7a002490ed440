"""benchmarks: FP8 kernels, decoding speed, MTP speculative decoding (`dsv3 bench kernels|decode|mtp`).

Each sub-benchmark is a module `dsv3.bench.<name>` with `add_args(parser)` and
`run(namespace) -> int`, like the top-level commands; the ones not present in this
checkout are simply not offered. Speed and memory are measured here, never in tests.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util

# sub-benchmark -> module, imported only when the parser is built
BENCH_MODULES = {
    "kernels": "dsv3.bench.kernels",
    "decode": "dsv3.bench.decode",
    "mtp": "dsv3.bench.mtp",
}


def add_args(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for name, module in BENCH_MODULES.items():
        if importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_args(p)
        p.set_defaults(bench_func=mod.run)


def run(ns: argparse.Namespace) -> int:
    return ns.bench_func(ns)
