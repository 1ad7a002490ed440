"""What a config costs: parameter counts (total, activated per token, MTP) and KV-cache bytes (V3.2's indexer in both).

Counts come from the model itself, built on the meta device (free even at 671B),
so they are the parameters dsv3 would load -- FP8 block scales excluded. Activated parameters are
given three ways: everything a token touches, without the input embedding (a row lookup, not a
matmul: the convention of DeepSeek's model cards, 37B for V3, 2.4B for V2-Lite), and without
embedding and output head.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelArgs
from dsv3.indexer import Indexer
from dsv3.layers import Linear, RMSNorm
from dsv3.model import Block
from dsv3.mtp import MTPModule


def _numel(module: torch.nn.Module) -> int:
    return sum(p.numel() for n, p in module.named_parameters() if not n.endswith("scale"))


def param_counts(args: ModelArgs) -> dict[str, int]:
    # one block of each kind (dense, MoE) and one MTP module, on the meta device: a 61-layer model of
    # 384 experts is 70k modules, one block per kind a few hundred (same counts, a fraction of the time)
    with torch.device("meta"):
        blocks = {kind: Block(i, args) for i, kind in _first_of_each_kind(args)}
        mtp_module = MTPModule(Block(args.n_layers, args), args)
        embed = _numel(torch.nn.Embedding(args.vocab_size, args.dim))
        head = _numel(Linear(args.dim, args.vocab_size))
        norm = _numel(RMSNorm(args.dim))
    total = active = embed + head + norm
    for i in range(args.n_layers):
        blk = blocks[args.is_moe_layer(i)]
        total += _numel(blk)
        active += _numel(blk) - _moe_inactive(blk.ffn, args)
    return {
        "total_params": total,
        "active_params": active,
        # the model cards' convention: V3 "37B activated" is 36.63B here, V2-Lite "2.4B" is 2.45B (docs/family.md)
        "active_params_without_embedding": active - embed,
        "active_params_without_embedding_and_head": active - embed - head,
        "mtp_params": _numel(mtp_module) * args.n_mtp_layers,
        "mtp_params_per_module": _numel(mtp_module),
        "embedding_params": embed,
    }


def _first_of_each_kind(args: ModelArgs) -> list[tuple[int, bool]]:
    """(layer id, is MoE) of the first dense and the first MoE layer the model has."""
    ids = {args.is_moe_layer(i): i for i in reversed(range(args.n_layers))}
    return [(i, kind) for kind, i in ids.items()]


def _moe_inactive(ffn: torch.nn.Module, args: ModelArgs) -> int:
    experts = getattr(ffn, "experts", None)
    if experts is None:
        return 0
    per_expert = _numel(experts[0])
    return per_expert * (args.n_routed_experts - args.n_activated_experts)


def kv_cache_bytes_per_token(args: ModelArgs, naive: bool = False, bytes_per_value: int = 2, mtp: bool = False) -> int:
    """Cache bytes per token over all main-model layers (+ the MTP modules' with `mtp`; bf16 by default),
    V3.2's indexer keys included as the model caches them (`index_cache_bytes_per_token`, FP8 with index_fp8)."""
    if naive:
        per_layer = args.n_heads * (args.qk_head_dim + args.v_head_dim)
    else:
        per_layer = args.kv_lora_rank + args.qk_rope_head_dim
    layers = args.n_layers + (args.n_mtp_layers if mtp else 0)
    index = index_cache_bytes_per_token(args, fp8=args.index_fp8, bytes_per_value=bytes_per_value, mtp=mtp)
    return per_layer * bytes_per_value * layers + index


def index_cache_bytes_per_token(args: ModelArgs, fp8: bool = False, bytes_per_value: int = 2, mtp: bool = False) -> int:
    """V3.2's indexer key cache per token over all layers: index_head_dim values (bf16 by default), or with `fp8`
    DeepSeek's serving layout, 1 B per value + one float32 scale per block (128 + 4 B per layer at 671B)."""
    if not args.index_n_heads:
        return 0
    d = args.index_head_dim
    per_layer = d + 4 * -(-d // args.block_size) if fp8 else d * bytes_per_value
    return per_layer * (args.n_layers + (args.n_mtp_layers if mtp else 0))


def info(args: ModelArgs) -> dict[str, int]:
    out = param_counts(args)
    out["kv_cache_bytes_per_token"] = kv_cache_bytes_per_token(args)
    out["kv_cache_bytes_per_token_naive"] = kv_cache_bytes_per_token(args, naive=True)
    if args.index_n_heads:  # V3.2: the indexer's parameters are in the counts above; its keys in the cache
        out["index_params_per_layer"] = index_params_per_layer(args)
        out["index_cache_bytes_per_token"] = index_cache_bytes_per_token(args)
        out["index_cache_bytes_per_token_fp8"] = index_cache_bytes_per_token(args, fp8=True)
    return out


def index_params_per_layer(args: ModelArgs) -> int:
    """Parameters of one layer's lightning indexer (V3.2), counted on the meta device."""
    with torch.device("meta"):
        return _numel(Indexer(args))
