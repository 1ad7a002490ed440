"""The static decode step (dsv3.decode_step) equals the readable `model(tokens, start_pos, cache)` path.

Readable twin: the model's own forward with a growing cache slice, Python-int positions and
data-dependent MoE dispatch. The static step must give the same logits (float32 rounding)
and the same greedy tokens -- eagerly, torch.compile'd, and replayed as a CUDA graph -- and
must keep every shape and every buffer address fixed across steps (what capture needs).
"""

from __future__ import annotations

import os
import subprocess
import sys
from unittest import mock

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.decode_step import DecodeRunner, StaticDecodeStep
from dsv3.errors import UsageError
from dsv3.generation import generate
from dsv3.moe import MoE

# the tiny preset has groups, a shared expert, q compression, sigmoid + bias, a dense first layer
# (its MTP module is unused by decoding); PLAIN varies the other branches
PLAIN = dict(q_lora_rank=0, n_shared_experts=0, score_func="softmax", n_expert_groups=1, n_limited_groups=1,
             route_scale=1.0, gate_bias=False, n_mtp_layers=0)
CONFIGS = [pytest.param({}, id="tiny"), pytest.param(PLAIN, id="plain")]


@torch.inference_mode()
def readable_logits(model, tokens: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    """Prefill `prompt` tokens, then one token per step: the last logits of each call, (b, v)."""
    cache = model.new_cache(tokens.shape[0], tokens.shape[1])
    out = [model(tokens[:, :prompt], 0, cache)[:, -1]]
    for p in range(prompt, tokens.shape[1]):
        out.append(model(tokens[:, p:p + 1], p, cache)[:, -1])
    return out


@torch.inference_mode()
def runner_logits(runner: DecodeRunner, tokens: torch.Tensor, prompt: int) -> list[torch.Tensor]:
    out = [runner(tokens[:, :prompt], 0)[:, -1]]
    for p in range(prompt, tokens.shape[1]):
        out.append(runner(tokens[:, p:p + 1], p)[:, -1])
    return out


@pytest.mark.parametrize("overrides", CONFIGS)
def test_static_step_logits_equal_readable_path(make_model, overrides):
    model = make_model("tiny", seed=1, **overrides)
    tokens = torch.randint(0, model.args.vocab_size, (3, 30), generator=torch.Generator().manual_seed(0))
    ref = readable_logits(model, tokens, prompt=7)
    # the cache is longer than the sequence: slots past it stay masked
    out = runner_logits(DecodeRunner(model, 3, 48, "static"), tokens, prompt=7)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        assert torch.equal(o.argmax(-1), r.argmax(-1))


def test_static_step_bf16_close_to_readable_path(make_model):
    # (built in float32 and cast: Transformer(dtype=bfloat16) leaves the MLA norms in float32)
    model = make_model("tiny", seed=2).to(torch.bfloat16)
    tokens = torch.randint(0, model.args.vocab_size, (2, 16), generator=torch.Generator().manual_seed(1))
    ref = readable_logits(model, tokens, prompt=5)
    out = runner_logits(DecodeRunner(model, 2, 16, "static"), tokens, prompt=5)
    for r, o in zip(ref[1:], out[1:]):
        assert ((o - r).norm() / r.norm()).item() < 2e-2  # bf16: sums in a different order round differently


@pytest.mark.parametrize("overrides", CONFIGS)
def test_generate_static_greedy_tokens_equal_readable(make_model, overrides):
    model = make_model("tiny", seed=3, **overrides)
    prompts = [[5, 17, 300, 2], [9, 8, 7, 6, 5, 4, 3], [1]]  # lockstep with ragged prompts
    ref = generate(model, prompts, 12)
    assert generate(model, prompts, 12, decode="static") == ref


def test_expert_stacking_reuses_storage_and_keeps_the_model_equal(make_model, tmp_path):
    model = make_model("tiny", seed=4)
    tokens = torch.randint(0, model.args.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = model(tokens)
    n_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    step = StaticDecodeStep(model, model.new_cache(2, 16))
    for blk, stacks in zip(model.layers, step.experts):
        if not isinstance(blk.ffn, MoE):
            assert stacks is None
            continue
        for name, stack in stacks.items():
            for i, expert in enumerate(blk.ffn.experts):
                w = getattr(expert, name).weight
                assert w.data_ptr() == stack[i].data_ptr()  # the Linear reads the stack: no second copy
                assert torch.equal(w, stack[i])
    assert sum(p.numel() * p.element_size() for p in model.parameters()) == n_bytes
    with torch.inference_mode():
        assert torch.equal(model(tokens), before)
    # the re-pointed weights still save and load like any others (safetensors refuses overlapping tensors)
    from dsv3.checkpoint import load_model, save_model

    save_model(model, tmp_path)
    loaded = load_model(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), loaded.state_dict().values()))
    # a second step object finds the experts already stacked and allocates nothing new
    again = StaticDecodeStep(model, model.new_cache(2, 16))
    for a, b in zip(step.experts, again.experts):
        if a is not None:
            assert all(a[n].data_ptr() == b[n].data_ptr() for n in a)


def test_static_step_is_shape_stable_and_one_graph(make_model):
    """What CUDA-graph capture needs, checked on CPU: fixed shapes and addresses, no host values.

    Dynamo (backend="eager", fullgraph) must trace the step as one graph with no breaks, and the
    same graph must serve every position (a recompile would raise).
    """
    model = make_model("tiny", seed=5)
    runner = DecodeRunner(model, 2, 24, "static")
    tokens = torch.randint(0, model.args.vocab_size, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        runner(tokens[:, :6], 0)
    buffers = [t for c in runner.cache.layers for t in c.tensors.values()]
    buffers += [s for e in runner.static.experts if e is not None for s in e.values()]
    ptrs = [t.data_ptr() for t in buffers]
    shapes = [t.shape for t in buffers]
    traced = torch.compile(runner.static, backend="eager", fullgraph=True, dynamic=False)
    with mock.patch.object(torch._dynamo.config, "error_on_recompile", True), torch.inference_mode():
        for p in range(6, 20):
            pos = torch.tensor(p)
            eager = runner.static(tokens[:, p:p + 1], pos)  # writes slot p ...
            again = traced(tokens[:, p:p + 1], pos)  # ... and writes it again with the same values
            assert eager.shape == again.shape == (2, model.args.vocab_size)
            torch.testing.assert_close(again, eager, rtol=0, atol=0)
            assert [t.data_ptr() for t in buffers] == ptrs
            assert [t.shape for t in buffers] == shapes


def test_decode_runner_rejects_what_it_cannot_do(make_model):
    with pytest.raises(UsageError, match="absorbed"):
        DecodeRunner(make_model("tiny", attn_impl="naive"), 1, 8)
    model = make_model("tiny")
    with pytest.raises(UsageError, match="decode mode"):
        DecodeRunner(model, 1, 8, "fast")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="CUDA"):
            DecodeRunner(model, 1, 8, "cuda-graph")
    with pytest.raises(UsageError, match="outside the cache"):
        DecodeRunner(model, 1, 8).step(torch.zeros(1, 1, dtype=torch.long), 8)
    with pytest.raises(UsageError, match="decode="):
        generate(model, [[1, 2]], 2, decode="fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU error path")
def test_cli_cuda_graph_on_cpu_is_a_usage_error():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "generate", "--preset", "tiny", "--prompt-ids", "1,2",
                        "--max-new-tokens", "2", "--cuda-graph"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "CUDA" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_compiled_step_greedy_tokens_identical(make_model):
    """torch.compile (inductor, fullgraph) of the static step: the same greedy tokens as eager."""
    model = make_model("tiny", seed=6)
    prompts = [[5, 17, 300, 2], [9, 8, 7, 6, 5]]
    ref = generate(model, prompts, 6)
    assert generate(model, prompts, 6, decode="compile") == ref


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", ["cuda-graph", "compile+cuda-graph"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_greedy_tokens_identical(make_model, mode, dtype):
    model = make_model("tiny", seed=7).to(device="cuda", dtype=dtype)
    prompts = [[5, 17, 300, 2], [9, 8, 7, 6, 5, 4, 3], [1]]
    if dtype == torch.float32:  # bf16 rounds differently in each formulation: compare its logits only
        ref = generate(model, prompts, 16)
        assert generate(model, prompts, 16, decode="static") == ref
        assert generate(model, prompts, 16, decode=mode) == ref
    tokens = torch.randint(0, model.args.vocab_size, (3, 24), device="cuda")
    ref_logits = readable_logits(model, tokens, prompt=6)
    out = runner_logits(DecodeRunner(model, 3, 32, mode), tokens, prompt=6)
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    for r, o in zip(ref_logits[1:], out[1:]):
        assert ((o - r).norm() / r.norm()).item() < tol


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("batch", [1, 5], ids=["gathered", "all-experts"])
def test_cuda_graph_with_fp8_experts_close_to_readable(make_model, batch):
    """FP8 experts through the Triton FP8 GEMM (all-experts path) or gathered and dequantised, captured as a
    CUDA graph: the readable FP8 path's logits (its tensor-core sums round differently: a bf16-sized bound)."""
    model = make_model(ModelArgs.preset("tiny", dtype="fp8", gemm_impl="fp8"), seed=8).to("cuda")
    tokens = torch.randint(0, model.args.vocab_size, (batch, 20), device="cuda")
    ref = readable_logits(model, tokens, prompt=6)
    out = runner_logits(DecodeRunner(model, batch, 24, "cuda-graph"), tokens, prompt=6)
    for r, o in zip(ref[1:], out[1:]):
        assert torch.isfinite(o).all() and ((o - r).norm() / r.norm()).item() < 1e-2


@pytest.mark.slow
def test_bench_decode_times_static_and_compiled_steps(tmp_path):
    """`dsv3 bench decode --static --compile` runs end to end (no timing assertions)."""
    import json

    env = dict(os.environ, DSV3_BENCH_DIR=str(tmp_path), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--batch", "2",
                        "--prompt", "8", "--new", "3", "--repeats", "1", "--attn", "absorb", "--static", "--compile",
                        "--json"], capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr
    rows = {row["impl"]: row for row in json.loads(r.stdout.strip().splitlines()[-1])["rows"]}
    assert set(rows) == {"dsv3:absorb", "dsv3-static:absorb", "dsv3-compile:absorb"}
    for row in rows.values():
        assert row["decode_tok_s"] > 0 and row["first_step_s"] > 0
    # one preallocated cache of the same size whichever way the step runs
    assert len({row["kv_bytes_per_token"] for row in rows.values()}) == 1
    r = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "decode", "--preset", "tiny", "--cuda-graph"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "--cuda-graph" in r.stderr and "Traceback" not in r.stderr


# tiny: 16 experts, top-4 -- batch 1 gathers the chosen experts (1·4 <= 16), batch 5 runs all of them (20 > 16)
@pytest.mark.parametrize("batch", [1, 5], ids=["gathered", "all-experts"])
@pytest.mark.parametrize("gemm_impl", ["bf16", "fp8"])
def test_static_step_with_fp8_experts_equals_readable_path(make_model, batch, gemm_impl):
    """FP8 experts stay FP8 in the static step: gathered with their scales and dequantised (batch 1), or
    streamed through their own FP8 Linears (batch 5); the readable path's logits either way."""
    from dsv3.moe import gathering_pays

    model = make_model(ModelArgs.preset("tiny", dtype="fp8", gemm_impl=gemm_impl), seed=2)
    args = model.args
    assert gathering_pays(batch, args.n_activated_experts, args.n_routed_experts) == (batch == 1)
    tokens = torch.randint(0, args.vocab_size, (batch, 14), generator=torch.Generator().manual_seed(3))
    ref = readable_logits(model, tokens, prompt=5)
    runner = DecodeRunner(model, batch, 24, "static")
    moe = next(blk.ffn for blk in model.layers if isinstance(blk.ffn, MoE))
    assert moe.experts[0].w1.weight.dtype == torch.float8_e4m3fn  # not dequantised to build the step
    out = runner_logits(runner, tokens, prompt=5)
    for r, o in zip(ref, out):
        torch.testing.assert_close(o, r, rtol=1e-5, atol=1e-5)
        assert torch.equal(o.argmax(-1), r.argmax(-1))


@pytest.mark.slow
def test_cli_generate_compile_same_tokens(fp8_ckpt_f32, capsys):
    """`dsv3 generate --compile` on the FP8 checkpoint kept FP8 (`--dtype stored`: the static step gathers FP8
    experts and dequantises them inside the compiled graph) prints the readable path's tokens."""
    import json

    from dsv3.cli import main

    args = ["generate", "--ckpt", str(fp8_ckpt_f32), "--prompt-ids", "5,17,300", "--prompt-ids", "9,8,7,6",
            "--max-new-tokens", "5", "--device", "cpu", "--dtype", "stored", "--json"]
    assert main(args) == 0
    ref = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"]
    assert main([*args, "--compile"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] == ref
    assert all(len(t) == 5 for t in ref)
