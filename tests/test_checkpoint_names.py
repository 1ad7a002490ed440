"""The HF <-> dsv3 name table, save/load round trips and loader errors on models saved by dsv3."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import dsv3
from dsv3.config import ModelArgs
from dsv3.errors import CheckpointError
from dsv3.names import dsv3_to_hf, hf_to_dsv3


@pytest.mark.parametrize("dtype", ["bf16", "fp8"])
def test_name_table_round_trip(dtype):
    args = ModelArgs.preset("tiny", dtype=dtype)
    table = dsv3_to_hf(args)
    assert len(set(table.values())) == len(table)
    for ours, hf in table.items():
        assert hf_to_dsv3(hf, args)[0] == ours, hf
    assert "model.layers.3.eh_proj.weight" in table.values()  # MTP layer = n_layers + 0
    assert "model.layers.1.mlp.gate.e_score_correction_bias" in table.values()
    if dtype == "fp8":
        assert "model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv" in table.values()
    assert hf_to_dsv3("model.layers.3.embed_tokens.weight", args)[0] == "mtp-copy:embed.weight"
    assert hf_to_dsv3("model.layers.3.shared_head.head.weight", args)[0] == "mtp-copy:head.weight"
    assert hf_to_dsv3("model.layers.9.self_attn.o_proj.weight", args) is None


def test_main_names_are_transformers_names():
    transformers = pytest.importorskip("transformers")
    args = ModelArgs.preset("tiny")
    cfg = transformers.DeepseekV3Config(**args.to_hf_config())
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(cfg)
    hf_names = set()
    for name in hf.state_dict():
        if ".mlp.experts.gate_up_proj" in name or ".mlp.experts.down_proj" in name:
            layer = name.split(".mlp.")[0]
            hf_names |= {f"{layer}.mlp.experts.{e}.{p}.weight" for e in range(args.n_routed_experts)
                         for p in ("gate_proj", "up_proj", "down_proj")}
        else:
            hf_names.add(name)
    ours = {hf for name, hf in dsv3_to_hf(args).items() if not name.startswith("mtp.")}
    assert ours == hf_names


def _save_hf(model, path, shards: int = 1, with_mtp_copies: bool = True):
    """Write model in the released layout: HF names, optionally an index over several shards."""
    table = dsv3_to_hf(model.args)
    state = {table[k]: v.contiguous() for k, v in model.state_dict().items()}
    if with_mtp_copies:
        for k in range(model.args.n_mtp_layers):
            layer = model.args.n_layers + k
            state[f"model.layers.{layer}.embed_tokens.weight"] = model.embed.weight.clone()
            state[f"model.layers.{layer}.shared_head.head.weight"] = model.head.weight.clone()
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.args.to_hf_config()))
    names = sorted(state)
    if shards == 1:
        save_file(state, path / "model.safetensors")
        return
    wm = {}
    for i in range(shards):
        fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = names[i::shards]
        save_file({n: state[n] for n in part}, path / fname)
        wm.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))


@pytest.mark.parametrize("shards", [1, 3])
def test_save_load_round_trip_with_mtp(make_model, tmp_path, shards):
    model = make_model(seed=1)
    _save_hf(model, tmp_path, shards=shards)
    loaded = dsv3.load_model(tmp_path, dtype=torch.float32)
    assert loaded.args == model.args
    want, got = model.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for k in want:
        assert torch.equal(want[k], got[k]), k
    tokens = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        a, b = model.forward_mtp(tokens), loaded.forward_mtp(tokens)
    # same weights; only memory layout differs (mmap-loaded tensors), so BLAS rounding may too
    torch.testing.assert_close(b[0], a[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b[1], a[1], rtol=1e-5, atol=1e-5)


def test_load_bf16_keeps_gate_bias_float32(make_model, tmp_path):
    model = make_model(seed=2)
    _save_hf(model, tmp_path)
    loaded = dsv3.load_model(tmp_path, dtype=torch.bfloat16, attn_impl="naive", max_seq_len=32)
    assert loaded.embed.weight.dtype == torch.bfloat16
    assert loaded.layers[1].ffn.gate.bias.dtype == torch.float32
    assert loaded.args.attn_impl == "naive" and loaded.args.max_seq_len == 32


def _ckpt(make_model, tmp_path):
    model = make_model(seed=3)
    _save_hf(model, tmp_path)
    return model


def _edit(path, fn):
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    fn(state)
    save_file(state, path / "model.safetensors")


def test_missing_tensor_is_named(make_model, tmp_path):
    _ckpt(make_model, tmp_path)
    _edit(tmp_path, lambda s: s.pop("model.layers.0.self_attn.kv_b_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor.*model\.layers\.0\.self_attn\.kv_b_proj\.weight"):
        dsv3.load_model(tmp_path)


def test_unexpected_tensor_is_named(make_model, tmp_path):
    _ckpt(make_model, tmp_path)
    _edit(tmp_path, lambda s: s.update({"model.layers.0.self_attn.rotary.weight": torch.zeros(2)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor.*model\.layers\.0\.self_attn\.rotary\.weight"):
        dsv3.load_model(tmp_path)


def test_wrong_shape_is_named(make_model, tmp_path):
    _ckpt(make_model, tmp_path)
    _edit(tmp_path, lambda s: s.update({"model.norm.weight": torch.ones(7)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight in model\.safetensors has shape \[7\], expected \[96\]"):
        dsv3.load_model(tmp_path)


def test_directory_errors(make_model, tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        dsv3.load_model(tmp_path / "nope")
    _ckpt(make_model, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        dsv3.load_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": "gone.safetensors"}}))
    with pytest.raises(CheckpointError, match="gone.safetensors"):
        dsv3.load_model(tmp_path)


def test_deeper_mtp_layers_skipped_only_when_asked(make_model, tmp_path):
    """A checkpoint with the MTP module loads without it when n_mtp_layers=0 is requested."""
    _ckpt(make_model, tmp_path)
    m = dsv3.load_model(tmp_path, n_mtp_layers=0)
    assert len(m.mtp) == 0
