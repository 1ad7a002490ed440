"""ModelArgs: every number that defines a DeepSeek-V3-family model, under the official names.

The field names are those of the official `inference/model.py` ModelArgs, so the
official `config_*.json` files load as they are; the Hugging Face `config.json`
names are mapped in `from_hf_config` / `to_hf_config` (by `dsv3.hf_config`). Fields below the
"dsv3" marker are ours: they are either read from a checkpoint (`gate_bias`,
`n_mtp_layers`, `norm_eps`) or choose an implementation (`attn_impl`,
`gemm_impl`) -- never inferred from a magic size such as `dim == 7168`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from dsv3.errors import ConfigError
from dsv3.hf_config import hf_to_official, official_to_hf

_CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class ModelArgs:
    # --- official fields (defaults = the official ModelArgs defaults, i.e. the 16B shape) ---
    max_batch_size: int = 8  # official only; dsv3 sizes caches per request, this is ignored
    max_seq_len: int = 16384  # longest sequence a cache may hold (prompt + generated)
    dtype: Literal["bf16", "fp8"] = "bf16"  # storage of the Linear weights in the checkpoint
    scale_fmt: str | None = None  # activation scale format for the fp8 GEMM: None or "ue8m0" (V3.1)
    vocab_size: int = 102400  # tokens in the vocabulary
    dim: int = 2048  # model (hidden) width
    inter_dim: int = 10944  # hidden width of the dense MLP layers
    moe_inter_dim: int = 1408  # hidden width of one expert
    n_layers: int = 27  # decoder blocks in the main model (MTP modules not included)
    n_dense_layers: int = 1  # the first n_dense_layers blocks use a dense MLP instead of MoE
    n_heads: int = 16  # attention heads
    n_routed_experts: int = 64  # routed experts per MoE layer
    n_shared_experts: int = 2  # shared experts (one MLP of width n_shared * moe_inter_dim)
    n_activated_experts: int = 6  # routed experts chosen per token (top-k)
    n_expert_groups: int = 1  # experts are split in this many groups for group-limited routing
    n_limited_groups: int = 1  # a token may only use experts in its best n_limited_groups groups
    score_func: Literal["softmax", "sigmoid"] = "softmax"  # gate scores
    route_scale: float = 1.0  # routed output multiplier
    q_lora_rank: int = 0  # q latent width; 0 = a direct wq projection (no q compression)
    kv_lora_rank: int = 512  # kv latent width (what the absorbed cache stores per token)
    qk_nope_head_dim: int = 128  # per-head q/k width without position
    qk_rope_head_dim: int = 64  # per-head q/k width that carries RoPE (k_pe shared by all heads)
    v_head_dim: int = 128  # per-head value width
    original_seq_len: int = 4096  # context the model was pretrained at (YaRN's reference length)
    rope_theta: float = 10000.0  # RoPE base
    rope_factor: float = 40.0  # YaRN context-extension factor (1 = plain RoPE)
    beta_fast: int = 32  # YaRN: rotations above which frequencies are kept
    beta_slow: int = 1  # YaRN: rotations below which frequencies are divided by rope_factor
    mscale: float = 1.0  # YaRN attention-temperature coefficient (HF: rope_scaling.mscale_all_dim)
    # --- dsv3 fields ---
    n_mtp_layers: int = 0  # multi-token-prediction modules (HF num_nextn_predict_layers; V3: 1)
    gate_bias: bool | None = None  # gate has a correction bias; None = sigmoid scoring implies it
    norm_eps: float = 1e-6  # RMSNorm epsilon
    attn_impl: Literal["absorb", "naive"] = "absorb"  # absorbed latent cache, or per-head K/V
    gemm_impl: Literal["bf16", "fp8"] = "bf16"  # how a Linear with FP8 weights multiplies
    moe_impl: Literal["grouped", "loop"] = "grouped"  # expert dispatch: sorted by expert, or one expert at a time
    official_yarn_gate: bool = False  # True: YaRN only if max_seq_len > original_seq_len (official code)
    block_size: int = 128  # FP8 weight block edge (weight_block_size in HF quantization_config)
    # --- V3.2 sparse attention (DSA): official names first; index_n_heads = 0 means no indexer (plain V3) ---
    index_n_heads: int = 0  # lightning-indexer heads (V3.2: 64)
    index_head_dim: int = 128  # width of an indexer query head and of the one indexer key per token
    index_topk: int = 2048  # keys each query attends to (the indexer's top-k)
    index_rope_interleave: bool = False  # indexer RoPE pairs: False (x[i], x[i + r/2]) as the released weights want
    index_fp8: bool = False  # the official demo's Hadamard rotation + FP8 indexer q/k (and FP8 key cache)
    index_impl: Literal["gather", "mask"] = "gather"  # attend to the gathered rows, or a dense mask (testing)

    def __post_init__(self) -> None:
        if self.gate_bias is None:
            self.gate_bias = self.score_func == "sigmoid"
        self.validate()

    # ------------------------------------------------------------------ derived sizes
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def yarn(self) -> bool:
        """Whether YaRN rescales RoPE (and the softmax temperature) for this config."""
        if self.rope_factor <= 1:
            return False
        return self.max_seq_len > self.original_seq_len if self.official_yarn_gate else True

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn:
            m = 0.1 * self.mscale * math.log(self.rope_factor) + 1.0
            scale *= m * m
        return scale

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.n_dense_layers

    def replace(self, **changes: Any) -> ModelArgs:
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ConfigError(f"unknown ModelArgs field(s) {unknown}; known: {_field_names()}")
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads",
                     "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v > 0,
                 f"{name} must be a positive integer, got {v!r}")
        for name in ("q_lora_rank", "n_dense_layers", "n_mtp_layers", "n_shared_experts", "qk_nope_head_dim"):
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                 f"{name} must be a non-negative integer, got {v!r}")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim must be even (RoPE rotates pairs), got {self.qk_rope_head_dim}")
        need(self.n_dense_layers <= self.n_layers,
             f"n_dense_layers ({self.n_dense_layers}) cannot exceed n_layers ({self.n_layers})")
        need(self.score_func in ("softmax", "sigmoid"), f"score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
        need(self.attn_impl in ("absorb", "naive"), f"attn_impl must be 'absorb' or 'naive', got {self.attn_impl!r}")
        need(self.gemm_impl in ("bf16", "fp8"), f"gemm_impl must be 'bf16' or 'fp8', got {self.gemm_impl!r}")
        need(self.moe_impl in ("grouped", "loop"), f"moe_impl must be 'grouped' or 'loop', got {self.moe_impl!r}")
        need(self.dtype in ("bf16", "fp8"), f"dtype must be 'bf16' or 'fp8', got {self.dtype!r}")
        need(self.scale_fmt in (None, "ue8m0"), f"scale_fmt must be null or 'ue8m0', got {self.scale_fmt!r}")
        need(self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        need(self.rope_factor >= 1 or self.rope_factor == 0, f"rope_factor must be >= 1, got {self.rope_factor}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")
        need(self.block_size > 0, f"block_size must be positive, got {self.block_size}")
        if self.n_layers > self.n_dense_layers:  # the model has MoE layers
            need(self.n_routed_experts > 0, f"n_routed_experts must be positive, got {self.n_routed_experts}")
            need(self.n_expert_groups > 0, f"n_expert_groups must be positive, got {self.n_expert_groups}")
            need(self.n_routed_experts % self.n_expert_groups == 0,
                 f"n_routed_experts ({self.n_routed_experts}) must be divisible by n_expert_groups "
                 f"({self.n_expert_groups})")
            need(1 <= self.n_limited_groups <= self.n_expert_groups,
                 f"n_limited_groups ({self.n_limited_groups}) must be between 1 and n_expert_groups "
                 f"({self.n_expert_groups})")
            per_group = self.n_routed_experts // self.n_expert_groups
            need(1 <= self.n_activated_experts <= self.n_limited_groups * per_group,
                 f"n_activated_experts ({self.n_activated_experts}) must be between 1 and the experts in the "
                 f"kept groups (n_limited_groups * n_routed_experts / n_expert_groups = "
                 f"{self.n_limited_groups * per_group})")
            if self.gate_bias and self.n_expert_groups > 1:
                need(per_group >= 2, "with a gate bias, group scores sum the top-2 experts of each group, "
                     f"so each group needs >= 2 experts (got {per_group})")
        self._validate_indexer(need)

    def _validate_indexer(self, need) -> None:
        """V3.2's indexer fields (checked only when there is an indexer)."""
        v = self.index_n_heads
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 0,
             f"index_n_heads must be a non-negative integer (0 = no indexer), got {v!r}")
        if not v:
            return
        for name in ("index_head_dim", "index_topk"):
            x = getattr(self, name)
            need(isinstance(x, int) and not isinstance(x, bool) and x > 0, f"{name} must be a positive integer, got {x!r}")
        need(self.q_lora_rank > 0, "the indexer's queries come from the q latent: index_n_heads > 0 needs q_lora_rank > 0")
        need(self.qk_rope_head_dim <= self.index_head_dim,
             f"index_head_dim ({self.index_head_dim}) must hold the qk_rope_head_dim ({self.qk_rope_head_dim}) rotated dims")
        need(self.index_impl in ("gather", "mask"), f"index_impl must be 'gather' or 'mask', got {self.index_impl!r}")
        d = self.index_head_dim
        need(not self.index_fp8 or d & (d - 1) == 0,
             f"index_fp8 rotates q and k by a Walsh-Hadamard matrix: index_head_dim must be a power of two, got {d}")

    # ------------------------------------------------------------------ presets and files
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> ModelArgs:
        presets = _presets()
        if name not in presets:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(presets)}")
        return presets[name].replace(**overrides) if overrides else presets[name]

    @classmethod
    def tiny(cls, name: str = "tiny", **overrides: Any) -> ModelArgs:
        """A member of the tiny family (`tiny_family`: tiny, tiny-hf, tiny-dist, tiny-lm) with `overrides`."""
        if name not in (family := tiny_family()):
            raise ConfigError(f"unknown tiny config {name!r}; choose one of {sorted(family)}")
        return family[name].replace(**overrides) if overrides else family[name]

    @classmethod
    def presets(cls) -> list[str]:
        return sorted(_presets())

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> ModelArgs:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown field(s) {unknown}; expected official ModelArgs names")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> ModelArgs:
        """An official inference config (`configs/config_671B.json` ...)."""
        d = _read_json(path)
        if "hidden_size" in d or "model_type" in d:
            return cls.from_hf_config(d, source=str(path))
        return cls.from_dict(d, source=str(path))

    @classmethod
    def from_hf_config(cls, cfg: str | os.PathLike | dict[str, Any], *, source: str | None = None) -> ModelArgs:
        """A Hugging Face `config.json` (a dict, the file, or the directory that holds it)."""
        if not isinstance(cfg, dict):
            p = Path(cfg)
            if p.is_dir():
                p = p / "config.json"
            source = source or str(p)
            cfg = _read_json(p)
        source = source or "config.json"
        return cls.from_dict(hf_to_official(cfg, source), source=source)

    @classmethod
    def load(cls, spec: str | os.PathLike) -> ModelArgs:
        """A preset name, an official or HF config file, or a checkpoint directory."""
        s = str(spec)
        if s in _presets():
            return cls.preset(s)
        p = Path(s)
        if p.is_dir():
            return cls.from_hf_config(p)
        if p.is_file():
            return cls.from_json(p)
        raise ConfigError(f"{s!r} is neither a preset ({', '.join(sorted(_presets()))}), "
                          "a config file nor a checkpoint directory")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf_config(self) -> dict[str, Any]:
        """The Hugging Face `config.json` for this model (inverse of `from_hf_config`)."""
        return official_to_hf(self)

def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(ModelArgs)]


def _read_json(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such config file")
    try:
        d = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{p}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{p}: expected a JSON object, got {type(d).__name__}")
    return d


def _config_file(name: str) -> ModelArgs:
    return ModelArgs.from_dict(json.loads((_CONFIG_DIR / f"config_{name}.json").read_text()))


def tiny_family() -> dict[str, ModelArgs]:
    """The small configs (dsv3/configs/config_tiny*.json), one family, each shaped for its use (different on purpose):

    tiny       every feature on, sized for a CPU forward in milliseconds; dims deliberately not powers of two
    tiny-hf    FP8 with partial 128-blocks (dims 200, 136, 160, ...): dsv3.testing's HF-layout checkpoints
    tiny-dist  what 1, 2 and 4 ranks split: 4 heads, 8 experts, vocabulary 256 (FP8 with block_size=8)
    tiny-lm    the bundled model (dsv3/assets/dsv3-tiny), trained by `dsv3 train`; vocab_size from the tokenizer
    """
    return {name: _config_file(name) for name in ("tiny", "tiny-hf", "tiny-dist", "tiny-lm")}


def _presets() -> dict[str, ModelArgs]:
    return {
        "tiny": tiny_family()["tiny"],
        "bench": _config_file("bench"),  # DeepSeek-V3-shaped, 133M parameters: what `dsv3 bench decode` times
        "16B": _config_file("16B"), "236B": _config_file("236B"),
        "671B": _config_file("671B").replace(n_mtp_layers=1),
        "671B-v3.2": _config_file("671B-v3.2").replace(n_mtp_layers=1),  # the official V3.2-Exp file: + indexer
    }
