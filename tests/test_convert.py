"""`dsv3 convert`: FP8 <-> BF16/FP32 round trips, the release's quantization rule, a transformers-loadable
output, atomic writes (temporary directory + rename, --force), side files and quantization_config."""

import json

import pytest
import torch

from dsv3 import convert as conv
from dsv3.checkpoint import is_quantized_in_release, iter_tensors, load_model, scan
from dsv3.errors import CheckpointError
from dsv3.fp8 import weight_dequant, weight_quant
from dsv3.testing import run_cli

TOKENS = torch.tensor([[3, 17, 101, 250, 8, 64, 299, 12]])


def _cfg(p):
    return json.loads((p / "config.json").read_text())


def test_fp8_to_bf16_is_a_valid_hf_checkpoint(fp8_ckpt, tmp_path):
    dst = tmp_path / "bf16"
    r = run_cli("convert", fp8_ckpt, dst, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert "quantization_config" not in _cfg(dst) and _cfg(dst)["torch_dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (fp8_ckpt / f).read_bytes()
    infos = scan(dst)
    assert not any(n.endswith("_scale_inv") for n in infos)
    assert {i.dtype for n, i in infos.items() if not n.endswith("e_score_correction_bias")} == {torch.bfloat16}
    # the same weights as dequantising at load
    a, b = load_model(dst), load_model(fp8_ckpt, dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_transformers_loads_the_bf16_output(fp8_ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    dst = tmp_path / "bf16"
    conv.convert(fp8_ckpt, dst, "bf16")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ours = load_model(dst, dtype=torch.float32)
    with torch.no_grad():
        ref, out = hf(TOKENS).logits.float(), ours(TOKENS)
    # measured 7.5e-7 (max-abs and norm); see RTOL in test_parity_transformers.py for why 5e-6
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-6


def test_fp8_fp32_fp8_round_trip_is_exact(fp8_ckpt, tmp_path):
    conv.convert(fp8_ckpt, tmp_path / "f32", "fp32")
    assert _cfg(tmp_path / "f32")["torch_dtype"] == "float32"
    conv.convert(tmp_path / "f32", tmp_path / "fp8", "fp8")
    assert _cfg(tmp_path / "fp8")["quantization_config"]["weight_block_size"] == [128, 128]
    orig, back = dict(iter_tensors(fp8_ckpt)), dict(iter_tensors(tmp_path / "fp8"))
    assert orig.keys() == back.keys()
    for n, t in orig.items():
        u = back[n]
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(t.view(torch.uint8), u.view(torch.uint8)), n
        elif n.endswith("_scale_inv"):
            torch.testing.assert_close(u, t, rtol=1e-6, atol=0)
        else:
            assert torch.equal(u, t.to(u.dtype)), n


def test_bf16_to_fp8_uses_the_release_format(bf16_ckpt, tmp_path):
    dst = tmp_path / "fp8"
    conv.convert(bf16_ckpt, dst, "fp8")
    src, out = dict(iter_tensors(bf16_ckpt)), dict(iter_tensors(dst))
    for n, t in src.items():
        if is_quantized_in_release(n):
            q, s = weight_quant(t.float(), 128)
            assert out[n].dtype == torch.float8_e4m3fn and torch.equal(out[n].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(out[n + "_scale_inv"], s)
        else:
            assert n + "_scale_inv" not in out and out[n].dtype == t.dtype, n
    # the unquantized ones, by name: embeddings, head, norms, gate weight + bias, MTP eh_proj/shared_head/embed
    kept = {n for n in out if n not in src or not is_quantized_in_release(n)} - {n for n in out if "scale_inv" in n}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.2.eh_proj.weight",
            "model.layers.2.shared_head.head.weight", "model.layers.2.embed_tokens.weight",
            "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"} <= kept
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    m = load_model(dst)
    assert m.layers[1].ffn.experts[0].w1.is_fp8 and not m.head.is_fp8
    # every quantized weight within e4m3's rounding of the original: half an ulp (2^-4 relative),
    # or half the smallest subnormal step (scale * 2^-10) near zero
    for n, t in src.items():
        if is_quantized_in_release(n):
            s = out[n + "_scale_inv"]
            deq = weight_dequant(out[n], s, 128, torch.float32)
            floor = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]] * 2**-10
            assert ((deq - t.float()).abs() <= t.float().abs() * 2**-4 + floor * 1.001).all(), n


@pytest.mark.slow
def test_never_overwrites_without_force(fp8_ckpt, tmp_path):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    r = run_cli("convert", fp8_ckpt, dst, "--dtype", "bf16")
    assert r.returncode == 2 and r.stderr.strip() == f"dsv3 convert: error: {dst}: already exists (use --force to replace it)"
    assert (dst / "keep.txt").read_text() == "mine"
    r = run_cli("convert", fp8_ckpt, dst, "--dtype", "bf16", "--force")
    assert r.returncode == 0, r.stderr
    assert not (dst / "keep.txt").exists() and (dst / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left


def test_interrupted_conversion_leaves_nothing(fp8_ckpt, tmp_path, monkeypatch):
    calls = []
    real = conv._write_shard

    def failing(file, entries, produce):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(file, entries, produce)

    monkeypatch.setattr(conv, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(fp8_ckpt, tmp_path / "out", "bf16")
    assert list(tmp_path.iterdir()) == []


def test_bad_source_fails_before_writing(fp8_ckpt, copy_ckpt, tmp_path):
    p = copy_ckpt(fp8_ckpt)
    (p / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        conv.convert(p, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()
