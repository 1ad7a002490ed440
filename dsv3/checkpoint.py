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
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from dsv3.config import ModelArgs
from dsv3.errors import CheckpointError

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
# MTP copies of the shared embedding and head: checked equal to the main model's, not loaded twice.
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
        out[name] = _dsv3_name_to_hf(name, args)
    return out


def _dsv3_name_to_hf(name: str, args: ModelArgs) -> str:
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


# ---------------------------------------------------------------------- reading
def weight_map(path: Path) -> dict[str, str]:
    """HF tensor name -> shard file name, from the index or the single model.safetensors."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            wm = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        missing = sorted({f for f in wm.values() if not (path / f).is_file()})
        if missing:
            raise CheckpointError(f"{index}: shard file(s) listed in the index are missing: {missing}")
        return wm
    single = path / "model.safetensors"
    if single.is_file():
        try:
            with safe_open(single, "pt") as f:
                return {k: single.name for k in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{single}: not a readable safetensors file ({e})") from None
    raise CheckpointError(f"{path}: no model.safetensors or model.safetensors.index.json")


def iter_tensors(path: Path, names: dict[str, str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, tensor) shard by shard, one tensor at a time (memory-mapped reads)."""
    by_file: dict[str, list[str]] = {}
    for n, f in names.items():
        by_file.setdefault(f, []).append(n)
    for fname in sorted(by_file):
        try:
            with safe_open(path / fname, "pt") as f:
                for n in by_file[fname]:
                    yield n, f.get_tensor(n)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{path / fname}: cannot read ({e})") from None


def load_model(path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu", **overrides):
    """Load a Hugging Face DeepSeek-V3 directory into a `dsv3.Transformer`.

    `dtype` casts the floating weights (FP8 weights are dequantised into it);
    None keeps them as stored. `overrides` set ModelArgs fields (attn_impl, max_seq_len, ...).
    """
    from dsv3.model import Transformer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (expected a Hugging Face checkpoint with config.json)")
    args = ModelArgs.from_hf_config(path)
    if dtype is not None and args.dtype == "fp8":
        overrides.setdefault("dtype", "bf16")  # dequantise at load
    wm = weight_map(path)
    if "n_mtp_layers" not in overrides:
        # transformers' save_pretrained keeps num_nextn_predict_layers in config.json but writes no MTP
        # tensors: use the MTP modules the checkpoint actually holds (a partial one is still an error).
        layers_present = {int(m.group(1)) for m in map(_LAYER_PREFIX.match, wm) if m}
        present = 0
        while present < args.n_mtp_layers and args.n_layers + present in layers_present:
            present += 1
        if present < args.n_mtp_layers:
            overrides["n_mtp_layers"] = present
    if overrides:
        args = args.replace(**overrides)

    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    mapping: dict[str, str] = {}
    unexpected: list[str] = []
    mtp_copies: dict[str, str] = {}
    scales: dict[str, str] = {}
    for hf_name in wm:
        r = hf_to_dsv3(hf_name, args)
        if r is None:
            # a deeper MTP layer than this model uses is simply not loaded
            m = _LAYER_PREFIX.match(hf_name)
            if m and int(m.group(1)) >= args.n_layers + args.n_mtp_layers and overrides.get("n_mtp_layers") is not None:
                continue
            unexpected.append(hf_name)
            continue
        ours = r[0]
        if ours.startswith("mtp-copy:"):
            mtp_copies[hf_name] = ours[len("mtp-copy:"):]
        elif ours.endswith(".scale") and ours not in expected:
            scales[ours] = hf_name  # FP8 scale of a weight we dequantise at load
        else:
            mapping[ours] = hf_name
    missing = sorted(set(expected) - set(mapping))
    if missing or unexpected:
        raise CheckpointError(_missing_message(path, missing, unexpected))

    state: dict[str, torch.Tensor] = {}
    tensors = dict(iter_tensors(path, {hf: wm[hf] for hf in list(mapping.values()) + list(scales.values())}))
    for ours, hf_name in mapping.items():
        t = tensors.pop(hf_name)
        want = expected[ours]
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{path}: tensor {hf_name} has shape {tuple(t.shape)}, "
                                  f"expected {tuple(want.shape)} from config.json")
        if t.dtype == torch.float8_e4m3fn and want.dtype != torch.float8_e4m3fn:
            s_name = ours[: -len(".weight")] + ".scale"
            if s_name not in scales:
                raise CheckpointError(f"{path}: FP8 tensor {hf_name} has no weight_scale_inv")
            from dsv3.fp8 import weight_dequant

            t = weight_dequant(t, tensors.pop(scales[s_name]), args.block_size, dtype or torch.bfloat16)
        elif dtype is not None and t.is_floating_point() and t.dtype != torch.float8_e4m3fn \
                and not ours.endswith((".scale", "gate.bias")):
            t = t.to(dtype)
        state[ours] = t.to(device)
    model.load_state_dict(state, assign=True, strict=True)
    model.rotary._table = None
    if model.head.weight.device.type == "cpu":
        from dsv3.layers import column_major_

        column_major_(model.head)
    return model.eval()


def _missing_message(path: Path, missing: list[str], unexpected: list[str]) -> str:
    parts = [f"{path}: checkpoint does not match config.json"]
    if missing:
        parts.append(f"{len(missing)} missing tensor(s): {_group(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected tensor(s): {_group(unexpected)}")
    return "; ".join(parts)


def _group(names: list[str], limit: int = 12) -> str:
    """Collapse layer/expert indices so long lists stay readable: layers.{0..60}.attn.wq_a.weight."""
    groups: dict[str, list[str]] = {}
    for n in names:
        key = re.sub(r"\.(\d+)\.", ".*.", n)
        groups.setdefault(key, []).append(n)
    shown = [k if len(v) > 1 else v[0] for k, v in groups.items()]
    more = f" (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return ", ".join(shown[:limit]) + more


def save_model(model, path) -> None:
    """Write `model` as a Hugging Face DeepSeek-V3 directory (config.json + model.safetensors)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    args = model.args
    tensors = {_dsv3_name_to_hf(name, args): t.detach().contiguous() for name, t in model.state_dict().items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(args.to_hf_config(), indent=2))
