"""bf16 matrix products on CPUs without bf16 arithmetic.

A CPU with AVX512-BF16 or AMX multiplies bf16 directly (oneDNN). One without them
(AVX2-only x86, e.g. AMD Zen 2/3) gets torch's fallback: measured on such a machine, one thread, a 512-row
product with a 512 x 2048 weight takes 111 ms in bf16 against 12 ms in float32 -- 9x slower, which made a bf16
prefill 5x slower than a float32 one. Its matrix-*vector* product is fine (3.7 ms vs 5.2 ms for the
32000 x 512 head), so a decode step of one sequence keeps bf16, and products of enough rows are computed in
float32 from the same bf16 operands, the result rounded back to bf16. bf16 GEMMs accumulate in float32 anyway:
the result is the same up to summation order. The upcast converts the whole weight at each call, so when it pays
depends on the weight's size: from ~3 rows for an expert-sized weight (4 rows x 512 x 2048: 1.06 ms in bf16,
0.66 ms upcast) but only from ~17 for the 32000 x 512 head, whose conversion alone takes ~55 ms. Hence two
thresholds: UPCAST_ROWS for weights up to LARGE_WEIGHT elements, UPCAST_ROWS_LARGE above (512 rows through the
head: 1,717 ms -> 281 ms). The attention's contractions against the cache are batched products that hit the
same fallback (8 sequences x 8 heads against 517 cached latents: 3.7 ms in bf16); `einsum` computes those in
float32 too, from UPCAST_ELEMENTS elements of operands up.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F

UPCAST_ROWS, UPCAST_ROWS_LARGE, LARGE_WEIGHT = 4, 32, 1 << 22
UPCAST_ELEMENTS = 1 << 14


@torch.compiler.assume_constant_result  # a fact of the machine: Dynamo calls it while tracing, keeps the answer
def has_bf16_arithmetic() -> bool:
    """Whether this CPU multiplies bf16 natively (avx512_bf16 or amx_bf16 in /proc/cpuinfo's flags). Where the
    flags cannot be read (not Linux), assume it does: torch's own bf16 path is then used as before."""
    return _cpu_flags_say_bf16()


@functools.cache  # (kept apart: Dynamo would trace into a cached function instead of calling it)
def _cpu_flags_say_bf16() -> bool:
    try:
        flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), None)
    except OSError:
        return True
    return flags is None or any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.linear(x, weight), computed in float32 when bf16 products of this many rows are slow on this CPU."""
    rows = x.numel() // max(x.shape[-1], 1)
    if (x.dtype == torch.bfloat16 and x.device.type == "cpu"
            and rows >= (UPCAST_ROWS if weight.numel() <= LARGE_WEIGHT else UPCAST_ROWS_LARGE)
            and not has_bf16_arithmetic()):
        return F.linear(x.float(), weight.float()).to(torch.bfloat16)
    return F.linear(x, weight)


def einsum(equation: str, *operands: torch.Tensor) -> torch.Tensor:
    """torch.einsum, computed in float32 when its bf16 operands are large enough to hit the CPU fallback."""
    if (operands[0].dtype == torch.bfloat16 and operands[0].device.type == "cpu"
            and sum(o.numel() for o in operands) >= UPCAST_ELEMENTS and not has_bf16_arithmetic()):
        return torch.einsum(equation, *(o.float() for o in operands)).to(torch.bfloat16)
    return torch.einsum(equation, *operands)
