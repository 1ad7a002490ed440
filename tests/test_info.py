"""`dsv3 info`: the exact parameter and KV-cache figures of /work/shared/reference/deepseek-v3.md."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.info import info
from dsv3.model import Block

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"total_params", "active_params", "mtp_params", "kv_cache_bytes_per_token", "kv_cache_bytes_per_token_naive"}

# From the reference. KV bytes: bf16 · n_layers · (kv_lora_rank + qk_rope_head_dim) absorbed,
# bf16 · n_layers · n_heads · (qk_nope + qk_rope + v head dims) naive.
EXPECTED = {
    "671B": dict(total_params=671_026_419_200, active_params=37_552_297_472, mtp_params=11_610_068_224,
                 kv_cache_bytes_per_token=70_272, kv_cache_bytes_per_token_naive=4_997_120),
    "236B": dict(total_params=235_741_434_880, active_params=21_375_800_320, mtp_params=0,
                 kv_cache_bytes_per_token=2 * 60 * 576, kv_cache_bytes_per_token_naive=2 * 60 * 128 * 320),
    "16B": dict(total_params=15_706_484_224, active_params=2_661_150_208, mtp_params=0,
                kv_cache_bytes_per_token=2 * 27 * 576, kv_cache_bytes_per_token_naive=2 * 27 * 16 * 320),
}


def _cli(*argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *argv], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


@pytest.mark.slow  # builds each model on the meta device in a fresh process (~5-15 s each here)
@pytest.mark.parametrize("preset", ["16B", "236B", "671B"])
def test_info_cli_json_exact(preset):
    r = _cli("info", preset, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert KEYS <= set(out)
    assert all(isinstance(v, int) for v in out.values())
    assert {k: out[k] for k in KEYS} == EXPECTED[preset]


def test_671B_per_layer_counts():
    """The reference's per-component figures, from single blocks on the meta device (fast)."""
    args = ModelArgs.preset("671B")

    def n(module):
        return sum(p.numel() for name, p in module.named_parameters() if not name.endswith("scale"))

    with torch.device("meta"):
        dense, moe = Block(0, args), Block(3, args)
        embed = torch.nn.Embedding(args.vocab_size, args.dim)
    assert n(dense.attn) == 187_107_328
    assert n(dense) == 583_483_392  # attention + MLP + two norms
    assert n(moe) == 11_507_286_272
    assert n(moe.ffn.experts[0]) == 44_040_192
    active = n(moe) - (args.n_routed_experts - args.n_activated_experts) * 44_040_192
    assert active == 585_318_656
    assert n(embed) == 926_679_040  # embedding (= head): 129,280 x 7,168 from the reference


def test_info_text_and_json_for_tiny(capsys):
    from dsv3.cli import main

    assert main(["info", "tiny", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out == {**out, **info(ModelArgs.preset("tiny"))}
    assert main(["info", "tiny"]) == 0
    text = capsys.readouterr().out
    assert f"{out['total_params']:,}" in text and f"{out['kv_cache_bytes_per_token']:,}" in text


def test_info_counts_match_a_real_model(make_model):
    """On tiny, info's counts are hand counts of the tensors (shapes from the preset, multiplied out here),
    and those of the parameters a real (non-meta) model allocates."""
    args = ModelArgs.preset("tiny")  # m 96, f 192, expert f 48, v 512, h 3, q 40, c 32, d 24, r 16, e 16, k 4
    attn = 40 * 96 + 40 + 3 * 40 * 40 + 96 * 48 + 32 + 32 * 3 * 48 + 3 * 24 * 96  # wq_a q_norm wq_b wkv_a kv_norm wkv_b wo
    assert attn == 24_840
    expert = 3 * 96 * 48  # w1 w2 w3
    dense = attn + 2 * 96 + 3 * 96 * 192  # + attn/ffn norms + MLP
    moe = attn + 2 * 96 + 16 * 96 + 16 + 16 * expert + expert  # gate weight, bias, 16 routed, 1 shared
    total = 2 * 512 * 96 + 96 + dense + 2 * moe  # embed, head, final norm, 1 dense + 2 MoE layers
    assert (dense, moe, total) == (80_328, 261_592, 701_912)
    got = info(args)
    assert got["total_params"] == total
    assert got["active_params"] == total - 2 * (16 - 4) * expert == 370_136
    assert got["mtp_params"] == 2 * 96 + 2 * 96 * 96 + moe + 96 == 280_312  # enorm hnorm eh_proj, a MoE block, norm
    assert got["kv_cache_bytes_per_token"] == 2 * 3 * (32 + 16) == 288  # bf16, 3 layers, latent + rope key
    assert got["kv_cache_bytes_per_token_naive"] == 2 * 3 * 3 * (24 + 16 + 24)
    model = make_model()
    main_params = sum(p.numel() for name, p in model.named_parameters() if not name.startswith("mtp."))
    assert main_params == total
    assert sum(p.numel() for p in model.mtp.parameters()) == got["mtp_params"]
    cache = model.new_cache(1, 10, dtype=torch.bfloat16)
    assert sum(c.nbytes() for c in cache.layers) == 10 * got["kv_cache_bytes_per_token"]
