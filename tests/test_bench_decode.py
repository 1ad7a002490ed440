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


def test_bench_decode_compare_list_and_llama_cpp_refusals(tmp_path, monkeypatch):
    """--compare takes a comma-separated list of peers; llama.cpp without its binding or its converter is
    refused on one line naming what is missing and how to get it (exit 2, no traceback)."""
    from dsv3.options import choice_list

    parse = choice_list(("transformers", "llama.cpp"))
    assert parse("llama.cpp,transformers,llama.cpp") == ("llama.cpp", "transformers")
    env = dict(os.environ, DSV3_BENCH_DIR=str(tmp_path))
    env.pop("DSV3_LLAMA_CPP_SRC", None)
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--compare",
                        "transformers,vllm"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "--compare" in r.stderr and "vllm" in r.stderr
    try:
        import llama_cpp  # noqa: F401
        missing = "convert_hf_to_gguf.py"
    except ImportError:
        missing = "llama-cpp-python"
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--compare",
                        "llama.cpp", "--llama-cpp-src", str(tmp_path)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 2, r.stderr
    assert missing in r.stderr and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.gguf"))


def _llama_cpp_src():
    src = os.environ.get("DSV3_LLAMA_CPP_SRC")
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return None
    return src if src and os.path.isfile(os.path.join(src, "convert_hf_to_gguf.py")) else None


@pytest.mark.slow
@pytest.mark.skipif(_llama_cpp_src() is None, reason="llama-cpp-python and DSV3_LLAMA_CPP_SRC (its source tree, "
                    "for the converter) are needed; see docs/benchmarks.md")
def test_bench_decode_beside_llama_cpp(tmp_path):
    """llama.cpp's converter turns the bench checkpoint into a GGUF whose greedy tokens equal dsv3's and
    transformers' (checked by the command before it times anything), then all three are timed side by side."""
    env = dict(os.environ, DSV3_BENCH_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--batch", "1",
                        "--prompt", "40", "--new", "3", "--repeats", "1", "--compare", "transformers,llama.cpp",
                        "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    rows = {row["impl"]: row for row in res["rows"]}
    assert set(rows) == {"dsv3:absorb", "transformers", "llama.cpp"}
    assert rows["dsv3:absorb"]["decode_vs_llama_cpp"] > 0 and rows["dsv3:absorb"]["prefill_vs_llama_cpp"] > 0
    assert (tmp_path / "tiny-float32-f32.gguf").stat().st_size > 0


@pytest.mark.skipif(_llama_cpp_src() is None, reason="llama-cpp-python and DSV3_LLAMA_CPP_SRC (its source tree, "
                    "for the converter) are needed; see docs/benchmarks.md")
def test_llama_cpp_runner_batches_sequences_independently(tmp_path, monkeypatch):
    """Batch B in llama.cpp is B sequences of one context: each one's logits equal those of it run alone, for a
    prompt longer than one 512-token llama_decode call and for the decode step after it."""
    import torch

    from dsv3.bench import decode, llama_cpp

    monkeypatch.setattr(decode, "BENCH_DIR", tmp_path)
    ckpt = decode.ensure_checkpoint("tiny", "float32")
    gguf = llama_cpp.ensure_gguf(ckpt, "float32", llama_cpp.check_available(None))
    assert not list(tmp_path.glob(".*gguf-src*")) and not list(tmp_path.glob("*.partial"))
    ids = torch.randint(0, 512, (2, 600), generator=torch.Generator().manual_seed(0))
    both = llama_cpp.LlamaCppRunner(gguf, 608, 1, "float32", batch=2)
    got = [both.prefill(ids), both.step(ids[:, :1], 600)]
    for seq in range(2):
        alone = llama_cpp.LlamaCppRunner(gguf, 608, 1, "float32")
        want = [alone.prefill(ids[seq:seq + 1]), alone.step(ids[seq:seq + 1, :1], 600)]
        for g, w in zip(got, want):
            assert g.shape == (2, 1, 512) and w.shape == (1, 1, 512)
            torch.testing.assert_close(g[seq], w[0], rtol=1e-4, atol=1e-5)
    with pytest.raises(RuntimeError, match="position 5"):
        both.step(ids[:, :1], 5)


def test_agreement_check_refuses_a_peer_computing_another_model(tmp_path, monkeypatch):
    """Before timing, transformers on the bench checkpoint agrees with dsv3 (float32: logits to ~1e-6, the same 16
    greedy tokens); a copy with one layer's attention output projection halved -- a misread tensor -- is refused."""
    from safetensors.torch import load_file, save_file

    from dsv3.bench import agreement, decode

    monkeypatch.setattr(decode, "BENCH_DIR", tmp_path)
    good = decode.ensure_checkpoint("tiny", "float32")
    vocab = json.loads((good / "config.json").read_text())["vocab_size"]
    spec = dict(dtype="float32", threads=1, device="cpu", vocab=vocab, mode="readable")
    ok = agreement.check_agreement({"dsv3:absorb": spec | dict(impl="dsv3:absorb", ckpt=str(good)),
                                    "transformers": spec | dict(impl="transformers", ckpt=str(good))},
                                   decode.spawn_worker, "float32")
    assert ok["transformers"]["rel_err"] < 1e-5 and ok["transformers"]["greedy_same"] == agreement.AGREE_NEW
    bad = tmp_path / "bad"
    bad.mkdir()
    for f in good.iterdir():
        if f.suffix == ".safetensors":
            t = load_file(f)
            t = {k: v * 0.5 if k == "model.layers.1.self_attn.o_proj.weight" else v for k, v in t.items()}
            save_file(t, bad / f.name, metadata={"format": "pt"})
        else:
            (bad / f.name).write_bytes(f.read_bytes())
    with pytest.raises(agreement.CheckFailed, match="transformers does not compute the same model as dsv3:absorb"):
        agreement.check_agreement({"dsv3:absorb": spec | dict(impl="dsv3:absorb", ckpt=str(good)),
                                   "transformers": spec | dict(impl="transformers", ckpt=str(bad))},
                                  decode.spawn_worker, "float32")


def test_bench_decode_fp8_release_format_beside_bf16(tmp_path):
    """--dtype fp8: the preset converted to the FP8 release format by dsv3's converter, timed as stored (FP8
    weights: fewer bytes) and dequantised to bf16 at load (what `dsv3 generate` does on a CPU)."""
    env = dict(os.environ, DSV3_BENCH_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--dtype", "fp8", "--batch", "1",
           "--prompt", "8", "--new", "2", "--repeats", "1", "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    rows = {row["impl"]: row for row in json.loads(r.stdout.strip().splitlines()[-1])["rows"]}
    assert set(rows) == {"dsv3:absorb", "dsv3-fp8:absorb"}
    assert all(row["decode_tok_s"] > 0 for row in rows.values())
    assert rows["dsv3-fp8:absorb"]["weights_mb"] < 0.75 * rows["dsv3:absorb"]["weights_mb"]
    from dsv3.config import ModelArgs

    assert ModelArgs.load(tmp_path / "tiny-fp8").dtype == "fp8"
    r = subprocess.run([*cmd, "--compare", "transformers"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "--dtype fp8" in r.stderr and "Traceback" not in r.stderr
