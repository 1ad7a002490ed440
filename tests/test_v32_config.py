"""DeepSeek-V3.2's config and costs: the released config.json and the official V3.2-Exp config file, the
indexer's parameters (hand counts from the reference's shapes) and cache bytes in `dsv3 info` / `dsv3 plan`."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from dsv3.cli import main
from dsv3.config import ModelArgs
from dsv3.errors import ConfigError
from dsv3.info import info
from dsv3.model import Transformer
from dsv3.plan import plan
from dsv3.testing import tiny_v32_args

RELEASED = Path(__file__).parent / "data" / "DeepSeek-V3.2.json"  # deepseek-ai/DeepSeek-V3.2's config.json
OFFICIAL = Path(__file__).resolve().parents[1] / "dsv3" / "configs" / "config_671B-v3.2.json"
# sha256 of json.dumps(file, sort_keys=True): inference/config_671B_v3.2.json of deepseek-ai/DeepSeek-V3.2-Exp
# (commit 3b99a53), the released config.json of DeepSeek-V3.2 (/work/shared/reference/configs/family)
SHA256 = {OFFICIAL: "c2a3ce569bf0c0c8d150ec43120a7a81bb0b77523ab20741497db800b6bb62f5",
          RELEASED: "5d8a074a6662ae6dba6ed0009d83ab656e948e0e184748f2577d272c3cae57b3"}
# One layer's indexer, from the reference's shapes: wq_b 8192 x 1536, wk 128 x 7168, k_norm weight + bias 2 x 128,
# weights_proj 64 x 7168
INDEX_PER_LAYER = 8192 * 1536 + 128 * 7168 + 2 * 128 + 64 * 7168


def test_config_files_are_the_official_ones():
    for path, digest in SHA256.items():
        assert hashlib.sha256(json.dumps(json.loads(path.read_text()), sort_keys=True).encode()).hexdigest() == digest


def test_released_config_json_is_the_official_preset():
    args = ModelArgs.from_hf_config(RELEASED)
    assert (args.index_n_heads, args.index_head_dim, args.index_topk) == (64, 128, 2048)
    assert args.scale_fmt == "ue8m0" and args.dtype == "fp8" and args.n_mtp_layers == 1
    assert args == ModelArgs.preset("671B-v3.2", max_seq_len=163840)
    assert ModelArgs.from_hf_config(args.to_hf_config()) == args
    plain = ModelArgs.from_hf_config({**json.loads(RELEASED.read_text()), "model_type": "deepseek_v3"})
    assert plain.index_n_heads == 0 and plain == args.replace(index_n_heads=0)


def test_v32_without_an_indexer_is_refused():
    cfg = {**json.loads(RELEASED.read_text()), "index_n_heads": 0}
    with pytest.raises(ConfigError, match="index_n_heads"):
        ModelArgs.from_hf_config(cfg, source="x/config.json")


@pytest.mark.slow  # the 671B model on the meta device: ~10 s here
def test_info_counts_the_indexer():
    """V3's figures from the reference plus 61 indexers (the MTP module's one in mtp_params)."""
    v32 = info(ModelArgs.preset("671B-v3.2"))
    assert INDEX_PER_LAYER == 13_959_424 == v32["index_params_per_layer"]
    assert v32["total_params"] == 671_026_419_200 + 61 * INDEX_PER_LAYER == 671_877_944_064  # 671.88B
    assert v32["active_params"] == 37_552_297_472 + 61 * INDEX_PER_LAYER == 38_403_822_336  # 38.40B
    assert v32["mtp_params"] == 11_610_068_224 + INDEX_PER_LAYER
    assert v32["index_cache_bytes_per_token"] == 61 * 128 * 2
    assert v32["index_cache_bytes_per_token_fp8"] == 61 * (128 + 4)  # DeepSeek's serving layout
    assert v32["kv_cache_bytes_per_token"] == 70_272 + 61 * 128 * 2


def test_info_cli_prints_the_indexer(capsys, tmp_path):
    args = tiny_v32_args()  # n_layers 2, index_n_heads 4, index_head_dim 32, q latent 136, dim 200
    (tmp_path / "config.json").write_text(json.dumps(args.to_hf_config()))
    assert main(["info", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    per_layer = 4 * 32 * 136 + 32 * 200 + 2 * 32 + 4 * 200
    assert f"{per_layer:,}" in text and f"{2 * 32 * 2:,} B" in text and f"{2 * (32 + 4):,} B" in text


@pytest.mark.parametrize("fp8", [False, True])
def test_cache_bytes_are_what_the_model_allocates(fp8):
    args = tiny_v32_args(index_fp8=fp8, index_head_dim=128 if fp8 else 32)
    with torch.device("meta"):
        cache = Transformer(args).new_cache(1, 10, dtype=torch.bfloat16)
    assert sum(c.nbytes() for c in cache.layers) == 10 * info(args)["kv_cache_bytes_per_token"]
    per_layer = 128 + 4 if fp8 else 32 * 2
    assert sum(c.tensors["ik"].nbytes + (c.tensors["ik_s"].nbytes if fp8 else 0) for c in cache.layers) == \
        10 * args.n_layers * per_layer


def test_plan_adds_the_replicated_indexer():
    """Per layer and GPU: FP8 wq_b and wk with their float32 block scales, bf16 weights_proj and k_norm."""
    per_layer = 8192 * 1536 + 64 * 12 * 4 + 128 * 7168 + 56 * 4 + 64 * 7168 * 2 + 2 * 128 * 2
    for gpus in (8, 16):
        a = plan(ModelArgs.preset("671B"), gpus, 141, max_seq_len=4096, search=False)
        b = plan(ModelArgs.preset("671B-v3.2"), gpus, 141, max_seq_len=4096, search=False)
        assert b["weights_bytes_per_gpu"] - a["weights_bytes_per_gpu"] == 61 * per_layer
        assert b["kv_cache_bytes_per_gpu"] - a["kv_cache_bytes_per_gpu"] == 4096 * 61 * 128 * 2
