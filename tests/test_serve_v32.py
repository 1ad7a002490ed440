"""Serving DeepSeek-V3.2: the lightning indexer's selection over the paged cache, against `dsv3.generate` alone.

A tiny V3.2 checkpoint (dsv3.testing) with index_topk (6) far below the prompt lengths, so a dense attention
would read other rows than the indexer picks: continuous batching with chunked prefill (chunks smaller than the
prompts, blocks scattered) must reproduce every request's greedy tokens from `dsv3.generate` of it alone (the
contiguous-cache `Indexer.forward`), in the bf16 key layout and in the FP8 one (index_fp8); serving with the
indexer dropped (the dense attention the runner ran before) must not; and one request over HTTP with the
`openai` client answers what `dsv3.generate` does.
"""

from __future__ import annotations

import random
import sys

import pytest
import torch

from dsv3.checkpoint import load_model
from dsv3.generation import generate
from dsv3.serve.cache import PagedCache, block_bytes
from dsv3.serve.engine import Engine, EngineConfig, Request, SamplingParams
from dsv3.testing import tiny_v32_args, write_checkpoint, write_tiny_checkpoint
from dsv3.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
TOPK = 6


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    path = write_checkpoint(tmp_path_factory.mktemp("v32serve") / "ckpt", tiny_v32_args(index_topk=TOPK),
                            float_dtype=torch.float32, std=0.3, tokenizer=True)
    return path, load_model(path, dtype=torch.float32)


def _requests(n: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(5)
    return [([rng.randrange(vocab) for _ in range(rng.randrange(2 * TOPK, 40))], rng.randrange(4, 10))
            for _ in range(n)]


def _serve(model, reqs, eng: Engine | None = None, first: int = 0) -> dict[str, list[int]]:
    """Greedy tokens per request id, all requests added at once (ids r{first}..); every one ran concurrently."""
    # 4-token blocks and 8-token chunks: every prompt (>= 12 tokens) prefills over several steps and blocks
    eng = eng or Engine(model, EngineConfig(block_size=4, n_blocks=200, max_batch=10, prefill_chunk=8, max_queue=32))
    for i, (p, m) in enumerate(reqs, first):
        eng.add(Request(f"r{i}", p, SamplingParams(max_tokens=m)))
    out, peak = {f"r{i}": [] for i in range(first, first + len(reqs))}, 0
    while eng.has_work():
        outs = eng.step()
        peak = max(peak, eng.stats()["running"] + sum(o.finished for o in outs))
        for o in outs:
            if o.token_id is not None:
                out[o.request_id].append(o.token_id)
    assert peak == len(reqs) and eng.stats()["blocks_used"] == 0
    return out


@pytest.mark.parametrize("index_fp8", [False, True], ids=["bf16-keys", "fp8-keys"])
def test_concurrent_chunked_requests_equal_generate_alone(v32, index_fp8):
    _, model = v32
    if index_fp8:  # the demo's Hadamard + FP8 keys: same weights, the indexer's arithmetic and cache layout change
        for blk in model.layers:
            blk.attn.indexer.fp8 = True
        model.args = model.args.replace(index_fp8=True)
    try:
        reqs = _requests(10, model.args.vocab_size)
        got = _serve(model, reqs)
        for i, (p, m) in enumerate(reqs):
            assert got[f"r{i}"] == generate(model, [p], m)[0], f"request {i} (prompt {len(p)} tokens)"
    finally:
        for blk in model.layers:
            blk.attn.indexer.fp8 = False
        model.args = model.args.replace(index_fp8=False)


def test_serving_without_the_indexer_would_differ(v32):
    """The mutation: drop the indexer from the served layers (dense attention over every cached row)."""
    _, model = v32
    reqs = _requests(10, model.args.vocab_size)
    want = [generate(model, [p], m)[0] for p, m in reqs]
    kept = [blk.attn.indexer for blk in model.layers]
    try:
        for blk in model.layers:
            blk.attn.indexer = None
        dense = _serve(model, reqs)
    finally:
        for blk, ix in zip(model.layers, kept):
            blk.attn.indexer = ix
    assert sum(dense[f"r{i}"] != w for i, w in enumerate(want)) >= len(want) // 2  # measured: 10 of 10


def test_shared_prefix_blocks_carry_their_indexer_keys(v32):
    """Prefix sharing: later prompts reuse the head's blocks (latents and indexer keys) without prefilling them."""
    _, model = v32
    (head, _), *_ = _requests(1, model.args.vocab_size)
    rng = random.Random(2)
    later = [(head + [rng.randrange(model.args.vocab_size) for _ in range(n)], 5) for n in (1, 3, 7)]
    eng = Engine(model, EngineConfig(block_size=4, n_blocks=100, max_batch=4, prefill_chunk=8, prefix_sharing=True))
    got = _serve(model, [(head, 5)], eng)
    prefilled, real = [], eng.step
    eng.step = lambda: (real(), prefilled.append(eng.stats()["prefill_tokens"]))[0]
    got |= _serve(model, later, eng, first=1)
    # each later prompt shares the head's full 4-token blocks (its last token is always computed)
    assert sum(len(p) for p, _ in later) - sum(prefilled) == 3 * 4 * ((len(head) - 1) // 4)
    for i, (p, m) in enumerate([(head, 5), *later]):
        assert got[f"r{i}"] == generate(model, [p], m)[0], f"request {i}"


def test_cache_holds_and_counts_the_indexer_keys(v32):
    _, model = v32
    a = model.args
    cache = PagedCache(model, 3, 4)
    assert [tuple(p["ik"].shape) for p in cache.ik] == [(12, a.index_head_dim)] * len(model.layers)
    per_row = (a.kv_lora_rank + a.qk_rope_head_dim + a.index_head_dim) * 4  # float32 everywhere
    assert block_bytes(model, 4) == len(model.layers) * 4 * per_row
    assert cache.nbytes() == 3 * block_bytes(model, 4)
    fp8 = model.args.replace(index_fp8=True)
    n_scales = -(-a.index_head_dim // a.block_size)
    fake = type("M", (), {"args": fp8, "layers": model.layers, "dtype": torch.float32, "device": model.device})()
    cache8 = PagedCache(fake, 3, 4)
    assert cache8.ik[0]["ik"].dtype == torch.float8_e4m3fn and tuple(cache8.ik[0]["ik_s"].shape) == (12, n_scales)
    per_row8 = (a.kv_lora_rank + a.qk_rope_head_dim) * 4 + a.index_head_dim + 4 * n_scales
    assert block_bytes(fake, 4) == cache8.nbytes() // 3 == len(model.layers) * 4 * per_row8


def test_one_request_over_http_with_the_openai_client(v32):
    openai = pytest.importorskip("openai")
    from dsv3.serve.server import BackgroundServer

    path, model = v32
    tok = Tokenizer.from_dir(path)
    prompt = "First Citizen: Before we proceed any further, hear me speak."
    ids = tok.encode(prompt)
    assert len(ids) > TOPK
    want = generate(model, [ids], 8, eos_id=tok.eos_id)[0]
    eng = Engine(model, EngineConfig(block_size=4, n_blocks=64, max_batch=4, prefill_chunk=5))
    srv = BackgroundServer.for_engine(eng, tok, model_name="dsv3-v32-tiny")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0, timeout=60)
        res = client.completions.create(model="dsv3-v32-tiny", prompt=prompt, max_tokens=8, temperature=0)
    finally:
        srv.stop()
    assert res.choices[0].text == tok.decode([t for t in want if t != tok.eos_id])
    assert res.usage.completion_tokens == len(want) and res.usage.prompt_tokens == len(ids)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_serve_v32_as_one_process(tmp_path):
    """`dsv3 serve --ckpt` of a V3.2 checkpoint under torchrun x2 (gloo): the replicated indexer selects alike on
    both ranks, and --cache-gb is sized with the indexer keys counted."""
    import httpx
    from test_serve_cli import start, stop  # tests/ is on sys.path under pytest

    ckpt = write_tiny_checkpoint(tmp_path / "v32", v32=True)
    model = load_model(ckpt, dtype=torch.float32)
    prompts = [list(range(3, 3 + n * 7, 7)) for n in (9, 17)]  # 9 and 17 tokens > index_topk (6)
    want = [generate(model, [p], 6)[0] for p in prompts]
    proc, url, _ = start([sys.executable, "-m", "dsv3.launch", "--standalone", "--nproc-per-node=2", "-m",
                          "dsv3.cli", "serve", "--ckpt", str(ckpt), "--port", "0", "--cache-gb", "0.01",
                          "--prefill-chunk", "5"])
    try:
        got = [httpx.post(url + "/v1/completions", timeout=60, json={
            "prompt": p, "max_tokens": 6, "temperature": 0, "return_token_ids": True}).json()["choices"][0]["token_ids"]
            for p in prompts]
    finally:
        stop(proc)
    assert got == want
