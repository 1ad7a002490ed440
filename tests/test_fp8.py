"""The torch references of dsv3.fp8 against independent oracles: an e4m3 grid search in
float64, block loops, and float64 matmuls; plus the model's two GEMM paths."""

from __future__ import annotations

import math

import pytest
import torch

from dsv3 import ModelArgs, Transformer, fp8
from dsv3.errors import UsageError
from dsv3.layers import Linear

E4M3_GRID = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double()  # by byte


def e4m3_oracle(v: torch.Tensor) -> torch.Tensor:
    """Bytes of round-to-nearest-even onto the e4m3 grid, saturating at ±448, by brute-force search (float64)."""
    finite = ~torch.isnan(E4M3_GRID)
    codes = torch.arange(256)[finite]
    grid = E4M3_GRID[finite]
    vv = v.double().clamp(-448, 448).reshape(-1, 1)
    dist = (vv - grid).abs()
    best = dist.min(1, keepdim=True).values
    cand = dist == best  # one or two (a tie) codes
    even = (codes % 2 == 0) | (grid == 0)  # ties go to the even mantissa
    pick = torch.where(cand & even, 1, 0) * 2 + cand.int()
    code = codes[pick.argmax(1)]
    sign = torch.signbit(v.reshape(-1))
    code = torch.where((grid[pick.argmax(1)] == 0) & sign, 0x80, code)  # -0.0 and tiny negatives
    code = torch.where(torch.isnan(v.reshape(-1)), 0x7F, code)
    return code.to(torch.uint8).reshape(v.shape)


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal fp8 bytes, with NaN compared by position (its sign bit is not part of the contract)."""
    na, nb = torch.isnan(a.float()), torch.isnan(b.float())
    return torch.equal(na, nb) and torch.equal(a.view(torch.uint8)[~na], b.view(torch.uint8)[~nb])


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


def with_unit_scale(vals: torch.Tensor) -> torch.Tensor:
    """Rows [448, v...] so that the tile's scale is exactly 1 and y = v: the cast itself is on show."""
    return torch.cat([torch.full((vals.shape[0], 1), 448.0), vals], dim=1)


def tie_and_carry_values() -> torch.Tensor:
    """Every midpoint between neighbouring e4m3 values (ties), ±, plus values just around them."""
    g = E4M3_GRID[:0x7F].float()  # 0 .. 448, ascending
    mids = (g[1:] + g[:-1]) / 2
    near = torch.cat([mids, torch.nextafter(mids, torch.zeros_like(mids)), torch.nextafter(mids, mids * 2)])
    return torch.cat([near, -near, torch.tensor([0.0, -0.0, 448.0, -448.0, 2**-10, -(2**-10), 2**-12])])


def test_torch_cast_is_the_grid_oracle():
    """The contract 'bytes = torch's cast' is only meaningful if torch's cast is RNE + saturating."""
    v = torch.cat([tie_and_carry_values(), torch.randn(4000) * 100, torch.tensor([500.0, -1e6, 465.0])])
    got = v.clamp(-448, 448).to(torch.float8_e4m3fn)
    assert torch.equal(got.view(torch.uint8), e4m3_oracle(v))


@pytest.mark.parametrize("shape", [(1, 128), (5, 200), (2, 3, 300), (4, 1), (3, 256)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_block_loop(shape, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-3, 3, shape[-1])).to(dtype)
    y, s = fp8.act_quant(x)
    k = shape[-1]
    assert y.shape == x.shape and y.is_contiguous() and s.shape == (*shape[:-1], math.ceil(k / 128))
    xf, yf, sf = x.float().reshape(-1, k), y.reshape(-1, k), s.reshape(-1, s.shape[-1])
    for r in range(xf.shape[0]):
        for j in range(0, k, 128):
            tile = xf[r, j:j + 128]
            sj = max(tile.abs().max().item(), 1e-4) / 448
            assert sf[r, j // 128].item() == pytest.approx(sj, rel=1e-7)
            assert torch.equal(yf[r, j:j + 128].view(torch.uint8), e4m3_oracle(tile / sf[r, j // 128]))


def test_act_quant_roundtrip_error_bound():
    """|y·s − x| ≤ half an e4m3 step (2^-4 relative) for normal values; the max element is exactly ±448·s."""
    torch.manual_seed(1)
    x = torch.randn(64, 384) * 3
    y, s = fp8.act_quant(x)
    back = y.float().unflatten(-1, (3, 128)) * s[..., None]
    err = (back.flatten(-2) - x).abs()
    assert (err <= x.abs() * 2**-4 + s.repeat_interleave(128, -1) * 2**-10).all()
    assert torch.equal(y.float().unflatten(-1, (3, 128)).abs().amax(-1), torch.full((64, 3), 448.0))


def test_act_quant_edge_values():
    x = torch.zeros(3, 256)
    x[0, :128] = 0.0  # all-zero tile: the 1e-4 floor, not a division by zero
    x[0, 5] = -0.0
    x[1, :] = torch.linspace(-5000, 5000, 256)  # far beyond ±448 before scaling
    x[2, 128:] = 1e-30  # tiny but non-zero
    y, s = fp8.act_quant(x)
    assert s[0, 0].item() == pytest.approx(1e-4 / 448) and (y[0, :128].float() == 0).all()
    assert y[0, 5].view(torch.uint8).item() == 0x80  # -0.0 stays -0.0
    assert y[1].float().abs().max().item() == 448.0 and not torch.isnan(y[1].float()).any()
    assert (y[2, 128:].float() == 0).all()  # 1e-30 / (1e-4/448) underflows to 0


def test_nan_inf_policy():
    """Documented in dsv3/fp8.py: NaN poisons its tile, Inf gives an Inf scale (Inf → NaN, finite → ±0),
    and the GEMM row of a non-finite activation is all NaN; other rows are untouched."""
    x = torch.randn(3, 256)
    x[0, 3] = float("nan")
    x[1, 200] = float("inf")
    y, s = fp8.act_quant(x)
    assert torch.isnan(s[0, 0]) and torch.isnan(y[0, :128].float()).all() and not torch.isnan(y[0, 128:].float()).any()
    assert torch.isinf(s[1, 1]) and torch.isnan(y[1, 200].float())
    assert (y[1, 128:].float().abs().nan_to_num(1) <= 1).all() and (y[1, 128:200].float() == 0).all()
    w = torch.randn(64, 256)
    q, ws = fp8.weight_quant(w)
    out = fp8.fp8_gemm(y, s, q, ws, out_dtype=torch.float32)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2]).all()


def test_ue8m0_scales_are_exact_powers_of_two():
    torch.manual_seed(2)
    x = torch.randn(16, 512) * torch.logspace(-4, 4, 16)[:, None]
    _, s_plain = fp8.act_quant(x)
    y, s = fp8.act_quant(x, scale_fmt="ue8m0")
    m, e = torch.frexp(s)
    assert (m == 0.5).all()  # a power of two
    assert (s >= s_plain).all() and (s < 2 * s_plain).all()
    # s just above a power of two: ceil(log2(s)) in float32 rounds down there; the bit version does not
    just_above = torch.tensor([2.0**k * (1 + 2**-23) for k in (-20, -3, 2, 5)])
    assert torch.equal(fp8.round_scale_ue8m0(just_above), torch.tensor([2.0**k * 2 for k in (-20, -3, 2, 5)]))
    assert torch.equal(fp8.round_scale_ue8m0(torch.tensor([0.25, 1.0])), torch.tensor([0.25, 1.0]))
    assert torch.isnan(fp8.round_scale_ue8m0(torch.tensor([float("nan")]))).all()
    assert torch.equal(y.view(torch.uint8), e4m3_oracle(x.unflatten(-1, (4, 128)).div(s[..., None]).flatten(-2)))


@pytest.mark.parametrize("shape", [(128, 128), (130, 200), (1, 7), (300, 129)])
def test_weight_quant_blocks_and_dequant(shape):
    torch.manual_seed(3)
    w = torch.randn(shape) * 0.05
    w[0, 0] = 3.0  # an outlier only coarsens its own block
    q, s = fp8.weight_quant(w)
    nbn, nbk = math.ceil(shape[0] / 128), math.ceil(shape[1] / 128)
    assert q.shape == w.shape and s.shape == (nbn, nbk) and q.is_contiguous()
    for i in range(nbn):
        for j in range(nbk):
            blk = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert s[i, j].item() == pytest.approx(max(blk.abs().max().item(), 1e-4) / 448, rel=1e-7)
            assert torch.equal(q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].view(torch.uint8), e4m3_oracle(blk / s[i, j]))
    deq = fp8.weight_dequant(q, s, dtype=torch.float32)
    expect = q.double() * s.double().repeat_interleave(128, 0)[: shape[0]].repeat_interleave(128, 1)[:, : shape[1]]
    assert torch.equal(deq, expect.float())  # one correctly rounded float32 product per element
    assert rel(deq, w) < 0.05
    assert torch.equal(fp8.weight_dequant(q, s), deq.to(torch.bfloat16))


@pytest.mark.parametrize("lead,bs", [((), 128), ((3, 2), 64)])
def test_batched_dequant_equals_per_matrix_and_survives_inductor(lead, bs):
    """weight_dequant over a batch of weights (the static step's gathered experts) = one matrix at a time, and
    act_dequant = act_quant's values, partial blocks included -- eagerly and compiled by Inductor (on CPU it
    miscompiled the repeat_interleave form of this expansion: NaN from the compiled static step)."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(*lead, 72, 200, generator=g).reshape(-1, 72, 200)
    pairs = [fp8.weight_quant(m, bs) for m in w]
    q = torch.stack([p[0] for p in pairs]).reshape(*lead, 72, 200)
    s = torch.stack([p[1] for p in pairs]).reshape(*lead, *pairs[0][1].shape)
    exact = torch.stack([a.double() * b.double().repeat_interleave(bs, 0)[:72].repeat_interleave(bs, 1)[:, :200]
                         for a, b in pairs]).reshape(*lead, 72, 200).float()
    x = torch.randn(5, 200, generator=g)
    xq, xs = fp8.act_quant(x, bs)
    exact_x = (xq.double() * xs.double().repeat_interleave(bs, -1)[:, :200]).float()
    compiled_w = torch.compile(fp8.weight_dequant, fullgraph=True)
    compiled_a = torch.compile(fp8.act_dequant, fullgraph=True)
    for wd, ad in ((fp8.weight_dequant, fp8.act_dequant), (compiled_w, compiled_a)):
        assert torch.equal(wd(q, s, bs, torch.float32), exact)
        assert torch.equal(ad(xq, xs, bs), exact_x)
    torch._dynamo.reset()


@pytest.mark.parametrize("lead,k,n", [((1,), 256, 128), ((7,), 200, 130), ((2, 3), 300, 257), ((5,), 64, 1)])
def test_fp8_gemm_against_float64(lead, k, n):
    torch.manual_seed(4)
    x = torch.randn(*lead, k)
    w = torch.randn(n, k) * 0.1
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    out = fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    assert out.shape == (*lead, n)
    # float64 of the same quantised operands: only the float32 accumulation differs
    a = torch.nn.functional.pad(xq.double(), (0, (-k) % 128)).unflatten(-1, (-1, 128)) * xs.double()[..., None]
    a = a.flatten(-2)[..., :k]
    b = fp8.weight_dequant(wq, ws, dtype=torch.float64)
    exact = a @ b.T
    assert rel(out, exact) < 1e-6
    assert rel(fp8.fp8_gemm(xq, xs, wq, ws), exact) < 2**-8  # bf16 output rounding
    assert rel(out, x.double() @ w.double().T) < 0.08  # e4m3 quantisation of both operands (~3.5% typical)


def test_bad_arguments_raise_usage_errors():
    with pytest.raises(UsageError, match="scale_fmt"):
        fp8.act_quant(torch.randn(2, 128), scale_fmt="e8m0")
    with pytest.raises(ValueError, match="gemm_impl"):
        fp8.fp8_linear(torch.randn(2, 128), *fp8.weight_quant(torch.randn(4, 128)), gemm_impl="int8")


def test_linear_gemm_impl_chooses_the_path():
    torch.manual_seed(5)
    lin_bf16 = Linear(200, 130, fp8_weight=True, gemm_impl="bf16")
    q, s = fp8.weight_quant(torch.randn(130, 200) * 0.05)
    lin_bf16.weight.data.copy_(q)
    lin_bf16.scale.data.copy_(s)
    lin_fp8 = Linear(200, 130, fp8_weight=True, gemm_impl="fp8")
    lin_fp8.load_state_dict(lin_bf16.state_dict())
    x = torch.randn(2, 3, 200)
    y16, y8 = lin_bf16(x), lin_fp8(x)
    assert torch.equal(y16, x @ fp8.weight_dequant(q, s, dtype=torch.float32).T)
    xq, xs = fp8.act_quant(x)
    assert torch.equal(y8, fp8.fp8_gemm(xq, xs, q, s, out_dtype=torch.float32))
    assert 1e-4 < rel(y8, y16) < 0.06  # different arithmetic, close results


def test_tiny_fp8_model_logits_fp8_vs_bf16_gemm():
    torch.manual_seed(6)
    args = ModelArgs.preset("tiny", dtype="fp8")
    m16 = Transformer(args)
    m8 = Transformer(args.replace(gemm_impl="fp8"))
    m8.load_state_dict(m16.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        l16, l8 = m16(tokens), m8(tokens)
    assert torch.isfinite(l8).all()
    assert rel(l8, l16) < 0.1  # measured 0.04-0.06 over seeds: FP8 activations in every GEMM, 3 layers
    assert (l8.argmax(-1) == l16.argmax(-1)).float().mean() > 0.8


def test_absorbed_mla_dequantises_wkv_b_once(monkeypatch):
    torch.manual_seed(7)
    args = ModelArgs.preset("tiny", dtype="fp8", attn_impl="absorb")
    model = Transformer(args)
    calls = []
    real = fp8.weight_dequant

    def counting(q, *a, **kw):
        calls.append(tuple(q.shape))
        return real(q, *a, **kw)

    monkeypatch.setattr(fp8, "weight_dequant", counting)
    wkv_b_shape = tuple(model.layers[0].attn.wkv_b.weight.shape)
    tokens = torch.randint(0, args.vocab_size, (1, 5))
    with torch.no_grad():
        first = model(tokens)
        n_first = calls.count(wkv_b_shape)
        for _ in range(3):
            again = model(tokens)
    assert n_first >= 1  # the first forward dequantised it
    assert calls.count(wkv_b_shape) == n_first  # later forwards reuse the cached dequantised weight
    assert torch.equal(first, again)
    # and a new weight invalidates the cache
    attn = model.layers[0].attn
    with torch.no_grad():
        attn.wkv_b.weight.copy_(fp8.weight_quant(torch.randn(wkv_b_shape) * 0.02)[0])
        model(tokens)
    assert calls.count(wkv_b_shape) > n_first
