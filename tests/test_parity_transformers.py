"""dsv3 against Hugging Face transformers' DeepseekV3ForCausalLM on tiny random checkpoints.

transformers builds and saves the model (`save_pretrained`, safetensors), dsv3 loads the
directory with `dsv3.load_model`: float32 logits must agree to RTOL (relative, global and
max-abs) and greedy decoding must produce the same tokens, in every attention path: naive, and
absorbed with each of its two branches forced (attention in latent space -- what every decode step
runs -- and SDPA on K/V expanded from the latents, which `MLA.expanding_pays` picks for long inputs).

Every weight is random and non-trivial (norm gains around 1, gate correction bias large
enough to change which experts are picked -- checked), so a wrong name mapping, a
transposed projection, a rope layout or a routing detail cannot hide.

transformers 5.24 keeps the routed experts as fused 3-D tensors in memory but
`save_pretrained` writes the per-expert names of the released checkpoints
(`mlp.experts.{e}.gate_proj.weight`, ...): a test below checks that, so no conversion is done here.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ATTN_PATHS, force_attn_path, randomize_hf, rel_err  # tests/ is on sys.path under pytest

import dsv3
from dsv3.config import ModelArgs

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM  # noqa: E402

# Measured (every config, every attention path): 2.6-5.2e-7 relative in norm, 3.7-7.6e-7 in max-abs --
# float32 rounding of the same sums in two different orders. 5e-6 leaves ~7x margin over the worst and
# still fails on small real bugs: a 10x wrong RMSNorm eps gives 7e-6 to 2.5e-5 here (1e-4 passed it).
RTOL = 5e-6

# Tiny configs covering: q-LoRA on/off, groups on/off, non-power-of-two heads and dims,
# YaRN (mscale 1, 0.707, and an explicit attention_factor 1 with mscale_all_dim 0.8) with prompts
# longer than original_max_position_embeddings, plain RoPE, 0 / 1 / 2 leading dense layers, 1 or 2
# shared experts.
CONFIGS = {
    "qlora-groups-yarn": dict(
        vocab_size=131, hidden_size=40, intermediate_size=56, moe_intermediate_size=24, num_hidden_layers=3,
        num_attention_heads=3, n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
        topk_group=1, kv_lora_rank=20, q_lora_rank=24, qk_rope_head_dim=8, v_head_dim=10, qk_nope_head_dim=12,
        first_k_dense_replace=1, max_position_embeddings=64,
        rope_scaling=dict(type="yarn", factor=4.0, original_max_position_embeddings=16, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0),
    ),
    "noqlora-nogroups-plainrope": dict(
        vocab_size=97, hidden_size=30, intermediate_size=44, moe_intermediate_size=14, num_hidden_layers=2,
        num_attention_heads=5, n_shared_experts=2, n_routed_experts=6, num_experts_per_tok=3, n_group=1,
        topk_group=1, kv_lora_rank=18, q_lora_rank=None, qk_rope_head_dim=6, v_head_dim=7, qk_nope_head_dim=6,
        first_k_dense_replace=0, max_position_embeddings=64, rope_scaling=None,
    ),
    "noqlora-groups4-yarn0707-2dense": dict(
        vocab_size=120, hidden_size=36, intermediate_size=50, moe_intermediate_size=12, num_hidden_layers=4,
        num_attention_heads=2, n_shared_experts=1, n_routed_experts=16, num_experts_per_tok=3, n_group=4,
        topk_group=2, kv_lora_rank=14, q_lora_rank=None, qk_rope_head_dim=10, v_head_dim=9, qk_nope_head_dim=11,
        first_k_dense_replace=2, max_position_embeddings=80,
        rope_scaling=dict(type="yarn", factor=5.0, original_max_position_embeddings=12, beta_fast=32, beta_slow=1,
                          mscale=0.707, mscale_all_dim=0.707),
    ),
    "qlora-nogroups-yarn": dict(
        vocab_size=100, hidden_size=48, intermediate_size=40, moe_intermediate_size=20, num_hidden_layers=2,
        num_attention_heads=7, n_shared_experts=1, n_routed_experts=5, num_experts_per_tok=2, n_group=1,
        topk_group=1, kv_lora_rank=12, q_lora_rank=18, qk_rope_head_dim=4, v_head_dim=6, qk_nope_head_dim=5,
        first_k_dense_replace=1, max_position_embeddings=96,
        rope_scaling=dict(type="yarn", factor=8.0, original_max_position_embeddings=12, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0),
    ),
    "qlora-groups-yarn-attention-factor": dict(
        vocab_size=90, hidden_size=32, intermediate_size=36, moe_intermediate_size=16, num_hidden_layers=2,
        num_attention_heads=3, n_shared_experts=1, n_routed_experts=6, num_experts_per_tok=2, n_group=3,
        topk_group=2, kv_lora_rank=10, q_lora_rank=12, qk_rope_head_dim=6, v_head_dim=8, qk_nope_head_dim=9,
        first_k_dense_replace=1, max_position_embeddings=60,
        rope_scaling=dict(type="yarn", factor=6.0, original_max_position_embeddings=10, attention_factor=1.0,
                          mscale_all_dim=0.8),
    ),
}
PROMPT_LEN = 26  # longer than every original_max_position_embeddings above
NEW_TOKENS = 6


def _hf_config(kw: dict) -> DeepseekV3Config:
    return DeepseekV3Config(**kw, num_key_value_heads=kw["num_attention_heads"], attn_implementation="eager",
                            experts_implementation="eager",
                            rms_norm_eps=1e-6)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def hf_pair(request, tmp_path_factory):
    """(config name, HF model, checkpoint dir) -- built and saved once per config."""
    name = request.param
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(_hf_config(CONFIGS[name])).float().eval()
    randomize_hf(hf, seed=sorted(CONFIGS).index(name))
    path = tmp_path_factory.mktemp(name)
    hf.save_pretrained(path)
    return name, hf, path


def _prompts(vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, PROMPT_LEN), generator=g)


@pytest.mark.parametrize("attn_path", ATTN_PATHS)
def test_logits_match_transformers(hf_pair, attn_path, monkeypatch):
    name, hf, path = hf_pair
    attn_impl = force_attn_path(monkeypatch, attn_path)
    model = dsv3.load_model(path, dtype=torch.float32, attn_impl=attn_impl)
    assert model.args.attn_impl == attn_impl
    tokens = _prompts(model.args.vocab_size, seed=1)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        out = model(tokens)
    assert out.shape == ref.shape
    rel, rel_max = rel_err(out, ref)
    assert rel < RTOL, f"{name}/{attn_path}: ‖Δ‖/‖ref‖ = {rel:.2e}"
    assert rel_max < RTOL, f"{name}/{attn_path}: max|Δ|/max|ref| = {rel_max:.2e}"


@pytest.mark.parametrize("attn_path", ATTN_PATHS)
def test_greedy_tokens_match_transformers(hf_pair, attn_path, monkeypatch):
    name, hf, path = hf_pair
    model = dsv3.load_model(path, dtype=torch.float32, attn_impl=force_attn_path(monkeypatch, attn_path))
    tokens = _prompts(model.args.vocab_size, seed=2)
    prompts = [tokens[0].tolist(), tokens[1, : PROMPT_LEN - 5].tolist()]  # different lengths in one batch
    ours = dsv3.generate(model, prompts, NEW_TOKENS)
    for p, got in zip(prompts, ours):
        seq = torch.tensor([p])
        with torch.no_grad():
            for _ in range(NEW_TOKENS):  # HF greedy by full recompute: no cache on the reference side
                seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert got == seq[0, len(p):].tolist(), f"{name}/{attn_path}: greedy tokens differ"


def test_correction_bias_changes_routing(hf_pair):
    """The bias is non-zero and large enough that routing depends on it (else the parity above proves less)."""
    name, hf, path = hf_pair
    model = dsv3.load_model(path, dtype=torch.float32)
    moe_layers = [blk for blk in model.layers if hasattr(blk.ffn, "gate")]
    assert moe_layers, name
    gate = moe_layers[0].ffn.gate
    assert gate.bias is not None and gate.bias.abs().min() > 0
    x = torch.randn(64, model.args.dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        _, with_bias = gate(x)
        saved = gate.bias.clone()
        gate.bias.zero_()
        _, without = gate(x)
        gate.bias.copy_(saved)
    assert not torch.equal(with_bias.sort(-1)[0], without.sort(-1)[0])


def test_save_pretrained_writes_per_expert_names(hf_pair):
    """The released checkpoints' layout (what dsv3's name table knows), not the fused in-memory tensors."""
    from safetensors import safe_open

    name, hf, path = hf_pair
    kw = CONFIGS[name]
    with safe_open(path / "model.safetensors", "pt") as f:
        keys = set(f.keys())  # noqa: SIM118
    layer = kw["first_k_dense_replace"]
    for e in range(kw["n_routed_experts"]):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            assert f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight" in keys
    assert not any("gate_up_proj" in k for k in keys)


def test_hf_config_round_trip(hf_pair):
    """config.json written by transformers -> ModelArgs -> to_hf_config -> DeepseekV3Config -> same ModelArgs."""
    name, hf, path = hf_pair
    kw = CONFIGS[name]
    args = ModelArgs.from_hf_config(path)
    assert args.dim == kw["hidden_size"] and args.n_heads == kw["num_attention_heads"]
    assert args.q_lora_rank == (kw["q_lora_rank"] or 0)
    assert args.n_expert_groups == kw["n_group"] and args.n_limited_groups == kw["topk_group"]
    assert args.n_dense_layers == kw["first_k_dense_replace"]
    assert args.score_func == "sigmoid" and args.gate_bias  # transformers' router is always sigmoid + bias
    if kw["rope_scaling"]:
        rs = kw["rope_scaling"]
        assert (args.rope_factor, args.original_seq_len, args.mscale) == (
            rs["factor"], rs["original_max_position_embeddings"], rs["mscale_all_dim"])
        assert args.softmax_scale == pytest.approx(hf.model.layers[0].self_attn.scaling, rel=1e-12)
    else:
        assert not args.yarn
    hf_cfg = args.to_hf_config()
    assert ModelArgs.from_hf_config(hf_cfg) == args
    theirs = DeepseekV3Config(**hf_cfg)
    assert ModelArgs.from_hf_config(theirs.to_dict()) == args
    for key in ("hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank", "n_group", "topk_group",
                "first_k_dense_replace", "routed_scaling_factor", "num_experts_per_tok", "v_head_dim"):
        assert getattr(theirs, key) == getattr(hf.config, key), key
    assert theirs.rope_parameters["rope_type"] == hf.config.rope_parameters["rope_type"]


def test_tiny_preset_through_transformers(tmp_path):
    """to_hf_config means what it says: transformers builds the tiny preset from it, dsv3 matches that model."""
    args = ModelArgs.preset("tiny")
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**args.to_hf_config(), attn_implementation="eager",
                                                 experts_implementation="eager")).float().eval()
    randomize_hf(hf, seed=11)
    hf.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    model = dsv3.load_model(tmp_path, dtype=torch.float32)
    # transformers writes no MTP tensors: the loader keeps the main model and drops the absent module
    assert model.args.n_mtp_layers == 0
    assert model.args.replace(n_mtp_layers=1, max_seq_len=args.max_seq_len) == args
    tokens = torch.randint(0, args.vocab_size, (1, 3 * args.original_seq_len // 2),
                           generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        rel, rel_max = rel_err(model(tokens), hf(tokens).logits.float())
    assert rel < RTOL and rel_max < RTOL, (rel, rel_max)
