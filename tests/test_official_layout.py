"""The official repository's layout (`model{i}-mp{n}.safetensors`) recognised, and merged back by
`dsv3 convert --from-official`.

The official layout is written here by `official_convert`, a re-implementation of deepseek-ai/DeepSeek-V3
`inference/convert.py` (its mapping table and loop, line for line; the only change is the MTP layer it
skips, hard-coded there as `model.layers.61` = V3's n_layers, here the tiny model's n_layers) -- so the
test does not go through any dsv3 code on the way out. Round trip: HF tiny FP8 checkpoint -> official
layout for 2 and 4 ranks -> dsv3 convert --from-official -> the same tensors (bytes) and the same logits.
"""

from __future__ import annotations

import json
import os
import shutil
from glob import glob

import pytest
import torch
from safetensors.torch import load_file, safe_open, save_file

import dsv3
from dsv3.cli import main
from dsv3.errors import CheckpointError
from dsv3.testing import tiny_dist_args, write_checkpoint

# inference/convert.py's table: HF key -> (official key, split dim)
MAPPING = {
    "embed_tokens": ("embed", 0), "input_layernorm": ("attn_norm", None),
    "post_attention_layernorm": ("ffn_norm", None), "q_proj": ("wq", 0), "q_a_proj": ("wq_a", None),
    "q_a_layernorm": ("q_norm", None), "q_b_proj": ("wq_b", 0), "kv_a_proj_with_mqa": ("wkv_a", None),
    "kv_a_layernorm": ("kv_norm", None), "kv_b_proj": ("wkv_b", 0), "o_proj": ("wo", 1), "gate": ("gate", None),
    "gate_proj": ("w1", 0), "down_proj": ("w2", 1), "up_proj": ("w3", 0), "norm": ("norm", None),
    "lm_head": ("head", 0), "scale": ("scale", None),
}


def official_convert(hf_ckpt_path, save_path, n_experts, mp, mtp_layer):
    n_local_experts = n_experts // mp
    state_dicts = [{} for _ in range(mp)]
    for file_path in glob(os.path.join(hf_ckpt_path, "*.safetensors")):
        with safe_open(file_path, framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118
                if f"model.layers.{mtp_layer}" in name:
                    continue
                param = f.get_tensor(name)
                if name.startswith("model."):
                    name = name[len("model."):]
                name = name.replace("self_attn", "attn").replace("mlp", "ffn")
                name = name.replace("weight_scale_inv", "scale").replace("e_score_correction_bias", "bias")
                key = name.split(".")[-2]
                assert key in MAPPING, f"Key {key} not found in mapping"
                new_key, dim = MAPPING[key]
                name = name.replace(key, new_key)
                for i in range(mp):
                    new_param = param
                    if "experts" in name and "shared_experts" not in name:
                        idx = int(name.split(".")[-3])
                        if idx < i * n_local_experts or idx >= (i + 1) * n_local_experts:
                            continue
                    elif dim is not None:
                        assert param.size(dim) % mp == 0, f"Dimension {dim} must be divisible by {mp}"
                        shard_size = param.size(dim) // mp
                        new_param = param.narrow(dim, i * shard_size, shard_size).contiguous()
                    state_dicts[i][name] = new_param
    os.makedirs(save_path, exist_ok=True)
    for i in range(mp):
        save_file(state_dicts[i], os.path.join(save_path, f"model{i}-mp{mp}.safetensors"))
    for file_path in glob(os.path.join(hf_ckpt_path, "*token*")):
        shutil.copyfile(file_path, os.path.join(save_path, os.path.basename(file_path)))


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    args = tiny_dist_args(fp8=True)  # 8x8 FP8 blocks: every sliced dim (and its scales) splits in 2 and 4
    return write_checkpoint(tmp_path_factory.mktemp("hf") / "src", args, seed=5, tokenizer=True), args


@pytest.mark.parametrize("mp", [2, 4])
def test_round_trip_official_layout(hf_src, tmp_path, mp):
    src, args = hf_src
    official = tmp_path / f"official-mp{mp}"
    official_convert(src, official, args.n_routed_experts, mp, mtp_layer=args.n_layers)
    assert sorted(p.name for p in official.glob("*.safetensors")) == [f"model{i}-mp{mp}.safetensors" for i in range(mp)]
    back = tmp_path / "back"
    config = src / "config.json"
    if mp == 4:  # the official code's own config format (configs/config_671B.json: ModelArgs field names)
        config = tmp_path / "config_tiny.json"
        config.write_text(json.dumps(args.to_dict()))
    assert main(["convert", "--from-official", str(official), str(back), "--config", str(config)]) == 0
    want = {n: t for n, t in _tensors(src).items() if not n.startswith(f"model.layers.{args.n_layers}.")}
    got = _tensors(back)
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name].view(torch.uint8), t.view(torch.uint8)), name
    assert (back / "tokenizer.json").is_file()
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["quantization_config"]["weight_block_size"] == [8, 8] and cfg["num_nextn_predict_layers"] == 0
    tokens = torch.randint(0, args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(0))
    a, b = dsv3.load_model(src, dtype=torch.float32), dsv3.load_model(back, dtype=torch.float32)
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_official_layout_is_named_when_pointed_at(hf_src, tmp_path, capsys):
    src, args = hf_src
    official_convert(src, tmp_path / "off", args.n_routed_experts, 2, mtp_layer=args.n_layers)
    with pytest.raises(CheckpointError, match=r"holds model0-mp2.safetensors: the official DeepSeek-V3 inference "
                                              r"layout .* dsv3 convert --from-official"):
        dsv3.load_model(tmp_path / "off")
    assert main(["generate", "--ckpt", str(tmp_path / "off"), "--prompt-ids", "1,2", "--max-new-tokens", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "official DeepSeek-V3 inference layout" in err[0] and "Traceback" not in err[0]
    shutil.copy(src / "config.json", tmp_path / "off")  # with a config.json beside it: named all the same
    with pytest.raises(CheckpointError, match="official DeepSeek-V3 inference layout"):
        dsv3.load_model(tmp_path / "off")


def test_from_official_bad_inputs(hf_src, tmp_path, capsys):
    src, args = hf_src
    off = tmp_path / "off"
    official_convert(src, off, args.n_routed_experts, 4, mtp_layer=args.n_layers)
    cfg = str(src / "config.json")
    cases = [
        (["convert", "--from-official", str(off), str(tmp_path / "a")], "carries no config.json; give --config"),
        (["convert", "--from-official", str(off), str(tmp_path / "b"), "--config", cfg, "--dtype", "bf16"],
         "no --dtype/--scale-fmt"),
        (["convert", str(src), str(tmp_path / "c")], "--dtype is required"),
        (["convert", "--from-official", str(src), str(tmp_path / "d"), "--config", cfg], "no model{i}-mp{n}"),
    ]
    for argv, msg in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (argv, err)
    shutil.copy(off / "model0-mp4.safetensors", off / "model0-mp2.safetensors")
    assert main(["convert", "--from-official", str(off), str(tmp_path / "e"), "--config", cfg]) == 2
    assert "shards for several model-parallel sizes ([2, 4]); keep one set" in capsys.readouterr().err
    (off / "model0-mp2.safetensors").unlink()
    (off / "model2-mp4.safetensors").unlink()
    assert main(["convert", "--from-official", str(off), str(tmp_path / "e"), "--config", cfg]) == 2
    assert "incomplete official-layout set for mp=4: missing model2-mp4.safetensors" in capsys.readouterr().err
    assert not any(p.name.startswith((".a", ".b", ".e", "a", "b", "c", "d", "e")) for p in tmp_path.iterdir())
