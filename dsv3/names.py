"""The one Hugging Face <-> dsv3 name table, as typed data.

Every HF tensor name of a DeepSeek-V3 checkpoint classifies (`classify`) into a `Name`: the dsv3
parameter it fills, its `Kind` and the dimension along which tensor parallelism shards it (None:
replicated or, for routed experts, owned whole by one rank).

    Kind.WEIGHT     a parameter or buffer of the model (`.weight`, norms, the gate bias)
    Kind.SCALE      an FP8 block scale (`<linear>.weight_scale_inv`; dsv3 `<linear>.scale`), sliced in blocks
                    along the same dimension as its weight
    Kind.MTP_COPY   the MTP layer's copy of the embedding or head: `ours` is the main model's tensor,
                    which the loader compares instead of loading twice
    Kind.SKIPPED    a layer deeper than the model has (`model.layers.{i}`, i >= n_layers + n_mtp_layers)

The MTP modules live at `model.layers.{n_layers + k}` in HF; in dsv3 at `mtp.{k}`, with the decoder-block
tensors under `mtp.{k}.block`. Loading, saving, per-rank slicing (dsv3.parallel), convert and plan all use it.
`hf_state` names a model's tensors as a checkpoint holds them (with the MTP copies), `stored_state` what
an FP8 checkpoint stores for a model built dequantised, `mtp_layers_present` how many MTP layers a checkpoint has.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

import torch

from dsv3.config import ModelArgs
from dsv3.model import Transformer

# (HF suffix inside a layer, dsv3 suffix inside a block, tensor-parallel shard dim)
LAYER_TABLE: list[tuple[str, str, int | None]] = [
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
    # V3.2's lightning indexer: replicated on every rank (13.96M per layer at 671B; each rank scores alike)
    ("self_attn.indexer.wq_b", "attn.indexer.wq_b", None),
    ("self_attn.indexer.wk", "attn.indexer.wk", None),
    ("self_attn.indexer.k_norm.weight", "attn.indexer.k_norm.weight", None),
    ("self_attn.indexer.k_norm.bias", "attn.indexer.k_norm.bias", None),
    ("self_attn.indexer.weights_proj", "attn.indexer.weights_proj", None),
]
# Linears the FP8 release keeps in bf16 although they sit in a block (no weight_scale_inv)
NOT_QUANTIZED = ("self_attn.indexer.weights_proj",)
# Tensors only the MTP layer has (relative to model.layers.{n_layers + k}.)
MTP_TABLE: list[tuple[str, str, int | None]] = [
    ("enorm.weight", "enorm.weight", None),
    ("hnorm.weight", "hnorm.weight", None),
    ("eh_proj.weight", "eh_proj.weight", None),
    ("shared_head.norm.weight", "norm.weight", None),
]
# MTP copies of the shared embedding and head: not loaded twice; load_model checks them equal to the main ones.
MTP_SHARED_COPIES = {"embed_tokens.weight": "embed.weight", "shared_head.head.weight": "head.weight"}
TOP_TABLE: list[tuple[str, str, int | None]] = [
    ("model.embed_tokens.weight", "embed.weight", 0),
    ("model.norm.weight", "norm.weight", None),
    ("lm_head.weight", "head.weight", 0),
]
NAME_TABLE = {"top": TOP_TABLE, "layer": LAYER_TABLE, "mtp": MTP_TABLE}


class Kind(enum.Enum):
    WEIGHT = "weight"
    SCALE = "scale"
    MTP_COPY = "mtp-copy"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Name:
    """One HF tensor name, classified: the dsv3 name it fills (MTP_COPY: the main tensor it copies;
    SKIPPED: ""), its kind, its tensor-parallel shard dim and its HF layer index (None outside layers)."""

    hf: str
    ours: str
    kind: Kind
    shard_dim: int | None = None
    layer: int | None = None


def _compile(table: list[tuple[str, str, int | None]]) -> list[tuple[re.Pattern, str, int | None, bool]]:
    out = []
    for hf, ours, dim in table:
        is_linear = not hf.endswith((".weight", ".bias", ".e_score_correction_bias"))
        pat = re.escape(hf).replace(r"\{e\}", r"(?P<e>\d+)")
        out.append((re.compile(pat + (r"(?P<suffix>\.weight|\.weight_scale_inv)" if is_linear else "") + "$"),
                    ours, dim, is_linear))
    return out


_LAYER_RE = _compile(LAYER_TABLE)
_MTP_RE = _compile(MTP_TABLE)
_TOP = {hf: (ours, dim) for hf, ours, dim in TOP_TABLE}
_LAYER_PREFIX = re.compile(r"model\.layers\.(\d+)\.(.+)$")


def hf_layer_index(hf_name: str) -> int | None:
    """i for an HF name `model.layers.{i}.…` (a decoder block or an MTP module), else None."""
    m = _LAYER_PREFIX.match(hf_name)
    return int(m.group(1)) if m else None


def block_shard_dims() -> dict[str, int]:
    """Tensor-parallel shard dim of each Linear inside a block, by its dsv3 path (`attn.wq_b`, `ffn.w2`, ...),
    from the name table; routed experts are not in it (expert parallelism keeps them whole)."""
    return {ours: dim for _, ours, dim in LAYER_TABLE if dim is not None and "{e}" not in ours}


def classify(name: str, args: ModelArgs) -> Name | None:
    """An HF tensor name as a `Name` (see the module docstring), or None for a name dsv3 does not know."""
    if name in _TOP:
        ours, dim = _TOP[name]
        return Name(name, ours, Kind.WEIGHT, dim)
    m = _LAYER_PREFIX.match(name)
    if not m:
        return None
    layer, rest = int(m.group(1)), m.group(2)
    if layer < args.n_layers:
        prefix = f"layers.{layer}."
    elif layer < args.n_layers + args.n_mtp_layers:
        k = layer - args.n_layers
        if rest in MTP_SHARED_COPIES:
            return Name(name, MTP_SHARED_COPIES[rest], Kind.MTP_COPY, None, layer)
        for pat, ours, dim, _ in _MTP_RE:
            if pat.match(rest):
                return Name(name, f"mtp.{k}.{ours}", Kind.WEIGHT, dim, layer)
        prefix = f"mtp.{k}.block."
    else:
        return Name(name, "", Kind.SKIPPED, None, layer)
    for pat, ours, dim, is_linear in _LAYER_RE:
        mm = pat.match(rest)
        if mm:
            ours = ours.replace("{e}", mm.group("e")) if "{e}" in ours else ours
            kind = Kind.WEIGHT
            if is_linear:
                kind = Kind.SCALE if mm.group("suffix") == ".weight_scale_inv" else Kind.WEIGHT
                ours += ".scale" if kind is Kind.SCALE else ".weight"
            return Name(name, prefix + ours, kind, dim, layer)
    return None


def hf_to_dsv3(name: str, args: ModelArgs) -> tuple[str, int | None] | None:
    """HF tensor name -> (dsv3 parameter name, shard dim), or None for a name dsv3 does not load.

    The (name, dim) view of `classify` for readers of the table: MTP copies of the embedding/head
    show as "mtp-copy:<main name>"; deeper layers than the model has as None.
    """
    n = classify(name, args)
    if n is None or n.kind is Kind.SKIPPED:
        return None
    if n.kind is Kind.MTP_COPY:
        return "mtp-copy:" + n.ours, None
    return n.ours, n.shard_dim


def meta_state(args: ModelArgs) -> dict[str, torch.Tensor]:
    """The model's state on the meta device (names, shapes, dtypes; no storage)."""
    with torch.device("meta"):
        return Transformer(args).state_dict()


def dsv3_to_hf(args: ModelArgs) -> dict[str, str]:
    """dsv3 parameter name -> HF name, for every tensor the model has."""
    return {name: dsv3_name_to_hf(name, args) for name in meta_state(args)}


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
        for hf, ours, _ in MTP_TABLE:
            if rest == ours:
                return f"model.layers.{layer}.{hf}"
        if not rest.startswith("block."):
            raise KeyError(name)
        rest = rest[len("block."):]
    em = re.match(r"ffn\.experts\.(\d+)\.(.+)$", rest)
    e = em.group(1) if em else None
    for hf, ours, _ in LAYER_TABLE:
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
    head, norms, gate weight/bias, the MTP eh_proj / shared_head / embed_tokens, nor V3.2's indexer weights_proj.
    """
    m = _LAYER_PREFIX.match(hf_name)
    if not m or not hf_name.endswith(".weight") or m.group(2).startswith(NOT_QUANTIZED):
        return False
    return any(is_linear and pat.match(m.group(2)) for pat, _, _, is_linear in _LAYER_RE)


def stored_state(expected: dict[str, torch.Tensor], ckpt_args: ModelArgs) -> dict[str, torch.Tensor]:
    """The state an FP8 checkpoint stores for a model built dequantised (`expected`): the release's quantized
    weights as float8_e4m3fn, each with its float32 block scale (what a meta model of `ckpt_args` holds)."""
    if ckpt_args.dtype != "fp8":
        return meta_state(ckpt_args)
    bs, out = ckpt_args.block_size, {}
    for name, t in expected.items():
        if name.endswith(".weight") and t.dim() == 2 and is_quantized_in_release(dsv3_name_to_hf(name, ckpt_args)):
            out[name] = torch.empty(t.shape, dtype=torch.float8_e4m3fn, device="meta")
            out[name[: -len(".weight")] + ".scale"] = torch.empty([-(-d // bs) for d in t.shape], device="meta")
        else:
            out[name] = t
    return out


def mtp_layers_present(ckpt_args: ModelArgs, tensors, overrides: dict) -> dict:
    """`overrides` with n_mtp_layers lowered to the MTP modules the checkpoint holds, when it holds fewer.

    transformers' save_pretrained keeps num_nextn_predict_layers in config.json but writes no MTP
    tensors: use the MTP modules the checkpoint actually holds (a partial one is still an error)."""
    layers_present = {hf_layer_index(n) for n in tensors} - {None}
    present = 0
    while present < ckpt_args.n_mtp_layers and ckpt_args.n_layers + present in layers_present:
        present += 1
    if present < ckpt_args.n_mtp_layers:
        overrides = {**overrides, "n_mtp_layers": present}
    return overrides


def hf_state(model, mtp_copies: bool = True) -> dict[str, torch.Tensor]:
    """The model's tensors under their Hugging Face names (+ the MTP layers' copies of embedding and head)."""
    args, sd = model.args, model.state_dict()
    out = {dsv3_name_to_hf(name, args): t.detach().contiguous() for name, t in sd.items()}
    for k in range(args.n_mtp_layers if mtp_copies else 0):
        for hf_suffix, ours in MTP_SHARED_COPIES.items():
            out[f"model.layers.{args.n_layers + k}.{hf_suffix}"] = sd[ours].detach().clone()
    return out
