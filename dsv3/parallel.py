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
rank is exchanged so that every rank raises the failing rank's message.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dsv3.config import ModelArgs
from dsv3.errors import CheckpointError, ConfigError, DistributedError, Dsv3Error

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


def _shard_block(block: nn.Module, rank: int, world: int) -> None:
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
        _shard_block(block, rank, world)
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
    from safetensors import safe_open

    from dsv3.checkpoint import _LAYER_PREFIX, check_finite, compute_dtype, hf_to_dsv3, scan, weight_map
    from dsv3.fp8 import weight_dequant
    from dsv3.model import Transformer

    wm = weight_map(path)
    cast_to = dtype or compute_dtype(scan(path).values())  # one compute dtype, as load_model (headers only)
    with torch.device("meta"):
        model = Transformer(args)
    shard_model(model, rank, world)
    expected = model.state_dict()
    mine = local_experts(args.n_routed_experts, rank, world)
    todo: dict[str, tuple[str, int | None]] = {}  # dsv3 name -> (HF name, shard dim)
    scales: dict[str, str] = {}  # scale of an FP8 weight dequantised at load
    unexpected = []
    for hf_name in wm:
        r = hf_to_dsv3(hf_name, args)
        if r is None:
            m = _LAYER_PREFIX.match(hf_name)
            if not (m and int(m.group(1)) >= args.n_layers + args.n_mtp_layers):
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

    def read(f, hf_name: str, dim: int | None, local_shape: tuple[int, ...]) -> torch.Tensor:
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
        if check_weights:  # this rank's slice only: together the ranks cover every value once
            check_finite(t, path / wm[hf_name], hf_name,
                         "" if dim is None else f" of rank {rank}'s slice (dim {dim}, {rank * n}..{(rank + 1) * n - 1})")
        return t

    def dequant(t: torch.Tensor, s_hf: str, dim: int | None, local_shape: tuple[int, ...]) -> torch.Tensor:
        """This rank's slice `t` of an FP8 weight, dequantised. A slice that starts or ends inside a
        scale block (e.g. 64 of 128 rows) is fine here: the whole scale tensor is tiny, read it all."""
        bs, out = args.block_size, dtype or torch.bfloat16
        if dim is None or local_shape[dim] % bs == 0:
            s = read(handle(wm[s_hf]), s_hf, dim, tuple(-(-x // bs) for x in t.shape))
            return weight_dequant(t, s, bs, out)
        full = list(local_shape)
        full[dim] *= world
        s = read(handle(wm[s_hf]), s_hf, None, tuple(-(-x // bs) for x in full))
        rows, cols = torch.arange(t.shape[0]), torch.arange(t.shape[1])
        if dim == 0:
            rows = rows + rank * t.shape[0]
        else:
            cols = cols + rank * t.shape[1]
        scale = s[rows // bs][:, cols // bs]  # (rows, cols): each value's block scale
        return (t.float() * scale).to(out)  # as weight_dequant computes it: the same values as one process

    handles: dict[str, object] = {}  # shard file -> open safetensors handle (memory-mapped)

    def handle(fname: str):
        if fname not in handles:
            try:
                handles[fname] = stack.enter_context(safe_open(path / fname, "pt"))
            except Exception as e:  # safetensors raises its own error types
                raise CheckpointError(f"{path / fname}: cannot read ({e})") from None
        return handles[fname]

    state: dict[str, torch.Tensor] = {}
    with contextlib.ExitStack() as stack:
        # file by file, so each shard's pages are touched once
        for ours in sorted(todo, key=lambda o: wm[todo[o][0]]):
            hf_name, dim = todo[ours]
            fname = wm[hf_name]
            try:
                t = read(handle(fname), hf_name, dim, tuple(expected[ours].shape))
                if t.dtype == torch.float8_e4m3fn and expected[ours].dtype != torch.float8_e4m3fn:
                    s_hf = scales.get(ours[: -len(".weight")] + ".scale")
                    if s_hf is None:
                        raise CheckpointError(f"{path}: FP8 tensor {hf_name} has no weight_scale_inv")
                    t = dequant(t, s_hf, dim, tuple(expected[ours].shape))
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


def checked_on_every_rank(fn, group):
    """`fn()` (argument checks) on every rank, then one exchange: if it raised a `Dsv3Error` on any
    rank, every rank raises (the message unchanged when every rank failed alike), so no rank goes on
    into a collective that the others never reach. Returns fn's result."""
    if group is None:
        return fn()
    err, out = None, None
    try:
        out = fn()
    except Dsv3Error as e:
        err = e
    try:
        agree(None if err is None else str(err), group)
    except DistributedError:
        if err is not None and rank_of(group) == 0:
            raise err from None  # rank 0's own error, worded as a single process words it
        raise
    return out


def agree(err: str | None, group) -> None:
    """Collective: raise DistributedError on every rank if any rank passed an error message."""
    import torch.distributed as dist

    msgs: list[str | None] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(msgs, err, group=group)
    except Exception as e:  # noqa: BLE001 - a rank died or stalled past the group's timeout
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {dist.get_rank(group)}: the other ranks did not report back ({first})"
                               + (f"; this rank's own error: {err}" if err else ""), rank=0) from None
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if len(failed) == len(msgs) and len(set(msgs)) == 1:
        # the same error everywhere (a bad config, world size or argument): say it as one process would
        raise DistributedError(msgs[0], rank=dist.get_rank(group))
    if failed:
        r, m = failed[0]
        more = f" ({len(failed) - 1} more rank(s) failed too)" if len(failed) > 1 else ""
        raise DistributedError(f"rank {r} of {len(msgs)} failed: {m}{more}", rank=dist.get_rank(group))


# ---------------------------------------------------------------------- launching
def maybe_init_distributed(timeout_s: float | None = None):
    """Under torchrun (WORLD_SIZE > 1): init the default group (nccl on CUDA, gloo on CPU), return it.

    Returns None for a plain single process. DSV3_DIST_BACKEND=gloo forces CPU ranks on a GPU machine
    (the tests do). The timeout (env DSV3_DIST_TIMEOUT, seconds, default
    300) bounds every collective, so a rank that dies or stalls cannot hang the others forever.
    """
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        timeout_s = timeout_s or dist_timeout_s()
        backend = os.environ.get("DSV3_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"DSV3_DIST_BACKEND must be 'nccl' or 'gloo', got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def dist_timeout_s() -> float:
    """The collective timeout in seconds: env DSV3_DIST_TIMEOUT, default 300."""
    raw = os.environ.get("DSV3_DIST_TIMEOUT", "300")
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise ConfigError(f"DSV3_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return t


def current_group():
    """The default process group when this process runs under torchrun with WORLD_SIZE > 1, else None."""
    d = torch.distributed
    return d.group.WORLD if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None


def run_distributed(fn, *args, **kwargs) -> int:
    """Run a command `fn(*args, **kwargs) -> int` on every rank of a torchrun launch (or plainly, alone).

    Rank 0 owns the terminal: other ranks' stdout goes to /dev/null, and a `Dsv3Error` (a usage error
    that every rank finds alike, or a `DistributedError` that every rank raises with the same message)
    is printed by rank 0 only; the other ranks exit with the same code 2, silently. The group is torn
    down after.

    A collective that fails mid-run (a rank stopped or killed: gloo times out after DSV3_DIST_TIMEOUT
    seconds, or finds the connection closed) ends the command on every rank that is still alive:
    rank 0 asks the others over a separate control group which of them are still there, and raises
    one `DistributedError` naming the ranks that did not report back and the timeout.
    """
    import contextlib
    import io

    try:
        group = maybe_init_distributed()
    except Dsv3Error:
        if os.environ.get("RANK", "0") != "0":
            return 2  # e.g. a bad DSV3_DIST_TIMEOUT: every rank finds it, rank 0 says it
        raise
    quiet = group is not None and rank_of(group) != 0
    # made while every rank is known to be alive: after a failure it is the one channel left to ask on
    # (gloo also beside NCCL; where gloo cannot connect, failures are still reported, without names)
    control = None
    if group is not None:
        with contextlib.suppress(RuntimeError):
            control = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=dist_timeout_s()))
    together, reporting = True, []
    restore = _stop_on_sigterm(reporting) if group is not None and not quiet else None
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return fn(*args, **kwargs)
    except Dsv3Error:
        if quiet:
            return 2  # rank 0 prints the message once
        raise
    except RuntimeError as e:
        if group is None or not _is_comm_error(e):
            raise  # a bug, not a lost rank: keep its traceback
        reporting.append(True)
        together = False  # a rank is gone: a farewell barrier would only wait out the timeout again
        err = _lost_ranks_error(e, group, control)
        if quiet:
            return 2
        raise err from None
    finally:
        if restore is not None:
            restore()
        shutdown(group, together=together)


def _stop_on_sigterm(reporting: list):
    """On rank 0: turn torchrun's SIGTERM (sent when another rank exited, e.g. was killed) into a failed
    collective, so that rank 0 still says which rank is gone instead of dying silently; while it is
    already reporting, the SIGTERM waits for the report. Returns the function that restores the handler."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        if not reporting:
            raise torch.distributed.DistError("SIGTERM from torchrun (it stops every worker once one has exited)")

    old = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, old)


def _is_comm_error(e: RuntimeError) -> bool:
    """A failed collective (gloo raises plain RuntimeErrors naming its sources; NCCL a DistError)."""
    return isinstance(e, torch.distributed.DistError) or "/gloo/" in str(e)


def _lost_ranks_error(e: RuntimeError, group, control, grace_s: float = 5.0) -> DistributedError:
    """After a failed collective: every rank that is still alive tells rank 0 so over `control`; rank 0
    waits up to `grace_s` (at most the timeout) for them and names the ranks that did not report back.

    The ranks still alive are all blocked in the same step's collectives, so their own timeouts fire
    within about one step of rank 0's: a few seconds of grace reach all of them.
    """
    import torch.distributed as dist

    rank, world, timeout = dist.get_rank(group), dist.get_world_size(group), dist_timeout_s()
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # gloo's "[.../pair.cc:553] Connection closed by peer [addr]:port. This is typically caused by ...":
    # keep the what, drop the source position and the boilerplate advice
    cause = re.split(r"\. (?=[A-Z])", re.sub(r"^\[[^\]]*\] ", "", cause))[0]
    if control is None:
        return DistributedError(f"a collective failed (DSV3_DIST_TIMEOUT = {timeout:g} s; a rank stopped or died, "
                                f"which one is unknown: no control group): {cause}", rank=rank)
    if rank != 0:
        with contextlib.suppress(Exception):  # rank 0 may be the one that is gone
            dist.send(torch.tensor([rank]), dst=0, group=control)
        return DistributedError(cause, rank=rank)
    deadline = time.monotonic() + min(grace_s, timeout)
    works, missing = {}, []
    for r in range(1, world):
        try:
            works[r] = dist.irecv(torch.zeros(1, dtype=torch.long), src=r, group=control)
        except Exception:  # noqa: BLE001 - that rank's connection is already closed: it died
            missing.append(r)
    for r, w in works.items():
        try:
            w.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.01)))
        except Exception:  # noqa: BLE001 - timed out, or that rank's connection closed meanwhile
            missing.append(r)
    missing.sort()
    who = (f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}") if missing else None
    if who:
        return DistributedError(f"{who} of {world} did not report back (collectives time out after "
                                f"DSV3_DIST_TIMEOUT = {timeout:g} s; stopped or died during the run): {cause}")
    return DistributedError(f"a collective failed on rank 0 though every rank reported back afterwards "
                            f"(DSV3_DIST_TIMEOUT = {timeout:g} s): {cause}")


def shared_seed(seed: int | None, group) -> int | None:
    """The same sampling seed on every rank (rank 0 draws one if none was given): ranks must sample alike."""
    if group is None or seed is not None:
        return seed
    return broadcast_object(int(torch.randint(2**31, ()).item()), group)


def device_for(group) -> torch.device:
    """Where this rank's weights go: its local GPU under NCCL, else the CPU."""
    if group is not None and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_of(group) -> int:
    return 0 if group is None else torch.distributed.get_rank(group)


def broadcast_object(obj, group, src: int = 0):
    """Rank src's `obj` on every rank (prompts, seeds: rank 0 owns the terminal and files)."""
    if group is None:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


def shutdown(group, together: bool = True) -> None:
    """Tear the default group down; `together=False` skips the farewell barrier (a rank is gone)."""
    if group is not None and torch.distributed.is_initialized():
        # leave together: a rank that tears down its store/threads while another still talks to them
        # can abort the other at exit
        if together:
            with contextlib.suppress(Exception):
                torch.distributed.barrier(group)
        torch.distributed.destroy_process_group()
