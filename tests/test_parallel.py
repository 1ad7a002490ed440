"""Tensor/expert-parallel runs (gloo, several CPU processes under torchrun) against the single process.

Each launch is a real `torchrun` (or `-m torch.distributed.run`) of tiny checkpoints written
by dsv3.testing.write_tiny_checkpoint: float32, and FP8 with 8×8 blocks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from parallel_worker import PROMPTS  # tests/ is on sys.path under pytest (rootdir conftest)
from safetensors import safe_open

from dsv3 import load_model
from dsv3.errors import ConfigError
from dsv3.generation import generate
from dsv3.names import dsv3_to_hf, hf_to_dsv3
from dsv3.parallel import check_world_size, shard_model, valid_world_sizes
from dsv3.testing import tiny_dist_args as tiny_args
from dsv3.testing import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": "60",
            "DSV3_DIST_BACKEND": "gloo"}  # CPU ranks even where a GPU is present


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, *args: str, nnodes: int = 1, node_rank: int = 0, port: int | None = None,
             timeout: float = 120, wait: bool = True):
    if nnodes == 1:  # torchrun picks a free port itself: no race with other processes on the machine
        where = ["--standalone"]
    else:
        where = [f"--nnodes={nnodes}", f"--node-rank={node_rank}", "--master-addr=127.0.0.1", f"--master-port={port}"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", *where, *args]
    if not wait:
        return subprocess.Popen(cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    return {"fp32": write_tiny_checkpoint(base / "fp32"), "fp8": write_tiny_checkpoint(base / "fp8", fp8=True)}


@pytest.fixture(scope="module")
def single(ckpts):
    """The single-process reference for each checkpoint and attention implementation."""
    out = {}
    tokens = torch.tensor([PROMPTS[0]])
    for name, path in ckpts.items():
        for impl, dtype in [("absorb", None), ("naive", None)] + ([("dequant", torch.float32)] if name == "fp8" else []):
            model = load_model(path, dtype=dtype, attn_impl="naive" if impl == "naive" else "absorb")
            with torch.inference_mode():
                logits, mtp_logits = model.forward_mtp(tokens)
            out[f"{name}/{impl}"] = {"logits": logits, "mtp_logits": mtp_logits, "tokens": generate(model, PROMPTS, 8)}
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module", params=[2, 4], ids=["world2", "world4"])
def parallel_run(request, ckpts, tmp_path_factory):
    """One torchrun launch per world size: what each rank computed and held, for both checkpoints."""
    world, out = request.param, tmp_path_factory.mktemp(f"world{request.param}")
    r = torchrun(world, "tests/parallel_worker.py", str(out), *(f"{k}={v}" for k, v in ckpts.items()))
    assert r.returncode == 0, r.stderr[-3000:]
    return world, [torch.load(out / f"rank{i}.pt") for i in range(world)]


def test_sharded_equals_single_process(parallel_run, single):
    world, ranks = parallel_run
    errors = {}
    for key, ref in single.items():
        for res in ranks:  # every rank ends with the same full logits (gathered over the vocabulary)
            got = res[key]
            assert got["logits"].shape == ref["logits"].shape
            errors[key] = max(_rel(got["logits"], ref["logits"]), _rel(got["mtp_logits"], ref["mtp_logits"]))
            assert errors[key] < 1e-5, (key, errors[key])
            assert got["tokens"] == ref["tokens"], key
    print(f"world {world}: relative logit errors {errors}")


# Written by hand from how tensor parallelism splits each projection (not read from dsv3's name table):
# HF name pattern -> the dim of the stored (out, in) tensor that is split across ranks; anything else is
# replicated, and routed experts stay whole on their owner. FP8 scales split like their weights.
TP_DIMS = [
    (r"\.self_attn\.(q_proj|q_b_proj|kv_b_proj)\.", 0),  # column parallel: heads are the output rows
    (r"\.self_attn\.o_proj\.", 1),  # row parallel: heads are the input columns
    (r"\.mlp\.(shared_experts\.)?(gate_proj|up_proj)\.", 0),  # dense MLP and shared expert: hidden width rows
    (r"\.mlp\.(shared_experts\.)?down_proj\.", 1),
    (r"^(model\.embed_tokens|lm_head)\.weight$", 0),  # vocabulary rows
]


def _tp_dim(hf_name: str) -> int | None:
    import re

    return next((dim for pat, dim in TP_DIMS if re.search(pat, hf_name)), None)


def test_hand_written_shard_dims_cover_what_they_should():
    names = set(dsv3_to_hf(tiny_args(fp8=True)).values())
    assert _tp_dim("model.layers.1.mlp.experts.3.gate_proj.weight") is None
    assert _tp_dim("model.layers.0.self_attn.o_proj.weight_scale_inv") == 1
    # embed + head; q_b, kv_b, o_proj in 3 layers + the MTP block; the dense MLP; 2 MoE layers' + the MTP block's
    # shared expert -- each FP8 Linear with its weight_scale_inv
    assert sum(_tp_dim(n) is not None for n in names) == 2 + 4 * 3 * 2 + 3 * 2 + 3 * 3 * 2 == 50


@pytest.mark.parametrize("fp8", [False, True])
def test_name_table_splits_what_the_hand_written_table_splits(fp8):
    """The loader's name table (which dim each tensor is split on) against TP_DIMS: in-process, no torchrun."""
    args = tiny_args(fp8=fp8)
    for hf in dsv3_to_hf(args).values():
        assert hf_to_dsv3(hf, args)[1] == _tp_dim(hf), hf


def test_rank_slices_equal_slices_of_full_tensors(parallel_run, ckpts):
    """Each rank's tensors, as loaded in parallel, are exactly the right slices of the files' tensors
    (read with safetensors; which dim is split comes from TP_DIMS above)."""
    world, ranks = parallel_run
    path = ckpts["fp8"]
    args = tiny_args(fp8=True)
    to_hf = dsv3_to_hf(args)
    wm = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    for rank in range(world):
        state = ranks[rank]["state/fp8"]
        experts = {int(k.split(".")[4]) for k in state if ".ffn.experts." in k and k.startswith("layers.1.")}
        assert experts == set(range(8 // world * rank, 8 // world * (rank + 1)))
        sharded = 0
        for name, local in state.items():
            hf = to_hf[name]
            with safe_open(path / wm[hf], "pt") as f:
                full = f.get_tensor(hf)
            dim = _tp_dim(hf)
            if dim is not None:
                n = full.shape[dim] // world
                full = full.narrow(dim, rank * n, n)
                sharded += 1
            assert local.shape == full.shape, (name, tuple(local.shape), tuple(full.shape))
            assert local.dtype == full.dtype and torch.equal(local.view(torch.uint8) if local.dtype == torch.float8_e4m3fn
                                                             else local, full.view(torch.uint8)
                                                             if full.dtype == torch.float8_e4m3fn else full), name
        assert sharded > 20  # weights and their FP8 scales, all layers


def test_in_memory_sharding_matches_loaded_slices(parallel_run, ckpts):
    """shard_model on a fully loaded model gives, rank by rank, exactly the tensors each rank loaded itself
    under torchrun (only its slices read)."""
    world, ranks = parallel_run
    ref = load_model(ckpts["fp8"])
    for rank in range(world):
        full = load_model(ckpts["fp8"])
        shard_model(full, rank=rank, world=world)
        mine, loaded = full.state_dict(), ranks[rank]["state/fp8"]
        assert mine.keys() == loaded.keys()
        for k, t in mine.items():
            assert t.dtype == loaded[k].dtype and torch.equal(t.view(torch.uint8), loaded[k].view(torch.uint8)) \
                if t.dtype == torch.float8_e4m3fn else torch.equal(t, loaded[k]), k
    # and by hand, for the last rank: a quarter or a half of the heads, the vocabulary, the experts
    n = 64 // world
    assert full.layers[0].attn.wo.weight.shape == (64, n)
    assert torch.equal(full.layers[0].attn.wo.weight.view(torch.uint8),
                       ref.layers[0].attn.wo.weight.view(torch.uint8)[:, 64 - n:])
    assert torch.equal(full.embed.weight, ref.embed.weight[256 - 256 // world:])
    assert [e is not None for e in full.layers[1].ffn.experts] == [i >= 8 - 8 // world for i in range(8)]


def test_valid_world_sizes():
    assert valid_world_sizes(tiny_args()) == [1, 2, 4]
    assert valid_world_sizes(tiny_args(fp8=True)) == [1, 2, 4]
    from dsv3.config import ModelArgs

    assert valid_world_sizes(ModelArgs.preset("671B")) == [1, 2, 4, 8, 16]
    # bf16 weights are not held to 128-blocks: 32 ranks would split heads, experts and vocabulary
    assert 32 in valid_world_sizes(ModelArgs.preset("671B").replace(dtype="bf16"))
    with pytest.raises(ConfigError, match=r"n_heads = 128 is not divisible by 3.*Valid world sizes: 1, 2, 4, 8, 16"):
        check_world_size(ModelArgs.preset("671B"), 3)
    # 32 ranks cut FP8 blocks: the message gives both lists (as stored, and dequantised at load)
    with pytest.raises(ConfigError, match=r"not a multiple of the FP8 block size 128.*Valid world sizes with FP8 "
                                          r"weights: 1, 2, 4, 8, 16; dequantised at load .*: 1, 2, 4, 8, 16, 32,"):
        check_world_size(ModelArgs.preset("671B"), 32)


def _generate_cmd(ckpt) -> list[str]:
    return ["-m", "dsv3.generate", "--ckpt", str(ckpt), "--prompt-ids", "5,17,200", "--prompt-ids", "250,1",
            "--max-new-tokens", "6", "--json"]


def test_invalid_world_size_rejected_before_reading(ckpts, tmp_path):
    """3 ranks cannot split 4 heads: every rank exits 2 with the valid list, before a tensor is read
    (the shards are garbage here, so reading one would fail differently)."""
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in ckpts["fp32"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes() if f.suffix == ".json" else b"garbage")
    t0 = time.monotonic()
    r = torchrun(3, *_generate_cmd(bad))
    assert r.returncode != 0
    assert r.stderr.count("cannot split the model over 3 ranks") >= 1 and "Valid world sizes: 1, 2, 4" in r.stderr
    assert f'File "{ROOT / "dsv3"}' not in r.stderr
    assert "garbage" not in r.stderr and "cannot read" not in r.stderr
    print(f"invalid world size: all ranks out in {time.monotonic() - t0:.1f} s")


@pytest.mark.parametrize("how", ["corrupt", "missing"])
def test_failing_rank_stops_every_rank(how, ckpts, tmp_path):
    """Experts 4-7 live in shard 3, which only rank 1 reads: break it; both ranks exit non-zero, promptly.
    Every rank checks every shard's header (the compute dtype is agreed from them), so a truncated or missing
    shard is reported by all ranks alike, in the single process's words, printed once."""
    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in ckpts["fp32"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    shard = bad / "model-00003-of-00003.safetensors"
    if how == "corrupt":
        shard.write_bytes(shard.read_bytes()[:1000])
    else:
        shard.unlink()
    t0 = time.monotonic()
    r = torchrun(2, *_generate_cmd(bad), timeout=90)
    took = time.monotonic() - t0
    assert r.returncode != 0
    if how == "corrupt":
        assert r.stderr.count("dsv3 generate: error:") == 1, r.stderr[-2000:]
        assert "model-00003-of-00003.safetensors: corrupted safetensors header" in r.stderr, r.stderr[:3000]
    else:
        assert "missing" in r.stderr and "model-00003-of-00003.safetensors" in r.stderr, r.stderr[-2000:]
    # torchrun itself reports the failed child with its own traceback; none comes from dsv3
    assert f'File "{ROOT / "dsv3"}' not in r.stderr
    # no wall-clock bound: rank 0 exiting at all (within torchrun's timeout above) is the point
    print(f"{how} shard: all ranks out in {took:.1f} s")


def test_generate_two_nodes_on_localhost(ckpts):
    """Two torchrun invocations (--nnodes 2, one process each) = one 2-rank run; rank 0 alone prints."""
    ref = load_model(ckpts["fp8"])
    want = generate(ref, [[5, 17, 200], [250, 1]], 6)
    port = _free_port()
    nodes = [torchrun(1, *_generate_cmd(ckpts["fp8"]), nnodes=2, node_rank=i, port=port, wait=False) for i in (0, 1)]
    outs = [p.communicate(timeout=120) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert json.loads(outs[0][0].strip().splitlines()[-1])["tokens"] == want
    assert outs[1][0].strip() == ""  # node 1 (rank 1) prints nothing


def test_sampled_generation_under_torchrun_equals_single_process(ckpts):
    """With sampling, every rank must draw the same token: seeded, 2 ranks reproduce the single process."""
    ref = load_model(ckpts["fp32"])
    want = generate(ref, [[5, 17, 200], [250, 1]], 6, temperature=1.0, top_k=50, seed=3)
    r = torchrun(2, *_generate_cmd(ckpts["fp32"]), "--temperature", "1.0", "--top-k", "50", "--seed", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1])["tokens"] == want
    assert want != generate(ref, [[5, 17, 200], [250, 1]], 6)  # sampling did change the tokens


def test_stalled_rank_does_not_hang_the_others():
    """A rank that never reaches the exchange: the others give up after DSV3_DIST_TIMEOUT seconds."""
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", "tests/stall_worker.py"]
    r = subprocess.run(cmd, env={**_env(), "DSV3_DIST_TIMEOUT": "5"}, cwd=ROOT, capture_output=True, text=True,
                       timeout=100)
    took = time.monotonic() - t0
    assert r.returncode != 0
    # the condition, not a duration: rank 0 gave up on its own (its timeout message) while rank 1 was still
    # asleep (120 s, longer than the subprocess timeout above, so a hang fails the test)
    assert "rank 0: rank 0: the other ranks did not report back" in r.stderr, r.stderr[-2000:]
    print(f"stalled rank: others out in {took:.1f} s (timeout 5 s)")


def test_checkpoint_mismatch_is_reported_through_the_exchange(ckpts, tmp_path):
    """A tensor missing from the index: a DistributedError naming it (in-process, one gloo rank)."""
    import torch.distributed as dist

    from dsv3.checkpoint import load_model
    from dsv3.errors import DistributedError

    bad = tmp_path / "ckpt"
    bad.mkdir()
    for f in ckpts["fp32"].iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    index = json.loads((bad / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.0.self_attn.q_a_proj.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        with pytest.raises(DistributedError, match=r"1 missing tensor\(s\): layers.0.attn.wq_a.weight"):
            load_model(bad, group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_chat_under_torchrun_equals_single_process(tmp_path):
    """`dsv3 chat` on 2 ranks: rank 0 reads stdin and broadcasts each line; the replies are the single-process ones."""
    from dsv3.testing import write_tokenizer

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    write_tokenizer(ckpt, vocab_size=256)
    script = "to be or not\n/clear\nthe king\n/exit\n"
    args = ["-m", "dsv3.cli", "chat", "--ckpt", str(ckpt), "--max-new-tokens", "5"]
    single = subprocess.run([sys.executable, *args], input=script, env=_env(), cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--standalone", *args]
    multi = subprocess.run(cmd, input=script, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=180)
    assert multi.returncode == 0, multi.stderr[-2000:]
    assert single.stdout.count("\n") == 2  # two replies
    assert multi.stdout == single.stdout
    assert multi.stderr.count("[conversation cleared]") == 1  # notices from rank 0 only
