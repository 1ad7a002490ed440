"""DeepSeek-V3.2 checkpoints: the indexer's tensor names (FP8 + scale where the release has them), loading kept
FP8 and dequantised against transformers on weights dequantised by safetensors + torch, the MTP layer's
indexer, `dsv3 convert` round trips, and a 2-rank torchrun generate equal to one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import dsv3
from dsv3 import convert as conv
from dsv3.generation import generate
from dsv3.names import classify, is_quantized_in_release
from dsv3.safetensors_io import iter_tensors
from dsv3.testing import tiny_v32_args, write_checkpoint, write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TOKENS = torch.tensor([[3, 17, 101, 250, 8, 64, 299, 12, 5, 77, 140, 2, 9, 310]])  # 14 > index_topk = 6
INDEXER = {"wq_b": True, "wk": True, "weights_proj": False}  # FP8 in the release? (names, kinds: names.py)


@pytest.fixture(scope="module")
def v32_fp8(tmp_path_factory):
    return write_checkpoint(tmp_path_factory.mktemp("v32") / "fp8", tiny_v32_args(), float_dtype=torch.float32)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(path.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            out.update({n: f.get_tensor(n) for n in f.keys()})  # noqa: SIM118
    return out


def test_indexer_names_in_the_release_layout(v32_fp8):
    args = tiny_v32_args()
    names = _tensors(v32_fp8)
    cfg = json.loads((v32_fp8 / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v32" and cfg["index_topk"] == args.index_topk
    for layer in range(args.n_layers + args.n_mtp_layers):  # the MTP layer has its indexer too
        p = f"model.layers.{layer}.self_attn.indexer."
        for lin, fp8 in INDEXER.items():
            assert names[p + lin + ".weight"].dtype == (torch.float8_e4m3fn if fp8 else torch.float32), lin
            assert (p + lin + ".weight_scale_inv" in names) == fp8, lin
            assert is_quantized_in_release(p + lin + ".weight") == fp8
        assert names[p + "k_norm.bias"].shape == (args.index_head_dim,)
    n = classify("model.layers.2.self_attn.indexer.k_norm.bias", args)
    assert n.ours == "mtp.0.block.attn.indexer.k_norm.bias" and n.shard_dim is None


def _dequantised(src: Path, dst: Path) -> Path:
    """An fp32 copy written with safetensors and a few lines of torch (not dsv3's reader or dequantiser)."""
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    bs = cfg.pop("quantization_config")["weight_block_size"][0]
    tensors, out = _tensors(src), {}
    for n, t in tensors.items():
        if n.endswith("_scale_inv"):
            continue
        if t.dtype == torch.float8_e4m3fn:
            s = tensors[n + "_scale_inv"].repeat_interleave(bs, 0)[: t.shape[0]].repeat_interleave(bs, 1)
            t = t.float() * s[:, : t.shape[1]]
        out[n] = t.float()
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps({**cfg, "torch_dtype": "float32"}))
    return dst


def test_fp8_v32_matches_transformers_on_dequantised_weights(v32_fp8, tmp_path):
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV32ForCausalLM.from_pretrained(_dequantised(v32_fp8, tmp_path / "deq"),
                                                             dtype=torch.float32).eval()
    kept, deq = dsv3.load_model(v32_fp8), dsv3.load_model(v32_fp8, dtype=torch.float32)
    assert kept.layers[0].attn.indexer.wq_b.is_fp8 and not kept.layers[0].attn.indexer.weights_proj.is_fp8
    with torch.no_grad():
        ref = hf(TOKENS).logits.float()
        for out in (kept(TOKENS), deq(TOKENS)):
            assert ((out - ref).norm() / ref.norm()).item() < 5e-6  # as test_checkpoint.py


def test_mtp_layer_indexer_is_loaded(v32_fp8):
    model = dsv3.load_model(v32_fp8, dtype=torch.float32)
    ix = model.mtp[0].block.attn.indexer
    stored = _tensors(v32_fp8)[f"model.layers.{model.args.n_layers}.self_attn.indexer.k_norm.bias"]
    assert torch.equal(ix.k_norm.bias, stored)
    with torch.no_grad():
        logits, mtp = model.forward_mtp(TOKENS)
    assert mtp.shape == (1, TOKENS.shape[1] - 1, model.args.vocab_size) and torch.isfinite(mtp).all()


def test_convert_round_trip_keeps_the_indexer(v32_fp8, tmp_path):
    conv.convert(v32_fp8, tmp_path / "f32", "fp32")
    assert json.loads((tmp_path / "f32" / "config.json").read_text())["model_type"] == "deepseek_v32"
    conv.convert(tmp_path / "f32", tmp_path / "fp8", "fp8")
    orig, back = dict(iter_tensors(v32_fp8)), dict(iter_tensors(tmp_path / "fp8"))
    assert orig.keys() == back.keys() and any(".indexer.wk.weight_scale_inv" in n for n in orig)
    for n, t in orig.items():
        u = back[n]
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(t.view(torch.uint8), u.view(torch.uint8)), n
        else:
            torch.testing.assert_close(u, t.to(u.dtype), rtol=1e-6, atol=0)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_rank_generate_equals_one_process(tmp_path):
    """Heads and experts split over 2 gloo ranks, the indexer replicated: the same greedy tokens."""
    ckpt = write_tiny_checkpoint(tmp_path / "v32", fp8=True, v32=True)
    prompts = [[5, 17, 200, 3, 9, 41, 77, 12, 100, 33], [250, 1]]  # 10 > index_topk: selection is sparse
    want = generate(dsv3.load_model(ckpt), prompts, 6)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DSV3_DIST_BACKEND": "gloo",
           "DSV3_DIST_TIMEOUT": "60"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "-m", "dsv3.generate",
           "--ckpt", str(ckpt), "--max-new-tokens", "6", "--json",
           *(a for p in prompts for a in ("--prompt-ids", ",".join(map(str, p))))]
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == want
