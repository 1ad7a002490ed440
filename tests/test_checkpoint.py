"""Loading Hugging Face DeepSeek-V3 checkpoints: FP8 kept or dequantised, parity with transformers,
the MTP layer, every check before any read, and the corrupted-input matrix."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from dsv3 import checkpoint as ck
from dsv3.checkpoint import check_checkpoint, load_model
from dsv3.errors import CheckpointError, ConfigError
from dsv3.names import hf_to_dsv3
from dsv3.safetensors_io import iter_tensors
from dsv3.testing import cli_env, tiny_hf_args, write_checkpoint

TOKENS = torch.tensor([[3, 17, 101, 250, 8, 64, 299, 12], [7, 7, 200, 31, 5, 90, 1, 44]])


def _shard_of(path, name):
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"][name]


def _edit_shard(path, name, fn):
    """Apply fn(dict of tensors) to the shard holding `name` and save it back."""
    f = path / _shard_of(path, name)
    d = load_file(f)
    fn(d)
    save_file(d, f, metadata={"format": "pt"})


def _edit_index(path, fn):
    p = path / "model.safetensors.index.json"
    idx = json.loads(p.read_text())
    fn(idx["weight_map"])
    p.write_text(json.dumps(idx))


# ---------------------------------------------------------------------- FP8 formats
def test_fp8_kept_as_fp8(fp8_ckpt):
    m = load_model(fp8_ckpt)
    wkv_a = m.layers[0].attn.wkv_a  # 160 x 200: both dims have a partial edge block
    assert wkv_a.weight.dtype == torch.float8_e4m3fn and wkv_a.is_fp8
    assert tuple(wkv_a.scale.shape) == (2, 2) and wkv_a.scale.dtype == torch.float32
    stored = dict(iter_tensors(fp8_ckpt, {n: "" for n in ["model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
                                                          "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"]}))
    assert torch.equal(wkv_a.weight.view(torch.uint8),
                       stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"].view(torch.uint8))
    assert torch.equal(wkv_a.scale, stored["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"])
    # the release's unquantized tensors keep their stored dtypes
    assert m.embed.weight.dtype == m.head.weight.dtype == torch.bfloat16
    assert m.layers[1].ffn.gate.weight.dtype == torch.bfloat16
    assert m.layers[1].ffn.gate.bias.dtype == torch.float32
    assert m.mtp[0].eh_proj.weight.dtype == torch.bfloat16 and not m.mtp[0].eh_proj.is_fp8
    assert m.mtp[0].block.attn.wkv_a.is_fp8
    fp8_params = [p for p in m.parameters() if p.dtype == torch.float8_e4m3fn]
    assert fp8_params and all(p.element_size() == 1 for p in fp8_params)


def test_release_kv_a_shape_576_rows(tmp_path):
    """The real kv_a_proj_with_mqa: 512 + 64 = 576 rows -> 5 scale rows, the last block 64 rows high."""
    args = tiny_hf_args(kv_lora_rank=512, qk_rope_head_dim=64, n_mtp_layers=0)
    p = write_checkpoint(tmp_path / "kv576", args, float_dtype=torch.float32, n_shards=2)
    kept, deq = load_model(p), load_model(p, dtype=torch.float32)
    w = kept.layers[0].attn.wkv_a
    assert tuple(w.weight.shape) == (576, 200) and tuple(w.scale.shape) == (5, 2)
    assert torch.equal(w.dequantized_weight(torch.float32), deq.layers[0].attn.wkv_a.weight)
    with torch.no_grad():
        torch.testing.assert_close(kept(TOKENS), deq(TOKENS), rtol=1e-5, atol=1e-5)


def test_dtype_dequantises_at_load(fp8_ckpt):
    m = load_model(fp8_ckpt, dtype=torch.float32)
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert not any(getattr(mod, "scale", None) is not None for mod in m.modules() if hasattr(mod, "is_fp8"))
    from safetensors import safe_open

    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    with safe_open(fp8_ckpt / _shard_of(fp8_ckpt, name), "pt") as f:  # safetensors' reader, not dsv3's
        w, s = f.get_tensor(name), f.get_tensor(name + "_scale_inv")
    ref = w.float() * s.repeat_interleave(128, 0)[: w.shape[0]].repeat_interleave(128, 1)[:, : w.shape[1]]
    assert torch.equal(m.layers[1].ffn.experts[3].w2.weight, ref)
    mb = load_model(fp8_ckpt, dtype=torch.bfloat16)
    assert mb.layers[1].ffn.gate.bias.dtype == torch.float32  # the correction bias stays float32
    assert mb.embed.weight.dtype == torch.bfloat16


def test_fp8_as_fp8_equals_dequantised_at_load(fp8_ckpt_f32):
    kept = load_model(fp8_ckpt_f32)
    deq = load_model(fp8_ckpt_f32, dtype=torch.float32)
    with torch.no_grad():
        a, b = kept(TOKENS), deq(TOKENS)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _dequantised_hf_dir(src, dst):
    """An independent fp32 HF directory, written without dsv3's reader or dequantiser: safetensors'
    own safe_open over every shard, then each FP8 weight × its scale block (the config's block size)
    broadcast over the weight with a few lines of torch."""
    from safetensors import safe_open

    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    bs_rows, bs_cols = cfg.pop("quantization_config")["weight_block_size"]
    tensors = {}
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            tensors.update({n: f.get_tensor(n) for n in f.keys()})  # noqa: SIM118
    out = {}
    for n, t in tensors.items():
        if n.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[n + "_scale_inv"]
            rows, cols = t.shape
            s = s.repeat_interleave(bs_rows, 0)[:rows].repeat_interleave(bs_cols, 1)[:, :cols]
            t = t.to(torch.float32) * s
        out[n] = t.float()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    cfg["torch_dtype"] = "float32"
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_fp8_matches_transformers_on_dequantised_weights(fp8_ckpt_f32, tmp_path):
    transformers = pytest.importorskip("transformers")
    ref_dir = _dequantised_hf_dir(fp8_ckpt_f32, tmp_path / "deq")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    ours = load_model(fp8_ckpt_f32)  # FP8 kept, computed through Linear's FP8 path
    ours_deq = load_model(fp8_ckpt_f32, dtype=torch.float32)
    with torch.no_grad():
        ref = hf(TOKENS).logits.float()
        a, b = ours(TOKENS), ours_deq(TOKENS)
    scale = ref.abs().max()
    # the same float32 products in another order: measured 8.6e-7 (max-abs), 6.8e-7 (norm); see RTOL in
    # test_parity_transformers.py for why 5e-6
    assert ((a - ref).abs().max() / scale).item() < 5e-6
    assert ((b - ref).abs().max() / scale).item() < 5e-6
    assert ((a - ref).norm() / ref.norm()).item() < 5e-6


def test_mtp_layer_loaded_from_layer_n(fp8_ckpt):
    args = tiny_hf_args()
    assert hf_to_dsv3("model.layers.2.eh_proj.weight", args) == ("mtp.0.eh_proj.weight", None)
    assert hf_to_dsv3("model.layers.2.embed_tokens.weight", args)[0] == "mtp-copy:embed.weight"
    m = load_model(fp8_ckpt)
    stored = dict(iter_tensors(fp8_ckpt, {"model.layers.2.eh_proj.weight": "", "model.layers.2.hnorm.weight": "",
                                          "model.layers.2.shared_head.norm.weight": ""}))
    assert torch.equal(m.mtp[0].eh_proj.weight, stored["model.layers.2.eh_proj.weight"])
    assert torch.equal(m.mtp[0].hnorm.weight, stored["model.layers.2.hnorm.weight"])
    assert torch.equal(m.mtp[0].norm.weight, stored["model.layers.2.shared_head.norm.weight"])
    no_mtp = load_model(fp8_ckpt, n_mtp_layers=0)
    assert len(no_mtp.mtp) == 0


def test_mtp_copy_must_equal_main(fp8_ckpt, copy_ckpt):
    p = copy_ckpt(fp8_ckpt)
    name = "model.layers.2.shared_head.head.weight"
    _edit_shard(p, name, lambda d: d[name].mul_(1.5))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.shared_head\.head\.weight differs.*lm_head\.weight"):
        load_model(p)


def test_bf16_checkpoint_loads_and_casts(bf16_ckpt):
    m = load_model(bf16_ckpt)
    assert m.layers[0].attn.wkv_a.weight.dtype == torch.bfloat16 and m.layers[0].attn.wkv_a.scale is None
    m32 = load_model(bf16_ckpt, dtype=torch.float32)
    assert m32.layers[0].attn.wkv_a.weight.dtype == torch.float32


def test_release_quantization_rule():
    q = ck.is_quantized_in_release
    assert q("model.layers.0.self_attn.kv_a_proj_with_mqa.weight")
    assert q("model.layers.61.mlp.experts.255.down_proj.weight")
    assert q("model.layers.61.self_attn.o_proj.weight")
    for n in ["model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.3.mlp.gate.weight",
              "model.layers.3.mlp.gate.e_score_correction_bias", "model.layers.0.input_layernorm.weight",
              "model.layers.61.eh_proj.weight", "model.layers.61.shared_head.head.weight",
              "model.layers.61.embed_tokens.weight", "model.layers.0.self_attn.kv_a_layernorm.weight"]:
        assert not q(n), n


# ---------------------------------------------------------------------- checks before reading
def test_checks_read_no_tensor_data(fp8_ckpt, copy_ckpt, monkeypatch):
    p = copy_ckpt(fp8_ckpt)
    name = "model.layers.1.mlp.experts.0.up_proj.weight"
    _edit_shard(p, name, lambda d: d.pop(name))
    _edit_index(p, lambda wm: wm.pop(name))
    reads = []
    monkeypatch.setattr(ck.ShardReader, "read", lambda self, info: reads.append(info.name))
    with pytest.raises(CheckpointError, match="missing"):
        load_model(p)
    assert reads == []


def _missing_many(p):
    names = [f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(4)] + ["model.norm.weight"]
    for n in names:
        _edit_shard(p, n, lambda d, n=n: d.pop(n))
    _edit_index(p, lambda wm: [wm.pop(n) for n in names])


def _unexpected(p):
    n = "model.layers.1.mlp.experts.0.up_proj.weight"
    _edit_shard(p, n, lambda d: d.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    _edit_index(p, lambda wm: wm.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", _shard_of(p, n)))


def _scale_missing(p):
    n = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _edit_shard(p, n, lambda d: d.pop(n))
    _edit_index(p, lambda wm: wm.pop(n))


def _shape(p):
    n = "model.layers.0.self_attn.kv_b_proj.weight"
    _edit_shard(p, n, lambda d: d.__setitem__(n, d[n][:-1].clone()))


def _dtype_bias(p):
    n = "model.layers.1.mlp.gate.e_score_correction_bias"
    _edit_shard(p, n, lambda d: d.__setitem__(n, d[n].bfloat16()))


def _dtype_fp8_unscaled(p):
    n = "model.layers.0.self_attn.o_proj.weight"
    _edit_shard(p, n, lambda d: d.__setitem__(n, d[n].bfloat16()))


def _no_quant_config(p):
    cfg = json.loads((p / "config.json").read_text())
    cfg.pop("quantization_config")
    (p / "config.json").write_text(json.dumps(cfg))


def _missing_shard(p):
    (p / "model-00002-of-00003.safetensors").unlink()


def _truncated(p):
    f = p / "model-00003-of-00003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])


def _corrupt_header(p):
    f = p / "model-00001-of-00003.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"garbage!!!!!"
    f.write_bytes(bytes(data))


def _header_size(p):
    f = p / "model-00001-of-00003.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = (10**12).to_bytes(8, "little")
    f.write_bytes(bytes(data))


def _bad_index(p):
    (p / "model.safetensors.index.json").write_text("{not json")


def _index_points_wrong(p):
    n = "model.norm.weight"
    other = next(f for f in ["model-00001-of-00003.safetensors", "model-00002-of-00003.safetensors"]
                 if f != _shard_of(p, n))
    _edit_index(p, lambda wm: wm.__setitem__(n, other))


def _bad_config_json(p):
    (p / "config.json").write_text('{"hidden_size": 200,')


def _unsupported_config(p):
    cfg = json.loads((p / "config.json").read_text())
    cfg["model_type"] = "llama"
    (p / "config.json").write_text(json.dumps(cfg))


def _config_mismatch(p):
    cfg = json.loads((p / "config.json").read_text())
    cfg["num_hidden_layers"] = 3  # the checkpoint has 2 (+ MTP): layer 2 is read as a main layer now
    (p / "config.json").write_text(json.dumps(cfg))


def _no_config(p):
    (p / "config.json").unlink()


CORRUPTIONS = {
    "missing tensors, grouped": (_missing_many, CheckpointError,
                                 r"5 missing tensor\(s\): model\.layers\.1\.mlp\.experts\.\{0\.\.3\}\.up_proj\.weight \(×4\), "
                                 r"model\.norm\.weight"),
    "unexpected tensor": (_unexpected, CheckpointError, r"1 unexpected tensor\(s\): .*rotary_emb\.inv_freq"),
    "fp8 weight without scale": (_scale_missing, CheckpointError,
                                 r"FP8 weight\(s\) without weight_scale_inv: model\.layers\.0\.self_attn\.o_proj"),
    "shape mismatch": (_shape, CheckpointError, r"kv_b_proj\.weight in model-\d+-of-00003\.safetensors has shape "
                                                r"\[127, 144\], expected \[128, 144\] from config\.json"),
    "dtype of the gate bias": (_dtype_bias, CheckpointError, r"e_score_correction_bias .* is bfloat16, expected float32"),
    "fp8 weight stored unquantized": (_dtype_fp8_unscaled, CheckpointError,
                                      r"o_proj\.weight.* is bfloat16, expected float8_e4m3fn"),
    "fp8 tensors, config without quantization": (_no_quant_config, CheckpointError, r"no quantization_config"),
    "missing shard": (_missing_shard, CheckpointError, r"shard file\(s\) listed in the index are missing: "
                                                       r"model-00002-of-00003"),
    "truncated shard": (_truncated, CheckpointError, r"model-00003-of-00003\.safetensors: truncated: tensor .* ends at"),
    "corrupted header": (_corrupt_header, CheckpointError, r"model-00001-of-00003\.safetensors: corrupted"),
    "absurd header size": (_header_size, CheckpointError, r"corrupted safetensors header"),
    "index not json": (_bad_index, CheckpointError, r"index\.json: not a valid safetensors index"),
    "index points to the wrong shard": (_index_points_wrong, CheckpointError,
                                        r"index lists tensor\(s\) their shard does not contain: model\.norm\.weight"),
    "malformed config": (_bad_config_json, ConfigError, r"config\.json: not valid JSON"),
    "unsupported config": (_unsupported_config, ConfigError, r"model_type 'llama' is not a DeepSeek-V3"),
    "config disagrees with tensors": (_config_mismatch, CheckpointError,
                                      r"does not match config\.json; .*unexpected tensor\(s\): model\.layers\.2\.eh_proj"),
    "no config": (_no_config, CheckpointError, r"no config\.json"),
}


@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_corrupted_checkpoint(case, fp8_ckpt, copy_ckpt):
    corrupt, err, pattern = CORRUPTIONS[case]
    p = copy_ckpt(fp8_ckpt)
    corrupt(p)
    with pytest.raises(err, match=pattern):
        check_checkpoint(p)
    with pytest.raises(err):
        load_model(p)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model(tmp_path / "nope")
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(f)


def test_check_weights_finds_nan(fp8_ckpt, copy_ckpt):
    p = copy_ckpt(fp8_ckpt)
    n = "model.layers.0.post_attention_layernorm.weight"
    _edit_shard(p, n, lambda d: d[n].__setitem__(7, float("nan")))
    load_model(p)  # not scanned by default
    with pytest.raises(CheckpointError, match=rf"tensor {n} holds NaN/Inf .* first at flat index 7"):
        load_model(p, check_weights=True)
    # an FP8 NaN (e4m3fn has no Inf): bit pattern 0x7F
    n8 = "model.layers.0.self_attn.q_a_proj.weight"
    _edit_shard(p, n, lambda d: d[n].__setitem__(7, 1.0))
    _edit_shard(p, n8, lambda d: d[n8].view(torch.uint8).view(-1).__setitem__(5, 0x7F))
    with pytest.raises(CheckpointError, match=rf"tensor {n8} holds NaN"):
        load_model(p, check_weights=True)


@pytest.mark.slow
def test_progress_bar_quiet_off_terminal(fp8_ckpt):
    code = f"from dsv3.checkpoint import load_model; load_model({str(fp8_ckpt)!r})"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stderr == "" and r.stdout == ""
    code = f"from dsv3.checkpoint import load_model; load_model({str(fp8_ckpt)!r}, progress=True)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=120)
    assert "loading:" in r.stderr and "B/s" in r.stderr


# ---------------------------------------------------------------------- memory while loading
_MEASURE = r"""
import json, sys, torch
from dsv3.checkpoint import load_model, scan

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

path, warm = sys.argv[1], sys.argv[2]
largest = max(i.nbytes for i in scan(path).values())
load_model(warm)  # page in torch's code for the ops the loader uses: that is not loading memory
open("/proc/self/clear_refs", "w").write("5")  # reset the peak (VmHWM) to the current RSS
base = status("VmRSS")
model = load_model(path)
peak = status("VmHWM")
size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
print(json.dumps({"base": base, "peak": peak, "model": size, "largest": largest}))
"""


@pytest.mark.slow
def test_peak_memory_while_loading(tmp_path):
    # ~270 MB in float32: big enough that "whole shard" or "state dict then copy" loaders exceed the bound
    args = tiny_hf_args(dtype="bf16", vocab_size=16000, dim=512, inter_dim=2048, moe_inter_dim=256, n_layers=6,
                        n_routed_experts=16, n_expert_groups=4, n_limited_groups=2, n_activated_experts=4,
                        q_lora_rank=384, kv_lora_rank=256, n_heads=4)
    p = write_checkpoint(tmp_path / "big", args, float_dtype=torch.float32, n_shards=4, std=0.02)
    warm = write_checkpoint(tmp_path / "warm", tiny_hf_args(dtype="bf16"), float_dtype=torch.float32)
    r = subprocess.run([sys.executable, "-c", _MEASURE, str(p), str(warm)], capture_output=True, text=True, env=cli_env(),
                       timeout=600)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout)
    delta, bound = m["peak"] - m["base"], m["model"] + m["largest"]
    print(f"peak RSS growth {delta / 2**20:.1f} MiB, bound (model {m['model'] / 2**20:.1f} + largest tensor "
          f"{m['largest'] / 2**20:.1f}) {bound / 2**20:.1f} MiB")
    assert m["model"] > 200 * 2**20
    assert delta <= bound + 16 * 2**20  # + interpreter/allocator slack
    assert bound < 1.5 * m["model"]  # the bound is tight enough to fail a loader that holds a second copy
