"""Hugging Face DeepSeek-V3 checkpoints <-> dsv3 modules.

One table (`NAME_TABLE`) maps every HF tensor name to the dsv3 parameter name and
the dimension along which tensor parallelism shards it (None: replicated or,
for routed experts, owned whole by one rank). Loading, saving and per-rank
slicing all go through `hf_to_dsv3` / `dsv3_to_hf`.

FP8 checkpoints store `<linear>.weight` as float8_e4m3fn next to
`<linear>.weight_scale_inv` (float32, one per 128×128 block); dsv3 calls the
latter `<linear>.scale` and slices it along the same dimension, in blocks.

The MTP modules live at `model.layers.{n_layers + k}` in HF; in dsv3 at `mtp.{k}`,
with the decoder-block tensors under `mtp.{k}.block`.

Loading (`load_model`) first checks everything it can without reading tensor data
(`check_checkpoint`: config <-> index <-> shard headers, missing/unexpected names,
shapes, dtypes, FP8 weights without scales), then streams: shards are memory-mapped
and each tensor is converted straight from the mapped bytes into its final place and
its pages released, so resident memory stays within the final model plus one tensor.
The safetensors headers and shards themselves are read by `dsv3.safetensors_io`.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsv3.config import ModelArgs
from dsv3.errors import CheckpointError
from dsv3.memory import check_fits
from dsv3.safetensors_io import ShardReader, TensorInfo, by_file, read_header

# (HF suffix inside a layer, dsv3 suffix inside a block, tensor-parallel shard dim)
_LAYER_TABLE: list[tuple[str, str, int | None]] = [
    ("input_layernorm.weight", "attn_norm.weight", None),
    ("post_attention_layernorm.weight", "ffn_norm.weight", None),
    ("self_attn.q_proj", "attn.wq", 0),
    ("self_attn.q_a_proj", "attn.wq_a", None),
    ("self_attn.q_a_layernorm.weight", "attn.q_norm.weight", None),
    ("self_attn.q_b_proj", "attn.wq_b", 0),
    ("self_attn.kv_a_proj_with_mqa", "attn.wkv_a", None),
    ("self_attn.kv_a_layernorm.weight", "attn.kv_norm.weight", None),
    ("self_attn.kv_b_proj", "attn.wkv_b", 0),
    ("self_attn.o_proj", "attn.wo", 1),
    ("mlp.gate_proj", "ffn.w1", 0),
    ("mlp.up_proj", "ffn.w3", 0),
    ("mlp.down_proj", "ffn.w2", 1),
    ("mlp.gate.weight", "ffn.gate.weight", None),
    ("mlp.gate.e_score_correction_bias", "ffn.gate.bias", None),
    ("mlp.shared_experts.gate_proj", "ffn.shared_experts.w1", 0),
    ("mlp.shared_experts.up_proj", "ffn.shared_experts.w3", 0),
    ("mlp.shared_experts.down_proj", "ffn.shared_experts.w2", 1),
    ("mlp.experts.{e}.gate_proj", "ffn.experts.{e}.w1", None),
    ("mlp.experts.{e}.up_proj", "ffn.experts.{e}.w3", None),
    ("mlp.experts.{e}.down_proj", "ffn.experts.{e}.w2", None),
]
# Tensors only the MTP layer has (relative to model.layers.{n_layers + k}.)
_MTP_TABLE: list[tuple[str, str, int | None]] = [
    ("enorm.weight", "enorm.weight", None),
    ("hnorm.weight", "hnorm.weight", None),
    ("eh_proj.weight", "eh_proj.weight", None),
    ("shared_head.norm.weight", "norm.weight", None),
]
# MTP copies of the shared embedding and head: not loaded twice; load_model checks them equal to the main ones.
MTP_SHARED_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
_TOP_TABLE: list[tuple[str, str, int | None]] = [
    ("model.embed_tokens.weight", "embed.weight", 0),
    ("model.norm.weight", "norm.weight", None),
    ("lm_head.weight", "head.weight", 0),
]
_LINEAR_SUFFIXES = (".weight", ".weight_scale_inv")
NAME_TABLE = {"top": _TOP_TABLE, "layer": _LAYER_TABLE, "mtp": _MTP_TABLE}


def _compile(table: list[tuple[str, str, int | None]]) -> list[tuple[re.Pattern, str, int | None, bool]]:
    out = []
    for hf, ours, dim in table:
        is_linear = not hf.endswith((".weight", ".e_score_correction_bias"))
        pat = re.escape(hf).replace(r"\{e\}", r"(?P<e>\d+)")
        out.append((re.compile(pat + (r"(?P<suffix>\.weight|\.weight_scale_inv)" if is_linear else "") + "$"),
                    ours, dim, is_linear))
    return out


_LAYER_RE = _compile(_LAYER_TABLE)
_MTP_RE = _compile(_MTP_TABLE)
_TOP = {hf: (ours, dim) for hf, ours, dim in _TOP_TABLE}
_LAYER_PREFIX = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def hf_layer_index(hf_name: str) -> int | None:
    """i for an HF name `model.layers.{i}.…` (a decoder block or an MTP module), else None."""
    m = _LAYER_PREFIX.match(hf_name)
    return int(m.group(1)) if m else None


def block_shard_dims() -> dict[str, int]:
    """Tensor-parallel shard dim of each Linear inside a block, by its dsv3 path (`attn.wq_b`, `ffn.w2`, ...),
    from the name table; routed experts are not in it (expert parallelism keeps them whole)."""
    return {ours: dim for _, ours, dim in _LAYER_TABLE if dim is not None and "{e}" not in ours}


def hf_to_dsv3(name: str, args: ModelArgs) -> tuple[str, int | None] | None:
    """HF tensor name -> (dsv3 parameter name, shard dim), or None for a name dsv3 does not know.

    MTP copies of the embedding/head map to "mtp-copy:<main name>" so the loader can
    compare them instead of loading them twice.
    """
    if name in _TOP:
        return _TOP[name]
    m = _LAYER_PREFIX.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if layer < args.n_layers:
        prefix = f"layers.{layer}."
    elif layer < args.n_layers + args.n_mtp_layers:
        k = layer - args.n_layers
        if rest in MTP_SHARED_COPIES:
            return "mtp-copy:" + MTP_SHARED_COPIES[rest], None
        for pat, ours, dim, _ in _MTP_RE:
            if pat.match(rest):
                return f"mtp.{k}.{ours}", dim
        prefix = f"mtp.{k}.block."
    else:
        return None
    for pat, ours, dim, is_linear in _LAYER_RE:
        mm = pat.match(rest)
        if mm:
            ours = ours.replace("{e}", mm.group("e")) if "{e}" in ours else ours
            if is_linear:
                ours += ".scale" if mm.group("suffix") == ".weight_scale_inv" else ".weight"
            return prefix + ours, dim
    return None


def dsv3_to_hf(args: ModelArgs) -> dict[str, str]:
    """dsv3 parameter name -> HF name, for every tensor the model has."""
    from dsv3.model import Transformer

    with torch.device("meta"):
        model = Transformer(args)
    out = {}
    for name in model.state_dict():
        out[name] = dsv3_name_to_hf(name, args)
    return out


def dsv3_name_to_hf(name: str, args: ModelArgs) -> str:
    for hf, (ours, _) in _TOP.items():
        if name == ours:
            return hf
    m = re.match(r"(layers|mtp)\.(\d+)\.(.+)$", name)
    if not m:
        raise KeyError(name)
    kind, idx, rest = m.group(1), int(m.group(2)), m.group(3)
    layer = idx if kind == "layers" else args.n_layers + idx
    if kind == "mtp":
        for hf, ours, _ in _MTP_TABLE:
            if rest == ours:
                return f"model.layers.{layer}.{hf}"
        if not rest.startswith("block."):
            raise KeyError(name)
        rest = rest[len("block."):]
    em = re.match(r"ffn\.experts\.(\d+)\.(.+)$", rest)
    e = em.group(1) if em else None
    for hf, ours, _ in _LAYER_TABLE:
        ours_e = ours.replace("{e}", e) if e is not None else ours
        hf_e = hf.replace("{e}", e) if e is not None else hf
        if rest == ours_e:
            return f"model.layers.{layer}.{hf_e}"
        if rest == ours_e + ".weight":
            return f"model.layers.{layer}.{hf_e}.weight"
        if rest == ours_e + ".scale":
            return f"model.layers.{layer}.{hf_e}.weight_scale_inv"
    raise KeyError(name)


def is_quantized_in_release(hf_name: str) -> bool:
    """Whether the DeepSeek FP8 release stores this `.weight` as FP8 (with a `weight_scale_inv`).

    Exactly the Linear weights of the decoder blocks (main and MTP): not the embeddings,
    head, norms, gate weight/bias, nor the MTP eh_proj / shared_head / embed_tokens.
    """
    m = _LAYER_PREFIX.match(hf_name)
    if not m or not hf_name.endswith(".weight"):
        return False
    return any(is_linear and pat.match(m.group(2)) for pat, _, _, is_linear in _LAYER_RE)


def meta_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    from dsv3.model import Transformer

    with torch.device("meta"):
        return Transformer(args).state_dict()


def default_checkpoint() -> Path:
    """The bundled small model the commands use without --ckpt (dsv3/assets/dsv3-tiny)."""
    path = BUNDLED_MODEL_DIR
    if not (path / "config.json").is_file():
        raise CheckpointError(f"no --ckpt given and the bundled model {path} is not installed: pass --ckpt DIR "
                              "(a Hugging Face DeepSeek-V3 checkpoint directory with config.json and safetensors)")
    return path


BUNDLED_MODEL_DIR = Path(__file__).parent / "assets" / "dsv3-tiny"


# ---------------------------------------------------------------------- checks (no tensor read)
def weight_map(path: Path) -> dict[str, str]:
    """HF tensor name -> shard file name, from the index or the single model.safetensors."""
    path = Path(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
            assert isinstance(wm, dict) and all(isinstance(v, str) for v in wm.values())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, AssertionError):
            raise CheckpointError(f"{index}: not a valid safetensors index (expected {{\"weight_map\": "
                                  "{tensor name: shard file}}})") from None
        missing = sorted({f for f in wm.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: shard file(s) listed in the index are missing: {_group(missing)}")
        return wm
    single = path / "model.safetensors"
    if single.is_file():
        return {k: single.name for k in read_header(single)}
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def scan(path: Path) -> dict[str, TensorInfo]:
    """Every tensor of the checkpoint with its location, index and shard headers cross-checked."""
    path = Path(path)
    wm = weight_map(path)
    headers = {f: read_header(path / f) for f in sorted(set(wm.values()))}
    out: dict[str, TensorInfo] = {}
    absent = []
    for name, f in wm.items():
        info = headers[f].get(name)
        if info is None:
            absent.append(f"{name} (in {f})")
        else:
            out[name] = info
    if absent:
        raise CheckpointError(f"{path}: the index lists tensor(s) their shard does not contain: {_group(absent)}")
    return out


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
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face DeepSeek-V3 checkpoint)")
    return path


def check_checkpoint(path, dtype: torch.dtype | None = None, **overrides) -> LoadPlan:
    """Check a checkpoint against its config.json without reading any tensor data.

    Raises a `CheckpointError` (or `ConfigError`) naming the file/tensor and what was expected.
    """
    path = check_directory(path)
    ckpt_args = ModelArgs.from_hf_config(path)
    tensors = scan(path)
    if ckpt_args.dtype != "fp8":
        scales = [n for n, i in tensors.items() if n.endswith(".weight_scale_inv") or i.dtype == torch.float8_e4m3fn]
        if scales:
            raise CheckpointError(f"{path}: {len(scales)} FP8 tensor(s) (e.g. {scales[0]}) but config.json has no "
                                  "quantization_config (expected bf16/fp32 weights, or an FP8 config)")
    if "n_mtp_layers" not in overrides:
        overrides = _mtp_layers_present(ckpt_args, tensors, overrides)
    mtp_override = "n_mtp_layers" in overrides
    model_over = dict(overrides)
    if dtype is not None and ckpt_args.dtype == "fp8":
        model_over["dtype"] = "bf16"  # dequantise at load
    ckpt_args = ckpt_args.replace(**{k: v for k, v in overrides.items() if k != "dtype"}) if overrides else ckpt_args
    args = ckpt_args.replace(**model_over) if model_over else ckpt_args
    plan = LoadPlan(path, ckpt_args, args, tensors, expected=meta_state(args))
    ckpt_expected = plan.expected if args is ckpt_args else meta_state(ckpt_args)

    unexpected = _map_names(plan, ckpt_expected, mtp_override)
    missing = sorted(set(plan.expected) - set(plan.mapping))
    if ckpt_args.dtype == "fp8" and args.dtype != "fp8":
        quantized = {n[: -len(".scale")] + ".weight" for n in ckpt_expected if n.endswith(".scale")}
        missing += sorted(n[: -len(".weight")] + ".scale" for n in quantized if n not in plan.scales)
    if missing or unexpected:
        raise CheckpointError(_missing_message(path, ckpt_args, missing, unexpected))
    bad = _shape_dtype_problems(plan, ckpt_expected)
    if bad:
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise CheckpointError(f"{path}: " + "; ".join(bad[:3]) + more)
    return plan


def _mtp_layers_present(ckpt_args: ModelArgs, tensors: dict[str, TensorInfo], overrides: dict) -> dict:
    """`overrides` with n_mtp_layers lowered to the MTP modules the checkpoint holds, when it holds fewer.

    transformers' save_pretrained keeps num_nextn_predict_layers in config.json but writes no MTP
    tensors: use the MTP modules the checkpoint actually holds (a partial one is still an error)."""
    layers_present = {int(m.group(1)) for m in map(_LAYER_PREFIX.match, tensors) if m}
    present = 0
    while present < ckpt_args.n_mtp_layers and ckpt_args.n_layers + present in layers_present:
        present += 1
    if present < ckpt_args.n_mtp_layers:
        overrides = {**overrides, "n_mtp_layers": present}
    return overrides


def _map_names(plan: LoadPlan, ckpt_expected: dict[str, torch.Tensor], mtp_override: bool) -> list[str]:
    """Fill plan.mapping / scales / copies from the checkpoint's HF names; returns the unexpected names."""
    ckpt_args = plan.ckpt_args
    unexpected: list[str] = []
    for hf_name in plan.tensors:
        r = hf_to_dsv3(hf_name, ckpt_args)
        if r is None:
            m = _LAYER_PREFIX.match(hf_name)
            if mtp_override and m and int(m.group(1)) >= ckpt_args.n_layers:
                continue  # a deeper MTP layer than the model asked for is not loaded
            unexpected.append(hf_name)
            continue
        ours = r[0]
        if ours.startswith("mtp-copy:"):
            plan.copies[hf_name] = ours[len("mtp-copy:"):]
        elif ours.endswith(".scale") and ours not in plan.expected and ours in ckpt_expected:
            plan.scales[ours[: -len(".scale")] + ".weight"] = hf_name
        elif ours in plan.expected:
            plan.mapping[ours] = hf_name
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
        parts.append(f"{len(hf)} FP8 weight(s) without weight_scale_inv: {_group(hf)}")
    elif missing:
        hf = [_safe_hf(n, args) for n in missing]
        parts.append(f"{len(hf)} missing tensor(s): {_group(hf)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {_group(unexpected)}")
    return "; ".join(parts)


def _safe_hf(name: str, args: ModelArgs) -> str:
    try:
        return dsv3_name_to_hf(name, args)
    except KeyError:
        return name


def _group(names: list[str], limit: int = 12) -> str:
    """Collapse indices so long lists stay readable: model.layers.{3..60}.mlp.experts.{0..255}.up_proj.weight (×14848)."""
    groups: dict[str, list[list[int]]] = {}
    for n in names:
        key = re.sub(r"(?<=\.)\d+(?=\.)", "#", n)
        groups.setdefault(key, []).append([int(x) for x in re.findall(r"(?<=\.)\d+(?=\.)", n)])
    shown = []
    for key, idx in groups.items():
        parts = key.split("#")
        out = parts[0]
        for j, rest in enumerate(parts[1:]):
            vals = sorted({i[j] for i in idx})
            if len(vals) == 1:
                out += str(vals[0])
            elif vals == list(range(vals[0], vals[-1] + 1)):
                out += f"{{{vals[0]}..{vals[-1]}}}"
            else:
                out += "{" + ",".join(map(str, vals)) + "}" if len(vals) <= 6 else "*"
            out += rest
        shown.append(f"{out} (×{len(idx)})" if len(idx) > 1 else out)
    more = f" (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


# ---------------------------------------------------------------------- loading
def iter_tensors(path: Path, names: dict[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) shard by shard in file order, one tensor at a time (memory-mapped reads).

    `names` (HF name -> shard file) restricts the set; default: the whole checkpoint.
    """
    infos = scan(path)
    if names is not None:
        infos = {n: infos[n] for n in names}
    for file, group in by_file(infos.values()):
        reader = ShardReader(file)
        try:
            for info in group:
                yield info.name, reader.read(info)
        finally:
            reader.close()


def load_model(path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu",
               check_weights: bool = False, progress: bool | None = None, **overrides):
    """Load a Hugging Face DeepSeek-V3 directory into a `dsv3.Transformer`, one tensor at a time.

    dtype None: every tensor keeps its stored dtype; FP8 Linear weights stay FP8 (+ scales) and
    compute through Linear's FP8 path. dtype given: FP8 weights are dequantised into it at load
    and the other floating tensors cast to it (the gate correction bias stays float32).
    `check_weights` scans every tensor for NaN/Inf. `progress`: a tqdm bar (default: only on a
    terminal). `overrides` set ModelArgs fields (attn_impl, max_seq_len, n_mtp_layers, ...).
    All checks run before any tensor is read (`check_checkpoint`).
    """
    from dsv3.model import Transformer

    plan = check_checkpoint(path, dtype, **overrides)
    device = torch.device(device)
    with torch.device("meta"):
        model = Transformer(plan.args)
    read = _PlanReader(plan, check_weights)
    cast_to = dtype or plan.compute_dtype
    check_fits(_weight_bytes(plan, dtype, cast_to), device, f"the weights of {plan.path}")
    bar = progress_bar(plan.nbytes, progress)
    try:
        _load_tensors(model, plan, read, dtype, cast_to, device, bar)
        _check_mtp_copies(model, plan, read)
    finally:
        bar.close()
        read.close()
    left = [n for n, t in model.state_dict().items() if t.is_meta]
    if left:
        raise CheckpointError(f"{plan.path}: tensors not loaded: {_group(left)}")
    model.rotary._table = None
    if model.head.weight.device.type == "cpu":
        from dsv3.layers import column_major_

        column_major_(model.head)
    return model.eval()


class _PlanReader:
    """`read(hf_name, fn)`: fn (default: a copy) on the tensor's mapped bytes, scanned for NaN/Inf first when
    `check_weights`; each shard is opened on first use, all closed by `close()`."""

    def __init__(self, plan: LoadPlan, check_weights: bool):
        self.plan, self.check_weights = plan, check_weights
        self.readers: dict[Path, ShardReader] = {}

    def __call__(self, hf_name: str, fn=None):
        info = self.plan.tensors[hf_name]

        def checked(view):
            if self.check_weights:
                check_finite(view, info.file, info.name)
            return fn(view) if fn else view.clone()

        if info.file not in self.readers:
            self.readers[info.file] = ShardReader(info.file)
        return self.readers[info.file].read(info, checked)

    def close(self) -> None:
        for r in self.readers.values():
            r.close()


def _target_dtype(ours: str, stored: torch.dtype, cast_to: torch.dtype) -> torch.dtype:
    """The dtype a stored tensor is loaded in: FP8, block scales, the gate bias and integers as stored."""
    if not stored.is_floating_point or stored == torch.float8_e4m3fn or ours.endswith((".scale", "gate.bias")):
        return stored
    return cast_to


def _weight_bytes(plan: LoadPlan, dtype: torch.dtype | None, cast_to: torch.dtype) -> int:
    """Bytes of the loaded weights (FP8 weights dequantised at load counted in their new dtype)."""
    def loaded_dtype(ours: str, info: TensorInfo) -> torch.dtype:
        return (dtype or torch.bfloat16) if ours in plan.scales else _target_dtype(ours, info.dtype, cast_to)

    return sum(math.prod(plan.tensors[h].shape) * loaded_dtype(o, plan.tensors[h]).itemsize
               for o, h in plan.mapping.items())


def _load_tensors(model, plan: LoadPlan, read: _PlanReader, dtype: torch.dtype | None, cast_to: torch.dtype,
                  device: torch.device, bar) -> None:
    """Every mapped tensor into `model`, shard by shard in file order, converted straight from the mapped bytes."""
    hf_to_ours = {h: o for o, h in plan.mapping.items()}
    for _file, group in by_file(plan.tensors[h] for h in plan.mapping.values()):
        for info in group:
            ours = hf_to_ours[info.name]
            if ours in plan.scales:
                from dsv3.fp8 import weight_dequant

                s = read(plan.scales[ours])
                # dequantised where it will live: on a GPU the float32 temporaries never touch host memory
                t = read(info.name, lambda v, s=s: weight_dequant(v.to(device), s.to(device),
                                                                   plan.ckpt_args.block_size, dtype or torch.bfloat16))
            else:
                want = _target_dtype(ours, info.dtype, cast_to)
                t = read(info.name, lambda v, want=want: v.to(device=device, dtype=want, copy=True))
            _assign(model, ours, t)
            del t
            bar.update(info.nbytes)


def _check_mtp_copies(model, plan: LoadPlan, read: _PlanReader) -> None:
    """The MTP layer's copies of embedding and head must equal the main ones (dsv3 keeps one of each)."""
    for hf_name, main in plan.copies.items():
        ref = model.get_parameter(main)
        if not read(hf_name, lambda v, ref=ref: torch.equal(v.to(device=ref.device, dtype=ref.dtype), ref)):
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


def check_finite(t: torch.Tensor, file, name: str, where: str = "") -> None:
    """Raise CheckpointError naming `file` and tensor `name` if `t` holds a NaN/Inf.

    `where` qualifies the flat index when `t` is a slice (a parallel rank's share).
    """
    flat = t.reshape(-1)
    step = 1 << 22
    for i in range(0, flat.numel(), step):
        chunk = flat[i: i + step]
        if chunk.dtype == torch.float8_e4m3fn:
            bad = (chunk.view(torch.uint8) & 0x7F) == 0x7F  # e4m3fn has NaN only, no Inf
        elif chunk.is_floating_point():
            bad = ~torch.isfinite(chunk)
        else:
            return
        if bad.any():
            j = i + int(bad.nonzero()[0, 0])
            raise CheckpointError(f"{file}: tensor {name} holds NaN/Inf ({int(bad.sum())}+ value(s), "
                                  f"first at flat index {j}{where}); expected finite weights")


def progress_bar(total: int, enabled: bool | None):
    """A tqdm bar of bytes (`enabled` None: only on a terminal)."""
    from tqdm import tqdm

    if enabled is None:
        enabled = sys.stderr.isatty()
    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", disable=not enabled,
                leave=False)


def save_model(model, path) -> None:
    """Write `model` as a Hugging Face DeepSeek-V3 directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = model.args
    tensors = {dsv3_name_to_hf(name, args): t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
