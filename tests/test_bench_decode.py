"""`dsv3 bench decode` runs end to end (correctness of the command, no timing assertions)."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_bench_decode_tiny_runs_and_reports(tmp_path):
    env = dict(os.environ, DSV3_BENCH_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--batch", "1",
                        "--prompt", "8", "--new", "3", "--repeats", "1", "--attn", "absorb,naive",
                        "--compare", "transformers", "--contexts", "8,16", "--plot", str(tmp_path / "p.png"), "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    impls = {row["impl"] for row in res["rows"]}
    assert impls == {"dsv3:absorb", "dsv3:naive", "transformers"}
    for row in res["rows"]:
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["peak_rss_mb"] > 0
        if row["impl"] != "transformers":
            assert row["decode_vs_transformers"] > 0
    # the absorbed cache holds c + r values per token per layer; naive h·(d + r + d)
    from dsv3.config import ModelArgs

    a = ModelArgs.preset("tiny")
    absorbed = next(r for r in res["rows"] if r["impl"] == "dsv3:absorb")
    naive = next(r for r in res["rows"] if r["impl"] == "dsv3:naive")
    assert absorbed["kv_bytes_per_token"] == (a.kv_lora_rank + a.qk_rope_head_dim) * 4 * a.n_layers
    assert naive["kv_bytes_per_token"] == a.n_heads * (a.qk_head_dim + a.v_head_dim) * 4 * a.n_layers
    assert set(res["curves"]) == {"dsv3:absorb", "dsv3:naive", "transformers"}
    assert (tmp_path / "p.png").stat().st_size > 0


def test_bench_decode_rejects_unknown_compare(tmp_path):
    env = dict(os.environ, DSV3_BENCH_DIR=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--compare", "vllm"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "--compare" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_bench_decode_sparse_rows_beside_dense(tmp_path):
    """`--sparse K`: the preset with V3.2's indexer (its keys cached beside the latents) timed beside the preset."""
    from dsv3.bench.decode import BENCH_INDEXER
    from dsv3.config import ModelArgs

    env = dict(os.environ, DSV3_BENCH_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--batch", "1",
                        "--prompt", "8", "--new", "2", "--repeats", "1", "--sparse", "4", "--json"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {row["impl"]: row for row in res["rows"]}
    assert set(rows) == {"dsv3:absorb", "dsv3-sparse4:absorb"}
    a = ModelArgs.preset("tiny")
    extra = rows["dsv3-sparse4:absorb"]["kv_bytes_per_token"] - rows["dsv3:absorb"]["kv_bytes_per_token"]
    assert extra == BENCH_INDEXER["index_head_dim"] * 4 * a.n_layers  # float32 indexer keys
    assert json.loads((tmp_path / "tiny-v32-top4-float32" / "config.json").read_text())["index_topk"] == 4


def test_bench_decode_sparse_needs_the_preset(tmp_path, capsys):
    from dsv3.cli import main

    assert main(["bench", "decode", "--ckpt", str(tmp_path), "--sparse", "4"]) == 2
    err = capsys.readouterr().err
    assert "--sparse" in err and "Traceback" not in err


def test_bench_decode_sparse_layer_curves(tmp_path, capsys):
    """`--sparse-layer CONFIG`: one V3.2 attention layer with and without its indexer, a curve each (no timing
    assertions); a config without an indexer is refused on one line."""
    from dsv3.cli import main
    from dsv3.testing import tiny_v32_args

    (tmp_path / "v32").mkdir()
    (tmp_path / "v32" / "config.json").write_text(json.dumps(tiny_v32_args().to_hf_config()))
    assert main(["bench", "decode", "--sparse-layer", str(tmp_path / "v32"), "--contexts", "24,8", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(res["curves"]) == {"dense", "sparse"} and res["index_topk"] == tiny_v32_args().index_topk
    for curve in res["curves"].values():
        assert [c for c, _, _ in curve] == [8, 24] and all(0 < lo <= med for _, lo, med in curve)
    assert main(["bench", "decode", "--sparse-layer", "tiny"]) == 2
    assert "not a V3.2 config" in capsys.readouterr().err
