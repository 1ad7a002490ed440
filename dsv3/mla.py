"""Multi-head Latent Attention (MLA), naive and absorbed, with its per-request cache.

Axes (the legend used across dsv3): b batch, s query positions, t key positions,
h heads, d nope/value head dim, r rope dim, c kv latent (kv_lora_rank), q q latent,
m model dim; and two per-head widths of this file only: i = d + r (a query or key head, nope and
rope parts together) and j = d + d_v (one head's rows of wkv_b: its k_nope and v parts). `e` is
reserved for experts.

MLA compresses keys and values of all heads into one latent per token,
c_kv = kv_norm(W_DKV x) (c wide), plus one shared rotary key k_pe (r wide).
Per head, k_nope = W_UK c_kv and v = W_UV c_kv (both inside `wkv_b`).

- naive: expand the latent into per-head K (d + r) and V (d) and cache those,
  h·(2d + r) values per token per layer -- what an ordinary MHA cache would hold.
- absorbed: cache only c_kv and k_pe (c + r per token per layer). Because
  q_nope·k_nope = q_nope·(W_UK c) = (W_UKᵀ q_nope)·c, fold W_UK into the query and
  W_UV into the output, so attention runs directly against the latent cache.

Both give the same numbers (up to rounding): tests hold them equal.

Written once: every path starts from `project` (queries, latent, rotary key), and the absorbed
attention is `attend_latent`, used by `forward` (the readable path: a Python-int position, a growing
cache slice; a long absorbed prefill expands instead, `expanding_pays`) and by `forward_static`
(dsv3.decode_step's static-shape step: a tensor position over the whole fixed-length cache).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from dsv3 import cpu_bf16
from dsv3.config import ModelArgs
from dsv3.indexer import Indexer, Selection
from dsv3.layers import Linear, RMSNorm
from dsv3.rope import apply_rope


class MLACache:
    """One layer's cache for one request: tensors sized (batch, max_len, ...), written by position.

    Absorbed: `kv` (b, t, c) normalised latents and `pe` (b, t, r) rotated shared keys.
    Naive: `k` (b, t, h, d + r) and `v` (b, t, h, d).
    Writing is by absolute position, so rolling back (speculative decoding) is just
    writing again at an earlier start_pos.
    """

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def write(self, start_pos: int, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new[name] at positions [start_pos, start_pos + s); return views over [0, start_pos + s)."""
        out = {}
        for name, x in new.items():
            buf = self.tensors[name]
            b, s = x.shape[:2]
            end = start_pos + s
            if end > buf.shape[1]:
                raise IndexError(f"cache holds {buf.shape[1]} positions, step needs {end}")
            buf[:b, start_pos:end] = x
            out[name] = buf[:b, :end]
        return out

    def write_at(self, pos: torch.Tensor, **new: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store new[name] (b, 1, ...) at position pos, a (1,) long tensor; return the whole buffers (b, t, ...).

        The static-shape form of `write` (dsv3.decode_step): no host value, every shape fixed by the cache.
        """
        out = {}
        for name, x in new.items():
            buf = self.tensors[name]
            buf.index_copy_(1, pos, x)
            out[name] = buf
        return out

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


class MLA(nn.Module):
    def __init__(self, args: ModelArgs, **linear_kw):
        super().__init__()
        self.args = args
        self.q_lora_rank = args.q_lora_rank
        self.nope, self.rope_dim, self.v_dim = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.kv_lora_rank = args.kv_lora_rank
        self.attn_impl = args.attn_impl
        self.softmax_scale = args.softmax_scale
        h, qk = args.n_heads, args.qk_head_dim
        if self.q_lora_rank == 0:
            self.wq = Linear(args.dim, h * qk, **linear_kw)
        else:
            self.wq_a = Linear(args.dim, self.q_lora_rank, **linear_kw)
            self.q_norm = RMSNorm(self.q_lora_rank)  # eps 1e-6 always, as kv_norm below
            self.wq_b = Linear(self.q_lora_rank, h * qk, **linear_kw)
        self.wkv_a = Linear(args.dim, self.kv_lora_rank + self.rope_dim, **linear_kw)
        # the latent norms keep RMSNorm's default eps (1e-6) whatever rms_norm_eps says: transformers'
        # DeepseekV3Attention and the official inference/model.py build them so (Moonlight: 1e-5 elsewhere)
        self.kv_norm = RMSNorm(self.kv_lora_rank)
        self.wkv_b = Linear(self.kv_lora_rank, h * (self.nope + self.v_dim), **linear_kw)
        self.wo = Linear(h * self.v_dim, args.dim, **linear_kw)
        self.indexer = Indexer(args, **linear_kw) if args.index_n_heads else None  # V3.2's sparse attention
        self._absorb_cache: tuple[tuple, torch.Tensor] | None = None

    # ------------------------------------------------------------------ cache
    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> MLACache:
        h = self.wkv_b.out_features // (self.nope + self.v_dim)  # local heads (tensor parallel)
        if self.attn_impl == "absorb":
            shapes = {"kv": (batch, max_len, self.kv_lora_rank), "pe": (batch, max_len, self.rope_dim)}
        else:
            shapes = {"k": (batch, max_len, h, self.nope + self.rope_dim), "v": (batch, max_len, h, self.v_dim)}
        tensors = {n: torch.zeros(sh, dtype=dtype, device=device) for n, sh in shapes.items()}
        if self.indexer is not None:  # V3.2: the indexer's keys beside the latents
            tensors |= self.indexer.new_cache(batch, max_len, dtype, device)
        return MLACache(tensors)

    def absorbed_wkv_b(self, dtype: torch.dtype) -> torch.Tensor:
        """wkv_b as (h, d + d_v, c) in `dtype`; an FP8 weight is dequantised once and kept.

        While training (grad enabled on a trainable weight) it is a fresh view every call, so the
        gradient reaches wkv_b; a copy kept from an earlier no-grad forward would silently cut it.
        """
        w = self.wkv_b.weight
        if torch.is_grad_enabled() and w.requires_grad:
            return rearrange(self.wkv_b.dequantized_weight(dtype), "(h j) c -> h j c", j=self.nope + self.v_dim)
        key = (w.data_ptr(), w._version, dtype, self.wkv_b.scale is not None and self.wkv_b.scale._version)
        if self._absorb_cache is None or self._absorb_cache[0] != key:
            full = self.wkv_b.dequantized_weight(dtype)
            self._absorb_cache = (key, rearrange(full, "(h j) c -> h j c", j=self.nope + self.v_dim))
        return self._absorb_cache[1]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                cache: MLACache | None = None) -> torch.Tensor:
        s = x.shape[1]
        qr = self.q_latent(x)
        q_nope, q_pe, kv, k_pe = self.project(x, cos, sin, qr)
        mask = causal_mask(start_pos, s, x.device) if s > 1 else None
        sel = None if self.indexer is None else self.indexer(x, qr, start_pos, cos, sin, cache)  # DSA's keys

        if self.attn_impl == "naive":
            kv_full = rearrange(self.wkv_b(kv), "b s (h j) -> b s h j", j=self.nope + self.v_dim)
            k_nope, v = kv_full.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, k_nope.shape[2], -1)], dim=-1)  # (b s h d+r)
            if cache is not None:
                k, v = cache.write(start_pos, k=k, v=v).values()
            q = torch.cat([q_nope, q_pe], dim=-1)  # (b s h d+r), rotated
            scores = torch.einsum("bshi,bthi->bsht", q, k) * self.softmax_scale
            probs = _softmax(scores, mask if sel is None else sel.dense_mask(), x.dtype)
            o = torch.einsum("bsht,bthd->bshd", probs, v)
        else:
            wkv_b = self.absorbed_wkv_b(x.dtype)  # (h, d + d_v, c)
            if cache is not None:
                kv, k_pe = cache.write(start_pos, kv=kv, pe=k_pe).values()
            if self.expanding_pays(s):
                o = self._expanded(q_nope, q_pe, kv, k_pe, wkv_b, None if sel is None else sel.dense_mask())
            else:
                o = self.attend_latent(q_nope, q_pe, kv, k_pe, wkv_b, mask, sel)
        return self.wo(rearrange(o, "b s h d -> b s (h d)"))

    def forward_static(self, x: torch.Tensor, pos: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                       mask: torch.Tensor, cache: MLACache, wkv_b: torch.Tensor) -> torch.Tensor:
        """One absorbed decode step with nothing on the host (dsv3.decode_step): x (b, 1, m) at position pos,
        a (1,) long tensor; the latents are written into the whole fixed-length cache and attention runs over
        all its t slots, the ones after pos masked by `mask` (1, t) (additive, -inf); wkv_b as `absorbed_wkv_b`."""
        qr = self.q_latent(x)
        q_nope, q_pe, kv, k_pe = self.project(x, cos, sin, qr)
        kv_all, pe_all = cache.write_at(pos, kv=kv, pe=k_pe).values()  # (b t c), (b t r)
        sel = None if self.indexer is None else self.indexer.forward_static(x, qr, pos, cos, sin, cache)
        o = self.attend_latent(q_nope, q_pe, kv_all, pe_all, wkv_b, mask, sel)
        return self.wo(rearrange(o, "b s h d -> b s (h d)"))

    def q_latent(self, x: torch.Tensor) -> torch.Tensor | None:
        """The normalised q latent (b s q), None without q-LoRA: wq_b reads it, and so does V3.2's indexer."""
        return None if self.q_lora_rank == 0 else self.q_norm(self.wq_a(x))

    def project(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                qr: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """The projections every path starts from: q_nope (b s h d), q_pe (b s h r) rotated, the normalised
        latent kv (b s c) and the rotated shared key k_pe (b s r). `qr`: the q latent if already computed."""
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_latent(x) if qr is None else qr)
        q = rearrange(q, "b s (h i) -> b s h i", i=self.nope + self.rope_dim)
        q_nope, q_pe = q.split([self.nope, self.rope_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None])  # (b s h r)
        kv, k_pe = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_norm(kv)  # (b s c)
        k_pe = apply_rope(k_pe, cos, sin)  # (b s r): one rotary key shared by all heads
        return q_nope, q_pe, kv, k_pe

    def attend_latent(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                      wkv_b: torch.Tensor, mask: torch.Tensor | None, sel: Selection | None = None) -> torch.Tensor:
        """Absorbed attention against the latents kv (b t c), k_pe (b t r): (b, s, h, d_v).

        `mask`: None, or an additive (s, >= t) mask whose last t columns are these keys' (`causal_mask`), or one
        per sequence (b, s, t) (dsv3.serve's padded decode batch).
        `sel` (V3.2): attend to the indexer's keys only -- gathered rows, or its dense mask instead of `mask`.
        """
        q_lat = cpu_bf16.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.nope])  # W_UK folded into q
        if sel is not None and sel.gathers:
            o_lat = sel.attend_latent(q_lat, q_pe, kv, k_pe, self.softmax_scale)
        else:
            scores = (cpu_bf16.einsum("bshc,btc->bsht", q_lat, kv)
                      + cpu_bf16.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
            probs = _softmax(scores, mask if sel is None else sel.dense_mask(), q_nope.dtype)
            o_lat = cpu_bf16.einsum("bsht,btc->bshc", probs, kv)
        return cpu_bf16.einsum("bshc,hdc->bshd", o_lat, wkv_b[:, self.nope:])  # W_UV applied after attention

    def expanding_pays(self, s: int) -> bool:
        """Whether s queries are cheaper against per-head K/V expanded from the cached latents.

        Per head, attending in latent space costs ~t·(2c + r) per query; expanding costs t·c·(d + d_v) once,
        then t·(d + r + d_v) per query. So a long prefill or chunk expands (V3: s >= 171), a decode step
        (s = 1) or an MTP verification (s = 2) stays latent -- the cache itself always stays latent.
        """
        c, d, dv = self.kv_lora_rank, self.nope, self.v_dim
        gain = 2 * c - d - dv
        return gain <= 0 or s * gain >= c * (d + dv)

    def _expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, k_pe: torch.Tensor,
                  wkv_b: torch.Tensor, sparse: torch.Tensor | None = None) -> torch.Tensor:
        """The same attention, through fused SDPA on K/V expanded from the latents: (b, s, h, d_v).
        `sparse`: V3.2's selection as an additive (b, s, t) mask (causality included), else causal."""
        k_nope, v = torch.einsum("btc,hjc->bhtj", kv, wkv_b).split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None].expand(-1, k_nope.shape[1], -1, -1)], dim=-1)  # (b h t d+r)
        q = rearrange(torch.cat([q_nope, q_pe], dim=-1), "b s h i -> b h s i")
        s, t = q.shape[2], k.shape[2]
        # queries are the last s of the t positions: query i sees keys 0 .. t - s + i
        mask = None if s == t else causal_mask(t - s, s, q.device) == 0
        if sparse is not None:
            mask = (sparse == 0)[:, None]  # (b, 1, s, t): True where the query may look
        # torch's fused (flash) CPU kernel wants one head dim for q, k and v: zero-pad v (2.4x faster here)
        pad = q.shape[-1] - self.v_dim
        o = F.scaled_dot_product_attention(q, k, F.pad(v, (0, pad)) if pad > 0 else v, attn_mask=mask,
                                           is_causal=mask is None, scale=self.softmax_scale)
        return rearrange(o[..., : self.v_dim], "b h s d -> b s h d")


def causal_mask(start_pos: int, s: int, device: torch.device) -> torch.Tensor:
    """(s, start_pos + s) additive mask: query i (at position start_pos + i) sees keys 0 .. start_pos + i."""
    q_pos = torch.arange(start_pos, start_pos + s, device=device)[:, None]
    k_pos = torch.arange(start_pos + s, device=device)[None, :]
    return torch.zeros(s, start_pos + s, device=device).masked_fill_(k_pos > q_pos, float("-inf"))


def _softmax(scores: torch.Tensor, mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    if mask is not None:
        t = scores.shape[-1]
        scores = scores + mask.unsqueeze(-2)[..., -t:]  # (s, 1, t) or (b, s, 1, t) over (b, s, h, t)
    return scores.softmax(dim=-1, dtype=torch.float32).to(dtype)
