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

`load_model_parallel` opens the same Hugging Face directory on every rank and reads
only that rank's slices (`safe_open(...).get_slice`), FP8 block scales sliced in
blocks with their weights. World sizes that do not divide the heads, experts,
vocabulary or FP8 blocks are rejected before any tensor is read; a failure on any
rank is exchanged (`dsv3.distributed.agree`) so that every rank raises the failing rank's message.
The torchrun runtime itself (init/teardown, broadcast, run_distributed) is `dsv3.distributed`.
"""

from __future__ import annotations

import contextlib
import functools
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.distributed import agree
from dsv3.errors import CheckpointError, ConfigError, Dsv3Error

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
                f"(--dtype bf16 or fp32; load_model_parallel(..., dtype=...)): {', '.join(map(str, dequantised))}")
    elif len(valid) > 1:
        msg += f"Valid world sizes: {', '.join(map(str, valid))}"
    elif len(dequantised) > 1:
        msg += (f"No world size > 1 keeps its FP8 blocks whole; dequantised at load (--dtype bf16 or fp32; "
                f"load_model_parallel(..., dtype=...)) valid world sizes are {', '.join(map(str, dequantised))}")
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
    from dsv3.checkpoint import block_shard_dims
    from dsv3.moe import MoE

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


# ---------------------------------------------------------------------- per-rank loading
_EXPERT = re.compile(r"\.ffn\.experts\.(\d+)\.")


def _read_rank(path: Path, args: ModelArgs, rank: int, world: int,
               dtype: torch.dtype | None, device, check_weights: bool = False) -> nn.Module:
    from dsv3.checkpoint import compute_dtype, scan, weight_map
    from dsv3.model import Transformer

    wm = weight_map(path)
    cast_to = dtype or compute_dtype(scan(path).values())  # one compute dtype, as load_model (headers only)
    with torch.device("meta"):
        model = Transformer(args)
    shard_model(model, rank, world)
    expected = model.state_dict()
    todo, scales = _rank_plan(path, args, wm, expected, rank, world)
    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        slices = _RankSlices(path, wm, args, rank, world, dtype, check_weights, stack)
        # file by file, so each shard's pages are touched once
        for ours in sorted(todo, key=lambda o: wm[todo[o][0]]):
            hf_name, dim = todo[ours]
            fname = wm[hf_name]
            try:
                t = slices.read(slices.handle(fname), hf_name, dim, tuple(expected[ours].shape))
                if t.dtype == torch.float8_e4m3fn and expected[ours].dtype != torch.float8_e4m3fn:
                    s_hf = scales.get(ours[: -len(".weight")] + ".scale")
                    if s_hf is None:
                        raise CheckpointError(f"{path}: FP8 tensor {hf_name} has no weight_scale_inv")
                    t = slices.dequant(t, s_hf, dim, tuple(expected[ours].shape))
                elif t.is_floating_point() and t.dtype != torch.float8_e4m3fn \
                        and not ours.endswith((".scale", "gate.bias")):
                    t = t.to(cast_to)
            except Dsv3Error:
                raise
            except Exception as e:
                raise CheckpointError(f"{path / fname}: cannot read {hf_name} ({e})") from None
            state[ours] = t.to(device)
    model.load_state_dict(state, assign=True, strict=True)
    model.rotary._table = None
    return model.eval()


def _rank_plan(path: Path, args: ModelArgs, wm: dict[str, str], expected: dict[str, torch.Tensor],
               rank: int, world: int) -> tuple[dict[str, tuple[str, int | None]], dict[str, str]]:
    """(dsv3 name -> (HF name, shard dim) for every tensor this rank reads, dsv3 scale name -> HF name for the
    FP8 scales dequantised at load); CheckpointError naming the missing and unexpected tensors."""
    from dsv3.checkpoint import hf_layer_index, hf_to_dsv3

    mine = local_experts(args.n_routed_experts, rank, world)
    todo: dict[str, tuple[str, int | None]] = {}  # dsv3 name -> (HF name, shard dim)
    scales: dict[str, str] = {}  # scale of an FP8 weight dequantised at load
    unexpected = []
    for hf_name in wm:
        r = hf_to_dsv3(hf_name, args)
        if r is None:
            layer = hf_layer_index(hf_name)
            if not (layer is not None and layer >= args.n_layers + args.n_mtp_layers):
                unexpected.append(hf_name)
            continue
        ours, dim = r
        if ours.startswith("mtp-copy:"):
            continue  # the MTP layer's copies of embedding/head: the main ones are used
        e = _EXPERT.search(ours)
        if e and int(e.group(1)) not in mine:
            continue  # another rank's expert
        if ours in expected:
            todo[ours] = (hf_name, dim)
        elif ours.endswith(".scale") and ours[: -len(".scale")] + ".weight" in expected:
            scales[ours] = hf_name
        else:
            unexpected.append(hf_name)
    missing = sorted(set(expected) - set(todo))
    if missing or unexpected:
        parts = [f"{path}: checkpoint does not match config.json (rank {rank} of {world})"]
        for what, names in (("missing", missing), ("unexpected", unexpected)):
            if names:
                more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
                parts.append(f"{len(names)} {what} tensor(s): {', '.join(names[:8])}{more}")
        raise CheckpointError("; ".join(parts))
    return todo, scales


class _RankSlices:
    """This rank's slices of the checkpoint's tensors, read with `safe_open(...).get_slice` from shards
    opened once each (memory-mapped, closed with `stack`)."""

    def __init__(self, path: Path, wm: dict[str, str], args: ModelArgs, rank: int, world: int,
                 dtype: torch.dtype | None, check_weights: bool, stack: contextlib.ExitStack):
        self.path, self.wm, self.args, self.rank, self.world = path, wm, args, rank, world
        self.dtype, self.check_weights, self.stack = dtype, check_weights, stack
        self.handles: dict[str, object] = {}  # shard file -> open safetensors handle (memory-mapped)

    def handle(self, fname: str):
        from safetensors import safe_open

        if fname not in self.handles:
            try:
                self.handles[fname] = self.stack.enter_context(safe_open(self.path / fname, "pt"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{self.path / fname}: cannot read ({e})") from None
        return self.handles[fname]

    def read(self, f, hf_name: str, dim: int | None, local_shape: tuple[int, ...]) -> torch.Tensor:
        from dsv3.checkpoint import check_finite

        path, rank, world = self.path, self.rank, self.world
        sl = f.get_slice(hf_name)
        full = tuple(sl.get_shape())
        want = list(local_shape)
        if dim is not None:
            want[dim] *= world
        if full != tuple(want):
            raise CheckpointError(f"{path}: tensor {hf_name} has shape {full}, expected {tuple(want)} from config.json")
        if dim is None:
            t = sl[:]
        else:
            n = local_shape[dim]
            t = sl[rank * n:(rank + 1) * n] if dim == 0 else sl[:, rank * n:(rank + 1) * n]
        if self.check_weights:  # this rank's slice only: together the ranks cover every value once
            check_finite(t, path / self.wm[hf_name], hf_name,
                         "" if dim is None else f" of rank {rank}'s slice (dim {dim}, {rank * n}..{(rank + 1) * n - 1})")
        return t

    def dequant(self, t: torch.Tensor, s_hf: str, dim: int | None, local_shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's slice `t` of an FP8 weight, dequantised. A slice that starts or ends inside a
        scale block (e.g. 64 of 128 rows) is fine here: the whole scale tensor is tiny, read it all."""
        from dsv3.fp8 import weight_dequant

        bs, out = self.args.block_size, self.dtype or torch.bfloat16
        if dim is None or local_shape[dim] % bs == 0:
            s = self.read(self.handle(self.wm[s_hf]), s_hf, dim, tuple(-(-x // bs) for x in t.shape))
            return weight_dequant(t, s, bs, out)
        full = list(local_shape)
        full[dim] *= self.world
        s = self.read(self.handle(self.wm[s_hf]), s_hf, None, tuple(-(-x // bs) for x in full))
        rows, cols = torch.arange(t.shape[0]), torch.arange(t.shape[1])
        if dim == 0:
            rows = rows + self.rank * t.shape[0]
        else:
            cols = cols + self.rank * t.shape[1]
        scale = s[rows // bs][:, cols // bs]  # (rows, cols): each value's block scale
        return (t.float() * scale).to(out)  # as weight_dequant computes it: the same values as one process


def load_model_parallel(path, group, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
                        check_weights: bool = False, **overrides) -> nn.Module:
    """This rank's share of a Hugging Face DeepSeek-V3 directory, with the collectives in place.

    Every rank calls it with the same arguments. Only this rank's slices are read; with `dtype`
    FP8 weights are dequantised at load, so their slices need not be whole 128-blocks.
    `check_weights`: each rank scans the slices it reads for NaN/Inf (together: every value once).
    If any rank fails (bad config, world size that does not divide, missing or
    unreadable shard, out of memory), every rank raises `DistributedError` carrying
    the first failing rank's message; the exchange is bounded by the group's timeout.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    err: str | None = None
    model = None
    try:
        from dsv3.checkpoint import check_directory

        path = check_directory(path)  # the single process's words for a missing or unreadable directory
        args = ModelArgs.from_hf_config(path)
        ckpt_fp8 = args.dtype == "fp8"
        # before any tensor is read: the sizes must split (FP8 kept as FP8: in whole scale blocks;
        # dequantised at load, any row/column boundary works)
        check_world_size(args, world, fp8_blocks=ckpt_fp8 and dtype is None, source=str(path))
        if dtype is not None and ckpt_fp8:
            overrides.setdefault("dtype", "bf16")  # dequantise at load, as load_model does
        if overrides:
            args = args.replace(**overrides)
        model = _read_rank(path, args, rank, world, dtype, device, check_weights)
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        err = str(e) if isinstance(e, Dsv3Error) else f"{type(e).__name__}: {e}"
    agree(err, group)
    return add_collectives(model, group)
