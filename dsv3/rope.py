"""Rotary position embedding with YaRN, in DeepSeek's interleaved-pair layout (and V3.2's indexer's half-split one).

Only the `qk_rope_head_dim` (r) slice of q and k is rotated. Pairs are adjacent
channels (x[2i], x[2i+1]) rotated by angle pos * inv_freq[i] -- the layout of the
released weights, so no permutation is needed when loading them.

YaRN stretches the low frequencies by `rope_factor` and keeps the high ones,
blending in between with a linear ramp over the pair index. dsv3 applies it
whenever the config carries it (as transformers and vLLM do: the released
weights were trained with it); the official demo applies it only when
`max_seq_len > original_seq_len` -- set `official_yarn_gate=True` to reproduce that.
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelArgs


def yarn_correction_range(args: ModelArgs) -> tuple[int, int]:
    """Pair indices [low, high] between which the YaRN ramp goes from 0 to 1 (V3: 10, 23)."""
    dim, base = args.qk_rope_head_dim, args.rope_theta

    def correction_dim(rotations: float) -> float:
        return dim * math.log(args.original_seq_len / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(args.beta_fast))
    high = math.ceil(correction_dim(args.beta_slow))
    return max(low, 0), min(high, dim - 1)


def inv_freq(args: ModelArgs) -> torch.Tensor:
    """Per-pair inverse frequency, shape (r/2,), float32."""
    dim = args.qk_rope_head_dim
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    if args.yarn:
        low, high = yarn_correction_range(args)
        span = max(high - low, 1e-3)
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / span).clamp(0, 1)
        freqs = freqs * (1 - ramp) + (freqs / args.rope_factor) * ramp
    return freqs


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (*positions.shape, r/2) in float32."""
    angles = positions.to(torch.float32)[..., None] * inv_freq(args).to(positions.device)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs of x (..., s, [h,] r) by per-position angles cos/sin (s, r/2).

    `cos`/`sin` broadcast from the left over any head axis: pass them already
    unsqueezed to x's rank minus one.
    """
    # a pair (x1, x2) is the complex number x1 + i·x2, rotated by multiplying with e^{iθ} = cos θ + i·sin θ:
    # (x1 cos - x2 sin) + i·(x2 cos + x1 sin), in three kernels instead of the eight the real formula takes.
    # view_as_complex needs even strides: a slice of an odd-width head (test configs) is copied first
    xf = x.float()
    if any(st % 2 for st in xf.stride()[:-1]):
        xf = xf.contiguous()
    z = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (..., r/2) complex
    return torch.view_as_real(z * torch.complex(cos, sin)).flatten(-2).to(x.dtype)


def apply_rope_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The same rotation with the other pair layout ("rotate half"): x[i] pairs with x[i + r/2].

    What V3.2's lightning indexer was trained with (transformers' DeepseekV32Indexer); MLA keeps `apply_rope`.
    """
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)  # (..., r/2) each
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Rotary(torch.nn.Module):
    """Holds the cos/sin table for positions [0, max_seq_len) -- built on first use, never on meta."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, start_pos: int, seqlen: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        end = start_pos + seqlen
        if self._table is None or self._table[0].shape[0] < end or self._table[0].device != device:
            n = max(end, min(self.args.max_seq_len, 4096))
            self._table = rope_cos_sin(self.args, torch.arange(n, device=device))
        cos, sin = self._table
        return cos[start_pos:end], sin[start_pos:end]
