"""V3.2's lightning indexer and DeepSeek Sparse Attention's token selection (DSA).

Each attention layer of DeepSeek-V3.2 (the MTP layer's too) carries a small scorer that picks, for every
query, the `index_topk` earlier tokens its MLA may attend to; MLA then reads only those latent rows, so a
decode step's attention costs O(index_topk) instead of O(context). The indexer itself still looks at every
key, but with a single 128-wide key per token and cheap heads.

    q_h(s) = wq_b(q latent)  (index_n_heads heads of index_head_dim)   k(t) = k_norm(wk x)   (one key per token)
    RoPE on the FIRST qk_rope_head_dim dims of q and k (MLA rotates its LAST ones)
    I(s, t) = n_heads^-1/2 * head_dim^-1/2 * sum_h w_h(s) * ReLU(q_h(s) . k(t)),   w = weights_proj(x)
    keep the top min(index_topk, s + 1) keys t <= s per query s

The scale is the official code's (`weights_proj(x) * n_heads**-0.5 * softmax_scale`, softmax_scale =
head_dim**-0.5); transformers' DeepseekV32Indexer applies the same two factors (ReLU commutes with a
positive scale). RoPE layout: transformers rotates half-split pairs (x[i], x[i + r/2]) -- the layout the
released weights were trained with (the Hugging Face copy of the inference code was fixed to it in 2025-11);
the GitHub demo still rotates interleaved pairs. `index_rope_interleave=True` gives the demo's.

`index_fp8=True` is the official demo's arithmetic: q and k rotated by an orthonormal Walsh-Hadamard matrix
(which leaves every q.k unchanged; it spreads outliers before quantisation), then quantised to FP8 e4m3 in
blocks of `block_size` (scale_fmt as the checkpoint's), the keys cached as FP8 + one float32 scale per block
(DeepSeek's 128 B + 4 B per token and layer). Off (default), q and k stay in the model's dtype, as in
transformers -- what the parity tests compare against.

Axes: the legend (b, s, t, m, c, r) with h the indexer's heads and i index_head_dim (this file only). In a
gathered tensor (`Selection.gather`) t counts each query's selected keys, not all positions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsv3.config import ModelArgs
from dsv3.fp8 import act_quant
from dsv3.layers import LayerNorm, Linear
from dsv3.rope import apply_rope, apply_rope_half

INDEX_K_NORM_EPS = 1e-6  # k_norm's epsilon: fixed in both references (official LayerNorm, transformers)


def hadamard(x: torch.Tensor) -> torch.Tensor:
    """x times the orthonormal Walsh-Hadamard matrix (Sylvester order) over the last axis, a power of two long:
    what the demo's `fast_hadamard_transform.hadamard_transform(x, scale=n**-0.5)` computes."""
    n = x.shape[-1]
    y = x.to(torch.promote_types(x.dtype, torch.float32))
    half = 1
    while half < n:  # butterflies: pairs of indices that differ in the bit `half`
        y = y.unflatten(-1, (n // (2 * half), 2, half))
        a, b = y[..., 0, :], y[..., 1, :]
        y = torch.stack((a + b, a - b), dim=-2).flatten(-3)
        half *= 2
    return (y * n**-0.5).to(x.dtype)


def fp8_dequant(y: torch.Tensor, s: torch.Tensor, block_size: int) -> torch.Tensor:
    """The float32 values of act_quant's (y, s): y (..., i) FP8, s (..., ceil(i / block_size))."""
    return y.float() * s.repeat_interleave(block_size, dim=-1)[..., : y.shape[-1]]


@dataclass
class Selection:
    """The keys each query may attend to: `idx` (b, s, t) positions, top-k by index score, and `bias` (b, s, t)
    0 for a real choice, -inf for a slot top-k filled past the causal limit (a query s sees s + 1 keys only);
    `n_keys` positions are cached; `gathers`: attend to the gathered rows (else the dense mask, for testing)."""

    idx: torch.Tensor
    bias: torch.Tensor
    n_keys: int
    gathers: bool

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        """Rows x (b, T, ...) of the selected keys: (b, s, t, ...)."""
        return x[torch.arange(x.shape[0], device=x.device)[:, None, None], self.idx]

    def dense_mask(self) -> torch.Tensor:
        """The selection as an additive mask over all cached keys, (b, s, T): 0 where chosen, else -inf."""
        b, s, _ = self.idx.shape
        full = torch.full((b, s, self.n_keys), float("-inf"), device=self.idx.device)
        return full.scatter_(-1, self.idx, self.bias)

    def attend_latent(self, q_lat: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      scale: float) -> torch.Tensor:
        """Absorbed MLA over the selected latent rows only: q_lat (b s h c), q_pe (b s h r) against kv (b T c),
        k_pe (b T r) -> the weighted latent sum (b, s, h, c). Cost per query: index_topk rows, whatever T is."""
        kv_sel, pe_sel = self.gather(kv), self.gather(k_pe)  # (b s t c), (b s t r)
        scores = (torch.einsum("bshc,bstc->bsht", q_lat, kv_sel)
                  + torch.einsum("bshr,bstr->bsht", q_pe, pe_sel)) * scale
        probs = (scores + self.bias[:, :, None]).softmax(dim=-1, dtype=torch.float32).to(q_lat.dtype)
        return torch.einsum("bsht,bstc->bshc", probs, kv_sel)


class Indexer(nn.Module):
    """The lightning indexer of one attention layer (HF `self_attn.indexer.*`)."""

    def __init__(self, args: ModelArgs, **linear_kw):
        super().__init__()
        self.n_heads, self.head_dim, self.rope_dim = args.index_n_heads, args.index_head_dim, args.qk_rope_head_dim
        self.topk, self.gathers = args.index_topk, args.index_impl == "gather"
        self.fp8, self.block_size, self.scale_fmt = args.index_fp8, args.block_size, args.scale_fmt
        self.rope = apply_rope if args.index_rope_interleave else apply_rope_half
        dtype = linear_kw.get("dtype")
        self.wq_b = Linear(args.q_lora_rank, self.n_heads * self.head_dim, **linear_kw)
        self.wk = Linear(args.dim, self.head_dim, **linear_kw)
        self.k_norm = LayerNorm(self.head_dim, INDEX_K_NORM_EPS, dtype)
        self.weights_proj = Linear(args.dim, self.n_heads, dtype=dtype)  # bf16 in the release, never FP8
        self.scale = (self.n_heads * self.head_dim) ** -0.5  # n_heads^-1/2 on w, softmax_scale = head_dim^-1/2

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
        """This layer's indexer keys for one request, beside MLA's latents: `ik` (b, t, i) in the cache dtype,
        or with index_fp8 FP8 `ik` + float32 `ik_s` (b, t, ceil(i / block_size))."""
        shape = (batch, max_len, self.head_dim)
        if not self.fp8:
            return {"ik": torch.zeros(shape, dtype=dtype, device=device)}
        n_scales = -(-self.head_dim // self.block_size)
        return {"ik": torch.zeros(shape, dtype=torch.float8_e4m3fn, device=device),
                "ik_s": torch.ones((batch, max_len, n_scales), dtype=torch.float32, device=device)}

    def project(self, x: torch.Tensor, qr: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """q (b s h i) and k (b s i), rotated on their first r dims, and the head weights w (b s h), scaled."""
        q = rearrange(self.wq_b(qr), "b s (h i) -> b s h i", i=self.head_dim)
        k = self.k_norm(self.wk(x))
        r = self.rope_dim
        q = torch.cat([self.rope(q[..., :r], cos[:, None], sin[:, None]), q[..., r:]], dim=-1)
        k = torch.cat([self.rope(k[..., :r], cos, sin), k[..., r:]], dim=-1)
        w = self.weights_proj(x).float() * self.scale
        return q, k, w

    def forward(self, x: torch.Tensor, qr: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                cache=None) -> Selection:
        """The selection for queries at positions start_pos .. start_pos + s - 1 (x (b s m), qr (b s q));
        with a cache (dsv3.mla.MLACache) this step's keys are stored by position and all cached ones scored."""
        q, k, w = self.project(x, qr, cos, sin)
        q, keys = self.keys(q, k, None if cache is None else lambda **new: cache.write(start_pos, **new))
        q_pos = torch.arange(start_pos, start_pos + x.shape[1], device=x.device)
        return self.select(self.scores(q, w, keys), q_pos)

    def forward_static(self, x: torch.Tensor, qr: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor,
                       sin: torch.Tensor, cache) -> Selection:
        """One decode step at position pos, a (1,) long tensor, over the whole fixed-length cache
        (dsv3.decode_step): every shape is fixed by the cache; slots after pos are never chosen."""
        q, k, w = self.project(x, qr, cos, sin)
        q, keys = self.keys(q, k, lambda **new: cache.write_at(pos, **new))
        return self.select(self.scores(q, w, keys), pos)

    def keys(self, q: torch.Tensor, k: torch.Tensor, write) -> tuple[torch.Tensor, torch.Tensor]:
        """(queries, all keys so far) as scored: k stored through `write` (None: no cache); with index_fp8
        both Hadamard-rotated and FP8 round-tripped, the keys cached as FP8 + scales. `write(ik=..[, ik_s=..])`
        stores the new keys and returns every cached key of the sequence in the same order (dsv3.serve's paged
        cache passes its own: a slot write and a block-table gather)."""
        if not self.fp8:
            return q, (k if write is None else write(ik=k)["ik"])
        bs, fmt = self.block_size, self.scale_fmt
        q = fp8_dequant(*act_quant(hadamard(q), bs, fmt), bs)
        kq, ks = act_quant(hadamard(k), bs, fmt)
        if write is not None:
            kq, ks = write(ik=kq, ik_s=ks).values()
        return q, fp8_dequant(kq, ks, bs)

    @staticmethod
    def scores(q: torch.Tensor, w: torch.Tensor, keys: torch.Tensor, max_logits: int = 2**26) -> torch.Tensor:
        """I(s, t) = sum_h w_h(s) ReLU(q_h(s) . k(t)) in float32: q (b s h i), w (b s h), keys (b t i) -> (b, s, t).

        Queries go in chunks so that the per-head logits (b, s, h, t) stay under `max_logits` values (2^26: 256 MB):
        a 4096-token prefill of V3.2 (64 heads) would otherwise hold 4.3 GB of them per layer."""
        b, s, h, _ = q.shape
        step = max(1, max_logits // max(1, b * h * keys.shape[1]))
        out = [torch.einsum("bsht,bsh->bst", F.relu(torch.einsum("bshi,bti->bsht", q[:, i:i + step].float(), keys.float())),
                            w[:, i:i + step]) for i in range(0, s, step)]
        return out[0] if len(out) == 1 else torch.cat(out, dim=1)

    def select(self, scores: torch.Tensor, q_pos: torch.Tensor) -> Selection:
        """Top-min(index_topk, T) keys of causally masked scores (b, s, T), queries at positions q_pos (s,)."""
        n_keys = scores.shape[-1]
        future = torch.arange(n_keys, device=scores.device)[None, :] > q_pos[:, None]  # (s, T)
        vals, idx = scores.masked_fill(future, float("-inf")).topk(min(self.topk, n_keys), dim=-1)
        bias = torch.zeros_like(vals).masked_fill_(vals == float("-inf"), float("-inf"))
        return Selection(idx, bias, n_keys, self.gathers)
