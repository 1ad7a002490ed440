"""Tensor and expert parallelism, applied to the single-device model after construction.

The model code never knows it is sharded: local sizes are read from tensors, so
cutting the parameters and adding the collectives is enough. For a world of N
ranks, rank r holds

    attention      wq / wq_b / wkv_b rows of its n_heads/N heads (column-parallel),
                   wo columns of those heads (row-parallel)    -> all-reduce of the MLA output
                   wq_a, wkv_a, the norms: replicated; so is the latent cache (b, t, c + r)
    dense MLP,     w1 / w3 rows, w2 columns (f/N each)         -> all-reduce of the MLP output
    shared experts
    routed experts experts r·E/N .. (r+1)·E/N - 1, whole; the others are None
                   (the gate is replicated, every rank routes every token identically)
                   -> one all-reduce of the MoE output (routed partial + shared partial)
    embedding      rows r·v/N .. of the vocabulary: masked lookup -> all-reduce
    head           the same rows: local logits -> all-gather along v

so one decoder block costs two all-reduces of (b, s, m) activations.

Sharding is the only place that knows about ranks: `shard_model(model, rank, world)`
narrows parameters (real or on the meta device), `add_collectives(model, group)` adds
the communication as forward hooks (and the vocabulary-parallel embedding module),
with the process group passed in -- no module-level world size.

Loading one rank's share is `dsv3.checkpoint.load_model(path, group=...)`: it builds the meta model,
cuts it here (`shard_model`), reads only the rank's slices and adds the collectives (`add_collectives`).
World sizes that do not divide the heads, experts, vocabulary or FP8 blocks are rejected
(`check_world_size`) before any tensor is read. The torchrun runtime itself (init/teardown, broadcast,
agree, run_distributed) is `dsv3.distributed`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.errors import ConfigError
from dsv3.moe import MoE
from dsv3.names import block_shard_dims

# ---------------------------------------------------------------------- validation


def _split_reasons(args: ModelArgs, world: int, fp8_blocks: bool) -> list[str]:
    """Why `world` ranks cannot split this model (empty when they can)."""
    if world == 1:
        return []  # nothing is cut: partial FP8 blocks are fine in one process
    out = []

    def need(size: int, what: str) -> None:
        if size % world:
            out.append(f"{what} = {size} is not divisible by {world}")
        elif fp8_blocks and (size // world) % args.block_size:
            out.append(f"{what} = {size} gives {size // world} per rank, not a multiple of the FP8 block "
                       f"size {args.block_size}")

    has_moe = args.n_layers > args.n_dense_layers or args.n_mtp_layers > 0
    if args.n_heads % world:
        out.append(f"n_heads = {args.n_heads} is not divisible by {world}")
    else:
        h = args.n_heads
        need(h * args.qk_head_dim, "query rows (n_heads * qk_head_dim)")
        need(h * (args.qk_nope_head_dim + args.v_head_dim), "wkv_b rows (n_heads * (qk_nope + v_head_dim))")
        need(h * args.v_head_dim, "wo columns (n_heads * v_head_dim)")
    if args.vocab_size % world:
        out.append(f"vocab_size = {args.vocab_size} is not divisible by {world}")
    if args.n_dense_layers > 0:
        need(args.inter_dim, "inter_dim")
    if has_moe:
        if args.n_routed_experts % world:
            out.append(f"n_routed_experts = {args.n_routed_experts} is not divisible by {world}")
        if args.n_shared_experts:
            need(args.n_shared_experts * args.moe_inter_dim, "shared-expert width (n_shared_experts * moe_inter_dim)")
    return out


def valid_world_sizes(args: ModelArgs, fp8_blocks: bool | None = None) -> list[int]:
    """Every world size that splits the model (at most n_heads, since each rank needs a head)."""
    fp8_blocks = args.dtype == "fp8" if fp8_blocks is None else fp8_blocks
    return [n for n in range(1, args.n_heads + 1) if not _split_reasons(args, n, fp8_blocks)]


def check_world_size(args: ModelArgs, world: int, fp8_blocks: bool | None = None, source: str = "config") -> None:
    """Raise ConfigError naming what does not divide and the world sizes that would work."""
    fp8_blocks = args.dtype == "fp8" if fp8_blocks is None else fp8_blocks
    if not isinstance(world, int) or world < 1:
        raise ConfigError(f"world size must be a positive integer, got {world!r}")
    reasons = _split_reasons(args, world, fp8_blocks)
    if not reasons:
        return
    msg = f"{source}: cannot split the model over {world} ranks: {'; '.join(reasons)}. "
    valid = valid_world_sizes(args, fp8_blocks)
    dequantised = valid_world_sizes(args, False) if fp8_blocks else valid
    if fp8_blocks and world in dequantised:
        # the FP8 blocks are the only obstacle: dequantised at load, each rank cuts any row/column
        msg += (f"Valid world sizes with FP8 weights: {', '.join(map(str, valid))}; dequantised at load "
                f"(--dtype bf16 or fp32; load_model(..., group=..., dtype=...)): {', '.join(map(str, dequantised))}")
    elif len(valid) > 1:
        msg += f"Valid world sizes: {', '.join(map(str, valid))}"
    elif len(dequantised) > 1:
        msg += (f"No world size > 1 keeps its FP8 blocks whole; dequantised at load (--dtype bf16 or fp32; "
                f"load_model(..., group=..., dtype=...)) valid world sizes are {', '.join(map(str, dequantised))}")
    else:
        msg += "No world size > 1 splits this model: run it as a single process (without torchrun)"
    raise ConfigError(msg)


# ---------------------------------------------------------------------- sharding


def local_experts(n_experts: int, rank: int, world: int) -> range:
    per = n_experts // world
    return range(rank * per, (rank + 1) * per)


def rank_layout(args: ModelArgs, rank: int, world: int) -> dict[str, range]:
    """What rank `rank` of `world` holds, as index ranges into the full model's axes (for docs and pictures)."""
    def part(n: int) -> range:
        return range(rank * n // world, (rank + 1) * n // world)
    return {"heads": part(args.n_heads), "experts": local_experts(args.n_routed_experts, rank, world),
            "vocab": part(args.vocab_size), "inter_dim": part(args.inter_dim),
            "shared_inter": part(args.n_shared_experts * args.moe_inter_dim)}


def _narrow(t: torch.Tensor, dim: int, rank: int, world: int) -> torch.Tensor:
    n = t.shape[dim] // world
    return t.narrow(dim, rank * n, n).clone()  # clone: drop the full storage (free on meta)


def _shard_linear(lin: nn.Module, dim: int, rank: int, world: int) -> None:
    lin.weight = nn.Parameter(_narrow(lin.weight, dim, rank, world), requires_grad=lin.weight.requires_grad)
    if lin.scale is not None:  # FP8 block scales: the same rows/columns, counted in blocks
        lin.scale = nn.Parameter(_narrow(lin.scale, dim, rank, world), requires_grad=False)
    lin.out_features, lin.in_features = lin.weight.shape


def shard_block(block: nn.Module, rank: int, world: int) -> None:
    for path, dim in block_shard_dims().items():  # the checkpoint's name table says which Linears split how
        lin = _submodule(block, path)
        if lin is not None:  # e.g. no wq with q-LoRA, no ffn.w1 in an MoE block
            _shard_linear(lin, dim, rank, world)
    block.attn._absorb_cache = None
    ffn = block.ffn
    if isinstance(ffn, MoE):
        mine = local_experts(len(ffn.experts), rank, world)
        for i in range(len(ffn.experts)):
            if i not in mine:
                ffn.experts[i] = None


def _submodule(root: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        root = getattr(root, name, None)
        if root is None:
            return None
    return root


class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + v/N) of the embedding: tokens outside give zeros, an all-reduce fills them in."""

    def __init__(self, weight: torch.Tensor, start: int, group=None):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=weight.requires_grad)
        self.start, self.group = start, group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.start
        inside = (local >= 0) & (local < self.weight.shape[0])
        y = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        y = y.masked_fill(~inside[..., None], 0)
        if self.group is not None:
            torch.distributed.all_reduce(y, group=self.group)
        return y

    def extra_repr(self) -> str:
        return f"rows {self.start}..{self.start + self.weight.shape[0] - 1}, dim={self.weight.shape[1]}"


def shard_model(model: nn.Module, rank: int, world: int) -> nn.Module:
    """Cut `model` (a Transformer, real or on meta) in place down to rank `rank`'s share of `world` ranks.

    No communication is added: the result computes rank-local partial results (see add_collectives).
    """
    if world == 1:
        return model
    check_world_size(model.args, world, fp8_blocks=model.args.dtype == "fp8")
    for block in list(model.layers) + [m.block for m in model.mtp]:
        shard_block(block, rank, world)
    v_local = model.embed.weight.shape[0] // world
    model.embed = VocabParallelEmbedding(_narrow(model.embed.weight, 0, rank, world), rank * v_local)
    _shard_linear(model.head, 0, rank, world)
    return model


def _all_reduce_output(module, inputs, output, *, group):
    torch.distributed.all_reduce(output, group=group)
    return output


def _all_gather_last(module, inputs, output, *, group):
    parts = [torch.empty_like(output) for _ in range(torch.distributed.get_world_size(group))]
    torch.distributed.all_gather(parts, output.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def add_collectives(model: nn.Module, group) -> nn.Module:
    """Add the communication a sharded model needs, as forward hooks on the existing modules."""
    if torch.distributed.get_world_size(group) == 1:
        return model
    reduce = functools.partial(_all_reduce_output, group=group)
    for block in list(model.layers) + [m.block for m in model.mtp]:
        block.attn.register_forward_hook(reduce)  # row-parallel wo: partial sums over local heads
        block.ffn.register_forward_hook(reduce)  # row-parallel w2 and/or this rank's experts
    model.embed.group = group
    model.head.register_forward_hook(functools.partial(_all_gather_last, group=group))
    return model


def parallelize(model: nn.Module, group) -> nn.Module:
    """shard_model + add_collectives for this process's rank in `group`."""
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    return add_collectives(shard_model(model, rank, world), group)
