"""Multi-token prediction (MTP): extra modules that predict tokens further ahead.

Module k (1-based depth) at position i combines the previous depth's hidden state
h_i (depth 0: the main model's final hidden state, after the final norm) with the
embedding of token i + k:

    h' = block(eh_proj([enorm(Emb(t_{i+k})) ; hnorm(h_i)]))    # embedding first
    logits = head(shared_head.norm(h'))                          # predicts token i + k + 1

The embedding and head are the main model's (shared); the release also stores
copies under the MTP layer, which the loader does not load twice: it checks them equal to the main ones.
Its names in the checkpoint are `model.layers.{n_layers + k - 1}.*`.
"""

from __future__ import annotations

import torch
from torch import nn

from dsv3.config import ModelArgs
from dsv3.layers import Linear, RMSNorm
from dsv3.mla import MLACache


class MTPModule(nn.Module):
    def __init__(self, block: nn.Module, args: ModelArgs, dtype: torch.dtype | None = None):
        """`block`: the decoder block this module wraps (a `dsv3.model.Block` at layer n_layers + k)."""
        super().__init__()
        self.enorm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.hnorm = RMSNorm(args.dim, args.norm_eps, dtype)
        self.eh_proj = Linear(2 * args.dim, args.dim, dtype=dtype)  # never quantised in the release
        self.block = block
        self.norm = RMSNorm(args.dim, args.norm_eps, dtype)  # shared_head.norm

    def forward(self, h: torch.Tensor, emb: torch.Tensor, start_pos: int, cos: torch.Tensor,
                sin: torch.Tensor, cache: MLACache | None = None) -> torch.Tensor:
        """h, emb (b, s, m) -> this depth's hidden state (b, s, m), already through shared_head.norm."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        return self.norm(self.block(x, start_pos, cos, sin, cache))
