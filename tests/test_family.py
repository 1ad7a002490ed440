"""The DeepSeek-V3 family's real config.json files (tests/data/configs/) through ModelArgs, `dsv3 info` and `dsv3 plan`.

Parameter counts are checked against a hand count written here from the config.json fields alone (HF
names, the formula of each projection), not against dsv3's own model; the literals are what that count
gives for the released files, and the rounded figures the ones published for each model.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv3.config import ModelArgs
from dsv3.errors import ConfigError
from dsv3.info import info
from dsv3.plan import plan

CONFIGS = Path(__file__).parent / "data" / "configs"


def _cfg(name: str) -> dict:
    return json.loads((CONFIGS / f"{name}.json").read_text())


def hand_count(c: dict) -> dict[str, int]:
    """(total, activated, embedding) parameters of a config.json, by the formula of each tensor."""
    m, h, v = c["hidden_size"], c["num_attention_heads"], c["vocab_size"]
    nope, rope, vd, kv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"], c["kv_lora_rank"]
    q = c.get("q_lora_rank")
    attn = (m * q + q + q * h * (nope + rope)) if q else m * h * (nope + rope)
    attn += m * (kv + rope) + kv + kv * h * (nope + vd) + h * vd * m
    e, k, f = c["n_routed_experts"], c["num_experts_per_tok"], c["moe_intermediate_size"]
    expert = 3 * m * f
    bias = e if c.get("topk_method") == "noaux_tc" else 0
    moe = m * e + bias + e * expert + c["n_shared_experts"] * expert
    dense = 3 * m * c["intermediate_size"]
    n_dense = c["first_k_dense_replace"]
    n_moe = c["num_hidden_layers"] - n_dense
    total = 2 * v * m + m + c["num_hidden_layers"] * (attn + 2 * m) + n_dense * dense + n_moe * moe
    return {"total": total, "active": total - n_moe * (e - k) * expert, "embedding": v * m}


def test_kimi_k2_loads_as_deepseek_v3():
    args = ModelArgs.from_hf_config(CONFIGS / "Kimi-K2-Instruct.json")
    assert (args.n_routed_experts, args.n_expert_groups, args.n_limited_groups, args.vocab_size) == (384, 1, 1, 163_840)
    assert (args.n_activated_experts, args.route_scale, args.rope_theta, args.rope_factor) == (8, 2.827, 50000.0, 32.0)
    assert (args.beta_fast, args.beta_slow, args.n_mtp_layers, args.dtype) == (1.0, 1.0, 0, "fp8")
    assert args.score_func == "sigmoid" and args.gate_bias


def test_kimi_k2_other_architecture_refused():
    cfg = {**_cfg("Kimi-K2-Instruct"), "architectures": ["KimiLinearForCausalLM"]}
    with pytest.raises(ConfigError, match=r"model_type 'kimi_k2' with architectures \['KimiLinearForCausalLM'\]"):
        ModelArgs.from_hf_config(cfg, source="config.json")


def test_unknown_model_type_names_kimi_k2():
    with pytest.raises(ConfigError, match="expected 'deepseek_v3', 'deepseek_v32', 'deepseek_v2' or 'kimi_k2'"):
        ModelArgs.from_hf_config({**_cfg("DeepSeek-V3"), "model_type": "qwen3_moe"})


@pytest.mark.parametrize("name, total, active", [
    ("DeepSeek-V3", 671_026_419_200, 37_552_297_472),
    ("DeepSeek-R1", 671_026_419_200, 37_552_297_472),
    ("DeepSeek-V3.1-Base", 671_026_419_200, 37_552_297_472),
    ("Kimi-K2-Instruct", 1_026_408_232_448, 32_861_500_928),
    ("Moonlight-16B-A3B-Instruct", 15_960_110_208, 2_914_776_192),
    ("DeepSeek-V2-Lite-Chat", 15_706_484_224, 2_661_150_208),
])
def test_info_counts_equal_the_hand_count(name, total, active):
    c = _cfg(name)
    hand = hand_count(c)
    assert (hand["total"], hand["active"]) == (total, active)
    got = info(ModelArgs.from_hf_config(c))
    assert (got["total_params"], got["active_params"]) == (total, active)
    assert got["active_params_without_embedding"] == active - hand["embedding"]
    assert got["active_params_without_embedding_and_head"] == active - 2 * hand["embedding"]


def test_kimi_k2_rounded_figures():
    got = info(ModelArgs.from_hf_config(CONFIGS / "Kimi-K2-Instruct.json"))
    assert f"{got['total_params'] / 1e9:,.2f}B / {got['active_params'] / 1e9:.2f}B" == "1,026.41B / 32.86B"


def test_model_cards_count_activated_without_the_embedding():
    """V3's card: 37B activated; V2-Lite's: 2.4B. Only 'without the input embedding' gives both."""
    v3 = info(ModelArgs.from_hf_config(CONFIGS / "DeepSeek-V3.json"))
    lite = info(ModelArgs.from_hf_config(CONFIGS / "DeepSeek-V2-Lite-Chat.json"))
    assert round(v3["active_params_without_embedding"] / 1e9) == 37  # 36.63B
    assert int(lite["active_params_without_embedding"] / 1e8) == 24  # 2.45B: the card's 2.4B
    # the other two conventions miss one card or the other
    assert int(lite["active_params"] / 1e8) == 26  # 2.66B with the embedding
    assert round(v3["active_params_without_embedding_and_head"] / 1e9) == 36  # 35.70B without embedding and head


def test_info_text_states_the_convention(capsys):
    from dsv3.cli import main

    assert main(["info", str(CONFIGS / "DeepSeek-V2-Lite-Chat.json")]) == 0
    text = capsys.readouterr().out
    assert "2,451,435,008" in text and "2,661,150,208" in text and "2,241,719,808" in text
    assert "model cards' convention" in text


def test_kimi_k2_plan_needs_16_gpus_of_141_gb():
    args = ModelArgs.from_hf_config(CONFIGS / "Kimi-K2-Instruct.json")
    out = plan(args, 8, 141)
    assert not out["fits"] and out["smallest_gpus_that_fit"] == 16
    assert plan(args, 16, 141, search=False)["fits"]


def test_kimi_k2_through_the_commands(capsys):
    from dsv3.cli import main

    kimi = str(CONFIGS / "Kimi-K2-Instruct.json")
    assert main(["info", kimi]) == 0
    text = capsys.readouterr().out
    assert "1,026,408,232,448" in text and "32,861,500,928" in text
    assert main(["plan", kimi, "--gpus", "8", "--gpu-mem-gb", "141"]) == 0
    assert "does NOT fit on 8 x 141 GB; the smallest GPU count that fits is 16" in capsys.readouterr().out
