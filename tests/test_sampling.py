"""Sampling against an independent oracle: a float64 distribution written from the definitions
(temperature, then top-k, then top-p, renormalised), token by token in plain Python, and chi-square
tests of the draws of `dsv3.sampling.sample` against it."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.sampling import sample, sampling_probs


def reference_probs(logits: list[float], temperature: float, top_p: float, top_k: int) -> list[float]:
    """The definitions, one row, float64, no torch:

    p_i ∝ exp(l_i / T); top-k keeps the k largest logits (all ties of the k-th); top-p keeps the
    smallest set of most probable tokens whose mass (after top-k, renormalised) reaches top_p;
    the kept probabilities are renormalised. T = 0 is the argmax (first of ties).
    """
    v = len(logits)
    if temperature == 0:
        best = max(range(v), key=lambda i: (logits[i], -i))
        return [1.0 if i == best else 0.0 for i in range(v)]
    kept = set(range(v))
    if 0 < top_k < v:
        kth = sorted(logits, reverse=True)[top_k - 1]
        kept = {i for i in kept if logits[i] >= kth}
    top = max(logits[i] for i in kept)
    w = {i: math.exp((logits[i] - top) / temperature) for i in kept}
    z = sum(w.values())
    p = {i: w[i] / z for i in kept}
    if top_p < 1:
        chosen, mass = set(), 0.0
        for i in sorted(p, key=lambda i: -p[i]):
            if mass >= top_p:
                break
            chosen.add(i)
            mass += p[i]
        p = {i: p[i] / mass for i in chosen}
    return [p.get(i, 0.0) for i in range(v)]


def reference_probs_rows(logits: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    return torch.tensor([reference_probs(row, temperature, top_p, top_k) for row in logits.double().tolist()],
                        dtype=torch.float64)


def chi2_critical(df: int, z: float = 3.09) -> float:
    """The chi-square quantile for df degrees of freedom at p = 0.001 (z = 3.09): Wilson-Hilferty."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def chi2(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """(statistic, degrees of freedom); a draw of a zero-probability token fails at once."""
    expected = probs.double() * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token of probability 0"
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), int(keep.sum()) - 1


CASES = [  # (temperature, top_p, top_k)
    (1.0, 1.0, 0), (0.7, 1.0, 0), (1.6, 1.0, 0), (1.0, 1.0, 5), (1.0, 1.0, 1), (0.8, 0.9, 0), (1.2, 0.5, 0),
    (1.0, 0.3, 7), (0.9, 0.95, 12), (1.0, 1e-6, 0), (1.0, 0.9, 100), (0.0, 1.0, 0), (0.0, 0.5, 3),
]


@pytest.mark.parametrize("temperature,top_p,top_k", CASES)
def test_sampling_probs_equal_the_definitions(temperature, top_p, top_k):
    g = torch.Generator().manual_seed(0)
    logits = 2.5 * torch.randn(6, 40, generator=g)
    got = sampling_probs(logits, temperature, top_p, top_k)
    ref = reference_probs_rows(logits, temperature, top_p, top_k)
    assert got.dtype == torch.float32 and got.shape == logits.shape
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    assert torch.equal(got > 0, ref > 0)  # the same support, exactly


def test_top_k_keeps_ties_and_top_p_its_boundary_token():
    """Hand-checked rows: ties of the k-th logit stay in; top-p keeps the token that crosses the threshold."""
    logits = torch.tensor([[3.0, 1.0, 1.0, 0.0, -1.0]])
    assert (sampling_probs(logits, 1.0, 1.0, 2)[0] > 0).tolist() == [True, True, True, False, False]
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()  # cumulative 0.5, 0.8, 0.95, 1.0
    kept = sampling_probs(p, 1.0, 0.6, 0)[0]
    torch.testing.assert_close(kept, torch.tensor([0.5, 0.3, 0.0, 0.0]) / 0.8)
    torch.testing.assert_close(sampling_probs(p, 1.0, 0.9, 0)[0], torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95)


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.6, 1.0, 0), (1.0, 1.0, 4), (1.3, 0.7, 0),
                                                     (1.0, 0.8, 5)])
def test_sample_draws_the_reference_distribution(temperature, top_p, top_k):
    """N draws of `sample` for one row of logits: counts match the float64 reference (chi-square, p = 0.001)."""
    v, n = 12, 20_000
    logits = 1.5 * torch.randn(1, v, generator=torch.Generator().manual_seed(1))
    ref = reference_probs_rows(logits, temperature, top_p, top_k)[0]
    draws = sample(logits.expand(n, v), temperature, top_p, top_k, generator=torch.Generator().manual_seed(2))
    counts = torch.bincount(draws, minlength=v).double()
    stat, df = chi2(counts, ref)
    assert df >= 2, "too few tokens kept to test a distribution"
    assert stat < chi2_critical(df), (stat, df, counts.tolist(), ref.tolist())


def test_sample_greedy_is_argmax():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(3))
    assert torch.equal(sample(logits, 0.0), logits.argmax(-1))
    assert torch.equal(sample(logits, 1.0, top_k=1, generator=torch.Generator().manual_seed(0)), logits.argmax(-1))


def test_chi2_critical_values():
    """The approximation against tabulated 0.999 quantiles."""
    for df, table in [(8, 26.12), (24, 51.18), (11, 31.26), (4, 18.47)]:
        assert abs(chi2_critical(df) - table) / table < 0.02, df
