"""A request's life on the asyncio side: admitted by the engine's thread, its tokens turned into text.

`admit` hands the request to the `EngineWorker` and turns the engine's refusals into API errors (429 queue
full, 400 can never fit, 503 engine stopped) before any response starts, so a streamed reply never begins
with a status it cannot keep. `generate_text` then yields text deltas: decoded incrementally (`TextOut`), a
stop string ending the request where it starts (the tail that could still become one is held back). A
consumer that stops early (a client gone) aborts the request, which frees its cache blocks at once.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from dsv3.errors import Dsv3Error, Overloaded
from dsv3.serve import protocol as api
from dsv3.serve.engine import Request as EngineRequest
from dsv3.serve.engine import SamplingParams
from dsv3.serve.worker import EngineWorker


@dataclass
class Served:
    """What the app serves: the engine's thread, the tokenizer (None: token ids only), the chat format."""

    worker: EngineWorker
    tokenizer: object
    chat_format: object
    model_name: str
    eos_id: int | None
    context: int


class TextOut:
    """Incremental detokenization with stop strings: `push(token) -> text safe to send`, `stopped`."""

    def __init__(self, tokenizer, stops: list[str], keep_special: bool = False):
        # a chat reply keeps special tokens: the chat format's markers (tool calls, ...) are special tokens
        self.decoder = tokenizer.stream(skip_special_tokens=not keep_special) if tokenizer is not None else None
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, token: int | None, final: bool = False) -> str:
        if self.decoder is not None and token is not None:
            self.text += self.decoder.push(token)
        if final and self.decoder is not None:
            self.text += self.decoder.flush()
        cut = min((i for i in (self.text.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.stopped, final = self.text[:cut], True, True
        end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent:end], end
        return out


async def admit(served: Served, req: EngineRequest) -> asyncio.Queue:
    """Queue `req` in the engine; its outputs will arrive on the returned queue."""
    loop, q = asyncio.get_running_loop(), asyncio.Queue()
    try:
        await asyncio.wrap_future(served.worker.submit(req, lambda o: loop.call_soon_threadsafe(q.put_nowait, o)))
    except Overloaded as e:
        raise api.ApiError(str(e), status=429, code="queue_full", type="rate_limit_error") from None
    except Dsv3Error as e:
        stopped = served.worker.error is not None
        raise api.ApiError(str(e), status=503 if stopped else 400, param=None if stopped else "prompt",
                           type="server_error" if stopped else "invalid_request_error") from None
    return q


async def outputs(served: Served, req: EngineRequest, q: asyncio.Queue):
    """The request's StepOutputs with a token (or the finish); aborts it if the consumer leaves early."""
    done = False
    try:
        while not done:
            o = await q.get()
            if isinstance(o, BaseException):
                raise api.ApiError(f"the engine stopped: {o}", status=503, type="server_error")
            done = o.finished
            if o.token_id is not None or o.finished:
                yield o
    finally:
        if not done:
            served.worker.abort(req.id)


def engine_request(served: Served, rid: str, prompt: list[int], s: dict) -> EngineRequest:
    if len(prompt) >= served.context:
        raise api.ApiError(f"the prompt has {len(prompt)} tokens; this model's context is {served.context} "
                           "(prompt + max_tokens must fit)", param="messages" if rid.startswith("chat") else "prompt",
                           code="context_length_exceeded")
    max_tokens = s["max_tokens"] or served.context - len(prompt)  # not given: up to the context
    stop_ids = [served.eos_id] if served.eos_id is not None else []
    params = SamplingParams(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"], seed=s["seed"],
                            max_tokens=max_tokens, stop_ids=stop_ids)
    return EngineRequest(rid, prompt, params)


async def generate_text(served: Served, req: EngineRequest, q: asyncio.Queue, stops: list[str], ids: list | None = None,
                        keep_special: bool = False):
    """(text delta, tokens so far, finish_reason or None) as tokens arrive; stop strings end the request.
    `ids`, if given, receives the token ids; `keep_special` keeps special tokens in the text (chat)."""
    text, n = TextOut(served.tokenizer, stops, keep_special), 0
    gen = outputs(served, req, q)
    try:
        async for o in gen:
            n += o.token_id is not None  # an end-of-sequence token counts as generated, but is not text
            if ids is not None and o.token_id is not None:
                ids.append(o.token_id)
            delta = text.push(o.token_id if o.token_id not in req.params.stop_ids else None, final=o.finished)
            if text.stopped:
                yield delta, n, "stop"
                return
            reason = None if not o.finished else ("length" if o.finish_reason == "length" else "stop")
            if o.finish_reason == "error":
                raise api.ApiError("the model produced non-finite logits for this request", status=500,
                                   type="server_error", code="numerical_error")
            yield delta, n, reason
    finally:
        await gen.aclose()


async def collect(served: Served, req: EngineRequest, q: asyncio.Queue, stops: list[str],
                  ids: list | None = None, keep_special: bool = False) -> tuple[str, int, str | None]:
    """The whole reply: (text, tokens generated, finish_reason); `ids` receives the token ids."""
    text, n, reason = "", 0, None
    async for delta, n, reason in generate_text(served, req, q, stops, ids, keep_special):  # noqa: B007 - the last count and reason
        text += delta
    return text, n, reason


async def unless_client_leaves(request, coro, poll_s: float = 0.1):
    """`await coro`, cancelled (its request aborted, its blocks freed) if the client disconnects meanwhile:
    a whole (non-streamed) reply has no write that would fail, so the connection is watched instead."""
    task = asyncio.ensure_future(coro)
    while True:
        done, _ = await asyncio.wait({task}, timeout=poll_s)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise api.ApiError("the client disconnected", status=499, code="client_closed_request")
