"""Hugging Face DeepSeek-V3 checkpoints <-> dsv3 modules.

The name table (HF name -> dsv3 name, kind, shard dim) is `dsv3.names`; loading, saving
and per-rank slicing all go through it. FP8 checkpoints store `<linear>.weight` as
float8_e4m3fn next to `<linear>.weight_scale_inv` (float32, one per 128×128 block);
dsv3 calls the latter `<linear>.scale` and slices it along the same dimension, in blocks.

Loading (`load_model`) first checks everything it can without reading tensor data
(`check_checkpoint`: config <-> index <-> shard headers, missing/unexpected names,
shapes, dtypes, FP8 weights without scales), then streams: shards are memory-mapped
and each tensor is converted straight from the mapped bytes into its final place and
its pages released, so resident memory stays within the final model plus one tensor.
The safetensors headers and shards themselves are read by `dsv3.safetensors_io`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from dsv3.config import ModelArgs
from dsv3.distributed import agree
from dsv3.errors import CheckpointError, Dsv3Error
from dsv3.fp8 import weight_dequant
from dsv3.layers import column_major_
from dsv3.memory import check_fits
from dsv3.model import Transformer
from dsv3.names import (
    Kind,
    classify,
    dsv3_name_to_hf,
    hf_state,
    is_quantized_in_release,  # noqa: F401 (ck.is_quantized_in_release: the rule, as checkpoint readers know it)
    mtp_layers_present,
    stored_state,
)
from dsv3.parallel import add_collectives, check_world_size, shard_model
from dsv3.safetensors_io import (
    ShardReader,  # noqa: F401 (the reader every load goes through; tests patch ck.ShardReader.read)
    SliceReader,
    TensorInfo,
    by_file,
    group_names,
    iter_tensors,  # noqa: F401 (re-exported: dsv3.checkpoint.iter_tensors in the notebooks)
    official_layout_hint,
    scan,
    write_index,
    write_shard,
)


def default_checkpoint() -> Path:
    """The bundled small model the commands use without --ckpt (dsv3/assets/dsv3-tiny)."""
    path = BUNDLED_MODEL_DIR
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no --ckpt given and the bundled model {path} is not installed: pass --ckpt DIR "
                              "(a Hugging Face DeepSeek-V3 checkpoint directory with config.json and safetensors)")
    return path


BUNDLED_MODEL_DIR = Path(__file__).parent / "assets" / "dsv3-tiny"


@dataclass
class LoadPlan:
    """Everything `load_model` will do, decided before any tensor is read."""

    path: Path
    ckpt_args: ModelArgs  # as config.json says (dtype "fp8" for a quantized checkpoint)
    args: ModelArgs  # the model to build (dtype "bf16" when dequantising at load)
    tensors: dict[str, TensorInfo]  # HF name -> location
    mapping: dict[str, str] = field(default_factory=dict)  # dsv3 name -> HF name
    scales: dict[str, str] = field(default_factory=dict)  # dsv3 weight name -> HF scale name (dequantised at load)
    copies: dict[str, str] = field(default_factory=dict)  # HF name of an MTP copy -> dsv3 main name
    expected: dict[str, torch.Tensor] = field(default_factory=dict)  # dsv3 name -> meta tensor
    model: torch.nn.Module | None = None  # the model to load into, on the meta device (built once)

    @property
    def nbytes(self) -> int:
        return sum(self.tensors[h].nbytes for h in self.mapping.values())

    @property
    def compute_dtype(self) -> torch.dtype:
        """The one floating dtype the model computes in when no dtype is asked for (see `compute_dtype`)."""
        return compute_dtype(self.tensors[h] for h in self.mapping.values())


def compute_dtype(infos) -> torch.dtype:
    """The floating dtype holding most of the non-FP8 bytes: a stray float16/float32/float64 tensor among
    bf16 ones is cast to it at load (as transformers casts to one dtype) instead of failing at the first matmul.
    FP8 weights, block scales and the gate bias (float32 by definition) do not vote."""
    votes: dict[torch.dtype, int] = {}
    for i in infos:
        if i.dtype.is_floating_point and i.dtype != torch.float8_e4m3fn and not i.name.endswith(_FIXED_DTYPE):
            votes[i.dtype] = votes.get(i.dtype, 0) + i.nbytes
    return max(votes, key=votes.get) if votes else torch.bfloat16


_FIXED_DTYPE = ("weight_scale_inv", "e_score_correction_bias")  # HF names whose dtype is part of the format


def check_directory(path) -> Path:
    """The checkpoint directory as a Path, or a CheckpointError saying why it is not one (no tensor read)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such directory (expected a Hugging Face checkpoint with config.json)")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint with config.json)")
    if not os.access(path, os.R_OK | os.X_OK):
        raise CheckpointError(f"{path}: directory is not readable")
    if not (path / "config.json").is_file():
        raise CheckpointError(official_layout_hint(path)
                              or f"{path}: no config.json (expected a Hugging Face DeepSeek-V3 checkpoint)")
    return path


def check_checkpoint(path, dtype: torch.dtype | None = None, **overrides) -> LoadPlan:
    """Check a checkpoint against its config.json without reading any tensor data.

    Raises a `CheckpointError` (or `ConfigError`) naming the file/tensor and what was expected.
    """
    return plan_load(path, dtype, overrides)


def plan_load(path, dtype: torch.dtype | None, overrides: dict, rank: tuple[int, int] | None = None) -> LoadPlan:
    """`check_checkpoint`, building the meta model once; `rank` (rank, world) for one rank's share: the world
    size is checked against config.json first, and a name mismatch is worded per rank."""
    path = check_directory(path)
    ckpt_args = ModelArgs.from_hf_config(path)
    if rank is not None:
        # before any tensor is read: the sizes must split (FP8 kept as FP8: in whole scale blocks;
        # dequantised at load, any row/column boundary works)
        check_world_size(ckpt_args, rank[1], fp8_blocks=ckpt_args.dtype == "fp8" and dtype is None, source=str(path))
    tensors = scan(path)
    if ckpt_args.dtype != "fp8":
        scales = [n for n, i in tensors.items() if n.endswith(".weight_scale_inv") or i.dtype == torch.float8_e4m3fn]
        if scales:
            raise CheckpointError(f"{path}: {len(scales)} FP8 tensor(s) (e.g. {scales[0]}) but config.json has no "
                                  "quantization_config (expected bf16/fp32 weights, or an FP8 config)")
    if "n_mtp_layers" not in overrides:
        overrides = mtp_layers_present(ckpt_args, tensors, overrides)
    mtp_override = "n_mtp_layers" in overrides
    model_over = dict(overrides)
    if dtype is not None and ckpt_args.dtype == "fp8":
        model_over["dtype"] = "bf16"  # dequantise at load
    ckpt_args = ckpt_args.replace(**{k: v for k, v in overrides.items() if k != "dtype"}) if overrides else ckpt_args
    args = ckpt_args.replace(**model_over) if model_over else ckpt_args
    with torch.device("meta"):
        model = Transformer(args)
    plan = LoadPlan(path, ckpt_args, args, tensors, expected=model.state_dict(), model=model)
    ckpt_expected = plan.expected if args.dtype == ckpt_args.dtype else stored_state(plan.expected, ckpt_args)

    unexpected = _map_names(plan, ckpt_expected, mtp_override)
    missing = sorted(set(plan.expected) - set(plan.mapping))
    if ckpt_args.dtype == "fp8" and args.dtype != "fp8":
        quantized = {n[: -len(".scale")] + ".weight" for n in ckpt_expected if n.endswith(".scale")}
        missing += sorted(n[: -len(".weight")] + ".scale" for n in quantized if n not in plan.scales)
    if (missing or unexpected) and rank is not None:
        raise CheckpointError(_rank_mismatch_message(path, rank, missing, unexpected))
    if missing or unexpected:
        raise CheckpointError(_missing_message(path, ckpt_args, missing, unexpected))
    bad = _shape_dtype_problems(plan, ckpt_expected)
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{path}: " + "; ".join(bad[:3]) + more)
    return plan


def _rank_mismatch_message(path: Path, rank: tuple[int, int], missing: list[str], unexpected: list[str]) -> str:
    parts = [f"{path}: checkpoint does not match config.json (rank {rank[0]} of {rank[1]})"]
    for what, names in (("missing", missing), ("unexpected", unexpected)):
        if names:
            more = f" (+{len(names) - 8} more)" if len(names) > 8 else ""
            parts.append(f"{len(names)} {what} tensor(s): {', '.join(names[:8])}{more}")
    return "; ".join(parts)


def _map_names(plan: LoadPlan, ckpt_expected: dict[str, torch.Tensor], mtp_override: bool) -> list[str]:
    """Fill plan.mapping / scales / copies from the checkpoint's HF names; returns the unexpected names."""
    ckpt_args = plan.ckpt_args
    unexpected: list[str] = []
    for hf_name in plan.tensors:
        n = classify(hf_name, ckpt_args)
        if n is None or n.kind is Kind.SKIPPED:
            if not (mtp_override and n is not None):
                unexpected.append(hf_name)  # a deeper MTP layer than the model asked for is not loaded
        elif n.kind is Kind.MTP_COPY:
            plan.copies[hf_name] = n.ours
        elif n.kind is Kind.SCALE and n.ours not in plan.expected and n.ours in ckpt_expected:
            plan.scales[n.ours[: -len(".scale")] + ".weight"] = hf_name
        elif n.ours in plan.expected:
            plan.mapping[n.ours] = hf_name
        else:
            unexpected.append(hf_name)
    return unexpected


def _shape_dtype_problems(plan: LoadPlan, ckpt_expected: dict[str, torch.Tensor]) -> list[str]:
    """Every stored shape or dtype that does not fit config.json: weights, FP8 scales, the MTP copies."""
    tensors, bad = plan.tensors, []
    for ours, hf_name in plan.mapping.items():
        info, want = tensors[hf_name], ckpt_expected[ours]
        if info.shape != tuple(want.shape):
            bad.append(f"tensor {hf_name} in {info.file.name} has shape {list(info.shape)}, expected "
                       f"{list(want.shape)} from config.json")
        elif not _dtype_ok(info.dtype, want.dtype, ours):
            bad.append(f"tensor {hf_name} in {info.file.name} is {_dt(info.dtype)}, expected "
                       f"{_expected_dtype_text(want.dtype, ours)}")
    for ours, hf_name in plan.scales.items():
        info = tensors[hf_name]
        want = ckpt_expected[ours[: -len(".weight")] + ".scale"]
        winfo = tensors[plan.mapping[ours]]
        if info.shape != tuple(want.shape) or info.dtype != torch.float32:
            bad.append(f"tensor {hf_name} in {info.file.name} is {_dt(info.dtype)} {list(info.shape)}, expected "
                       f"float32 {list(want.shape)} (one scale per {plan.ckpt_args.block_size}² block)")
        if winfo.dtype != torch.float8_e4m3fn:
            bad.append(f"tensor {plan.mapping[ours]} is {_dt(winfo.dtype)}, expected float8_e4m3fn (it has a scale)")
    for hf_name, main in plan.copies.items():
        info, want = tensors[hf_name], plan.expected[main]
        if info.shape != tuple(want.shape):
            bad.append(f"tensor {hf_name} in {info.file.name} has shape {list(info.shape)}, expected "
                       f"{list(want.shape)} (a copy of the main model's {main})")
    return bad


def _dt(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def _dtype_ok(have: torch.dtype, want: torch.dtype, ours: str) -> bool:
    if want == torch.float8_e4m3fn:
        return have == torch.float8_e4m3fn
    if ours.endswith(".scale") or ours.endswith("gate.bias"):
        return have == torch.float32
    return have.is_floating_point and have != torch.float8_e4m3fn


def _expected_dtype_text(want: torch.dtype, ours: str) -> str:
    if want == torch.float8_e4m3fn:
        return "float8_e4m3fn (config.json has an FP8 quantization_config)"
    if ours.endswith(".scale") or ours.endswith("gate.bias"):
        return "float32"
    return "a floating dtype (bfloat16/float16/float32; FP8 only with a weight_scale_inv)"


def _missing_message(path: Path, args: ModelArgs, missing: list[str], unexpected: list[str]) -> str:
    parts = [f"{path}: checkpoint does not match config.json"]
    scales = [n for n in missing if n.endswith(".scale")]
    others = [n for n in missing if not n.endswith(".scale")]
    if scales and not others:
        hf = [dsv3_name_to_hf(n, args) for n in scales]
        parts.append(f"{len(hf)} FP8 weight(s) without weight_scale_inv: {group_names(hf)}")
    elif missing:
        hf = [_safe_hf(n, args) for n in missing]
        parts.append(f"{len(hf)} missing tensor(s): {group_names(hf)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {group_names(unexpected)}")
    return "; ".join(parts)


def _safe_hf(name: str, args: ModelArgs) -> str:
    try:
        return dsv3_name_to_hf(name, args)
    except KeyError:
        return name


# ---------------------------------------------------------------------- loading
def load_model(path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", group=None,
               check_weights: bool = False, progress: bool | None = None, **overrides):
    """Load a Hugging Face DeepSeek-V3 directory into a `dsv3.Transformer`, one tensor at a time.

    dtype None: every tensor keeps its stored dtype; FP8 Linear weights stay FP8 (+ scales) and
    compute through Linear's FP8 path. dtype given: FP8 weights are dequantised into it at load
    and the other floating tensors cast to it (the gate correction bias stays float32).
    `check_weights` scans every tensor for NaN/Inf. `progress`: a tqdm bar (default: only on a
    terminal). `overrides` set ModelArgs fields (attn_impl, max_seq_len, n_mtp_layers, ...).
    All checks run before any tensor is read (`check_checkpoint`).

    `group` (a torch.distributed process group; every rank calls with the same arguments): this rank's
    share (`dsv3.parallel`), only its rows/columns read, with the collectives in place. With `dtype`, FP8
    slices need not be whole blocks. `check_weights` then scans each rank's slices (together: every value
    once). If any rank fails (bad config, world size that does not divide, missing or unreadable shard,
    out of memory), every rank raises `DistributedError` carrying the first failing rank's message; the
    exchange is bounded by the group's timeout.
    """
    if group is None:
        return load_rank(path, 0, 1, dtype=dtype, device=device, check_weights=check_weights, progress=progress,
                         **overrides)
    rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
    err, model = None, None
    try:
        model = load_rank(path, rank, world, dtype=dtype, device=device, check_weights=check_weights,
                          progress=progress if rank == 0 else False, in_group=True, **overrides)
    except Exception as e:  # noqa: BLE001 - any failure must reach the other ranks, not hang them
        err = str(e) if isinstance(e, Dsv3Error) else f"{type(e).__name__}: {e}"
    agree(err, group)
    return add_collectives(model, group)


def load_rank(path, rank: int, world: int, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
              check_weights: bool = False, progress: bool | None = None, in_group: bool = False, **overrides):
    """Rank `rank`'s share of `world` (`dsv3.parallel.shard_model`, no collectives), reading only its slices;
    the whole model for world 1. `in_group`: words a name mismatch per rank (as `load_model(group=...)`)."""
    plan = plan_load(path, dtype, overrides, (rank, world) if in_group or world > 1 else None)
    device = torch.device(device)
    model = shard_model(plan.model, rank, world)
    local = model.state_dict()
    todo = {o: h for o, h in plan.mapping.items() if o in local}  # not another rank's experts
    read = SliceReader(plan.tensors, check_weights, rank)
    cast_to = dtype or plan.compute_dtype
    check_fits(_weight_bytes(plan, todo, local, dtype, cast_to), device, f"the weights of {plan.path}")
    bar = progress_bar(sum(plan.tensors[h].nbytes for h in todo.values()), progress)
    try:
        _load_tensors(model, plan, todo, local, read, dtype, cast_to, device, bar)
        _check_mtp_copies(model, plan, read, world)
    finally:
        bar.close()
        read.close()
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise CheckpointError(f"{plan.path}: tensors not loaded: {group_names(left)}")
    model.rotary._table = None
    if world == 1 and model.head.weight.device.type == "cpu":
        column_major_(model.head)
    return model.eval()


def _target_dtype(ours: str, stored: torch.dtype, cast_to: torch.dtype) -> torch.dtype:
    """The dtype a stored tensor is loaded in: FP8, block scales, the gate bias and integers as stored."""
    if not stored.is_floating_point or stored == torch.float8_e4m3fn or ours.endswith((".scale", "gate.bias")):
        return stored
    return cast_to


def _weight_bytes(plan: LoadPlan, todo: dict[str, str], local: dict[str, torch.Tensor], dtype: torch.dtype | None,
                  cast_to: torch.dtype) -> int:
    """Bytes of this rank's loaded weights (FP8 weights dequantised at load counted in their new dtype)."""
    def loaded_dtype(ours: str, info: TensorInfo) -> torch.dtype:
        return (dtype or torch.bfloat16) if ours in plan.scales else _target_dtype(ours, info.dtype, cast_to)

    return sum(local[o].numel() * loaded_dtype(o, plan.tensors[h]).itemsize for o, h in todo.items())


def _load_tensors(model, plan: LoadPlan, todo: dict[str, str], local: dict[str, torch.Tensor], read: SliceReader,
                  dtype: torch.dtype | None, cast_to: torch.dtype, device: torch.device, bar) -> None:
    """This rank's tensors into `model`, shard by shard in file order, converted straight from the mapped bytes."""
    hf_to_ours = {h: o for o, h in todo.items()}
    for _file, group in by_file(plan.tensors[h] for h in todo.values()):
        for info in group:
            ours = hf_to_ours[info.name]
            dim = _cut_dim(info.shape, tuple(local[ours].shape))
            n = local[ours].shape[dim] if dim is not None else 0
            if ours in plan.scales:
                t = _dequantised(plan, read, ours, info, dim, n, dtype or torch.bfloat16, device)
            else:
                want = _target_dtype(ours, info.dtype, cast_to)
                t = read(info.name, lambda v, want=want: v.to(device=device, dtype=want, copy=True), dim, n)
            _assign(model, ours, t)
            del t
            bar.update(info.nbytes)


def _cut_dim(full: tuple[int, ...], local: tuple[int, ...]) -> int | None:
    """The dimension along which this rank's tensor is a slice of the stored one (None: whole)."""
    cut = [d for d, (a, b) in enumerate(zip(full, local)) if a != b]
    return cut[0] if cut else None


def _dequantised(plan: LoadPlan, read: SliceReader, ours: str, info: TensorInfo, dim: int | None, n: int,
                 out: torch.dtype, device: torch.device) -> torch.Tensor:
    """This rank's slice of an FP8 weight, dequantised where it will live (on a GPU the float32 temporaries
    never touch host memory). A slice that starts or ends inside a scale block (e.g. 64 of 128 rows) is fine:
    the whole scale tensor is tiny, read it all and give each value its block's scale."""
    bs, r = plan.ckpt_args.block_size, read.rank
    if dim is None or n % bs == 0:
        s = read(plan.scales[ours], None, dim, n // bs)
        return read(info.name, lambda v: weight_dequant(v.to(device), s.to(device), bs, out), dim, n)
    s = read(plan.scales[ours]).to(device)

    def partial(v):
        rows, cols = torch.arange(v.shape[0]), torch.arange(v.shape[1])
        if dim == 0:
            rows = rows + r * n
        else:
            cols = cols + r * n
        scale = s[rows // bs][:, cols // bs]  # (rows, cols): each value's block scale
        return (v.to(device).float() * scale).to(out)  # as weight_dequant computes it: the values of one process

    return read(info.name, partial, dim, n)


def _check_mtp_copies(model, plan: LoadPlan, read: SliceReader, world: int = 1) -> None:
    """The MTP layer's copies of embedding and head must equal the main ones (dsv3 keeps one of each); a rank
    compares its rows of them."""
    for hf_name, main in plan.copies.items():
        ref = model.get_parameter(main)
        dim, n = (0, ref.shape[0]) if world > 1 else (None, 0)
        if not read(hf_name, lambda v, ref=ref: torch.equal(v.to(device=ref.device, dtype=ref.dtype), ref), dim, n):
            if not bool(torch.isfinite(ref).all()):  # NaN != NaN: a NaN in both copies is not a mismatch
                raise CheckpointError(f"{plan.path}: tensor {dsv3_name_to_hf(main, plan.args)} holds NaN/Inf "
                                      "(expected finite weights)")
            raise CheckpointError(f"{plan.path}: MTP tensor {hf_name} differs from the main model's "
                                  f"{dsv3_name_to_hf(main, plan.args)} (dsv3 shares one embedding/head; "
                                  "expected an exact copy)")


def _assign(model: torch.nn.Module, name: str, t: torch.Tensor) -> None:
    mod_name, _, attr = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if attr in mod._parameters:
        old = mod._parameters[attr]
        mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=old.requires_grad and t.is_floating_point()
                                                   and t.dtype != torch.float8_e4m3fn)
    else:
        mod._buffers[attr] = t


def progress_bar(total: int, enabled: bool | None):
    """A tqdm bar of bytes (`enabled` None: only on a terminal)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", disable=not enabled,
                leave=False)


def save_model(model, path, *, mtp_copies: bool = False, shard_of=None, config: dict | None = None) -> None:
    """Write `model` as a Hugging Face DeepSeek-V3 directory: config.json (`config` updates it) + model.safetensors,
    or with `shard_of` (HF name -> shard file name) several shards and a model.safetensors.index.json."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in hf_state(model, mtp_copies).items():
        shards.setdefault(shard_of(name) if shard_of else "model.safetensors", {})[name] = t
    for fname, tensors in shards.items():
        write_shard(path / fname, tensors)
    if shard_of:
        write_index(path, {n: f for f, ts in shards.items() for n in ts},
                    sum(t.numel() * t.element_size() for ts in shards.values() for t in ts.values()))
    (path / "config.json").write_text(json.dumps({**model.args.to_hf_config(), **(config or {})}, indent=2))
