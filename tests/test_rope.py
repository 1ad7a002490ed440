"""RoPE / YaRN against the numbers and formulas of the reference (deepseek-v3.md)."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.rope import apply_rope, inv_freq, rope_cos_sin, yarn_correction_range


def test_yarn_correction_range_671B():
    assert yarn_correction_range(ModelArgs.preset("671B")) == (10, 23)


@pytest.mark.parametrize("preset,scale", [("671B", 0.1352337788608801), ("236B", 0.1352337788608801),
                                          ("16B", 0.1147213867929261)])
def test_softmax_scale(preset, scale):
    assert ModelArgs.preset(preset).softmax_scale == pytest.approx(scale, rel=1e-15)


def _inv_freq_formula(dim: int, base: float, orig: int, factor: float, beta_fast: float, beta_slow: float):
    """Float64 YaRN frequencies, written from the reference text."""
    def d(rot):
        return dim * math.log(orig / (2 * math.pi * rot)) / (2 * math.log(base))

    low, high = max(math.floor(d(beta_fast)), 0), min(math.ceil(d(beta_slow)), dim - 1)
    out = []
    for i in range(dim // 2):
        f = base ** (-2 * i / dim)
        ramp = min(max((i - low) / (high - low), 0.0), 1.0)
        out.append(f * (1 - ramp) + f / factor * ramp)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("preset", ["671B", "16B", "tiny"])
def test_inv_freq_matches_formula(preset):
    a = ModelArgs.preset(preset)
    ref = _inv_freq_formula(a.qk_rope_head_dim, a.rope_theta, a.original_seq_len, a.rope_factor, a.beta_fast,
                            a.beta_slow)
    torch.testing.assert_close(inv_freq(a).double(), ref, rtol=1e-6, atol=0)


def test_official_yarn_gate_both_sides():
    """Official code: YaRN only when max_seq_len > original_seq_len; dsv3's default: whenever configured."""
    base = ModelArgs.preset("671B")
    plain = 1.0 / (base.rope_theta ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    short = base.replace(official_yarn_gate=True, max_seq_len=base.original_seq_len)  # not longer: no YaRN
    assert not short.yarn
    assert short.softmax_scale == pytest.approx(192 ** -0.5, rel=1e-15)
    torch.testing.assert_close(inv_freq(short).double(), plain, rtol=1e-6, atol=0)
    long = base.replace(official_yarn_gate=True, max_seq_len=base.original_seq_len + 1)
    assert long.yarn and long.softmax_scale == pytest.approx(0.1352337788608801, rel=1e-15)
    default_short = base.replace(max_seq_len=base.original_seq_len)  # dsv3 default: YaRN regardless
    assert default_short.yarn and default_short.softmax_scale == pytest.approx(0.1352337788608801, rel=1e-15)
    torch.testing.assert_close(inv_freq(default_short), inv_freq(long))
    assert not torch.allclose(inv_freq(default_short).double(), plain)
    assert not base.replace(rope_factor=1.0).yarn


def test_apply_rope_is_interleaved_complex_rotation():
    a = ModelArgs.preset("tiny")
    r = a.qk_rope_head_dim
    x = torch.randn(2, 9, 3, r, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(5, 14)
    cos, sin = rope_cos_sin(a, pos)
    out = apply_rope(x, cos[:, None], sin[:, None])
    angles = pos.double()[:, None] * inv_freq(a).double()  # (s, r/2)
    ref = torch.view_as_real(torch.view_as_complex(x.double().reshape(2, 9, 3, r // 2, 2))
                             * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_rope_dot_products_depend_on_relative_position_only():
    a = ModelArgs.preset("tiny")
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(a.qk_rope_head_dim, generator=g), torch.randn(a.qk_rope_head_dim, generator=g)

    def dot(m, n):
        cq, sq = rope_cos_sin(a, torch.tensor([m]))
        ck, sk = rope_cos_sin(a, torch.tensor([n]))
        return (apply_rope(q[None], cq, sq) * apply_rope(k[None], ck, sk)).sum().item()

    assert dot(7, 3) == pytest.approx(dot(104, 100), rel=1e-4)
    assert dot(7, 3) != pytest.approx(dot(8, 3), rel=1e-4)
