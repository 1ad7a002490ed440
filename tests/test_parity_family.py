"""dsv3 against transformers on tiny random checkpoints shaped like each released family member.

Each real config.json (tests/data/configs/) is shrunk -- widths, heads, layers, vocabulary and the
number of experts -- but keeps what changes the arithmetic: scoring function and top-k method,
norm_topk_prob, the group structure (n_group, topk_group, with several experts per group), top-k,
routed_scaling_factor, shared experts, q-LoRA on/off, rope_theta, the YaRN fields (factor, beta_fast,
beta_slow, mscale, mscale_all_dim; original length cut to 16 so prompts cross it) and rms_norm_eps.
transformers builds and saves the model (DeepseekV3ForCausalLM, DeepseekV2ForCausalLM for V2-Lite);
the config.json dsv3 reads is the shrunk real file itself (model_type kimi_k2 for Kimi K2, no
scoring_func defaults filled in by transformers). The harness (randomisation, tolerances) is
tests/test_parity_transformers.py's.

The latent down-projections are scaled down (latent RMS ~0.1, as in trained models, where
kv_a_proj outputs are small), so that the eps inside q_norm / kv_norm is visible: with Moonlight's
rms_norm_eps (1e-5) put into them -- the bug this file was written for -- the logits move by
far more than RTOL (checked below), while transformers and the official code build both with 1e-6.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ATTN_PATHS, force_attn_path, randomize_hf, rel_err
from test_parity_transformers import PROMPT_LEN, RTOL

import dsv3
from dsv3.config import ModelArgs

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

CONFIGS = Path(__file__).parent / "data" / "configs"
FAMILY = ["DeepSeek-V3", "DeepSeek-R1", "DeepSeek-V3.1-Base", "Kimi-K2-Instruct", "Moonlight-16B-A3B-Instruct",
          "DeepSeek-V2-Lite-Chat"]
LATENT_SCALE = 0.1
_NOT_FOR_HF = ("architectures", "model_type", "auto_map", "quantization_config", "torch_dtype", "dtype",
               "transformers_version")


def shrink(c: dict) -> dict:
    """The real config with small dimensions and every routing / rope / eps field kept."""
    groups, k = c["n_group"], c["num_experts_per_tok"]
    experts = 3 * groups if groups > 1 else k + 4  # V3: 8 groups of 3, 4 kept, top-8 of 12 candidates
    dense = min(c["first_k_dense_replace"], 1)
    s = {kk: v for kk, v in c.items() if kk != "quantization_config"}
    s.update(vocab_size=160, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
             num_hidden_layers=dense + 2, first_k_dense_replace=dense, num_attention_heads=3, num_key_value_heads=3,
             kv_lora_rank=24, q_lora_rank=32 if c.get("q_lora_rank") else None, qk_nope_head_dim=12,
             qk_rope_head_dim=8, v_head_dim=10, n_routed_experts=experts, max_position_embeddings=64,
             num_nextn_predict_layers=0, torch_dtype="float32", bos_token_id=0, eos_token_id=1)
    if "head_dim" in c:  # V2's config: head_dim is the rope width
        s["head_dim"] = s["qk_rope_head_dim"]
    for key in ("rope_scaling", "rope_parameters"):
        if s.get(key):
            s[key] = {**s[key], "original_max_position_embeddings": 16}
    return s


@pytest.fixture(scope="module", params=FAMILY)
def family_pair(request, tmp_path_factory):
    """(name, HF model, checkpoint dir whose config.json is the shrunk real one)."""
    name = request.param
    real = json.loads((CONFIGS / f"{name}.json").read_text())
    small = shrink(real)
    v2 = real["model_type"] == "deepseek_v2"
    cfg_cls, model_cls = (DeepseekV2Config, DeepseekV2ForCausalLM) if v2 else (DeepseekV3Config, DeepseekV3ForCausalLM)
    hf_cfg = cfg_cls(**{k: v for k, v in small.items() if k not in _NOT_FOR_HF}, attn_implementation="eager",
                     experts_implementation="eager")
    torch.manual_seed(0)
    hf = model_cls(hf_cfg).float().eval()
    randomize_hf(hf, seed=FAMILY.index(name))
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith(("kv_a_proj_with_mqa.weight", "q_a_proj.weight")):
                p.mul_(LATENT_SCALE)
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    (path / "config.json").write_text(json.dumps(small, indent=2))  # what a user's directory holds
    return name, hf, path


def _tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))


def test_shrunk_config_keeps_the_real_fields(family_pair):
    """dsv3 reads the shrunk file as the real one, up to the dimensions shrink() changes."""
    name, _, path = family_pair
    real = ModelArgs.from_hf_config(CONFIGS / f"{name}.json")
    small = ModelArgs.from_hf_config(path)
    for field in ("score_func", "gate_bias", "n_expert_groups", "n_limited_groups", "n_activated_experts",
                  "route_scale", "n_shared_experts", "rope_theta", "rope_factor", "beta_fast", "beta_slow", "mscale",
                  "norm_eps"):
        assert getattr(small, field) == getattr(real, field), field
    assert (small.q_lora_rank > 0) == (real.q_lora_rank > 0)


@pytest.mark.parametrize("attn_path", ATTN_PATHS)
def test_family_logits_match_transformers(family_pair, attn_path, monkeypatch):
    name, hf, path = family_pair
    model = dsv3.load_model(path, dtype=torch.float32, attn_impl=force_attn_path(monkeypatch, attn_path))
    tokens = _tokens(model.args.vocab_size)
    with torch.no_grad():
        rel, rel_max = rel_err(model(tokens), hf(tokens).logits.float())
    assert rel < RTOL and rel_max < RTOL, f"{name}/{attn_path}: {rel:.2e} {rel_max:.2e}"


def test_family_greedy_tokens_match_transformers(family_pair):
    name, hf, path = family_pair
    model = dsv3.load_model(path, dtype=torch.float32)
    prompt = _tokens(model.args.vocab_size)[0].tolist()
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert dsv3.generate(model, [prompt], 5) == [seq[0, len(prompt):].tolist()], name


@pytest.mark.parametrize("family_pair", ["Moonlight-16B-A3B-Instruct"], indirect=True)
def test_latent_norm_eps_is_visible_here(family_pair):
    """The config's rms_norm_eps inside kv_norm (the Moonlight bug; no q-LoRA there) would fail the parity above."""
    name, hf, path = family_pair
    model = dsv3.load_model(path, dtype=torch.float32)
    tokens = _tokens(model.args.vocab_size)
    assert model.args.norm_eps == 1e-5
    for blk in model.layers:
        assert blk.attn.kv_norm.eps == 1e-6 and blk.attn_norm.eps == 1e-5
        blk.attn.kv_norm.eps = model.args.norm_eps
    with torch.no_grad():
        rel, _ = rel_err(model(tokens), hf(tokens).logits.float())
    assert rel > 10 * RTOL, rel


@pytest.mark.parametrize("family_pair", ["DeepSeek-V3.1-Base"], indirect=True)
def test_v31_fp8_ue8m0_checkpoint_matches_transformers(family_pair, tmp_path):
    """V3.1's own format: the float checkpoint quantised by `dsv3 convert --dtype fp8` with its real
    quantization_config (scale_fmt ue8m0 kept), read by dsv3 as FP8; transformers runs the same weights,
    dequantised back to float32 (lossless with power-of-two scales, tests/test_convert_ue8m0.py)."""
    from dsv3.convert import convert

    name, hf_float, path = family_pair
    real_q = json.loads((CONFIGS / f"{name}.json").read_text())["quantization_config"]
    convert(path, tmp_path / "fp8", "fp8", scale_fmt=real_q["scale_fmt"], progress=False)
    q = json.loads((tmp_path / "fp8" / "config.json").read_text())["quantization_config"]
    assert q == real_q
    convert(tmp_path / "fp8", tmp_path / "fp32", "fp32", progress=False)
    hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "fp32", attn_implementation="eager",
                                               experts_implementation="eager").float().eval()
    model = dsv3.load_model(tmp_path / "fp8", dtype=torch.float32)
    ckpt = ModelArgs.from_hf_config(tmp_path / "fp8")
    assert ckpt.dtype == "fp8" and ckpt.scale_fmt == model.args.scale_fmt == "ue8m0"
    tokens = _tokens(model.args.vocab_size)
    with torch.no_grad():
        rel, rel_max = rel_err(model(tokens), hf(tokens).logits.float())
    assert rel < RTOL and rel_max < RTOL, (rel, rel_max)
    with torch.no_grad():  # FP8 changed the weights: the float model before quantisation is another model
        assert rel_err(model(tokens), hf_float(tokens).logits.float())[0] > 100 * RTOL
