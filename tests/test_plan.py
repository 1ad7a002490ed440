"""`dsv3 plan` against the arithmetic in the reference (shared/reference/deepseek-v3.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsv3.config import ModelArgs
from dsv3.errors import ConfigError
from dsv3.plan import kv_cache_bytes_per_rank, plan, weights_bytes_per_rank

ROOT = Path(__file__).resolve().parents[1]
V3 = ModelArgs.preset("671B")
CHECKPOINT_BYTES = 688_574_839_360  # whole HF release incl. the MTP layer (reference)
EMBED_PARAMS = 926_679_040


def test_unsharded_bytes_equal_the_release_checkpoint():
    # the release also stores copies of embedding and head under the MTP layer (bf16)
    assert weights_bytes_per_rank(V3, 1, mtp=True) + 2 * EMBED_PARAMS * 2 == CHECKPOINT_BYTES


def test_per_rank_weights_match_reference():
    assert weights_bytes_per_rank(V3, 8) / 1e9 == pytest.approx(85.1, abs=0.05)
    assert weights_bytes_per_rank(V3, 16) / 1e9 == pytest.approx(43.1, abs=0.05)
    # replicated tensors (wq_a, wkv_a, norms, gate) make N ranks hold more than 1/N of the whole
    assert weights_bytes_per_rank(V3, 8) > weights_bytes_per_rank(V3, 1) / 8


def test_verdicts():
    assert plan(V3, 8, 141)["fits"]
    p80 = plan(V3, 8, 80)
    assert not p80["fits"] and p80["smallest_gpus_that_fit"] == 16
    assert plan(V3, 16, 80)["fits"]  # the official 2 nodes x 8 x 80 GB recipe
    assert not plan(V3.replace(dtype="bf16"), 8, 141)["fits"]  # 1.34 TB of bf16 weights
    assert plan(V3, 16, 40)["smallest_gpus_that_fit"] is None  # 16 is the most FP8 blocks allow
    # the MTP module adds its block (sharded like any other) and its eh_proj/norms
    assert plan(V3, 8, 141, mtp=True)["weights_bytes_per_gpu"] > plan(V3, 8, 141)["weights_bytes_per_gpu"]


def test_kv_cache_is_70272_bytes_per_token_replicated():
    assert kv_cache_bytes_per_rank(V3, 1, 1) == 70_272
    assert plan(V3, 8, 141, batch=2, max_seq_len=1000)["kv_cache_bytes_per_gpu"] == 2 * 1000 * 70_272


def test_invalid_gpu_count_lists_valid_ones():
    with pytest.raises(ConfigError, match="Valid world sizes: 1, 2, 4, 8, 16"):
        plan(V3, 6, 80)


@pytest.mark.slow
def test_cli_json():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "plan", "671B", "--gpus", "8", "--gpu-mem-gb", "141",
                        "--json"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["fits"] is True and out["weights_bytes_per_gpu"] == weights_bytes_per_rank(V3, 8)
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "plan", "671B", "--gpus", "8", "--gpu-mem-gb", "80"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "does NOT fit on 8 x 80 GB; the smallest GPU count that fits is 16" in r.stdout
    assert "weights (+ FP8 scales)       85.14 GB per GPU" in r.stdout
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "plan", "671B", "--gpus", "3", "--gpu-mem-gb", "80"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and "Valid world sizes: 1, 2, 4, 8, 16" in r.stderr and "Traceback" not in r.stderr
