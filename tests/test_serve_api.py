"""`dsv3 serve`'s HTTP API driven by the real `openai` client and raw `httpx` streams, on loopback.

The reference for every answer is `dsv3.generate` of that request alone on the same float32 model, and the
prompt's token count is the tokenizer's (and the checkpoint's chat template's) own.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
import torch

from dsv3.checkpoint import default_checkpoint, load_model
from dsv3.generation import generate
from dsv3.serve.engine import Engine, EngineConfig
from dsv3.serve.server import BackgroundServer
from dsv3.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
POISON = 7  # a prompt of POISON tokens gets NaN logits in `test_a_failing_request_leaves_the_others_alone`


@pytest.fixture(scope="module")
def tiny():
    path = default_checkpoint()
    return load_model(path, dtype=torch.float32), Tokenizer.from_dir(path)


@pytest.fixture(scope="module")
def live(tiny):
    model, tok = tiny
    eng = Engine(model, EngineConfig(block_size=8, n_blocks=600, max_batch=16, prefill_chunk=64, max_queue=64))
    srv = BackgroundServer.for_engine(eng, tok)
    yield srv, eng
    srv.stop()


def expected(tiny, ids: list[int], n: int) -> tuple[str, int]:
    """(text, completion tokens) of dsv3.generate alone: greedy, stopping at eos (counted, not shown)."""
    model, tok = tiny
    out = generate(model, [ids], n, eos_id=tok.eos_id)[0]
    return tok.decode([t for t in out if t != tok.eos_id]), len(out)


def sse_events(lines: list[str]) -> list[dict]:
    """The events of a stream, checked well-formed: `data: {json}` lines, blank separators, `[DONE]` last."""
    data = [ln for ln in lines if ln]
    assert all(ln.startswith("data: ") for ln in data), data
    assert data[-1] == "data: [DONE]" and data.count("data: [DONE]") == 1
    return [json.loads(ln[6:]) for ln in data[:-1]]


PROMPTS = ["ROMEO:", "First Citizen:\nBefore we proceed", "O, what a", "KING HENRY:\nWhat", "Enter", "The", "Good morrow",
           "Speak"]


@pytest.mark.slow
def test_32_concurrent_clients_get_their_single_request_answers(tiny, live):
    srv, eng = live
    _, tok = tiny
    client = openai.AsyncOpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)

    async def chat(i, stream):
        msgs = [{"role": "user", "content": PROMPTS[i % 8]}]
        ids = tok.encode(tok.apply_chat_template(msgs), add_bos=False)
        want, n = expected(tiny, ids, 4 + i % 7)
        kw = dict(model="dsv3-tiny", messages=msgs, max_tokens=4 + i % 7, temperature=0)
        if not stream:
            r = await client.chat.completions.create(**kw)
            assert (r.choices[0].message.content, r.usage.completion_tokens, r.usage.prompt_tokens) == (want, n, len(ids))
            return
        text, usage = "", None
        async for c in await client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
            text += "".join(ch.delta.content or "" for ch in c.choices)
            usage = c.usage or usage
        assert (text, usage.completion_tokens, usage.prompt_tokens) == (want, n, len(ids))

    async def completion(i, http):
        ids = tok.encode(PROMPTS[i % 8])
        want, n = expected(tiny, ids, 3 + i % 9)
        body = {"model": "dsv3-tiny", "prompt": PROMPTS[i % 8], "max_tokens": 3 + i % 9, "temperature": 0}
        if http is None:
            r = await client.completions.create(**body)
            assert (r.choices[0].text, r.usage.completion_tokens, r.usage.prompt_tokens) == (want, n, len(ids))
            return
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        async with http.stream("POST", srv.url + "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = sse_events([ln async for ln in r.aiter_lines()])
        assert "".join(c["text"] for e in events for c in e["choices"]) == want
        assert events[-1]["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
        assert [c["finish_reason"] for c in events[-2]["choices"]] in (["length"], ["stop"])

    async def main():
        async with httpx.AsyncClient(timeout=60) as http:
            jobs = [chat(i, False) for i in range(8)] + [chat(i, True) for i in range(8, 16)] \
                + [completion(i, None) for i in range(16, 24)] + [completion(i, http) for i in range(24, 32)]
            await asyncio.gather(*jobs)

    asyncio.run(main())
    assert eng.stats()["blocks_used"] == 0 and eng.stats()["running"] == 0
    metrics = httpx.get(srv.url + "/metrics").text
    assert "dsv3_requests_total 32" in metrics and 'dsv3_time_to_first_token_seconds_count 32' in metrics


@pytest.mark.parametrize("path, body, param, code", [
    ("/v1/completions", b"{not json", None, "invalid_json"),
    ("/v1/completions", b"[1, 2]", None, "invalid_json"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "max_tokens": "8"}, "max_tokens", "invalid_type"),
    ("/v1/completions", {"prompt": 5}, "prompt", "invalid_type"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, "model", "model_not_found"),
    ("/v1/completions", {"prompt": "x " * 600}, "prompt", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 600}, "prompt", None),
    ("/v1/completions", {"prompt": [5, 99999]}, "prompt", None),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "n": 2}, "n", "invalid_value"),
    ("/v1/completions", {"prompt": "x", "stream": "yes"}, "stream", "invalid_type"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages", "invalid_type"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages[0]", "invalid_type"),
])
def test_bad_requests_get_openai_error_json(live, path, body, param, code):
    srv, eng = live
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(srv.url + path, timeout=30, **kw)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert (err["param"], err["code"], err["type"]) == (param, code, "invalid_request_error")
    assert eng.stats()["waiting"] == 0


def test_a_failing_request_leaves_the_others_alone(tiny, live, monkeypatch):
    srv, eng = live
    real = eng.runner.forward

    def poisoned(chunks):
        logits = real(chunks).clone()  # an inference tensor: written to outside inference mode as a copy
        for i, ch in enumerate(chunks):
            if ch.start == 0 and ch.tokens == [POISON] * 3:  # the poisoned prompt, whole
                logits[i] = float("nan")
        return logits

    monkeypatch.setattr(eng.runner, "forward", poisoned)
    good = {"prompt": "ROMEO:", "max_tokens": 6, "temperature": 0}
    want = expected(tiny, tiny[1].encode("ROMEO:"), 6)[0]

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as http:
            rs = await asyncio.gather(*[http.post("/v1/completions", json=good) for _ in range(4)],
                                      http.post("/v1/completions", json={"prompt": [POISON] * 3, "max_tokens": 4}))
        return rs

    *oks, bad = asyncio.run(main())
    assert [r.status_code for r in oks] == [200] * 4, [r.text for r in oks]
    assert [r.json()["choices"][0]["text"] for r in oks] == [want] * 4
    assert bad.status_code == 500 and bad.json()["error"]["code"] == "numerical_error"
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert eng.stats()["blocks_used"] == 0


def test_client_leaving_mid_stream_frees_its_blocks(tiny, live):
    srv, eng = live
    before = srv.served.worker.metrics.counters["dsv3_generation_tokens_total"]
    body = {"prompt": "ROMEO:", "max_tokens": 400, "temperature": 0.8, "seed": 1, "stream": True}
    srv.served.eos_id = None  # it must still be running when the client leaves
    with httpx.Client(timeout=30) as http, http.stream("POST", srv.url + "/v1/completions", json=body) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert eng.stats()["blocks_used"] > 0
    deadline = time.monotonic() + 10
    while eng.stats()["blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng.stats()["blocks_used"] == 0 and eng.stats()["running"] == 0
    assert srv.served.worker.metrics.counters["dsv3_generation_tokens_total"] - before < 400  # cancelled, not run out
    # a whole (non-streamed) reply whose client gives up waiting
    before = srv.served.worker.metrics.counters["dsv3_generation_tokens_total"]
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/completions", json={**body, "stream": False, "max_tokens": 480}, timeout=0.3)
    deadline = time.monotonic() + 10
    while eng.stats()["blocks_used"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert eng.stats()["blocks_used"] == 0 and eng.stats()["running"] == 0
    assert srv.served.worker.metrics.counters["dsv3_generation_tokens_total"] - before < 480
    srv.served.eos_id = tiny[1].eos_id


def test_full_queue_answers_429(tiny, monkeypatch):
    model, tok = tiny
    eng = Engine(model, EngineConfig(block_size=8, n_blocks=200, max_batch=1, max_queue=1))
    real = eng.step
    monkeypatch.setattr(eng, "step", lambda: (time.sleep(0.02), real())[1])  # slow enough to hold the batch
    srv = BackgroundServer.for_engine(eng, tok)
    srv.served.eos_id = None  # no early end of sequence: the long requests hold the batch and the queue
    try:
        long = {"prompt": "ROMEO:", "max_tokens": 300, "temperature": 0.8, "stream": True}
        with httpx.Client(base_url=srv.url, timeout=30) as http, http.stream("POST", "/v1/completions", json=long) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the stream (the client leaves)
            next(lines)  # running: the batch (1) is full
            with httpx.stream("POST", srv.url + "/v1/completions", json=long, timeout=30) as queued:
                deadline = time.monotonic() + 5
                while eng.stats()["waiting"] == 0 and time.monotonic() < deadline:
                    time.sleep(0.01)
                third = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
                assert third.status_code == 429, third.text
                assert third.json()["error"]["code"] == "queue_full"
                assert queued.status_code == 200
                next(lines)
    finally:
        srv.stop()
    assert eng.stats()["blocks_used"] == 0


def test_stop_strings_seeds_models_and_health(tiny, live):
    srv, eng = live
    _, tok = tiny
    full, _ = expected(tiny, tok.encode("ROMEO:"), 12)
    stop = full[len(full) // 2: len(full) // 2 + 2]
    assert stop.strip(), full  # a visible piece of the greedy text
    r = httpx.post(srv.url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 12, "temperature": 0,
                                                      "stop": [stop]}, timeout=30).json()
    assert r["choices"][0]["text"] == full[: full.index(stop)] and r["choices"][0]["finish_reason"] == "stop"
    sampled = {"prompt": "O, what a", "max_tokens": 10, "temperature": 1.0, "top_k": 40, "seed": 11}
    texts = {httpx.post(srv.url + "/v1/completions", json=sampled, timeout=30).json()["choices"][0]["text"]
             for _ in range(3)}
    model, _ = tiny
    want = generate(model, [tok.encode("O, what a")], 10, temperature=1.0, top_k=40, seed=11, eos_id=tok.eos_id)[0]
    assert texts == {tok.decode([t for t in want if t != tok.eos_id])}  # the same seed, the same draws as alone
    assert httpx.get(srv.url + "/v1/models").json()["data"][0]["id"] == "dsv3-tiny"
    assert httpx.get(srv.url + "/health").json() == {"status": "ok"}
    assert eng.stats()["blocks_used"] == 0
