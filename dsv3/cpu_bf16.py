"""bf16 matrix products on CPUs without bf16 arithmetic.

A CPU with AVX512-BF16 or AMX multiplies bf16 directly (oneDNN), twice as fast as float32. One without them
(AVX2-only x86, e.g. AMD Zen 2/3) gets torch's fallback: measured on such a machine, one thread, a 512-row
product with a 512 x 2048 weight takes 111 ms in bf16 against 12 ms in float32 -- 9x slower, which made a bf16
prefill 5x slower than a float32 one. Its matrix-*vector* product is fine (3.7 ms vs 5.2 ms for the
32000 x 512 head), so decode steps keep bf16 and only products of UPCAST_ROWS rows or more are computed in
float32 from the same bf16 operands, the result rounded back to bf16. bf16 GEMMs accumulate in float32 anyway:
the result is the same up to summation order. The upcast converts the whole weight each call, so it pays from
a few rows for an expert-sized weight (4 rows x 512 x 2048: 1.06 ms bf16, 0.66 ms upcast) but only from ~17
for the 32000 x 512 head (its conversion alone is ~55 ms); UPCAST_ROWS = 32 is past both: a prefill is
upcast (512 rows through the head: 1,717 ms -> 281 ms), a decode step of up to 31 sequences is not.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

UPCAST_ROWS = 32


@functools.cache
def has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo's flags). Where the
    flags cannot be read (not Linux), assume it does: torch's own bf16 path is then used as before."""
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), computed in float32 when bf16 products of this many rows are slow on this CPU."""
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu" and x.numel() >= UPCAST_ROWS * x.shape[-1]
            and not has_bf16_arithmetic()):
        return F.linear(x.float(), weight.float()).to(torch.bfloat16)
    return F.linear(x, weight)
