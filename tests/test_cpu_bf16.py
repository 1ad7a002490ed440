"""cpu_bf16.linear: the float32 upcast of a many-row bf16 product equals the exact product rounded to bf16."""

import pytest
import torch
import torch.nn.functional as F

from dsv3 import cpu_bf16


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 300])
def test_linear_matches_float64_rounded_to_bf16(monkeypatch, native, rows):
    monkeypatch.setattr(cpu_bf16, "has_bf16_arithmetic", lambda: native)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(2, rows, 256, generator=g).bfloat16()
    w = torch.randn(384, 256, generator=g).bfloat16()
    exact = F.linear(x.double(), w.double())
    got = cpu_bf16.linear(x, w)
    assert got.dtype == torch.bfloat16 and got.shape == (2, rows, 384)
    # one bf16 rounding of the exact result (2^-8 relative), plus float32 summation order
    torch.testing.assert_close(got.double(), exact, rtol=2 ** -8, atol=1e-4)
    if not native and 2 * rows >= cpu_bf16.UPCAST_ROWS:  # the upcast branch (a small weight): as done by hand
        assert torch.equal(got, F.linear(x.float(), w.float()).bfloat16())


def test_has_bf16_arithmetic_reads_the_cpu_flags():
    flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    assert cpu_bf16.has_bf16_arithmetic() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_large_weights_are_upcast_from_more_rows(monkeypatch):
    """A head-sized weight (over LARGE_WEIGHT elements) stays in bf16 below UPCAST_ROWS_LARGE rows."""
    monkeypatch.setattr(cpu_bf16, "has_bf16_arithmetic", lambda: False)
    calls = []
    monkeypatch.setattr(cpu_bf16.F, "linear", lambda x, w: calls.append(x.dtype) or x @ w.t())
    w = torch.zeros(cpu_bf16.LARGE_WEIGHT // 64 + 1, 64, dtype=torch.bfloat16)
    for rows in (cpu_bf16.UPCAST_ROWS, cpu_bf16.UPCAST_ROWS_LARGE):
        cpu_bf16.linear(torch.zeros(rows, 64, dtype=torch.bfloat16), w)
    assert calls == [torch.bfloat16, torch.float32]


@pytest.mark.parametrize("native", [True, False])
def test_einsum_matches_float64_rounded_to_bf16(monkeypatch, native):
    """The latent attention's contraction (8 sequences x 8 heads against 517 cached latents) in bf16."""
    monkeypatch.setattr(cpu_bf16, "has_bf16_arithmetic", lambda: native)
    g = torch.Generator().manual_seed(0)
    probs, kv = torch.rand(8, 1, 8, 517, generator=g).bfloat16(), torch.randn(8, 517, 128, generator=g).bfloat16()
    got = cpu_bf16.einsum("bsht,btc->bshc", probs, kv)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), torch.einsum("bsht,btc->bshc", probs.double(), kv.double()),
                               rtol=2 ** -8, atol=1e-2)
    if not native:
        assert torch.equal(got, torch.einsum("bsht,btc->bshc", probs.float(), kv.float()).bfloat16())


def test_upcasting_products_compile_as_one_graph():
    """Under torch.compile (the static decode step's, fullgraph) the CPU check is a constant, not a traced file
    read: `dsv3 generate --compile --dtype bfloat16` failed on this before."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 256, generator=g).bfloat16()
    w = torch.randn(384, 256, generator=g).bfloat16()
    q = torch.randn(2, 1, 4, 64, generator=g).bfloat16()
    kv = torch.randn(4, 64, 96, generator=g).bfloat16()
    lin = torch.compile(cpu_bf16.linear, fullgraph=True)
    ein = torch.compile(lambda a, b: cpu_bf16.einsum("bshd,hdc->bshc", a, b), fullgraph=True)
    torch.testing.assert_close(lin(x, w), cpu_bf16.linear(x, w), rtol=2 ** -8, atol=1e-3)
    torch.testing.assert_close(ein(q, kv), cpu_bf16.einsum("bshd,hdc->bshc", q, kv), rtol=2 ** -8, atol=1e-3)
    torch._dynamo.reset()
