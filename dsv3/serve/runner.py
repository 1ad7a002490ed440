"""One model forward over a packed batch: prefill chunks and decode tokens of many sequences at once.

Everything but attention is position-wise, so the batch is packed into one row of n tokens (the chunks of
every sequence, one after another): embedding, norms, MLP/MoE, `wo` and the head see (1, n, m) and never pad.
Attention goes through MLA's public pieces: `MLA.project` gives the queries, latents and rotary keys of the n
tokens (each rotated at its own position); the latents are written into the paged pools at their slots; then,
sequence by sequence, `MLA.attend_latent` attends its queries against the rows its block table gathers, with
the causal mask of a chunk starting at that sequence's position. Under tensor parallelism the collectives
are forward hooks on the modules (`dsv3.parallel`): the FFN and head are called as modules, and the MLA
module's own hooks (the all-reduce of its output) are run here after `wo`, so a rank runs this code unchanged.

Axes: b sequences in the batch, s a sequence's new tokens, t its cached positions, n packed tokens, h heads,
d head dim, c latent, r rope dim, m model dim, v vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from dsv3.mla import causal_mask
from dsv3.serve.cache import PagedCache


@dataclass
class Chunk:
    """One sequence's share of a step: `tokens` at positions [start, start + len(tokens)), its block table."""

    tokens: list[int]
    start: int
    table: list[int]


class PagedRunner:
    """Runs `Transformer` blocks over the paged cache (absorbed attention only: the cache holds latents)."""

    def __init__(self, model, cache: PagedCache):
        self.model, self.cache = model, cache
        self.cos, self.sin = model.rotary(0, model.args.max_seq_len, model.device)  # (positions, r/2)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits (b, v) float32 of the last token of every chunk."""
        model, dev = self.model, self.model.device
        flat = [t for ch in chunks for t in ch.tokens]
        pos = torch.tensor([ch.start + i for ch in chunks for i in range(len(ch.tokens))], device=dev)
        slots = torch.cat([self.cache.slots(ch.table, ch.start, ch.start + len(ch.tokens)) for ch in chunks])
        bounds, a = [], 0
        for ch in chunks:  # (first, last + 1) packed index of each chunk, and the pool rows it attends to
            bounds.append((a, a + len(ch.tokens), ch.start, self.cache.slots(ch.table, 0, ch.start + len(ch.tokens))))
            a += len(ch.tokens)
        cos, sin = self.cos[pos], self.sin[pos]  # (n, r/2): every token at its own position
        x = model.embed(torch.tensor([flat], device=dev))  # (1, n, m)
        for i, blk in enumerate(model.layers):
            x = x + self._attention(blk.attn, blk.attn_norm(x), i, cos, sin, slots, bounds)
            x = x + blk.ffn(blk.ffn_norm(x))
        last = torch.tensor([e - 1 for _, e, _, _ in bounds], device=dev)
        return model.head(model.norm(x)[:, last]).float()[0]

    def _attention(self, attn, x, layer: int, cos, sin, slots, bounds) -> torch.Tensor:
        q_nope, q_pe, kv, k_pe = attn.project(x, cos, sin)  # (1 n h d), (1 n h r), (1 n c), (1 n r)
        kv_pool, pe_pool = self.cache.kv[layer], self.cache.pe[layer]
        kv_pool.index_copy_(0, slots, kv[0].to(kv_pool.dtype))
        pe_pool.index_copy_(0, slots, k_pe[0].to(pe_pool.dtype))
        wkv_b = attn.absorbed_wkv_b(x.dtype)  # (h, d + d_v, c)
        outs = []
        for a, e, start, rows in bounds:
            s = e - a
            mask = causal_mask(start, s, x.device) if s > 1 else None
            outs.append(attn.attend_latent(q_nope[:, a:e], q_pe[:, a:e], kv_pool[rows][None], pe_pool[rows][None],
                                           wkv_b, mask))  # (1 s h d)
        out = attn.wo(rearrange(torch.cat(outs, dim=1), "b n h d -> b n (h d)"))
        return run_forward_hooks(attn, x, out)


def run_forward_hooks(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What calling `module` would have done after its forward: its forward hooks. dsv3.parallel adds the
    tensor-parallel all-reduce of the attention output as a hook on the MLA module, and this runner calls the
    module's pieces (`project`, `attend_latent`, `wo`) rather than the module, so it runs the hooks itself."""
    for hook in module._forward_hooks.values():
        res = hook(module, (x,), out)
        out = out if res is None else res
    return out
