"""MLA: absorbed vs naive, both against a float64 attention written from the formulas; the mask; the caches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import ATTN_PATHS, force_attn_path, randomize_  # tests/ is on sys.path under pytest

from dsv3.config import ModelArgs
from dsv3.info import kv_cache_bytes_per_token
from dsv3.mla import MLA, causal_mask
from dsv3.model import Transformer
from dsv3.rope import rope_cos_sin


def _mla(args: ModelArgs, seed: int) -> MLA:
    return randomize_(MLA(args), seed).eval()


def ref_attention(mla: MLA, x: torch.Tensor, start_pos: int, args: ModelArgs) -> torch.Tensor:
    """Float64 MLA from the reference formulas: materialised per-head K/V, complex-number rotary."""
    x = x.double()
    w = {n: p.double() for n, p in mla.named_parameters()}

    def rms(v, weight):
        return v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + args.norm_eps) * weight

    b, s, _ = x.shape
    h, d, r, dv = args.n_heads, args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
    q = F.linear(x, w["wq.weight"]) if args.q_lora_rank == 0 else \
        F.linear(rms(F.linear(x, w["wq_a.weight"]), w["q_norm.weight"]), w["wq_b.weight"])
    q = q.view(b, s, h, d + r)
    kv = F.linear(x, w["wkv_a.weight"])
    c, k_pe = kv[..., : args.kv_lora_rank], kv[..., args.kv_lora_rank:]
    kvb = F.linear(rms(c, w["kv_norm.weight"]), w["wkv_b.weight"]).view(b, s, h, d + dv)
    k_nope, v = kvb[..., :d], kvb[..., d:]
    # rotary as complex multiplication of interleaved pairs (x[2i] + i·x[2i+1]) by e^{i·pos·θ_i}
    cos, sin = rope_cos_sin(args, torch.arange(start_pos, start_pos + s))
    rot = torch.complex(cos.double(), sin.double())  # (s, r/2)

    def rope(t):  # (b, s, [h,] r)
        tc = torch.view_as_complex(t.reshape(*t.shape[:-1], r // 2, 2).contiguous())
        shape = (1, s, 1, r // 2) if t.dim() == 4 else (1, s, r // 2)
        return torch.view_as_real(tc * rot.view(shape)).flatten(-2)

    qf = torch.cat([q[..., :d], rope(q[..., d:])], -1)
    kf = torch.cat([k_nope, rope(k_pe)[:, :, None].expand(b, s, h, r)], -1)
    scores = torch.einsum("bshe,bthe->bhst", qf, kf) * args.softmax_scale
    allowed = torch.ones(s, s, dtype=torch.bool).tril()
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
    o = torch.einsum("bhst,bthd->bshd", probs, v).reshape(b, s, h * dv)
    return F.linear(o, w["wo.weight"])


ARGS = {
    "tiny": ModelArgs.preset("tiny"),
    "no-qlora-odd": ModelArgs.preset("tiny").replace(q_lora_rank=0, n_heads=5, qk_nope_head_dim=7, v_head_dim=11,
                                                     qk_rope_head_dim=6, kv_lora_rank=13),
    "plain-rope": ModelArgs.preset("tiny").replace(rope_factor=1.0),
}


@pytest.mark.parametrize("name", sorted(ARGS))
@pytest.mark.parametrize("attn_path", ATTN_PATHS)
def test_mla_matches_float64_reference(name, attn_path, monkeypatch):
    args = ARGS[name].replace(attn_impl=force_attn_path(monkeypatch, attn_path))
    mla = _mla(args, seed=1)
    s = 2 * args.original_seq_len  # positions beyond the YaRN reference length
    x = torch.randn(2, s, args.dim, generator=torch.Generator().manual_seed(2))
    cos, sin = rope_cos_sin(args, torch.arange(s))
    with torch.no_grad():
        out = mla(x, 0, cos, sin)
        ref = ref_attention(mla, x, 0, args)
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < 2e-6, err  # float32 against float64: measured 3.3-4.4e-7


@pytest.mark.parametrize("attn_path", ATTN_PATHS)
def test_decode_steps_match_float64_reference(attn_path, monkeypatch):
    """Prefill, then one query at a time through the cache (the decode step), against the float64 formulas."""
    args = ARGS["tiny"].replace(attn_impl=force_attn_path(monkeypatch, attn_path))
    mla = _mla(args, seed=7)
    s, prefill = 2 * args.original_seq_len, 5
    x = torch.randn(2, s, args.dim, generator=torch.Generator().manual_seed(8))
    cos, sin = rope_cos_sin(args, torch.arange(s))
    with torch.no_grad():
        cache = mla.new_cache(2, s, torch.float32, torch.device("cpu"))
        outs = [mla(x[:, :prefill], 0, cos[:prefill], sin[:prefill], cache)]
        outs += [mla(x[:, i:i + 1], i, cos[i:i + 1], sin[i:i + 1], cache) for i in range(prefill, s)]
        ref = ref_attention(mla, x, 0, args)
    err = ((torch.cat(outs, 1).double() - ref).norm() / ref.norm()).item()
    assert err < 2e-6, err


@pytest.mark.parametrize("attn_path", ["latent", "expanded"])
@pytest.mark.parametrize("q_lora_rank", [0, 40])
def test_absorbed_equals_naive(q_lora_rank, attn_path, monkeypatch):
    args = ModelArgs.preset("tiny", q_lora_rank=q_lora_rank)
    naive = _mla(args.replace(attn_impl="naive"), seed=3)
    absorb = _mla(args.replace(attn_impl=force_attn_path(monkeypatch, attn_path)), seed=3)
    x = torch.randn(3, 17, args.dim, generator=torch.Generator().manual_seed(4))
    cos, sin = rope_cos_sin(args, torch.arange(17))
    with torch.no_grad():
        torch.testing.assert_close(absorb(x, 0, cos, sin), naive(x, 0, cos, sin), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_cached_chunks_equal_full(attn_impl):
    """Feeding the sequence in chunks through a cache (multi-token steps at start_pos > 0) = one full pass."""
    args = ModelArgs.preset("tiny", attn_impl=attn_impl)
    mla = _mla(args, seed=5)
    s = 20
    x = torch.randn(2, s, args.dim, generator=torch.Generator().manual_seed(6))
    cos, sin = rope_cos_sin(args, torch.arange(s))
    with torch.no_grad():
        full = mla(x, 0, cos, sin)
        cache = mla.new_cache(2, s, torch.float32, torch.device("cpu"))
        outs, pos = [], 0
        for n in (7, 1, 4, 1, 1, 6):
            outs.append(mla(x[:, pos:pos + n], pos, cos[pos:pos + n], sin[pos:pos + n], cache))
            pos += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_cache_shapes_and_bytes():
    args = ModelArgs.preset("tiny")
    h = args.n_heads
    a = MLA(args).new_cache(2, 10, torch.bfloat16, torch.device("cpu"))
    n = MLA(args.replace(attn_impl="naive")).new_cache(2, 10, torch.bfloat16, torch.device("cpu"))
    assert {k: tuple(t.shape) for k, t in a.tensors.items()} == {"kv": (2, 10, args.kv_lora_rank),
                                                               "pe": (2, 10, args.qk_rope_head_dim)}
    assert {k: tuple(t.shape) for k, t in n.tensors.items()} == {
        "k": (2, 10, h, args.qk_nope_head_dim + args.qk_rope_head_dim), "v": (2, 10, h, args.v_head_dim)}
    # per token per layer, what `dsv3 info` reports (bf16)
    assert a.nbytes() // 20 == kv_cache_bytes_per_token(args) // args.n_layers
    assert n.nbytes() // 20 == kv_cache_bytes_per_token(args, naive=True) // args.n_layers


def test_cache_overflow_is_refused():
    args = ModelArgs.preset("tiny")
    mla = _mla(args, seed=0)
    cache = mla.new_cache(1, 4, torch.float32, torch.device("cpu"))
    cos, sin = rope_cos_sin(args, torch.arange(6))
    with pytest.raises(IndexError, match="cache holds 4 positions"), torch.no_grad():
        mla(torch.randn(1, 6, args.dim), 0, cos, sin, cache)


@pytest.mark.parametrize("start_pos,s", [(0, 1), (0, 5), (3, 1), (3, 4), (10, 7)])
def test_causal_mask(start_pos, s):
    m = causal_mask(start_pos, s, torch.device("cpu"))
    assert m.shape == (s, start_pos + s)
    for i in range(s):
        for j in range(start_pos + s):
            visible = j <= start_pos + i
            assert (m[i, j].item() == 0.0) if visible else (m[i, j].item() == float("-inf")), (i, j)


def test_absorbed_wkv_b_trains_after_a_no_grad_forward():
    """A latent-space copy of wkv_b kept from an inference forward must not cut its gradient."""
    args = ModelArgs.preset("tiny")
    torch.manual_seed(0)
    model = Transformer(args)
    tokens = torch.randint(0, args.vocab_size, (1, 5))
    with torch.no_grad():
        model(tokens)  # caches the absorbed view
    model(tokens).sum().backward()
    for layer in model.layers:
        assert layer.attn.wkv_b.weight.grad is not None and layer.attn.wkv_b.weight.grad.abs().sum() > 0
