"""DeepSeek-V3.2 (sparse attention) against transformers 5.24's DeepseekV32ForCausalLM on tiny random checkpoints.

The config is the released V3.2 config.json (tests/data/DeepSeek-V3.2.json) shrunk: its routing (sigmoid,
noaux_tc, 8 groups, 4 kept, top-8), rope (YaRN 40x, beta 32/1, mscale 1) and eps fields are kept, the widths
are small and index_topk (6) is smaller than the prompt (20), so the indexer's choice changes the logits.
transformers builds and saves the model; dsv3 loads the directory. Checked: prefill logits (every attention
path), cached decode steps against transformers' full recompute, and index_topk >= length against
transformers' dense DeepseekV3 on the same weights.

Reference choice: transformers and the official V3.2-Exp code agree on the score's scale; they differ in the
indexer's RoPE pair layout (transformers: half-split, the released weights' layout; the GitHub demo:
interleaved) and in FP8 (transformers computes q.k unquantised). dsv3's defaults follow transformers, so this
file compares with them; the interleaved option and the FP8 arithmetic are checked in test_indexer.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import ATTN_PATHS, force_attn_path, randomize_hf, rel_err

import dsv3

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, DeepseekV32Config, DeepseekV32ForCausalLM  # noqa: E402

RELEASED = Path(__file__).parent / "data" / "DeepSeek-V3.2.json"
RTOL = 5e-6  # as test_parity_transformers.py: float32 rounding of the same sums in another order
SHRINK = dict(vocab_size=128, hidden_size=64, intermediate_size=96, moe_intermediate_size=16, num_hidden_layers=3,
              first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32,
              q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
              index_n_heads=8, index_head_dim=32, index_topk=6)
PROMPT, DECODE = 20, 8


def tiny_v32_config() -> dict:
    cfg = json.loads(RELEASED.read_text())
    cfg.pop("quantization_config")  # float weights here; FP8 V3.2 checkpoints: test_indexer.py
    return {**cfg, **SHRINK}


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    """(HF V3.2 model, its checkpoint dir, prompt tokens (2, PROMPT + DECODE))."""
    cfg = tiny_v32_config()
    torch.manual_seed(0)
    hf = DeepseekV32ForCausalLM(DeepseekV32Config(**cfg, attn_implementation="eager",
                                                  experts_implementation="eager")).float().eval()
    randomize_hf(hf, seed=5)
    path = tmp_path_factory.mktemp("v32")
    hf.save_pretrained(path)
    tokens = torch.randint(0, cfg["vocab_size"], (2, PROMPT + DECODE), generator=torch.Generator().manual_seed(6))
    return hf, path, tokens


@pytest.mark.parametrize("attn_path", ATTN_PATHS)
def test_prefill_logits_match_transformers(v32, attn_path, monkeypatch):
    hf, path, tokens = v32
    model = dsv3.load_model(path, dtype=torch.float32, attn_impl=force_attn_path(monkeypatch, attn_path))
    assert model.args.index_n_heads == 8 and model.args.index_topk < PROMPT
    with torch.no_grad():
        ref = hf(tokens[:, :PROMPT]).logits.float()
        out = model(tokens[:, :PROMPT])
    rel, rel_max = rel_err(out, ref)
    assert rel < RTOL and rel_max < RTOL, (attn_path, rel, rel_max)


@pytest.mark.parametrize("index_impl", ["gather", "mask"])
def test_cached_decode_matches_transformers_recompute(v32, index_impl):
    """Prefill then one token at a time through the latent + indexer caches == transformers on the whole sequence."""
    hf, path, tokens = v32
    model = dsv3.load_model(path, dtype=torch.float32, index_impl=index_impl)
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        cache = model.new_cache(2, PROMPT + DECODE)
        steps = [model(tokens[:, :PROMPT], 0, cache)]
        steps += [model(tokens[:, p:p + 1], p, cache) for p in range(PROMPT, PROMPT + DECODE)]
    rel, rel_max = rel_err(torch.cat(steps, dim=1), ref)
    assert rel < RTOL and rel_max < RTOL, (index_impl, rel, rel_max)


def test_sparsity_matters_and_full_topk_is_dense_v3(v32):
    """index_topk >= length: the logits of transformers' dense DeepseekV3 on the same weights (the indexer
    unused); index_topk = 6 changes them -- else the tests above would prove nothing about the selection."""
    hf, path, tokens = v32
    cfg = {k: v for k, v in tiny_v32_config().items() if not k.startswith("index_")}
    dense = DeepseekV3ForCausalLM(DeepseekV3Config(**{**cfg, "model_type": "deepseek_v3"}, attn_implementation="eager",
                                                   experts_implementation="eager")).float().eval()
    missing, unexpected = dense.load_state_dict(hf.state_dict(), strict=False)
    assert not missing and unexpected and all(".indexer." in k for k in unexpected)
    full = dsv3.load_model(path, dtype=torch.float32, index_topk=PROMPT + DECODE)
    sparse = dsv3.load_model(path, dtype=torch.float32)
    with torch.no_grad():
        ref = dense(tokens).logits.float()
        rel, rel_max = rel_err(full(tokens), ref)
        changed = rel_err(sparse(tokens), ref)[0]
    assert rel < RTOL and rel_max < RTOL, (rel, rel_max)
    assert changed > 1e-2, changed


def test_demo_rope_layout_is_not_transformers(v32):
    """The interleaved (GitHub demo) indexer RoPE picks other keys on these weights: the layout is tested above."""
    hf, path, tokens = v32
    demo = dsv3.load_model(path, dtype=torch.float32, index_rope_interleave=True)
    with torch.no_grad():
        assert rel_err(demo(tokens), hf(tokens).logits.float())[0] > 1e-3


def test_greedy_generate_matches_transformers(v32):
    hf, path, tokens = v32
    model = dsv3.load_model(path, dtype=torch.float32)
    prompts = [tokens[0, :PROMPT].tolist(), tokens[1, : PROMPT - 4].tolist()]
    ours = dsv3.generate(model, prompts, 5)
    for p, got in zip(prompts, ours):
        seq = torch.tensor([p])
        with torch.no_grad():
            for _ in range(5):
                seq = torch.cat([seq, hf(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert got == seq[0, len(p):].tolist()


def test_config_round_trip_through_transformers(v32):
    hf, path, _ = v32
    args = dsv3.ModelArgs.from_hf_config(path)
    assert (args.index_n_heads, args.index_head_dim, args.index_topk) == (8, 32, 6)
    written = args.to_hf_config()
    assert written["model_type"] == "deepseek_v32" and written["architectures"] == ["DeepseekV32ForCausalLM"]
    theirs = DeepseekV32Config(**written)
    assert dsv3.ModelArgs.from_hf_config(theirs.to_dict()) == args
    for key in ("index_n_heads", "index_head_dim", "index_topk", "n_group", "topk_group", "q_lora_rank"):
        assert getattr(theirs, key) == getattr(hf.config, key), key
