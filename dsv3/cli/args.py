"""The flags `dsv3 generate` and `dsv3 chat` share: which model (--ckpt/--preset, dtype, device, length) and how to sample.

Argument definitions only, so this module imports no torch: `dsv3 --help` and every argument error
stay fast. The values are checked by their argparse types here, the rest (sampling combinations,
prompt files, devices that are absent) by `dsv3.cli.common` before the model loads.
"""

from __future__ import annotations

import argparse
import re

from dsv3.options import non_negative, positive, real, seed

DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32"}  # --dtype -> torch
STORED = "stored"  # --dtype stored: every tensor as the checkpoint stores it, on every device


def device_name(s: str) -> str:
    """argparse type for --device: cpu, cuda or cuda:N (meta and others cannot hold real weights)."""
    if not re.fullmatch(r"cpu|cuda(:\d+)?", s):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {s!r}")
    return s


def add_model_args(p) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--ckpt", help="Hugging Face DeepSeek-V3 directory (config.json + safetensors [+ tokenizer]); "
                                    "default: the bundled small model")
    src.add_argument("--preset", help="random weights of a preset config (tiny, ...): for smoke tests")
    p.add_argument("--dtype", choices=sorted(DTYPES) + [STORED], default=None,
                   help="dequantise/cast the weights at load (default: as stored, except FP8 weights on a CPU, "
                        "dequantised once into the dtype of the checkpoint's other tensors, bf16 in the release -- "
                        "a CPU has no FP8 arithmetic and dequantising at every product decodes ~5x slower; "
                        "'stored' keeps them FP8 there too)")
    p.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    p.add_argument("--max-seq-len", type=positive, default=None,
                   help="longest prompt + generation, sizes the cache (default: the checkpoint's max_seq_len)")
    p.add_argument("--check-weights", action="store_true", help="scan every tensor for NaN/Inf while loading")


def add_sampling_args(p, max_new_tokens: int = 64) -> None:
    p.add_argument("--max-new-tokens", type=non_negative, default=max_new_tokens,
                   help="tokens to generate per prompt at most (stops earlier at the end-of-sequence token)")
    p.add_argument("--temperature", type=real(0), default=0.0, help="softmax temperature; 0 = greedy")
    p.add_argument("--top-p", type=real(0, 1, lo_open=True), default=1.0,
                   help="nucleus sampling: keep the smallest set of tokens with this much probability; 1 = off")
    p.add_argument("--top-k", type=non_negative, default=0, help="keep the k most likely tokens; 0 = no top-k")
    p.add_argument("--seed", type=seed, default=None,
                   help="sampling seed in [0, 2^63) (default: a fresh random seed, shared by all ranks)")
