"""FP8 block-scaled GEMM vs bf16 matmul vs torch._scaled_mm on DeepSeek-V3's shapes (TFLOP/s, share of peak).

For every M in {1, 16, 128, 1024, 4096} and every (N, K) of the model's linear layers
(q_b (24576, 1536), kv_b (32768, 512), o (7168, 16384), dense up/gate (18432, 7168),
dense down (7168, 18432), expert up/gate (2048, 7168), expert down (7168, 2048),
kv_a (576, 7168)), times C = A·Bᵀ three ways:

  fp8_gemm    dsv3.kernels.fp8_gemm: 1×128 activation tiles, 128×128 weight blocks
  bf16        torch.matmul of the same shape in bfloat16
  scaled_mm   torch._scaled_mm with one scale per row of A and per column of Bᵀ (cuBLAS FP8),
              where this torch/GPU supports it

FLOPs = 2·M·N·K. "% peak" compares each with the card's dense peak for its input type
(FP8 for fp8_gemm and scaled_mm, BF16 for bf16), from a small table of known cards or
--peak-fp8/--peak-bf16. The `err` column is ‖fp8_gemm − ref‖/‖ref‖ against a float32
matmul of the dequantised operands: a broken kernel shows up here, not only in the tests.

Without CUDA only `--quick` runs (tiny shapes, the Triton interpreter or the torch
reference): it exercises the command end to end; its timings mean nothing.
"""

from __future__ import annotations

import argparse

from dsv3.options import integer_list, real

HELP = "FP8 block-scaled GEMM vs bf16 matmul vs torch._scaled_mm on DeepSeek-V3's shapes (TFLOP/s, share of peak)."


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--json-out", type=str, default=None, help="also write the JSON object to this file (checked first)")
    p.add_argument("--quick", action="store_true", help="tiny shapes only (runs on CPU, through the Triton interpreter)")
    p.add_argument("--m", type=integer_list(1), default=None,
                   help="comma-separated M values (default: 1,16,128,1024,4096; with --quick 1,16)")
    p.add_argument("--rep-ms", type=real(0, lo_open=True), default=30.0,
                   help="GPU: milliseconds of repetitions per measurement")
    p.add_argument("--peak-fp8", type=real(0, lo_open=True), default=None,
                   help="dense FP8 peak of this card in TFLOP/s (default: from the card's name)")
    p.add_argument("--peak-bf16", type=real(0, lo_open=True), default=None,
                   help="dense BF16 peak of this card in TFLOP/s (default: from the card's name)")


def run(ns: argparse.Namespace) -> int:
    from dsv3.bench import kernels

    return kernels.run(ns)
