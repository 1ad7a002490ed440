"""Block and Transformer: composition only (embed -> blocks -> norm -> head, + MTP modules).

The model is single-device code: local sizes (heads, experts, vocabulary) are read
from tensors, so `dsv3.parallel` can shard it after construction without edits here.
It can be built on the `meta` device for free (`with torch.device("meta"): ...`);
weights then arrive with `load_state_dict(..., assign=True)` (see `dsv3.checkpoint`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from dsv3 import fp8
from dsv3.config import ModelArgs
from dsv3.layers import MLP, LayerNorm, Linear, RMSNorm
from dsv3.mla import MLA, MLACache
from dsv3.moe import Gate, MoE
from dsv3.mtp import MTPModule
from dsv3.rope import Rotary


def linear_kwargs(args: ModelArgs, dtype: torch.dtype | None = None) -> dict:
    """How every quantisable Linear of the model is built (FP8 storage follows `args.dtype`)."""
    return dict(dtype=dtype, fp8_weight=args.dtype == "fp8", block_size=args.block_size,
                gemm_impl=args.gemm_impl, scale_fmt=args.scale_fmt)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x)); ffn is an MLP or MoE."""

    def __init__(self, layer_id: int, args: ModelArgs, dtype: torch.dtype | None = None):
        super().__init__()
        kw = linear_kwargs(args, dtype)
        self.attn = MLA(args, **kw)
        self.ffn = MoE(args, **kw) if args.is_moe_layer(layer_id) else MLP(args.dim, args.inter_dim, **kw)
        self.attn_norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps, dtype)

    def forward(self, x: torch.Tensor, start_pos: int, cos: torch.Tensor, sin: torch.Tensor,
                cache: MLACache | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), start_pos, cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class Cache:
    """The per-request cache of a model: one MLACache per block (+ one per MTP module)."""

    def __init__(self, layers: list[MLACache], mtp: list[MLACache], batch: int, max_len: int):
        self.layers, self.mtp, self.batch, self.max_len = layers, mtp, batch, max_len

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers + self.mtp)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs, dtype: torch.dtype | None = None):
        super().__init__()
        self.args = args
        self.embed = nn.Embedding(args.vocab_size, args.dim, dtype=dtype)
        self.layers = nn.ModuleList(Block(i, args, dtype) for i in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.head = Linear(args.dim, args.vocab_size, dtype=dtype)  # never quantised in the release
        self.mtp = nn.ModuleList(MTPModule(Block(args.n_layers + k, args, dtype), args, dtype)
                                 for k in range(args.n_mtp_layers))
        self.rotary = Rotary(args)
        if not self.embed.weight.is_meta:
            self.init_weights()

    # ------------------------------------------------------------------ weights
    @torch.no_grad()
    def init_weights(self, std: float = 0.02, generator: torch.Generator | None = None) -> None:
        """Random init (normal(0, std) for matrices, ones for norms, zeros for gate and LayerNorm biases)."""
        for mod in self.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif isinstance(mod, LayerNorm):  # V3.2's indexer k_norm
                mod.weight.fill_(1.0)
                mod.bias.zero_()
            elif isinstance(mod, nn.Embedding):
                mod.weight.normal_(0, std, generator=generator)
            elif isinstance(mod, Linear):
                if mod.is_fp8:
                    w = torch.empty(mod.weight.shape).normal_(0, std, generator=generator)
                    q, s = fp8.weight_quant(w, mod.block_size)
                    mod.weight.copy_(q)
                    mod.scale.copy_(s)
                else:
                    mod.weight.normal_(0, std, generator=generator)
            elif isinstance(mod, Gate):
                mod.weight.normal_(0, std / math.sqrt(2), generator=generator)
                if mod.bias is not None:
                    mod.bias.zero_()

    # ------------------------------------------------------------------ inference
    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                  mtp: bool = False, device: torch.device | str | None = None) -> Cache:
        """A cache for `batch` sequences of up to `max_len` tokens (default: args.max_seq_len);
        with `mtp`, also one per MTP module (speculative decoding). device="meta" sizes it for free."""
        max_len = max_len or self.args.max_seq_len
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        layers = [blk.attn.new_cache(batch, max_len, dtype, device) for blk in self.layers]
        mtp_caches = [m.block.attn.new_cache(batch, max_len, dtype, device) for m in self.mtp] if mtp else []
        return Cache(layers, mtp_caches, batch, max_len)

    def hidden(self, tokens: torch.Tensor, start_pos: int = 0, cache: Cache | None = None) -> torch.Tensor:
        """Final hidden states after the last norm, (b, s, m)."""
        b, s = tokens.shape
        if start_pos + s > self.args.max_seq_len:
            raise ValueError(f"positions up to {start_pos + s} exceed max_seq_len={self.args.max_seq_len}")
        cos, sin = self.rotary(start_pos, s, tokens.device)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            x = layer(x, start_pos, cos, sin, None if cache is None else cache.layers[i])
        return self.norm(x)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0, cache: Cache | None = None, *,
                last_only: bool = False) -> torch.Tensor:
        """Logits (b, s, v) in float32 for every position given; with a cache, appends to it.

        `last_only` returns the last position's logits only, (b, 1, v): all a generation step needs
        (for a 512-token prefill of the bench preset, the full head is 30% of the work)."""
        h = self.hidden(tokens, start_pos, cache)
        return self.head(h[:, -1:] if last_only else h).float()

    def forward_mtp(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
        """Main logits (b, s, v) and MTP logits: for depth k, position i predicts token i + k + 1,
        shape (b, s - k, v). With one MTP module (V3) the second value is that tensor, else a list."""
        if not self.mtp:
            raise ValueError("this model has no MTP modules (n_mtp_layers = 0)")
        h = self.hidden(tokens)
        logits = self.head(h).float()
        s = tokens.shape[1]
        cos, sin = self.rotary(0, s, tokens.device)
        outs = []
        for k, module in enumerate(self.mtp, start=1):
            h = module(h[:, : s - k], self.embed(tokens[:, k:]), 0, cos[: s - k], sin[: s - k])
            outs.append(self.head(h).float())
        return logits, outs[0] if len(outs) == 1 else outs

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype
