"""One model forward over a packed batch: prefill chunks and decode tokens of many sequences at once.

Everything but attention is position-wise, so the batch is packed into one row of n tokens (the chunks of
every sequence, one after another): embedding, norms, MLP/MoE, `wo` and the head see (1, n, m) and never pad.
Attention goes through MLA's public pieces: `MLA.project` gives the queries, latents and rotary keys of the n
tokens (each rotated at its own position); the latents are written into the paged pools at their slots; then
`MLA.attend_latent` attends each prefill chunk's queries against the rows its block table gathers, with the
causal mask of a chunk starting at that sequence's position, and every decode token of the step in ONE call:
their rows gathered into a (b, t) grid padded to the longest context, the padding masked with -inf (exact
zeros after the softmax, so the same tokens as one call per sequence, without its per-call overhead). Every
index tensor of a step is built once on the host (`Plan`) and shared by all layers; pools are read with
`index_select` (torch's advanced-indexing gather was several times slower here). DeepSeek-V3.2 (an indexer
per layer): the indexer projects the n tokens too, each sequence's new keys go into the indexer pool at its
slots (`Indexer.keys`, FP8 + scales with index_fp8), its queries are scored against the keys its block table
gathers, and `Indexer.select` keeps the top min(index_topk, position + 1) per query; `attend_latent` then reads
only those latent rows -- the arithmetic of `Indexer.forward` over a contiguous cache. The decode tokens do
this together too, over the same padded grid (each one's position masks its padding). Under tensor
parallelism the collectives are forward hooks on the modules (`dsv3.parallel`): the FFN and head are called as
modules, and the MLA module's own hooks (the all-reduce of its output) are run here after `wo`, so a rank runs
this code unchanged.

Axes: b sequences in the batch, s a sequence's new tokens, t its cached positions, n packed tokens, h heads,
d head dim, c latent, r rope dim, m model dim, v vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange

from dsv3.indexer import Selection
from dsv3.mla import causal_mask
from dsv3.serve.cache import PagedCache


@dataclass
class Chunk:
    """One sequence's share of a step: `tokens` at positions [start, start + len(tokens)), its block table."""

    tokens: list[int]
    start: int
    table: list[int]


@dataclass
class Plan:
    """A step's index tensors: positions `pos` (n,), pool `slots` (n,) of the new tokens, `last` (b,) packed
    index of each chunk's last token, `bounds` (first, last + 1, start, rows (t,)) per chunk; decode tokens
    (one-token chunks) at packed indices `dec` (b',), their pool rows `dec_rows` (b', t) padded to the longest,
    and `dec_mask` (b', 1, t) additive, -inf on the padding; their pool slots `dec_slots` (b',) and positions
    `dec_pos` (b', 1) for V3.2's indexer."""

    pos: torch.Tensor
    slots: torch.Tensor
    last: torch.Tensor
    bounds: list[tuple[int, int, int, torch.Tensor]]
    dec: torch.Tensor
    dec_rows: torch.Tensor
    dec_mask: torch.Tensor
    dec_slots: torch.Tensor
    dec_pos: torch.Tensor


class PagedRunner:
    """Runs `Transformer` blocks over the paged cache (absorbed attention only: the cache holds latents)."""

    def __init__(self, model, cache: PagedCache):
        self.model, self.cache = model, cache
        self.cos, self.sin = model.rotary(0, model.args.max_seq_len, model.device)  # (positions, r/2)

    @torch.inference_mode()
    def forward(self, chunks: list[Chunk]) -> torch.Tensor:
        """Logits (b, v) float32 of the last token of every chunk."""
        model, dev = self.model, self.model.device
        plan = self._plan(chunks)
        cos, sin = self.cos[plan.pos], self.sin[plan.pos]  # (n, r/2): every token at its own position
        x = model.embed(torch.tensor([[t for ch in chunks for t in ch.tokens]], device=dev))  # (1, n, m)
        for i, blk in enumerate(model.layers):
            x = x + self._attention(blk.attn, blk.attn_norm(x), i, cos, sin, plan)
            x = x + blk.ffn(blk.ffn_norm(x))
        return model.head(model.norm(x)[:, plan.last]).float()[0]

    def _plan(self, chunks: list[Chunk]) -> Plan:
        """Every index tensor of the step, built once on the host and shared by all layers."""
        dev = self.model.device
        pos, slots, last, bounds, dec, dec_rows, a = [], [], [], [], [], [], 0
        for ch in chunks:
            e = a + len(ch.tokens)
            rows = self.cache.rows(ch.table, ch.start + len(ch.tokens))  # (t,)
            pos.append(torch.arange(ch.start, ch.start + len(ch.tokens)))
            slots.append(rows[ch.start:])
            last.append(e - 1)
            if len(ch.tokens) == 1:  # a decode token: attended with the others in one padded call
                dec.append(a)
                dec_rows.append(rows)
            bounds.append((a, e, ch.start, rows.to(dev)))
            a = e
        lens = torch.tensor([len(r) for r in dec_rows], dtype=torch.long)
        t = int(lens.max()) if dec_rows else 0
        pad = (torch.nn.utils.rnn.pad_sequence(dec_rows, batch_first=True) if dec_rows
               else torch.zeros(0, 0, dtype=torch.long))  # (b', t), padded with row 0 (masked below)
        mask = torch.zeros(len(dec), 1, t).masked_fill_(torch.arange(t) >= lens[:, None, None], float("-inf"))
        pos, slots = torch.cat(pos).to(dev), torch.cat(slots).to(dev)
        dec = torch.tensor(dec, dtype=torch.long, device=dev)
        return Plan(pos, slots, torch.tensor(last, device=dev), bounds, dec, pad.to(dev), mask.to(dev), slots[dec],
                    pos[dec, None])

    def _attention(self, attn, x, layer: int, cos, sin, plan: Plan) -> torch.Tensor:
        qr = attn.q_latent(x)  # (1 n q), None without q-LoRA; V3.2's indexer reads it too
        q_nope, q_pe, kv, k_pe = attn.project(x, cos, sin, qr)  # (1 n h d), (1 n h r), (1 n c), (1 n r)
        kv_pool, pe_pool = self.cache.kv[layer], self.cache.pe[layer]
        kv_pool.index_copy_(0, plan.slots, kv[0].to(kv_pool.dtype))
        pe_pool.index_copy_(0, plan.slots, k_pe[0].to(pe_pool.dtype))
        wkv_b = attn.absorbed_wkv_b(x.dtype)  # (h, d + d_v, c)
        index = None if attn.indexer is None else attn.indexer.project(x, qr, cos, sin)  # (1 n h i), (1 n i), (1 n h)
        o = q_nope.new_empty(*q_nope.shape[:3], attn.v_dim)  # (1 n h d_v)
        batched = len(plan.dec) > 0
        if batched:  # the decode tokens: one call over their padded rows (b t), the padding masked out
            b, t = plan.dec_rows.shape
            gather = plan.dec_rows.view(-1)
            sel = None if index is None else self._select_decode(attn.indexer, index, layer, plan)
            o[0, plan.dec] = attn.attend_latent(
                q_nope[0, plan.dec, None], q_pe[0, plan.dec, None], kv_pool.index_select(0, gather).view(b, t, -1),
                pe_pool.index_select(0, gather).view(b, t, -1), wkv_b, plan.dec_mask if sel is None else None,
                sel)[:, 0]
        for a, e, start, rows in plan.bounds:
            s = e - a
            if batched and s == 1:
                continue
            mask = causal_mask(start, s, x.device) if s > 1 else None
            sel = None if index is None else self._select(attn.indexer, index, layer, a, e, start, rows)
            o[:, a:e] = attn.attend_latent(q_nope[:, a:e], q_pe[:, a:e], kv_pool.index_select(0, rows)[None],
                                           pe_pool.index_select(0, rows)[None], wkv_b, mask, sel)  # (1 s h d)
        out = attn.wo(rearrange(o, "b n h d -> b n (h d)"))
        return run_forward_hooks(attn, x, out)

    def _select(self, indexer, index, layer: int, a: int, e: int, start: int, rows: torch.Tensor) -> Selection:
        """V3.2: the keys the chunk at packed tokens [a, e) (positions start ..) attends to, among the `rows`
        (t,) its block table gathers; its new indexer keys are stored at its slots (rows[start:]) first."""
        q, k, w = index
        pools = self.cache.ik[layer]

        def write(**new: torch.Tensor) -> dict[str, torch.Tensor]:
            for name, val in new.items():
                _bits(pools[name]).index_copy_(0, rows[start:], _bits(val[0].to(pools[name].dtype)))
            # (1 t i): every key of this sequence
            return {name: _bits(pools[name]).index_select(0, rows).view(pools[name].dtype)[None] for name in new}

        q_s, keys = indexer.keys(q[:, a:e], k[:, a:e], write)
        q_pos = torch.arange(start, start + e - a, device=q.device)
        return indexer.select(indexer.scores(q_s, w[:, a:e], keys), q_pos)

    def _select_decode(self, indexer, index, layer: int, plan: Plan) -> Selection:
        """V3.2: the keys of every decode token of the step at once. Their new indexer keys go to their slots,
        every sequence's keys are gathered into the padded (b, t) grid of `plan.dec_rows`, and each token keeps
        the top min(index_topk, position + 1) of its own row: its position masks the padding (which lies past
        it) exactly as the causal limit masks the future, so each gets the selection a call of its own gives."""
        q, k, w = index
        pools = self.cache.ik[layer]
        b, t = plan.dec_rows.shape
        gather = plan.dec_rows.view(-1)

        def write(**new: torch.Tensor) -> dict[str, torch.Tensor]:
            for name, val in new.items():
                _bits(pools[name]).index_copy_(0, plan.dec_slots, _bits(val[:, 0].to(pools[name].dtype)))
            # (b t i): every key of every decoding sequence, padded
            return {name: _bits(pools[name]).index_select(0, gather).view(pools[name].dtype).view(b, t, -1)
                    for name in new}

        q_s, keys = indexer.keys(q[0, plan.dec, None], k[0, plan.dec, None], write)  # (b 1 h i), (b t i)
        return indexer.select(indexer.scores(q_s, w[0, plan.dec, None], keys), plan.dec_pos)


def _bits(x: torch.Tensor) -> torch.Tensor:
    """x itself, or its bytes for FP8 (torch's CPU index_copy_ and gathers have no FP8 kernels; bytes move alike)."""
    return x.view(torch.uint8) if x.dtype == torch.float8_e4m3fn else x


def run_forward_hooks(module: torch.nn.Module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """What calling `module` would have done after its forward: its forward hooks. dsv3.parallel adds the
    tensor-parallel all-reduce of the attention output as a hook on the MLA module, and this runner calls the
    module's pieces (`project`, `attend_latent`, `wo`) rather than the module, so it runs the hooks itself."""
    for hook in module._forward_hooks.values():
        res = hook(module, (x,), out)
        out = out if res is None else res
    return out
