"""DeepSeek-V3.1's FP8 format (`quantization_config.scale_fmt: "ue8m0"`) through `dsv3 convert`.

What ue8m0 means, from the official inference code (deepseek-ai/DeepSeek-V3 inference/kernel.py,
V3.2-Exp likewise): only `act_quant` reads scale_fmt -- activation scales s = amax/448 are rounded up to
2^ceil(log2 s). Weight scales are loaded as stored (float32 `weight_scale_inv`, real = fp8 × scale); in
V3.1's release they are powers of two (the model was trained with UE8M0 scales; issue #961 notes
o_proj as the exception). dsv3 keeps scale_fmt for the activations and, when it quantises with
ue8m0, writes power-of-two weight scales. With such scales, fp8 × scale has at most 4 significant bits:
FP8 -> BF16 -> FP8 is lossless, which the round trip below checks against a dequantisation written here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import dsv3
from dsv3.cli import main
from dsv3.convert import convert
from dsv3.errors import UsageError
from dsv3.testing import tiny_hf_args, write_checkpoint


def _tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _dequant(t: dict[str, torch.Tensor], block: int) -> dict[str, torch.Tensor]:
    """Every weight as float32 real values: fp8 × its block scale, the rest as stored."""
    out = {}
    for name, w in t.items():
        if name.endswith("_scale_inv"):
            continue
        if w.dtype == torch.float8_e4m3fn:
            s = t[name + "_scale_inv"]
            big = s.repeat_interleave(block, 0).repeat_interleave(block, 1)[: w.shape[0], : w.shape[1]]
            out[name] = w.float() * big
        else:
            out[name] = w.float()
    return out


def _is_power_of_two(s: torch.Tensor) -> bool:
    mantissa, _ = torch.frexp(s)
    return bool((mantissa == 0.5).all())


@pytest.fixture(scope="module")
def v31(tmp_path_factory):
    args = tiny_hf_args(dtype="fp8", scale_fmt="ue8m0")
    return write_checkpoint(tmp_path_factory.mktemp("v31") / "src", args, seed=3)


def test_round_trip_through_bf16_is_lossless(v31, tmp_path):
    block = 128
    src = _tensors(v31)
    scales = [t for n, t in src.items() if n.endswith("_scale_inv")]
    assert scales and all(_is_power_of_two(s) for s in scales)
    convert(v31, tmp_path / "bf16", "bf16", progress=False)
    assert "quantization_config" not in json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert main(["convert", str(tmp_path / "bf16"), str(tmp_path / "back"), "--dtype", "fp8", "--scale-fmt", "ue8m0"]) == 0
    back = _tensors(tmp_path / "back")
    assert set(back) == set(src)
    assert all(_is_power_of_two(t) for n, t in back.items() if n.endswith("_scale_inv"))
    ref, got = _dequant(src, block), _dequant(back, block)
    for name in ref:
        assert torch.equal(got[name], ref[name]), name
    cfg_src = json.loads((v31 / "config.json").read_text())["quantization_config"]
    cfg_back = json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]
    assert cfg_back == cfg_src and cfg_back["scale_fmt"] == "ue8m0"
    # same logits: FP8 dequantised to float32, with the V3.1 activation format kept for the fp8 GEMM
    tokens = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(0))
    a, b = dsv3.load_model(v31, dtype=torch.float32), dsv3.load_model(tmp_path / "back", dtype=torch.float32)
    assert a.args.scale_fmt == b.args.scale_fmt == "ue8m0"
    with torch.no_grad():
        assert torch.equal(a(tokens), b(tokens))


def test_plain_scales_do_not_survive_bf16(tmp_path):
    """The control: V3's amax/448 scales lose bits in bf16 (so the lossless round trip above proves ue8m0)."""
    src = write_checkpoint(tmp_path / "v3", tiny_hf_args(dtype="fp8"), seed=3)
    convert(src, tmp_path / "bf16", "bf16", progress=False)
    convert(tmp_path / "bf16", tmp_path / "back", "fp8", progress=False)
    ref, got = _dequant(_tensors(src), 128), _dequant(_tensors(tmp_path / "back"), 128)
    assert any(not torch.equal(got[n], ref[n]) for n in ref)
    assert "scale_fmt" not in json.loads((tmp_path / "back" / "config.json").read_text())["quantization_config"]


def test_fp8_copy_keeps_scale_fmt_and_mismatch_is_refused(v31, tmp_path):
    convert(v31, tmp_path / "copy", "fp8", progress=False)
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["quantization_config"]["scale_fmt"] == "ue8m0"
    plain = write_checkpoint(tmp_path / "v3", tiny_hf_args(dtype="fp8"), seed=1)
    with pytest.raises(UsageError, match="is FP8 with scale_fmt None, and FP8 weights are copied as they are"):
        convert(plain, tmp_path / "x", "fp8", scale_fmt="ue8m0", progress=False)
    with pytest.raises(UsageError, match="only 'ue8m0', and only with --dtype fp8"):
        convert(v31, tmp_path / "y", "bf16", scale_fmt="ue8m0", progress=False)
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
