"""The serving engine against `dsv3.generate` of each request alone (the independent reference), float32.

Continuous batching, chunked prefill and the paged cache must not change a single greedy token; seeded
sampling must give a request the same tokens whatever else shares its batch; blocks must all come back.
"""

from __future__ import annotations

import random

import pytest
import torch
from conftest import randomize_  # tests/ is on sys.path under pytest

from dsv3.config import ModelArgs
from dsv3.errors import Overloaded, UsageError
from dsv3.generation import generate
from dsv3.model import Transformer
from dsv3.serve.engine import Engine, EngineConfig, Request, SamplingParams


@pytest.fixture(scope="module")
def model():
    return randomize_(Transformer(ModelArgs.tiny("tiny"), dtype=torch.float32), 3).eval()


def run_all(eng: Engine, reqs: list[Request], first: int | None = None, peak: list | None = None) -> dict[str, list[int]]:
    """Add the `first` requests (default all) at once, the rest one per step; step until done: tokens per id.
    `peak` receives the largest running batch seen."""
    out: dict[str, list[int]] = {r.id: [] for r in reqs}
    first = len(reqs) if first is None else first
    pending, steps, most = list(reqs[first:]), 0, 0
    for r in reqs[:first]:
        eng.add(r)
    while pending or eng.has_work():
        if pending:
            eng.add(pending.pop(0))
        outs = eng.step()
        most = max(most, eng.stats()["running"] + sum(o.finished for o in outs))
        for o in outs:
            if o.token_id is not None:
                out[o.request_id].append(o.token_id)
        steps += 1
        assert steps < 2000
    if peak is not None:
        peak.append(most)
    return out


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(512) for _ in range(rng.randrange(1, 60))] for _ in range(n)]


def test_greedy_concurrent_requests_equal_generate_alone(model):
    ps = prompts(20)
    max_new = [random.Random(i).randrange(1, 12) for i in range(len(ps))]
    # small chunks and blocks: prompts are spread over steps, sequences over many non-contiguous blocks
    eng = Engine(model, EngineConfig(block_size=4, n_blocks=400, max_batch=16, prefill_chunk=24, max_queue=64))
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=m)) for i, (p, m) in enumerate(zip(ps, max_new))]
    peak = []
    got = run_all(eng, reqs, first=16, peak=peak)
    assert peak == [16]  # 16 at once, the other 4 joining as the first ones leave
    for i, (p, m) in enumerate(zip(ps, max_new)):
        assert got[f"r{i}"] == generate(model, [p], m)[0], f"request {i}"
    assert eng.stats()["blocks_used"] == 0 and eng.cache.reserved == 0


def test_seeded_sampling_is_per_request(model):
    ps = prompts(6, seed=1)
    params = lambda s: SamplingParams(temperature=0.9, top_p=0.9, top_k=50, seed=s, max_tokens=6)  # noqa: E731
    alone = run_all(Engine(model, EngineConfig(n_blocks=64, block_size=8)), [Request("x", ps[0], params(7))])["x"]
    crowd = [Request("x", ps[0], params(7))] + [Request(f"o{i}", p, params(100 + i)) for i, p in enumerate(ps[1:])]
    together = run_all(Engine(model, EngineConfig(n_blocks=64, block_size=8, prefill_chunk=16)), crowd)
    assert together["x"] == alone
    # and the same draw as dsv3.generate alone with that seed (one generator, one draw per token)
    assert alone == generate(model, [ps[0]], 6, temperature=0.9, top_p=0.9, top_k=50, seed=7)[0]


def test_admission_waits_for_blocks_and_aborts_free_them(model):
    eng = Engine(model, EngineConfig(block_size=4, n_blocks=6, max_batch=4, max_queue=2))
    eng.add(Request("a", [1] * 10, SamplingParams(max_tokens=10)))  # 20 tokens: 5 of the 6 blocks
    eng.add(Request("b", [2] * 4, SamplingParams(max_tokens=4)))  # 2 blocks: must wait for "a"
    eng.step()
    assert eng.stats()["running"] == 1 and eng.stats()["waiting"] == 1
    assert len(eng.block_table("a")) == 3  # 10 prompt tokens + the first new one's row... grown as needed
    eng.add(Request("c", [3], SamplingParams(max_tokens=3)))
    with pytest.raises(Overloaded):
        eng.add(Request("d", [3], SamplingParams(max_tokens=1)))
    assert eng.abort("a")
    assert eng.stats()["blocks_used"] == 0
    eng.step()
    assert eng.stats()["running"] == 2


@pytest.mark.parametrize("req, words", [
    (Request("x", [1] * 30, SamplingParams(max_tokens=1)), "need 8 cache blocks"),
    (Request("x", [1] * 250, SamplingParams(max_tokens=10)), "exceeds the context of 256"),
    (Request("x", [], SamplingParams()), "at least one token"),
    (Request("x", [600], SamplingParams()), "outside the vocabulary"),
    (Request("x", [1], SamplingParams(top_p=0)), "top_p"),
    (Request("x", [1], SamplingParams(max_tokens=0)), "max_tokens"),
])
def test_requests_that_can_never_run_are_refused_up_front(model, req, words):
    eng = Engine(model, EngineConfig(block_size=4, n_blocks=6))
    with pytest.raises(UsageError, match=words):
        eng.add(req)
    assert eng.stats()["waiting"] == 0


def test_long_prompt_is_chunked_without_stalling_decodes(model):
    eng = Engine(model, EngineConfig(block_size=8, n_blocks=64, prefill_chunk=16))
    eng.add(Request("short", [5, 6], SamplingParams(max_tokens=20)))
    eng.step()
    eng.add(Request("long", list(range(100)), SamplingParams(max_tokens=2)))
    seen = []
    for _ in range(7):
        outs = {o.request_id: o for o in eng.step()}
        seen.append((eng.stats()["prefill_tokens"], eng.stats()["decode_tokens"], outs["short"].token_id is not None))
    # 100 prompt tokens in chunks of 16 over 7 steps, and "short" got a token at every one of them
    assert seen == [(16, 1, True)] * 6 + [(4, 1, True)]
    assert eng.stats()["running"] == 2


def test_prefix_sharing_skips_the_shared_prefill_and_changes_no_token(model):
    rng = random.Random(5)
    head = [rng.randrange(512) for _ in range(37)]
    ps = [head + [rng.randrange(512) for _ in range(rng.randrange(1, 9))] for _ in range(8)] + [head[:20], head, head,
                                                                                          head[:32], head[:32]]
    eng = Engine(model, EngineConfig(block_size=8, n_blocks=80, max_batch=4, prefill_chunk=32, prefix_sharing=True))
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=5)) for i, p in enumerate(ps)]
    prefilled, real = [], eng.step

    def step():
        outs = real()
        prefilled.append(eng.stats()["prefill_tokens"])
        return outs

    eng.step = step
    got = run_all(eng, reqs, first=1)
    assert [got[r.id] for r in reqs] == [generate(model, [p], 5)[0] for p in ps]
    # r0 and r1 start together (nothing to share yet); every later request shares the head's 4 full blocks of
    # 8 tokens, head[:20] its first 2 and head[:32] its first 3 (a prompt's last token is always computed)
    saved = sum(len(p) for p in ps) - sum(prefilled)
    assert saved == 32 * (len(ps) - 5) + 16 + 2 * 24, (saved, prefilled)
    assert eng.stats()["blocks_used"] == 0 and eng.stats()["blocks_free"] == 80


def test_prefix_sharing_with_evictions_in_a_small_cache(model):
    rng = random.Random(9)
    heads = [[rng.randrange(512) for _ in range(9)] for _ in range(3)]
    ps = [rng.choice(heads) + [rng.randrange(512) for _ in range(rng.randrange(1, 6))] for _ in range(14)]
    eng = Engine(model, EngineConfig(block_size=4, n_blocks=14, max_batch=3, prefill_chunk=8, prefix_sharing=True))
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=4)) for i, p in enumerate(ps)]
    got = run_all(eng, reqs, first=3)
    assert [got[r.id] for r in reqs] == [generate(model, [p], 4)[0] for p in ps]
    assert eng.stats()["blocks_used"] == 0 and eng.cache.reserved == 0
    assert eng.cache.by_name and all(eng.cache.by_name[eng.cache.name_of[b]] == b for b in eng.cache.name_of)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_logit_ends_only_its_request(model, bad):
    """The batched finiteness check: a single NaN/±inf in one row (after a few good steps) ends that request
    with "error" and frees its blocks; the others' greedy tokens still equal `dsv3.generate` alone."""
    ps = prompts(3, seed=5)
    eng = Engine(model, EngineConfig(n_blocks=64, block_size=4))
    forward = eng.runner.forward

    def poisoned(chunks):
        logits = forward(chunks).clone()
        for i, ch in enumerate(chunks):
            if (seq := eng.find("r1")) is not None and ch.table is seq.table and seq.generated == 2:
                logits[i, 17] = bad
        return logits

    eng.runner.forward = poisoned
    reqs = [Request(f"r{i}", p, SamplingParams(max_tokens=6)) for i, p in enumerate(ps)]
    for r in reqs:
        eng.add(r)
    got, reasons = {r.id: [] for r in reqs}, {}
    while eng.has_work():
        for o in eng.step():
            if o.token_id is not None:
                got[o.request_id].append(o.token_id)
            if o.finished:
                reasons[o.request_id] = o.finish_reason
    assert reasons == {"r0": "length", "r1": "error", "r2": "length"}
    assert got["r1"] == generate(model, [ps[1]], 2)[0]
    assert got["r0"] == generate(model, [ps[0]], 6)[0] and got["r2"] == generate(model, [ps[2]], 6)[0]
    assert eng.stats()["blocks_used"] == 0 and eng.cache.reserved == 0
