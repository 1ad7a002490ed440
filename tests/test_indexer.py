"""V3.2's lightning indexer against float64 references written from the formulas (dsv3/indexer.py's docstring).

I(s, t) = (n_heads * head_dim)^-1/2 * sum_h w_h(s) ReLU(q_h(s) . k(t)), q = wq_b(qr), k = LayerNorm(wk x), RoPE on
the first r dims (half-split pairs, or interleaved with index_rope_interleave), causal, top-min(index_topk, s+1).
The FP8 option against the demo's arithmetic: Sylvester-Hadamard matrix, e4m3 with amax/448 scales (ue8m0:
rounded up to a power of two), the dot products of the dequantised values.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.indexer import Indexer, Selection, hadamard
from dsv3.model import Transformer
from dsv3.rope import rope_cos_sin

ARGS = ModelArgs.tiny("tiny", index_n_heads=6, index_head_dim=32, index_topk=5, max_seq_len=64)


def _indexer(args: ModelArgs, seed: int = 0) -> Indexer:
    torch.manual_seed(seed)
    ix = Indexer(args)
    with torch.no_grad():
        for name, p in ix.named_parameters():
            p.copy_(torch.randn(p.shape) / p.shape[-1] ** 0.5 if p.dim() == 2 else 1 + 0.2 * torch.randn(p.shape)
                    if name.endswith("weight") else 0.2 * torch.randn(p.shape))
    return ix


def _rope64(x: torch.Tensor, pos: torch.Tensor, args: ModelArgs, interleave: bool) -> torch.Tensor:
    """Rotate the first r dims of x (b, s, [h,] i) pair by pair: pair j = (2j, 2j+1) or (j, j + r/2)."""
    r = args.qk_rope_head_dim
    cos, sin = (t.double() for t in rope_cos_sin(args, pos))  # (s, r/2)
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    out = x.clone()
    for j in range(r // 2):
        a, b = (2 * j, 2 * j + 1) if interleave else (j, j + r // 2)
        out[..., a] = x[..., a] * cos[..., j] - x[..., b] * sin[..., j]
        out[..., b] = x[..., b] * cos[..., j] + x[..., a] * sin[..., j]
    return out


def _reference(ix: Indexer, x: torch.Tensor, qr: torch.Tensor, args: ModelArgs, interleave: bool = False):
    """(scores (b, s, t) float64 with -inf for the future, set of chosen keys per (b, s))."""
    n, d = args.index_n_heads, args.index_head_dim
    xd, qd = x.double(), qr.double()
    b, s, _ = x.shape
    pos = torch.arange(s)
    q = (qd @ ix.wq_b.weight.double().T).view(b, s, n, d)
    k = xd @ ix.wk.weight.double().T
    k = (k - k.mean(-1, keepdim=True)) / torch.sqrt(k.var(-1, unbiased=False, keepdim=True) + 1e-6)
    k = k * ix.k_norm.weight.double() + ix.k_norm.bias.double()
    q, k = _rope64(q, pos, args, interleave), _rope64(k, pos, args, interleave)
    w = xd @ ix.weights_proj.weight.double().T  # (b, s, h)
    scores = torch.zeros(b, s, s, dtype=torch.float64)
    for h in range(n):
        scores += w[..., h, None] * torch.relu(q[:, :, h] @ k.transpose(1, 2))
    scores = scores / math.sqrt(n) / math.sqrt(d)
    scores = scores.masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    chosen = [[set(scores[i, j].topk(min(args.index_topk, j + 1)).indices.tolist()) for j in range(s)] for i in range(b)]
    return scores, chosen


def _inputs(args: ModelArgs, s: int = 12, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, s, args.dim, generator=g), torch.randn(2, s, args.q_lora_rank, generator=g)


@pytest.mark.parametrize("interleave", [False, True])
def test_scores_and_selection_match_float64(interleave):
    args = ARGS.replace(index_rope_interleave=interleave)
    ix = _indexer(args)
    x, qr = _inputs(args)
    ref, chosen = _reference(ix, x, qr, args, interleave)
    cos, sin = rope_cos_sin(args, torch.arange(x.shape[1]))
    with torch.no_grad():
        q, k, w = ix.project(x, qr, cos, sin)
        scores = ix.scores(q, w, k)
        sel = ix(x, qr, 0, cos, sin)
    causal = torch.isfinite(ref)
    err = (scores.double()[causal] - ref[causal]).norm() / ref[causal].norm()
    assert err < 2e-6, err
    got = [[set(sel.idx[i, j][sel.bias[i, j] == 0].tolist()) for j in range(x.shape[1])] for i in range(2)]
    assert got == chosen
    assert [[len(c) for c in row] for row in got] == [[min(args.index_topk, j + 1) for j in range(x.shape[1])]] * 2
    # the other layout scores differently: the option is not a no-op
    other, _ = _reference(ix, x, qr, args, not interleave)
    assert (other[causal] - ref[causal]).norm() / ref[causal].norm() > 1e-2


def test_hadamard_is_the_orthonormal_sylvester_matrix():
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < 32:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = h / math.sqrt(32)
    x = torch.randn(3, 5, 32, dtype=torch.float64)
    assert torch.allclose(hadamard(x), x @ h.T, atol=1e-12)
    assert torch.allclose(h @ h.T, torch.eye(32, dtype=torch.float64), atol=1e-12)


def _fp8_roundtrip64(x: torch.Tensor, ue8m0: bool) -> torch.Tensor:
    """The demo's act_quant of one 32-wide vector per row (one block), dequantised, from the definition."""
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-4) / 448.0
    if ue8m0:
        s = torch.exp2(torch.ceil(torch.log2(s)))
    return (x / s).clamp(-448, 448).to(torch.float8_e4m3fn).double() * s


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_scores_follow_the_demo(scale_fmt):
    """index_fp8: Hadamard-rotate q and k, FP8 round trip, score the dequantised values (the demo's fp8_index)."""
    args = ARGS.replace(index_fp8=True, scale_fmt=scale_fmt)
    ix = _indexer(args)
    x, qr = _inputs(args)
    cos, sin = rope_cos_sin(args, torch.arange(x.shape[1]))
    with torch.no_grad():
        q, k, w = ix.project(x, qr, cos, sin)
        q8, k8 = ix.keys(q, k, None)
        got = ix.scores(q8, w, k8).double()
        exact = ix.scores(q, w, k).double()
    qd, kd = hadamard(q.double()), hadamard(k.double())
    ref = torch.einsum("bsht,bsh->bst", torch.relu(torch.einsum("bshi,bti->bsht", _fp8_roundtrip64(qd, bool(scale_fmt)),
                                                             _fp8_roundtrip64(kd, bool(scale_fmt)))), w.double())
    assert (got - ref).norm() / ref.norm() < 1e-5
    rel = ((got - exact).norm() / exact.norm()).item()
    assert 1e-4 < rel < 0.1, rel  # FP8 moves the scores (a few %), the rotation alone would not


def test_fp8_key_cache_is_deepseeks_layout():
    """index_head_dim 128, block 128: per token and layer 128 B of e4m3 + one 4-byte scale, beside the latents."""
    args = ARGS.replace(index_fp8=True, index_head_dim=128)
    with torch.device("meta"):
        cache = Transformer(args).new_cache(1, 10, dtype=torch.bfloat16)
    t = cache.layers[0].tensors
    assert t["ik"].dtype == torch.float8_e4m3fn and t["ik"].shape == (1, 10, 128)
    assert t["ik_s"].dtype == torch.float32 and t["ik_s"].shape == (1, 10, 1)
    assert t["ik"].element_size() * 128 + t["ik_s"].element_size() == 132


def test_fp8_indexer_model_cached_decode_equals_recompute():
    """The FP8 key cache written by position gives the logits of a full recompute (same rounding either way)."""
    args = ARGS.replace(index_fp8=True, scale_fmt="ue8m0")
    torch.manual_seed(0)
    model = Transformer(args).float()
    tokens = torch.randint(0, args.vocab_size, (2, 14), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 14)
        steps = [model(tokens[:, :9], 0, cache)] + [model(tokens[:, p:p + 1], p, cache) for p in range(9, 14)]
    inc = torch.cat(steps, 1)
    assert ((inc - full).norm() / full.norm()) < 2e-6


def test_decode_attends_to_topk_rows_only():
    """At 40 cached tokens a decode step gathers index_topk latent rows; equal to float64 attention over them."""
    torch.manual_seed(0)
    model = Transformer(ARGS).float()
    tokens = torch.randint(0, ARGS.vocab_size, (1, 41), generator=torch.Generator().manual_seed(3))
    real, seen = Selection.attend_latent, []

    def spy(self, q_lat, q_pe, kv, k_pe, scale):
        out = real(self, q_lat, q_pe, kv, k_pe, scale)
        seen.append((self.idx, q_lat, q_pe, kv, k_pe, scale, out))
        return out

    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        cache = model.new_cache(1, 41)
        model(tokens[:, :40], 0, cache)
        mp.setattr(Selection, "attend_latent", spy)
        model(tokens[:, 40:], 40, cache)
    assert len(seen) == ARGS.n_layers
    idx, q_lat, q_pe, kv, k_pe, scale, out = seen[0]
    assert idx.shape == (1, 1, ARGS.index_topk) and kv.shape[1] == 41
    rows = idx[0, 0]
    kv, pe = kv[0, rows].double(), k_pe[0, rows].double()  # (t, c), (t, r)
    scores = (torch.einsum("hc,tc->ht", q_lat[0, 0].double(), kv)
              + torch.einsum("hr,tr->ht", q_pe[0, 0].double(), pe)) * scale
    ref = scores.softmax(-1) @ kv  # (h, c)
    assert ((out[0, 0].double() - ref).norm() / ref.norm()) < 2e-6


def test_config_checks():
    from dsv3.errors import ConfigError

    with pytest.raises(ConfigError, match="q_lora_rank"):
        ModelArgs.tiny("tiny", index_n_heads=4, q_lora_rank=0)
    with pytest.raises(ConfigError, match="power of two"):
        ModelArgs.tiny("tiny", index_n_heads=4, index_head_dim=48, index_fp8=True)
    with pytest.raises(ConfigError, match="index_impl"):
        ModelArgs.tiny("tiny", index_n_heads=4, index_impl="dense")
    with pytest.raises(ConfigError, match="index_topk"):
        ModelArgs.tiny("tiny", index_n_heads=4, index_topk=0)
    assert ModelArgs.tiny("tiny", index_topk=0).index_n_heads == 0  # no indexer: its fields are not read


@pytest.mark.parametrize("index_impl", ["gather", "mask"])
def test_static_decode_step_equals_readable_path(make_model, index_impl):
    """dsv3.decode_step's fixed-shape step (top-k over every cache slot, later slots never chosen) == model()."""
    from dsv3.decode_step import DecodeRunner

    model = make_model(ARGS.replace(index_impl=index_impl), seed=1)
    tokens = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        cache = model.new_cache(2, 16)
        ref = [model(tokens[:, :4], 0, cache)[:, -1]] + [model(tokens[:, p:p + 1], p, cache)[:, -1] for p in range(4, 16)]
        runner = DecodeRunner(model, 2, 24, "static")  # more slots than tokens: the extra ones stay unchosen
        out = [runner(tokens[:, :4], 0)[:, -1]] + [runner(tokens[:, p:p + 1], p)[:, -1] for p in range(4, 16)]
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)


def test_scores_in_query_chunks_equal_float64():
    """A long prefill scores its queries in chunks (here 4 of <= 8 queries): the same scores."""
    g = torch.Generator().manual_seed(4)
    q, keys, w = torch.randn(2, 30, 6, 8, generator=g), torch.randn(2, 50, 8, generator=g), torch.randn(2, 30, 6, generator=g)
    ref = torch.zeros(2, 30, 50, dtype=torch.float64)
    for h in range(6):
        ref += w[:, :, h, None].double() * torch.relu(q[:, :, h].double() @ keys.double().transpose(1, 2))
    got = Indexer.scores(q, w, keys, max_logits=2 * 6 * 50 * 8).double()
    assert ((got - ref).norm() / ref.norm()) < 2e-6


def test_mtp_speculative_decoding_on_v32_equals_greedy(make_model):
    """MTP drafts verified by the main model (the caches rolled back by position, indexer keys included)."""
    from dsv3.generation import generate
    from dsv3.speculative import generate_mtp

    model = make_model(ARGS, seed=2)
    prompts = [[5, 17, 300, 2, 9, 44, 71], [9, 8, 7]]
    stats = {}
    assert generate_mtp(model, prompts, 10, stats=stats) == generate(model, prompts, 10)
    assert stats["drafted"] > 0
