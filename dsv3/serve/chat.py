"""The chat format the server renders and parses with, until `dsv3.chat_format` (branch chat-formats) lands.

Same calls as `dsv3.chat_format.chat_format_for(tokenizer)`: `render(messages, tools, thinking,
add_generation_prompt) -> str` through the checkpoint's own template (`Tokenizer.apply_chat_template`),
`stop_strings`, `parse(text) -> Reply`, and `stream_parser()` whose `feed(delta)` returns content or
reasoning deltas. Reasoning is what precedes `</think>` when the reply opens with `<think>`; tool calls are
not parsed by this stand-in (no tool-call grammar without the family's format).
"""

from __future__ import annotations

from dataclasses import dataclass, field

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class Reply:
    content: str
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)


class TemplateFormat:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_strings: list[str] = []

    def render(self, messages: list[dict], tools: list | None = None, thinking: bool | None = None,
               add_generation_prompt: bool = True) -> str:
        kw = {"tools": tools} if tools else {}
        if thinking is not None:
            kw["thinking"] = thinking
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kw)

    def parse(self, text: str) -> Reply:
        body = text.removeprefix(THINK_OPEN) if text.startswith(THINK_OPEN) else None
        if body is not None and THINK_CLOSE in body:
            reasoning, content = body.split(THINK_CLOSE, 1)
            return Reply(content.lstrip("\n"), reasoning.strip("\n"))
        return Reply(text)

    def stream_parser(self) -> StreamParser:
        return StreamParser(self)


class StreamParser:
    """Content deltas as they come (a reply opening with <think> streams as reasoning until </think>)."""

    def __init__(self, fmt: TemplateFormat):
        self.fmt, self.text, self.sent = fmt, "", 0  # sent: chars of `text` already handed out

    def feed(self, delta: str) -> list[dict]:
        self.text += delta
        if THINK_OPEN.startswith(self.text) or (self.text.startswith(THINK_OPEN) and THINK_CLOSE not in self.text):
            return []  # undecided, or inside the reasoning: said whole at the end, or when </think> arrives
        if self.sent == 0 and self.text.startswith(THINK_OPEN):
            reply = self.fmt.parse(self.text)
            self.sent = len(self.text)
            return [d for d in ({"reasoning_content": reply.reasoning_content}, {"content": reply.content})
                    if next(iter(d.values()))]
        new, self.sent = self.text[self.sent:], len(self.text)
        return [{"content": new}] if new else []

    def finish(self) -> Reply:
        return self.fmt.parse(self.text)


def chat_format_for(tokenizer, config=None) -> TemplateFormat:
    return TemplateFormat(tokenizer)
