"""The paged latent cache: fixed-size blocks of latent + rotary-key rows, and the block manager that owns them.

MLA's absorbed path caches, per token and layer, only the normalised latent c (`kv_lora_rank` wide) and the
rotated shared key k_pe (`qk_rope_head_dim` wide). Here they live in one pool per layer, reserved once:
`kv` (N·B, c) and `pe` (N·B, r) for N blocks of B token rows. A sequence owns a block table (block ids in
order); its position p lives in row `table[p // B] * B + p % B` of every layer's pool (`rows`). Blocks are
handed out as a sequence grows and come back when it finishes or is aborted; `reserve` lets the scheduler
admit a request only while the blocks it could ever need are still unpromised, so a running sequence never
runs out (no preemption).

DeepSeek-V3.2 (an indexer per layer, `index_n_heads` > 0): each layer also pools the lightning indexer's one
key per token, `ik[i]["ik"]` (N·B, i) in the cache dtype -- or, with `index_fp8`, FP8 e4m3 plus its float32
block scales `ik[i]["ik_s"]` (N·B, ceil(i / block_size)), DeepSeek's 128 B + 4 B per token -- in the same rows
(same block tables, same slots), and `block_bytes` counts them, so --cache-gb sizes the whole cache.

Prefix sharing: a full block is named by the hash of its tokens and of the blocks before it (`chain_hashes`),
so identical prompt heads map to the same names. A later sequence whose prompt starts with registered blocks
takes them as they are (reference-counted, never written again: a sequence only writes past what it shares)
and skips their prefill. A block no sequence holds any more keeps its contents and name as long as it can:
it counts as free, and is evicted (least recently released first) only when no never-named block is left.

Axes: c kv latent, r rope dim, i index_head_dim; N blocks, B rows per block (the legend's letters where they exist).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch

from dsv3.errors import ResourceError, UsageError


def index_key_shapes(args, dtype: torch.dtype) -> dict[str, tuple[int, torch.dtype]]:
    """Per token and layer, the indexer-key rows a V3.2 cache holds (name -> (width, dtype)); {} without an
    indexer. The layout of `Indexer.new_cache`: `ik` in the cache dtype, or FP8 `ik` + float32 scales `ik_s`."""
    if not args.index_n_heads:
        return {}
    if not args.index_fp8:
        return {"ik": (args.index_head_dim, dtype)}
    return {"ik": (args.index_head_dim, torch.float8_e4m3fn),
            "ik_s": (-(-args.index_head_dim // args.block_size), torch.float32)}


def block_bytes(model, block_size: int, dtype: torch.dtype | None = None) -> int:
    """Bytes one block takes across every layer: B rows of (c + r) values per layer, plus V3.2's indexer keys."""
    args, dtype = model.args, dtype or model.dtype
    elem = torch.empty(0, dtype=dtype).element_size()
    row = (args.kv_lora_rank + args.qk_rope_head_dim) * elem
    row += sum(w * torch.empty(0, dtype=dt).element_size() for w, dt in index_key_shapes(args, dtype).values())
    return len(model.layers) * block_size * row


def blocks_for(model, cache_gb: float, block_size: int, dtype: torch.dtype | None = None) -> int:
    """How many blocks `cache_gb` GiB holds (at least one, else ResourceError naming --cache-gb)."""
    per = block_bytes(model, block_size, dtype)
    n = int(cache_gb * 2**30 // per)
    if n < 1:
        raise ResourceError(f"--cache-gb {cache_gb:g} holds no block: one block of {block_size} tokens takes "
                            f"{per} bytes ({cache_gb * 2**30:.0f} bytes given)")
    return n


class PagedCache:
    """Every layer's pools (`kv[i]` (N·B, c), `pe[i]` (N·B, r), V3.2's `ik[i]` {name: (N·B, width)}, else {})
    and the free list of block ids."""

    def __init__(self, model, n_blocks: int, block_size: int, dtype: torch.dtype | None = None):
        if n_blocks < 1 or block_size < 1:
            raise UsageError(f"a paged cache needs n_blocks >= 1 and block_size >= 1, got {n_blocks}, {block_size}")
        args, dtype = model.args, dtype or model.dtype
        rows = n_blocks * block_size
        self.block_size, self.n_blocks = block_size, n_blocks
        self.kv = [torch.zeros(rows, args.kv_lora_rank, dtype=dtype, device=model.device) for _ in model.layers]
        self.pe = [torch.zeros(rows, args.qk_rope_head_dim, dtype=dtype, device=model.device) for _ in model.layers]
        shapes = index_key_shapes(args, dtype)
        self.ik = [{n: torch.zeros(rows, w, dtype=dt, device=model.device) for n, (w, dt) in shapes.items()}
                   for _ in model.layers]
        self.free = list(range(n_blocks - 1, -1, -1))  # a stack: the lowest id is handed out first
        self.reserved = 0  # blocks promised to admitted sequences but not handed out yet
        self.refs = [0] * n_blocks  # sequences holding each block
        self.name_of: dict[int, int] = {}  # block -> its prefix hash (full blocks registered for sharing)
        self.by_name: dict[int, int] = {}  # prefix hash -> block
        self.idle: OrderedDict[int, None] = OrderedDict()  # named blocks nobody holds: free, contents kept

    # ------------------------------------------------------------------ accounting
    def blocks_needed(self, n_tokens: int) -> int:
        return math.ceil(n_tokens / self.block_size)

    @property
    def n_free(self) -> int:
        return len(self.free) + len(self.idle)

    @property
    def used(self) -> int:
        return self.n_blocks - self.n_free

    def can_reserve(self, n_blocks: int) -> bool:
        return self.n_free - self.reserved >= n_blocks

    def reserve(self, n_blocks: int) -> None:
        if not self.can_reserve(n_blocks):
            raise ResourceError(f"cannot reserve {n_blocks} blocks: {self.n_free - self.reserved} unpromised")
        self.reserved += n_blocks

    # ------------------------------------------------------------------ prefix sharing
    def chain_hashes(self, tokens: list[int], n_blocks: int, parent: int | None = None) -> list[int]:
        """The names of the first n_blocks full blocks of `tokens` (each hashes its tokens and the name before)."""
        out, b = [], self.block_size
        for i in range(n_blocks):
            parent = hash((parent, tuple(tokens[i * b: (i + 1) * b])))
            out.append(parent)
        return out

    def shared_prefix(self, prompt: list[int]) -> list[int]:
        """Registered blocks spelling the head of `prompt` (the last prompt token is always left to compute)."""
        blocks = []
        for h in self.chain_hashes(prompt, (len(prompt) - 1) // self.block_size):
            if h not in self.by_name:
                break
            blocks.append(self.by_name[h])
        return blocks

    def adopt(self, blocks: list[int]) -> None:
        """Hold shared blocks (an idle one stops being free)."""
        for blk in blocks:
            self.idle.pop(blk, None)
            self.refs[blk] += 1

    def register(self, block: int, name: int) -> None:
        """Name a full, finished block so later prompts with the same head can share it."""
        if name not in self.by_name and block not in self.name_of:
            self.by_name[name], self.name_of[block] = block, name

    # ------------------------------------------------------------------ block tables
    def grow(self, table: list[int], n_tokens: int) -> None:
        """Append blocks to `table` (taken from this sequence's reservation) until it holds n_tokens rows."""
        while len(table) * self.block_size < n_tokens:
            if self.free:
                blk = self.free.pop()
            elif self.idle:  # the least recently released named block: its name goes
                blk, _ = self.idle.popitem(last=False)
                del self.by_name[self.name_of.pop(blk)]
            else:
                raise ResourceError("paged cache exhausted (a reservation was not honoured)")
            self.refs[blk] = 1
            table.append(blk)
            self.reserved -= 1

    def release(self, table: list[int], unused_reservation: int = 0) -> None:
        """Give a finished or aborted sequence's blocks (and what it had promised but not taken) back."""
        for blk in reversed(table):
            self.refs[blk] -= 1
            if self.refs[blk] == 0:
                if blk in self.name_of:
                    self.idle[blk] = None
                else:
                    self.free.append(blk)
        self.reserved -= unused_reservation
        table.clear()

    def rows(self, table: list[int], end: int) -> torch.Tensor:
        """Pool rows (end,) int64 of positions [0, end) of the sequence with this block table: block j of the
        table covers pool rows [table[j]·B, table[j]·B + B), one tensor op per sequence, not one per position."""
        b = self.block_size
        need = -(-end // b)  # the blocks that hold [0, end)
        if len(table) < need:
            raise RuntimeError(f"block table holds {len(table)} blocks, positions [0, {end}) need {need}")
        blocks = torch.tensor(table[:need], dtype=torch.long)
        return (blocks[:, None] * b + torch.arange(b)).view(-1)[:end]

    def nbytes(self) -> int:
        pools = self.kv + self.pe + [t for layer in self.ik for t in layer.values()]
        return sum(t.numel() * t.element_size() for t in pools)
