"""The OpenAI API's request checks and shapes: every field read with its type and range, errors as JSON.

A bad request becomes an `ApiError` (status, message, type, param, code) and leaves as OpenAI's error body
`{"error": {"message", "type", "param", "code"}}`: 400 for malformed JSON, wrong types, an unknown model,
bad sampling values or a prompt past the context; 429 when the queue is full; 503 when the engine stopped.
Plain dicts are read by hand rather than through a schema library so that each message names the field.
"""

from __future__ import annotations

import json
import math
import time
import uuid

from dsv3.sampling import SEED_RANGE


class ApiError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.param, self.code, self.type = status, param, code, type

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def field(body: dict, name: str, kinds: tuple, default=None, *, lo=None, hi=None, lo_open=False):
    """body[name] checked to be one of `kinds` (bool is never a number) and within [lo, hi]."""
    v = body.get(name, default)
    if v is None:
        return default
    if float in kinds and isinstance(v, int) and not isinstance(v, bool):
        v = float(v)
    if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
        want = " or ".join({bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
                            dict: "object"}[k] for k in kinds)
        raise ApiError(f"'{name}' must be a {want}, got {json.dumps(v)[:40]}", param=name, code="invalid_type")
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        if (isinstance(v, float) and not math.isfinite(v)) or (lo is not None and (v <= lo if lo_open else v < lo)) \
                or (hi is not None and v > hi):
            rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}{']' if hi is not None else ')'}"
            raise ApiError(f"'{name}' must be in {rng}, got {v}", param=name, code="invalid_value")
    return v


def sampling_fields(body: dict) -> dict:
    """temperature, top_p, top_k, seed, max_tokens, stop (strings), stream, include_usage; n must be 1."""
    if field(body, "n", (int,), 1) != 1:
        raise ApiError("only n = 1 is supported", param="n", code="invalid_value")
    max_tokens = field(body, "max_completion_tokens", (int,), None, lo=1)
    max_tokens = field(body, "max_tokens", (int,), max_tokens, lo=1)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError("'stop' must be a non-empty string or an array of them", param="stop", code="invalid_type")
    opts = field(body, "stream_options", (dict,), {})
    top_k = field(body, "top_k", (int,), 0, lo=-1)
    return {
        "temperature": field(body, "temperature", (float,), 1.0, lo=0, hi=2),
        "top_p": field(body, "top_p", (float,), 1.0, lo=0, hi=1, lo_open=True),
        "top_k": 0 if top_k == -1 else top_k,
        "seed": field(body, "seed", (int,), None, lo=SEED_RANGE[0], hi=SEED_RANGE[1] - 1),
        "max_tokens": max_tokens,  # None: up to the context
        "stop": stop or [],
        "stream": field(body, "stream", (bool,), False),
        "include_usage": bool(field(opts, "include_usage", (bool,), False)),
    }


def check_model(body: dict, served: str) -> str:
    name = field(body, "model", (str,), served)
    if name != served:
        raise ApiError(f"the model '{name}' does not exist; this server serves '{served}'", param="model",
                       code="model_not_found")
    return name


def completion_prompt(body: dict, tokenizer) -> list[int]:
    """`prompt`: a string, an array of token ids, or an array holding one of these (n = 1)."""
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]
    if isinstance(p, str):
        if tokenizer is None:
            raise ApiError("this model has no tokenizer: send the prompt as token ids", param="prompt")
        return tokenizer.encode(p)
    if isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        return p
    raise ApiError("'prompt' must be a non-empty string or an array of token ids", param="prompt",
                   code="invalid_type")


def chat_fields(body: dict) -> tuple[list[dict], list | None, object]:
    """messages (each an object with a string role), tools (array) and tool_choice."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError("'messages' must be a non-empty array", param="messages", code="invalid_type")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]",
                           code="invalid_type")
        c = m.get("content")
        if c is not None and not isinstance(c, (str, list)):
            raise ApiError(f"messages[{i}].content must be a string or an array of parts",
                           param=f"messages[{i}].content", code="invalid_type")
        if isinstance(c, list):  # text parts only: join them
            if not all(isinstance(x, dict) and x.get("type") == "text" and isinstance(x.get("text"), str) for x in c):
                raise ApiError(f"messages[{i}].content: only text parts are supported",
                               param=f"messages[{i}].content", code="invalid_value")
            msgs[i] = {**m, "content": "".join(x["text"] for x in c)}
    tools = field(body, "tools", (list,), None)
    choice = body.get("tool_choice")
    if choice is not None and not (choice in ("none", "auto", "required") or isinstance(choice, dict)):
        raise ApiError("'tool_choice' must be 'none', 'auto', 'required' or an object", param="tool_choice",
                       code="invalid_value")
    return msgs, (None if choice == "none" else tools), choice


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def envelope(kind: str, rid: str, model: str, choices: list, use: dict | None = None) -> dict:
    out = {"id": rid, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None:
        out["usage"] = use
    return out
