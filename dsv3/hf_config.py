"""The Hugging Face `config.json` <-> ModelArgs mapping, for every family member dsv3 runs.

`hf_to_official` turns a config.json dict into official ModelArgs field values (checking the
fields DeepSeek-V3 fixes), `official_to_hf` writes the config.json transformers reads back.
Kept apart from `config.py` so ModelArgs stays the list of fields and their checks.
"""

from __future__ import annotations

import math
from typing import Any

from dsv3.errors import ConfigError

# HF name -> official name, for fields that are plain renames.
_HF_RENAMES = {  # HF config.json field -> ModelArgs field
    "vocab_size": "vocab_size", "hidden_size": "dim", "intermediate_size": "inter_dim",
    "moe_intermediate_size": "moe_inter_dim", "num_hidden_layers": "n_layers",
    "first_k_dense_replace": "n_dense_layers", "num_attention_heads": "n_heads",
    "n_routed_experts": "n_routed_experts", "n_shared_experts": "n_shared_experts",
    "num_experts_per_tok": "n_activated_experts", "n_group": "n_expert_groups", "topk_group": "n_limited_groups",
    "scoring_func": "score_func", "routed_scaling_factor": "route_scale", "kv_lora_rank": "kv_lora_rank",
    "qk_nope_head_dim": "qk_nope_head_dim", "qk_rope_head_dim": "qk_rope_head_dim", "v_head_dim": "v_head_dim",
    "rope_theta": "rope_theta", "num_nextn_predict_layers": "n_mtp_layers", "rms_norm_eps": "norm_eps",
    "max_position_embeddings": "max_seq_len",
}


# transformers 5.24 DeepseekV3Config defaults (= the released V3 config) for fields a config.json may omit
_HF_V3_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 18432, "moe_intermediate_size": 2048, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
    "num_nextn_predict_layers": 1,
}
# transformers' attribute names for two fields (attribute_map), as its to_dict() may write them
_HF_ALIASES = {"num_local_experts": "n_routed_experts", "num_mtp_layers": "num_nextn_predict_layers"}


def _yarn_m(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def hf_to_official(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    mt = cfg.get("model_type")
    if mt == "deepseek_v32":
        return _hf_v32_to_official(cfg, source)
    if mt == "kimi_k2":
        mt = _kimi_k2_as_v3(cfg, source)
    if mt not in (None, "deepseek_v3", "deepseek_v2"):
        raise ConfigError(f"{source}: model_type {mt!r} is not a DeepSeek-V3 family model "
                          "(expected 'deepseek_v3', 'deepseek_v32', 'deepseek_v2' or 'kimi_k2')")
    missing = [k for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size") if k not in cfg]
    if missing:
        raise ConfigError(f"{source}: missing required field(s) {missing}")
    if mt == "deepseek_v3":
        # a field config.json leaves out means what transformers' DeepseekV3Config defaults it to (V3's shape)
        cfg = {**_HF_V3_DEFAULTS, **{_HF_ALIASES[k]: v for k, v in cfg.items() if k in _HF_ALIASES}, **cfg}
    out: dict[str, Any] = {}
    for hf, ours in _HF_RENAMES.items():
        if cfg.get(hf) is not None:
            out[ours] = cfg[hf]
    # transformers' DeepseekV3Config has no scoring_func/topk_method (its router is always sigmoid +
    # noaux_tc) and save_pretrained omits them; the released V3 config.json states them explicitly.
    if mt == "deepseek_v3" and cfg.get("scoring_func") is None:
        out["score_func"] = "sigmoid"
    # transformers' config class writes some fields under its own attribute names
    if cfg.get("num_mtp_layers") is not None and "num_nextn_predict_layers" not in cfg:
        out["n_mtp_layers"] = cfg["num_mtp_layers"]
    if "n_routed_experts" not in out and cfg.get("num_local_experts") is not None:
        out["n_routed_experts"] = cfg["num_local_experts"]
    out["q_lora_rank"] = cfg.get("q_lora_rank") or 0
    if cfg.get("num_key_value_heads", cfg["num_attention_heads"]) != cfg["num_attention_heads"]:
        raise ConfigError(f"{source}: num_key_value_heads must equal num_attention_heads for MLA")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} unsupported (DeepSeek-V3 uses 'silu')")
    if cfg.get("rope_interleave") is False:
        raise ConfigError(f"{source}: rope_interleave=false (rotate-half rope layout) is not the DeepSeek-V3 "
                          "checkpoint layout; expected true or absent")
    if cfg.get("attention_bias"):
        raise ConfigError(f"{source}: attention_bias=true is not part of DeepSeek-V3")
    if cfg.get("tie_word_embeddings"):
        raise ConfigError(f"{source}: tie_word_embeddings=true is not part of DeepSeek-V3")
    freq = cfg.get("moe_layer_freq", 1)
    if freq != 1:
        raise ConfigError(f"{source}: moe_layer_freq {freq} unsupported (DeepSeek-V3 uses 1)")
    method = cfg.get("topk_method") or ("noaux_tc" if out.get("score_func", "softmax") == "sigmoid" else "greedy")
    if method not in ("noaux_tc", "greedy", "group_limited_greedy"):
        raise ConfigError(f"{source}: topk_method {method!r} unsupported (expected noaux_tc, greedy "
                          "or group_limited_greedy)")
    out["gate_bias"] = method == "noaux_tc"
    score = out.get("score_func", "softmax")
    norm = cfg.get("norm_topk_prob", score == "sigmoid")
    if bool(norm) != (score == "sigmoid"):
        raise ConfigError(f"{source}: norm_topk_prob={norm} with scoring_func={score!r} is not a DeepSeek "
                          "combination (sigmoid renormalises the top-k weights, softmax does not)")
    _hf_rope(cfg, out, source)
    _hf_quantization(cfg.get("quantization_config"), out, source)
    if "n_routed_experts" not in out:  # a dense-only config
        out["n_dense_layers"] = out["n_layers"]
    return out


def _kimi_k2_as_v3(cfg: dict[str, Any], source: str) -> str:
    """Kimi K2 (Moonshot) ships model_type "kimi_k2" with the DeepSeek-V3 architecture class: the same
    tensors and forward, other sizes (384 experts, no groups, vocabulary 163,840). Read as deepseek_v3."""
    arch = cfg.get("architectures") or ["DeepseekV3ForCausalLM"]
    if arch != ["DeepseekV3ForCausalLM"]:
        raise ConfigError(f"{source}: model_type 'kimi_k2' with architectures {arch}; dsv3 runs Kimi K2 as "
                          "the DeepSeek-V3 architecture (expected ['DeepseekV3ForCausalLM'])")
    return "deepseek_v3"


# --- DeepSeek-V3.2 (model_type deepseek_v32): DeepSeek-V3 plus the lightning indexer's three fields ---
# transformers 5.24 DeepseekV32Config defaults: V3's shape, a 163840-token context, the indexer of the release.
_HF_V32_DEFAULTS: dict[str, Any] = {"max_position_embeddings": 163840, "index_n_heads": 64,
                                    "index_head_dim": 128, "index_topk": 2048}
_HF_V32_FIELDS = ("index_n_heads", "index_head_dim", "index_topk")  # same names in config.json and ModelArgs


def _hf_v32_to_official(cfg: dict[str, Any], source: str) -> dict[str, Any]:
    """A deepseek_v32 config.json: read as DeepSeek-V3 (its defaults included), then the indexer fields."""
    full = {**_HF_V32_DEFAULTS, **cfg}
    out = hf_to_official({k: v for k, v in full.items() if k not in _HF_V32_FIELDS} | {"model_type": "deepseek_v3"},
                         source)
    for name in _HF_V32_FIELDS:
        out[name] = full[name]
    if not out["index_n_heads"]:
        raise ConfigError(f"{source}: model_type 'deepseek_v32' with index_n_heads={full['index_n_heads']!r}: "
                          "a V3.2 model has a lightning indexer (expected a positive number of heads)")
    return out


def _v32_hf_fields(args: Any) -> dict[str, Any]:
    """What a V3.2 config.json adds to (and changes in) DeepSeek-V3's."""
    return {"architectures": ["DeepseekV32ForCausalLM"], "model_type": "deepseek_v32",
            **{name: getattr(args, name) for name in _HF_V32_FIELDS}}


def _hf_rope(cfg: dict[str, Any], out: dict[str, Any], source: str) -> None:
    """rope_scaling (or rope_parameters) -> the YaRN fields of `out`."""
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    rtype = (rs or {}).get("type", (rs or {}).get("rope_type", "default")) if rs else "default"
    if rs and "rope_theta" in rs and "rope_theta" not in cfg:
        out["rope_theta"] = rs["rope_theta"]
    if rtype == "yarn":
        factor = rs.get("factor")
        if not factor:
            raise ConfigError(f"{source}: rope_scaling.factor is missing (YaRN needs its context-extension factor)")
        out["rope_factor"] = factor
        out["original_seq_len"] = rs.get("original_max_position_embeddings", 4096)
        out["beta_fast"] = rs.get("beta_fast", 32)
        out["beta_slow"] = rs.get("beta_slow", 1)
        m_all = rs.get("mscale_all_dim") or 0
        m = rs.get("mscale") or 0
        # transformers multiplies cos/sin by an attention factor derived from these; DeepSeek checkpoints
        # set mscale == mscale_all_dim, which makes it 1 -- the only form dsv3 (and the official code) runs.
        attn_factor = rs.get("attention_factor")
        if attn_factor is None:
            attn_factor = _yarn_m(factor, m) / _yarn_m(factor, m_all) if m and m_all else _yarn_m(factor, 1)
        if abs(attn_factor - 1) > 1e-9:
            raise ConfigError(f"{source}: rope_scaling with mscale={m or None}, mscale_all_dim={m_all or None} "
                              f"scales cos/sin by {attn_factor:.6g} (transformers' YaRN attention_factor); "
                              "unsupported: DeepSeek checkpoints set mscale == mscale_all_dim")
        out["mscale"] = m_all
    elif rtype == "default":
        out["rope_factor"] = 1.0
        out["original_seq_len"] = min(out.get("max_seq_len", 4096), 4096)
        out["mscale"] = 0.0
    else:
        raise ConfigError(f"{source}: rope_scaling type {rtype!r} unsupported (expected 'yarn' or none)")


def _hf_quantization(q: dict | None, out: dict[str, Any], source: str) -> None:
    """quantization_config -> dtype "fp8", block_size, scale_fmt in `out`."""
    if not q:
        return
    if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
        raise ConfigError(f"{source}: quantization_config {q} unsupported (expected fp8 e4m3 blocks)")
    bs = q.get("weight_block_size", [128, 128])
    if len(bs) != 2 or bs[0] != bs[1]:
        raise ConfigError(f"{source}: weight_block_size {bs} unsupported (expected square blocks)")
    out["dtype"], out["block_size"] = "fp8", bs[0]
    if q.get("scale_fmt"):
        out["scale_fmt"] = q["scale_fmt"]


def official_to_hf(args: Any) -> dict[str, Any]:
    """The Hugging Face `config.json` of a ModelArgs (inverse of `hf_to_official`)."""
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "vocab_size": args.vocab_size,
        "hidden_size": args.dim,
        "intermediate_size": args.inter_dim,
        "moe_intermediate_size": args.moe_inter_dim,
        "num_hidden_layers": args.n_layers,
        "num_nextn_predict_layers": args.n_mtp_layers,
        "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_heads,
        "n_shared_experts": args.n_shared_experts,
        "n_routed_experts": args.n_routed_experts,
        "routed_scaling_factor": args.route_scale,
        "kv_lora_rank": args.kv_lora_rank,
        "q_lora_rank": args.q_lora_rank or None,
        "qk_rope_head_dim": args.qk_rope_head_dim,
        "v_head_dim": args.v_head_dim,
        "qk_nope_head_dim": args.qk_nope_head_dim,
        "topk_method": "noaux_tc" if args.gate_bias else ("group_limited_greedy" if args.n_expert_groups > 1 else "greedy"),
        "n_group": args.n_expert_groups,
        "topk_group": args.n_limited_groups,
        "num_experts_per_tok": args.n_activated_experts,
        "moe_layer_freq": 1,
        "first_k_dense_replace": args.n_dense_layers,
        "norm_topk_prob": args.score_func == "sigmoid",
        "scoring_func": args.score_func,
        "hidden_act": "silu",
        "max_position_embeddings": args.max_seq_len,
        "rms_norm_eps": args.norm_eps,
        "rope_theta": args.rope_theta,
        "attention_bias": False,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
    }
    if args.rope_factor > 1:
        cfg["rope_scaling"] = {
            "type": "yarn",
            "factor": args.rope_factor,
            "original_max_position_embeddings": args.original_seq_len,
            "beta_fast": args.beta_fast,
            "beta_slow": args.beta_slow,
            "mscale": args.mscale,
            "mscale_all_dim": args.mscale,
        }
    if args.dtype == "fp8":
        cfg["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [args.block_size, args.block_size],
        }
        if args.scale_fmt:
            cfg["quantization_config"]["scale_fmt"] = args.scale_fmt
    if args.index_n_heads:  # V3.2
        cfg.update(_v32_hf_fields(args))
    return cfg
