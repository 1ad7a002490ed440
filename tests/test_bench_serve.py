"""`dsv3 bench serve` end to end on the tiny preset: the structure and consistency of what it reports (never its
speed), its greedy check against `dsv3.generate` of the checkpoint, and its argument errors."""

import json

import numpy as np
import pytest
import torch

from dsv3.bench.serve import percentile
from dsv3.testing import run_cli


@pytest.mark.slow
def test_bench_serve_tiny_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DSV3_BENCH_DIR", str(tmp_path))
    r = run_cli("bench", "serve", "--preset", "tiny", "--concurrency", "1,3", "--rounds", "2", "--prompt-len", "8",
                "--max-tokens", "5", "--repeats", "1", "--transformers-cb", "off", "--cache-gb", "0.01", "--json",
                timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {(row["engine"], row["concurrency"]): row for row in res["rows"]}
    assert set(rows) == {(e, c) for e in ("dsv3", "transformers") for c in (1, 3)}
    for (_, c), row in rows.items():
        assert row["requests"] == 2 * c and row["repeats"] == 1
        assert row["output_tokens"] == 2 * c * 5  # no end-of-sequence token: every reply runs to max_tokens
        assert row["output_tok_s"] == pytest.approx(row["output_tokens"] / row["wall_s"])
        for kind in ("ttft", "itl"):
            p50, p90, p99 = (row[f"{kind}_p{q}_ms"] for q in (50, 90, 99))
            assert 0 < p50 <= p90 <= p99
        assert row["ttft_p99_ms"] <= 1e3 * row["wall_s"]
    for x in res["ratios"]:
        c = x["concurrency"]
        assert x["throughput_x"] == pytest.approx(rows["dsv3", c]["output_tok_s"] / rows["transformers", c]["output_tok_s"])
        assert x["ttft_p50_x"] == pytest.approx(rows["dsv3", c]["ttft_p50_ms"] / rows["transformers", c]["ttft_p50_ms"])
    # the greedy check: both servers gave the same words, and they are the ids dsv3.generate gives in process
    check = res["greedy_check"]
    assert check["match"] and set(check["texts"]) == {"dsv3", "transformers"}
    from dsv3.checkpoint import load_model
    from dsv3.generation import generate

    model = load_model(res["ckpt"], dtype=torch.float32)
    prompt = [int(w[1:]) for w in check["prompt"].split()]
    assert len(prompt) == 8
    assert [int(w[1:]) for w in check["texts"]["dsv3"]] == generate(model, [prompt], 5)[0]
    assert res["transformers_continuous_batching"] is False
    # the table the command prints without --json: one line per engine and concurrency, one ratio line each
    from dsv3.bench.serve import print_table

    print_table(res)
    out = capsys.readouterr().out.splitlines()
    assert sum(ln.startswith(("dsv3 ", "transformers ")) for ln in out) == 4
    assert [ln.split(":")[0] for ln in out if ln.startswith("concurrency")] == ["concurrency   1", "concurrency   3"]


def test_percentile_matches_numpy():
    xs = [5.0, 1.0, 9.0, 2.5, 7.0, 3.0, 8.5]
    for q in (0, 50, 90, 99, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


@pytest.mark.parametrize("argv,named", [(["--engines", "vllm"], "--engines"),
                                        (["--prompt-len", "250", "--max-tokens", "10"], "--prompt-len")])
def test_bench_serve_bad_arguments(tmp_path, monkeypatch, argv, named):
    monkeypatch.setenv("DSV3_BENCH_DIR", str(tmp_path))
    r = run_cli("bench", "serve", "--preset", "tiny", *argv)
    assert r.returncode == 2
    assert named in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bench_serve_names_the_missing_extra(monkeypatch):
    """Without transformers' serving packages (the base install), the command names the extra to install."""
    import argparse
    import importlib.util

    from dsv3.bench import serve
    from dsv3.errors import UsageError

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openai" else real(name, *a))
    ns = argparse.Namespace(engines="dsv3,transformers", cache_gb=0.25)
    with pytest.raises(UsageError, match=r"openai: pip install 'dsv3\[bench\]'"):
        serve.check_args(ns)
    assert serve.check_args(argparse.Namespace(engines="dsv3", cache_gb=0.25)) == ["dsv3"]
