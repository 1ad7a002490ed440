"""Benchmarks: `dsv3 bench kernels|decode|mtp ...` (speed and memory, printed side by side)."""

import importlib

BENCHMARKS = {"kernels": "dsv3.bench.kernels", "decode": "dsv3.bench.decode", "mtp": "dsv3.bench.mtp"}


def add_args(p) -> None:
    sub = p.add_subparsers(dest="bench", required=True, metavar="BENCH")
    for name, module in BENCHMARKS.items():
        if importlib.util.find_spec(module) is None:
            continue
        mod = importlib.import_module(module)
        c = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0], description=mod.__doc__)
        mod.add_args(c)
        c.set_defaults(bench_run=mod.run)


def run(ns) -> int:
    return ns.bench_run(ns)
