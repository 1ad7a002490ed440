"""Regenerate v3.2-cases.json: DeepSeek-V3.2's own encoder run over a matrix of conversations and replies.

Usage: python make_v32_cases.py PATH/TO/encoding_dsv32.py   (the file from the DeepSeek-V3.2 release,
`encoding/encoding_dsv32.py`; see SOURCES.md). The encoder is not part of this repository: only what it
printed is kept, so tests/test_chat_format.py checks dsv3's V3.2 format against DeepSeek's code.
"""

import copy
import importlib.util
import json
import sys
from pathlib import Path

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "clock", "description": "The time now",
                                          "parameters": {"type": "object", "properties": {}}}}


def call(i, name, args):
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


TWO_CALLS = {"role": "assistant", "content": None, "reasoning_content": "Two lookups.",
             "tool_calls": [call(0, "get_weather", {"city": "Paris", "days": 2}), call(1, "clock", {})]}
CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hello"}],
    "system and multi-turn with reasoning in history": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4", "reasoning_content": "Add them."},
        {"role": "user", "content": "And 3+3?"}],
    "system message not first": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello.", "reasoning_content": "Greet."},
        {"role": "system", "content": "Now answer in French."},
        {"role": "user", "content": "Bye"}],
    "tool calls and results": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather in Paris, and the time?"},
        TWO_CALLS,
        {"role": "tool", "tool_call_id": "c0", "content": "sunny"},
        {"role": "tool", "tool_call_id": "c1", "content": "12:00"}],
    "tools without a system message, content '' with a tool call, then the answer": [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "", "reasoning_content": "Look it up.",
         "tool_calls": [call(0, "get_weather", {"city": "Rome"})]},
        {"role": "tool", "tool_call_id": "c0", "content": "rain"},
        {"role": "assistant", "content": "It rains in Rome.", "reasoning_content": "Tell them."},
        {"role": "user", "content": "Thanks"}],
}
TOOLS = {"tool calls and results": [WEATHER, CLOCK],
         "tools without a system message, content '' with a tool call, then the answer": [WEATHER]}
REPLIES = [
    {"role": "assistant", "content": "Just an answer."},
    {"role": "assistant", "content": "Paris is sunny.", "reasoning_content": "The tool said sunny."},
    {"role": "assistant", "content": "Let me check.", "reasoning_content": "Need data.",
     "tool_calls": [call(0, "get_weather", {"city": "Nice", "days": 3}), call(1, "clock", {})]},
    {"role": "assistant", "content": "", "reasoning_content": "Nested values.",
     "tool_calls": [call(0, "get_weather", {"city": "Oslo", "days": [1, 2], "opts": {"units": "C"}})]},
]


def with_tools(messages, tools):
    """dsv3's convention (as vLLM's): the tools ride on the first system message, or on an empty one put first."""
    messages = copy.deepcopy(messages)
    if tools:
        if messages[0]["role"] != "system":
            messages.insert(0, {"role": "system", "content": ""})
        messages[0]["tools"] = tools
    return messages


def main(encoder: Path) -> None:
    spec = importlib.util.spec_from_file_location("encoding_dsv32", encoder)
    enc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(enc)
    cases = []
    for name, messages in CONVERSATIONS.items():
        for mode in ("chat", "thinking"):
            prompt = enc.encode_messages(with_tools(messages, TOOLS.get(name)), thinking_mode=mode)
            cases.append({"name": name, "messages": messages, "tools": TOOLS.get(name), "thinking": mode == "thinking",
                          "prompt": prompt})
    replies = []
    for reply in REPLIES:
        for mode in ("chat", "thinking") if reply.get("reasoning_content") else ("chat",):
            history = [{"role": "user", "content": "q"}]
            text = enc.encode_messages(history + [reply], thinking_mode=mode)
            text = text[len(enc.encode_messages(history, thinking_mode=mode)):]
            parsed = enc.parse_message_from_completion_text(text, thinking_mode=mode)
            replies.append({"message": reply, "thinking": mode == "thinking", "text": text, "parsed": parsed})
    out = Path(__file__).with_name("v3.2-cases.json")
    out.write_text(json.dumps({"source": "DeepSeek-V3.2 encoding/encoding_dsv32.py (see SOURCES.md)",
                               "conversations": cases, "replies": replies}, ensure_ascii=False, indent=1) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
