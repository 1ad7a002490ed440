"""The benchmarks' work: FP8 kernels, decoding speed, MTP speculative decoding (`dsv3 bench kernels|decode|mtp`).

Speed and memory are measured here, never in the tests. Each module `dsv3.bench.<name>` has
`run(namespace) -> int`; its flags are defined in `dsv3.cli.bench.<name>`.
"""
