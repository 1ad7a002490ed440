"""ModelArgs: presets = the official files, the HF mapping, round trips, and every validation error."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pytest

from dsv3.config import ModelArgs
from dsv3.errors import ConfigError

REF = Path("/work/shared/reference/configs")
PKG = Path(__file__).resolve().parents[1] / "dsv3" / "configs"
CONFIGS = REF if REF.is_dir() else PKG  # the shared reference where it exists, else the package's copy
DEFAULTS = {f.name: f.default for f in dataclasses.fields(ModelArgs)}


# sha256 of json.dumps(official file, sort_keys=True), taken from the official files (/work/shared/reference/configs):
# the package's copies are checked against these everywhere, and against the files themselves where they exist.
OFFICIAL_SHA256 = {
    "config_16B.json": "8f28dbb64762db08bef6fac2fdebc3b0bceb484f285282c17c9a40cb5a80319f",
    "config_236B.json": "e990b0fb8e3f5d9291c78021ca414f3641d546b774abe840dc0c275653f6d1b8",
    "config_671B.json": "02615a10cc475fa1682e9303c4d932f245db0d5df3e52b46f8f213f547d89820",
    "config_v3.1.json": "d7dabcc3b1d80f723675c614e1d44f4b409165a75e243d04ac1b27c56b688aee",
    "hf_config_deepseek_v3.json": "e9b2ab3401c24824f85a2bf4ece602aaada5311b7535b15ed1386e484216a5b0",
}


def _canonical_sha256(path: Path) -> str:
    return hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest()


def test_package_configs_are_the_official_files():
    for name, digest in OFFICIAL_SHA256.items():
        assert _canonical_sha256(PKG / name) == digest, name


@pytest.mark.skipif(not REF.is_dir(), reason=f"{REF} absent: the package copies are checked by hash only")
def test_package_configs_equal_the_shared_reference():
    assert sorted(p.name for p in REF.glob("*.json")) == sorted(OFFICIAL_SHA256)
    for name in OFFICIAL_SHA256:
        assert json.loads((PKG / name).read_text()) == json.loads((REF / name).read_text()), name


@pytest.mark.parametrize("preset", ["16B", "236B", "671B"])
def test_preset_equals_official_json(preset):
    official = json.loads((CONFIGS / f"config_{preset}.json").read_text())
    args = ModelArgs.preset(preset)
    for key, value in official.items():
        assert getattr(args, key) == value, key
    derived = {"gate_bias": args.score_func == "sigmoid", "n_mtp_layers": 1 if preset == "671B" else 0}
    for key, default in DEFAULTS.items():
        if key not in official:
            assert getattr(args, key) == derived.get(key, default), key
    # the official files know nothing of MTP; the 671B preset adds V3's one module
    assert ModelArgs.from_json(CONFIGS / f"config_{preset}.json") == args.replace(n_mtp_layers=0)


def test_from_hf_config_maps_every_field():
    path = CONFIGS / "hf_config_deepseek_v3.json"
    hf = json.loads(path.read_text())
    args = ModelArgs.from_hf_config(path)
    rs, q = hf["rope_scaling"], hf["quantization_config"]
    expected = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], inter_dim=hf["intermediate_size"],
        moe_inter_dim=hf["moe_intermediate_size"], n_layers=hf["num_hidden_layers"],
        n_dense_layers=hf["first_k_dense_replace"], n_heads=hf["num_attention_heads"],
        n_routed_experts=hf["n_routed_experts"], n_shared_experts=hf["n_shared_experts"],
        n_activated_experts=hf["num_experts_per_tok"], n_expert_groups=hf["n_group"],
        n_limited_groups=hf["topk_group"], score_func=hf["scoring_func"], route_scale=hf["routed_scaling_factor"],
        q_lora_rank=hf["q_lora_rank"], kv_lora_rank=hf["kv_lora_rank"], qk_nope_head_dim=hf["qk_nope_head_dim"],
        qk_rope_head_dim=hf["qk_rope_head_dim"], v_head_dim=hf["v_head_dim"],
        original_seq_len=rs["original_max_position_embeddings"], rope_theta=hf["rope_theta"],
        rope_factor=rs["factor"], beta_fast=rs["beta_fast"], beta_slow=rs["beta_slow"], mscale=rs["mscale_all_dim"],
        n_mtp_layers=hf["num_nextn_predict_layers"], gate_bias=True, norm_eps=hf["rms_norm_eps"],
        max_seq_len=hf["max_position_embeddings"], dtype="fp8", block_size=q["weight_block_size"][0],
    )
    for key, value in expected.items():
        assert getattr(args, key) == value, key
    # and it is the 671B preset, at the HF context length
    assert args == ModelArgs.preset("671B").replace(max_seq_len=hf["max_position_embeddings"])
    assert ModelArgs.from_json(path) == args  # from_json recognises an HF file


def test_hf_q_lora_null_and_transformers_defaults():
    hf = json.loads((CONFIGS / "hf_config_deepseek_v3.json").read_text())
    hf["q_lora_rank"] = None
    assert ModelArgs.from_hf_config(hf).q_lora_rank == 0
    # transformers' save_pretrained omits scoring_func / topk_method: DeepseekV3's router is sigmoid + noaux_tc
    for key in ("scoring_func", "topk_method"):
        hf.pop(key)
    a = ModelArgs.from_hf_config(hf)
    assert a.score_func == "sigmoid" and a.gate_bias
    # transformers' newer name for rope_scaling
    hf["rope_parameters"] = dict(hf.pop("rope_scaling"), rope_theta=hf.pop("rope_theta"), rope_type="yarn")
    assert ModelArgs.from_hf_config(hf) == a


def test_yarn_attention_factor_one_is_accepted():
    """An explicit attention_factor of 1 is DeepSeek's form too; the softmax mscale is mscale_all_dim."""
    rs = {k: v for k, v in _YARN.items() if k != "mscale"}
    args = ModelArgs.from_hf_config(_hf(rope_scaling=dict(rs, attention_factor=1.0, mscale_all_dim=0.8)))
    assert args.mscale == 0.8 and args.yarn


def test_v31_scale_fmt():
    args = ModelArgs.from_json(CONFIGS / "config_v3.1.json")
    assert args.scale_fmt == "ue8m0" and args.dtype == "fp8"
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args


@pytest.mark.parametrize("preset", ["tiny", "16B", "236B", "671B"])
def test_to_hf_config_round_trip(preset, tmp_path):
    args = ModelArgs.preset(preset)
    cfg = args.to_hf_config()
    assert ModelArgs.from_hf_config(cfg) == args
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert ModelArgs.from_hf_config(tmp_path) == args  # through a file in a checkpoint directory
    assert ModelArgs.load(tmp_path) == args
    assert cfg["q_lora_rank"] == (args.q_lora_rank or None)


@pytest.mark.parametrize("preset", ["tiny", "16B", "236B", "671B"])
def test_transformers_accepts_to_hf_config(preset):
    transformers = pytest.importorskip("transformers")
    args = ModelArgs.preset(preset)
    theirs = transformers.DeepseekV3Config(**args.to_hf_config())
    assert (theirs.hidden_size, theirs.num_hidden_layers, theirs.n_routed_experts, theirs.q_lora_rank) == (
        args.dim, args.n_layers, args.n_routed_experts, args.q_lora_rank or None)
    assert ModelArgs.from_hf_config(theirs.to_dict()) == args


def test_load_spec_kinds(tmp_path):
    assert ModelArgs.load("671B") == ModelArgs.preset("671B")
    assert ModelArgs.load(CONFIGS / "config_236B.json") == ModelArgs.preset("236B")
    assert sorted(ModelArgs.presets()) == ["16B", "236B", "671B", "671B-v3.2", "bench", "tiny"]


# ---------------------------------------------------------------------- every validation error
def _tiny(**changes):
    d = dataclasses.asdict(ModelArgs.preset("tiny"))
    d.update(changes)
    return ModelArgs(**d)


POSITIVE = ["vocab_size", "dim", "inter_dim", "moe_inter_dim", "n_layers", "n_heads", "kv_lora_rank",
            "qk_rope_head_dim", "v_head_dim", "max_seq_len", "original_seq_len"]
NON_NEGATIVE = ["q_lora_rank", "n_dense_layers", "n_mtp_layers", "n_shared_experts", "qk_nope_head_dim"]

VALIDATION_CASES = (
    [(dict(**{f: bad}), f) for f in POSITIVE for bad in (0, -3, True, 2.5)]
    + [(dict(**{f: bad}), f) for f in NON_NEGATIVE for bad in (-1, False, 1.5)]
    + [
        (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
        (dict(n_dense_layers=4), "n_dense_layers"),
        (dict(score_func="relu"), "score_func"),
        (dict(attn_impl="flash"), "attn_impl"),
        (dict(gemm_impl="int8"), "gemm_impl"),
        (dict(moe_impl="fast"), "moe_impl"),
        (dict(dtype="fp16"), "dtype"),
        (dict(scale_fmt="e8m0"), "scale_fmt"),
        (dict(rope_theta=0), "rope_theta"),
        (dict(rope_factor=0.5), "rope_factor"),
        (dict(norm_eps=0.0), "norm_eps"),
        (dict(block_size=0), "block_size"),
        (dict(n_routed_experts=0), "n_routed_experts"),
        (dict(n_expert_groups=0), "n_expert_groups"),
        (dict(n_routed_experts=18), "n_expert_groups"),  # 18 experts in 4 groups
        (dict(n_limited_groups=5), "n_limited_groups"),
        (dict(n_limited_groups=0), "n_limited_groups"),
        (dict(n_activated_experts=9), "n_activated_experts"),  # kept groups hold 2 * 4 = 8 experts
        (dict(n_activated_experts=0), "n_activated_experts"),
        (dict(n_expert_groups=16, n_limited_groups=8, n_activated_experts=4), "2 experts"),  # top-2 of 1 expert
    ]
)


@pytest.mark.parametrize("changes,field", VALIDATION_CASES,
                         ids=[f"{k}={v!r}" for c, _ in VALIDATION_CASES for k, v in list(c.items())[:1]])
def test_validation_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        _tiny(**changes)


def test_dense_only_model_skips_moe_checks():
    a = _tiny(n_dense_layers=3, n_routed_experts=0, n_expert_groups=0)
    assert not any(a.is_moe_layer(i) for i in range(a.n_layers))


def test_other_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown ModelArgs field.*'dimension'"):
        ModelArgs.preset("tiny").replace(dimension=3)
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelArgs.preset("huge")
    with pytest.raises(ConfigError, match="unknown field.*'hidden'"):
        ModelArgs.from_dict({"hidden": 3})
    with pytest.raises(ConfigError, match="neither a preset"):
        ModelArgs.load(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="no such config file"):
        ModelArgs.from_json(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelArgs.from_json(bad)
    bad.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        ModelArgs.from_json(bad)
    bad.write_text(json.dumps({"dim": 0}))
    with pytest.raises(ConfigError, match=f"{bad.name}.*dim must be a positive integer"):
        ModelArgs.from_json(bad)


def _hf(**changes):
    d = ModelArgs.preset("tiny").to_hf_config()
    for k, v in changes.items():
        if v is _DROP:
            d.pop(k)
        else:
            d[k] = v
    return d


_DROP = object()
_YARN = ModelArgs.preset("tiny").to_hf_config()["rope_scaling"]
HF_CASES = [
    (dict(model_type="llama"), "model_type"),
    (dict(hidden_size=_DROP), "hidden_size"),
    (dict(num_hidden_layers=_DROP), "num_hidden_layers"),
    (dict(num_key_value_heads=1), "num_key_value_heads"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(tie_word_embeddings=True), "tie_word_embeddings"),
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(topk_method="random"), "topk_method"),
    (dict(norm_topk_prob=False), "norm_topk_prob"),
    (dict(rope_scaling=dict(_YARN, mscale=0.5)), "mscale"),
    # without both mscale keys transformers scales cos/sin by 0.1·ln(factor) + 1: refused, not silently changed
    (dict(rope_scaling={k: v for k, v in _YARN.items() if k not in ("mscale", "mscale_all_dim")}), "mscale"),
    (dict(rope_scaling={k: v for k, v in _YARN.items() if k != "mscale"}), "mscale=None"),
    (dict(rope_scaling={k: v for k, v in _YARN.items() if k != "mscale_all_dim"}), "mscale_all_dim=None"),
    (dict(rope_scaling={k: v for k, v in _YARN.items() if k != "factor"}), "rope_scaling.factor"),
    (dict(rope_interleave=False), "rope_interleave"),
    (dict(rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling type 'linear'"),
    (dict(quantization_config=dict(quant_method="gptq")), "quantization_config"),
    (dict(quantization_config=dict(quant_method="fp8", fmt="e5m2")), "quantization_config"),
    (dict(quantization_config=dict(quant_method="fp8", weight_block_size=[128, 64])), "weight_block_size"),
    (dict(first_k_dense_replace=-1), "n_dense_layers"),  # mapped, then validated under our name
]


@pytest.mark.parametrize("changes,field", HF_CASES, ids=[f"{c}" for _, c in HF_CASES])
def test_hf_config_errors_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelArgs.from_hf_config(_hf(**changes), source="x/config.json")


def test_fields_missing_from_hf_config_take_transformers_defaults():
    """A sparse deepseek_v3 config.json means what transformers makes of it (its defaults are V3's shape)."""
    transformers = pytest.importorskip("transformers")
    sparse = {"model_type": "deepseek_v3", "hidden_size": 64, "num_hidden_layers": 4, "num_attention_heads": 2,
              "num_key_value_heads": 2, "vocab_size": 100}  # (transformers' own default for kv heads is 128)
    args = ModelArgs.from_hf_config(sparse)
    assert args == ModelArgs.from_hf_config(transformers.DeepseekV3Config(**sparse).to_dict())
    assert (args.n_dense_layers, args.n_routed_experts, args.q_lora_rank, args.n_expert_groups) == (3, 256, 1536, 8)
    assert ModelArgs.from_hf_config(dict(sparse, num_local_experts=16)).n_routed_experts == 16
