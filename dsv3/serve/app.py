"""The FastAPI app: OpenAI's /v1/chat/completions and /v1/completions (streamed over SSE or whole),
/v1/models, /health and /metrics, over an `EngineWorker` (`textgen` carries a request's tokens and text).

Bodies are read by `protocol` (each bad field a 400 naming it, OpenAI's error JSON). Chat prompts are
rendered, and replies parsed, by the chat format (`chat`): reasoning comes back as `reasoning_content`,
tool calls as `tool_calls`. Every response carries its usage (a streamed one in a last chunk when
`stream_options.include_usage` asks for it); every stream ends with `data: [DONE]`.
"""

from __future__ import annotations

import json
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from dsv3.errors import Dsv3Error
from dsv3.serve import protocol as api
from dsv3.serve.textgen import Served, admit, collect, engine_request, generate_text, unless_client_leaves

DONE = "data: [DONE]\n\n"


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def build_app(served: Served) -> FastAPI:
    app = FastAPI(title="dsv3", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(api.ApiError)
    async def on_api_error(request: Request, e: api.ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.get("/health")
    async def health():
        if served.worker.error is not None:
            return JSONResponse({"status": "error", "error": str(served.worker.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "dsv3", "max_model_len": served.context}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(served.worker.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = api.parse_json(await request.body())
        model, s = api.check_model(body, served.model_name), api.sampling_fields(body)
        prompt = api.completion_prompt(body, served.tokenizer)
        req = engine_request(served, api.new_id("cmpl"), prompt, s)
        q = await admit(served, req)
        if s["stream"]:
            return StreamingResponse(stream_completion(served, req, q, model, s), media_type="text/event-stream")
        ids: list[int] = []
        text, n, reason = await unless_client_leaves(request, collect(served, req, q, s["stop"], ids))
        choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        if api.field(body, "return_token_ids", (bool,), False):  # an extension (vLLM's name): the ids generated
            choice["token_ids"] = ids
        return api.envelope("text_completion", req.id, model, [choice], api.usage(len(prompt), n))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = api.parse_json(await request.body())
        model, s = api.check_model(body, served.model_name), api.sampling_fields(body)
        if served.tokenizer is None:
            raise api.ApiError("this model has no tokenizer: use /v1/completions with token ids", param="messages")
        messages, tools, _ = api.chat_fields(body)
        thinking = api.field(body, "thinking", (bool,), None)
        try:
            rendered = served.chat_format.render(messages, tools=tools, thinking=thinking)
        except Dsv3Error as e:  # messages or tools the format cannot take
            raise api.ApiError(str(e), param="messages") from None
        prompt = served.tokenizer.encode(rendered, add_bos=False)
        req = engine_request(served, api.new_id("chatcmpl"), prompt, s)
        stops = s["stop"] + list(served.chat_format.stop_strings)
        turn = dict(thinking=thinking, prompt=rendered)
        q = await admit(served, req)
        if s["stream"]:
            return StreamingResponse(stream_chat(served, req, q, model, s, stops, turn), media_type="text/event-stream")
        text, n, reason = await unless_client_leaves(request, collect(served, req, q, stops, keep_special=True))
        reply = served.chat_format.parse(text, **turn)
        message = {"role": "assistant", "content": reply.content}
        if reply.reasoning_content is not None:
            message["reasoning_content"] = reply.reasoning_content
        if reply.tool_calls:
            message["tool_calls"] = reply.tool_calls
            reason = "tool_calls"
        choice = {"index": 0, "message": message, "finish_reason": reason, "logprobs": None}
        return api.envelope("chat.completion", req.id, model, [choice], api.usage(len(prompt), n))

    return app


async def stream_completion(served: Served, req, q, model: str, s: dict):
    n = 0
    try:
        async for delta, n, reason in generate_text(served, req, q, s["stop"]):  # noqa: B007 - n: the last count
            if delta or reason:
                choice = {"index": 0, "text": delta, "finish_reason": reason, "logprobs": None}
                yield sse(api.envelope("text_completion", req.id, model, [choice]))
    except api.ApiError as e:
        yield sse(e.body())
    if s["include_usage"]:
        yield sse(api.envelope("text_completion", req.id, model, [], api.usage(len(req.prompt), n)))
    yield DONE


async def stream_chat(served: Served, req, q, model: str, s: dict, stops: list[str], turn: dict):
    chunk = lambda delta, reason=None: sse(api.envelope(  # noqa: E731
        "chat.completion.chunk", req.id, model, [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}]))
    yield chunk({"role": "assistant", "content": ""})
    parser, n = served.chat_format.stream_parser(**turn), 0
    try:
        reason = None
        async for delta, n, reason in generate_text(served, req, q, stops, keep_special=True):  # noqa: B007
            for d in parser.feed(delta) if delta else []:
                yield chunk(d)
        for d in parser.flush():  # what the parser held back to the end
            yield chunk(d)
        reply = parser.finish()
        if reply.tool_calls:
            yield chunk({"tool_calls": [{"index": i, **c} for i, c in enumerate(reply.tool_calls)]})
            reason = "tool_calls"
        yield chunk({}, reason)
    except api.ApiError as e:
        yield sse(e.body())
    if s["include_usage"]:
        yield sse(api.envelope("chat.completion.chunk", req.id, model, [], api.usage(len(req.prompt), n)))
    yield DONE
