"""What every chat format shares: the checked message list, `Reply`, the `ChatFormat` base, the stream parser.

`dsv3.chat_format` holds the families (V3, R1, V3.1, V3.2, a checkpoint's own template) and
`chat_format_for`; this file is the part they have in common. The stream parser is the one
parser: `ChatFormat.parse(text)` feeds it the whole text at once, so a reply parsed in one go
and the same reply fed one character at a time give the same result by construction of the
rules below (a marker is acted on where it is complete; text that may still become a marker
is held back until it is decided).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from dsv3.errors import UsageError

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"
THINK, END_THINK = "<think>", "</think>"
CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
OUTPUTS_BEGIN, OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN, OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
DSML = "｜DSML｜"
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class Reply:
    """One assistant reply: `content` (None when the reply is only tool calls), reasoning, OpenAI tool calls."""

    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    def message(self) -> dict[str, Any]:
        """The reply as an OpenAI assistant message (to append to the conversation)."""
        m: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            m["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            m["tool_calls"] = self.tool_calls
        return m


# ---------------------------------------------------------------------- input checks
def _text(v, where: str) -> str | None:
    """A message's content: a string, None, or OpenAI text parts joined."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, list):
        parts = []
        for j, p in enumerate(v):
            if not (isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)):
                raise UsageError(f"{where}[{j}]: expected a text part {{'type': 'text', 'text': '...'}}")
            parts.append(p["text"])
        return "".join(parts)
    raise UsageError(f"{where}: expected a string, a list of text parts or null, got {type(v).__name__}")


def _tool_calls(v, where: str) -> list[dict[str, str]]:
    if v is None:
        return []
    if not isinstance(v, list):
        raise UsageError(f"{where}: expected a list of tool calls, got {type(v).__name__}")
    calls = []
    for j, c in enumerate(v):
        at = f"{where}[{j}]"
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict):
            raise UsageError(f"{at}.function: expected {{'name': ..., 'arguments': '<JSON string>'}}")
        if c.get("type", "function") != "function":
            raise UsageError(f"{at}.type: expected 'function', got {c.get('type')!r}")
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not name:
            raise UsageError(f"{at}.function.name: expected a non-empty string")
        if isinstance(args, dict):  # lenient: an object instead of its JSON text
            args = json.dumps(args, ensure_ascii=False)
        if not isinstance(args, str):
            raise UsageError(f"{at}.function.arguments: expected a JSON string, got {type(args).__name__}")
        calls.append({"id": c.get("id"), "name": name, "arguments": args})
    return calls


def normalize_messages(messages) -> list[dict[str, Any]]:
    """Checked messages as {role, content, tool_calls, reasoning}; UsageError names the index and field."""
    if not isinstance(messages, list) or not messages:
        raise UsageError("messages: expected a non-empty list of message objects")
    out = []
    for i, m in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(m, dict):
            raise UsageError(f"{at}: expected an object with 'role' and 'content', got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise UsageError(f"{at}.role: expected one of {', '.join(ROLES)}; got {role!r}")
        content = _text(m.get("content"), f"{at}.content")
        if role != "assistant" and m.get("tool_calls"):
            raise UsageError(f"{at}.tool_calls: only assistant messages carry tool calls")
        calls = _tool_calls(m.get("tool_calls"), f"{at}.tool_calls") if role == "assistant" else []
        reasoning = m.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise UsageError(f"{at}.reasoning_content: expected a string or null, got {type(reasoning).__name__}")
        if content is None and not calls:
            raise UsageError(f"{at}.content: missing (only an assistant message with tool_calls may have content null)")
        out.append({"role": role, "content": content, "tool_calls": calls, "reasoning": reasoning})
    return out


def check_tools(tools) -> list[dict[str, Any]]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise UsageError(f"tools: expected a list of tool specs, got {type(tools).__name__}")
    for k, t in enumerate(tools):
        if not (isinstance(t, dict) and isinstance(t.get("function"), dict) and isinstance(t["function"].get("name"), str)):
            raise UsageError(f"tools[{k}]: expected {{'type': 'function', 'function': {{'name': ..., 'parameters': ...}}}}")
    return tools


def call_id(index: int, name: str, arguments: str) -> str:
    """A tool call's id: deterministic from its place in the reply, name and arguments."""
    return "call_" + hashlib.sha256(f"{index}\0{name}\0{arguments}".encode()).hexdigest()[:24]


def json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except (ValueError, RecursionError):
        return False


# ---------------------------------------------------------------------- the formats
class ChatFormat:
    """A family's chat format: `render` messages to a prompt, `parse` / `stream_parser` the reply."""

    def __init__(self, name: str, *, bos: str = BOS, eos: str = EOS, reasoning: bool = False,
                 thinking_default: bool = False, toggle: bool = False, tool_marker: str | None = None,
                 stop_strings=(USER,)):
        self.name, self.bos, self.eos = name, bos, eos
        self.reasoning = reasoning  # the model can write a <think> section
        self.thinking_default = thinking_default
        self.toggle = toggle  # `thinking=` switches it (V3.1, V3.2); R1 always thinks
        self.tool_marker = tool_marker  # where a reply's tool-call block starts
        self._stops = list(stop_strings)

    @property
    def stop_strings(self) -> list[str]:
        """Strings that end the assistant turn besides eos."""
        return list(self._stops)

    def render(self, messages, *, tools=None, thinking=None, add_generation_prompt: bool = True) -> str:
        """The prompt text for OpenAI-style `messages` (bos included; encode it without adding another)."""
        if thinking is not None and not isinstance(thinking, bool):
            raise UsageError(f"thinking: expected true, false or null, got {thinking!r}")
        return self._render(normalize_messages(messages), check_tools(tools),
                            self.thinking_default if thinking is None or not self.toggle else thinking,
                            add_generation_prompt)

    def opens_reasoning(self, thinking=None, prompt: str | None = None) -> bool:
        """Whether the reply starts inside the reasoning section (the prompt ended with <think>)."""
        if not self.reasoning:
            return False
        if prompt is not None:
            return prompt.endswith(THINK) or prompt.endswith(THINK + "\n")
        return self.thinking_default if thinking is None or not self.toggle else bool(thinking)

    def stream_parser(self, *, thinking=None, prompt: str | None = None) -> StreamParser:
        """A parser fed the reply's text as it is generated; give the rendered `prompt` when you have it."""
        return StreamParser(self, self.opens_reasoning(thinking, prompt))

    def parse(self, text: str, *, thinking=None, prompt: str | None = None) -> Reply:
        """The reply in `text` (decoded with special tokens kept; eos and anything after it ignored)."""
        p = self.stream_parser(thinking=thinking, prompt=prompt)
        p.feed(text)
        return p.finish()

    def completion(self, message: dict[str, Any], *, thinking=None) -> str:
        """The text the model writes for the assistant `message` after the generation prompt (parse inverts it)."""
        m = normalize_messages([message])[0]
        if m["role"] != "assistant":
            raise UsageError("messages[0].role: a completion is an assistant message")
        think = self.opens_reasoning(thinking)
        head = (m["reasoning"] or "") + END_THINK if think else ""
        return head + (m["content"] or "") + self._calls_text(m["tool_calls"]) + self.eos

    # per family
    def _render(self, msgs, tools, thinking: bool, add_generation_prompt: bool) -> str:
        raise NotImplementedError

    def _calls_text(self, calls) -> str:
        return ""

    def _parse_calls(self, block: str) -> list[tuple[str, str]] | None:
        """[(name, arguments)] from the tool-call block (from the marker on), None when malformed."""
        return None




# ---------------------------------------------------------------------- the stream parser
def _first(text: str, markers: list[str]) -> tuple[int, str | None]:
    """(position, marker) of the earliest complete marker in `text`, or (-1, None)."""
    best, found = -1, None
    for mk in markers:
        at = text.find(mk)
        if at != -1 and (best == -1 or at < best):
            best, found = at, mk
    return best, found


def _undecided(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a marker (it may still become one)."""
    longest = 0
    for mk in markers:
        for k in range(min(len(mk) - 1, len(text)), longest, -1):
            if text.endswith(mk[:k]):
                longest = k
                break
    return longest


class StreamParser:
    """Turns the reply's text, fed in pieces, into OpenAI delta pieces, and the whole `Reply` at the end.

    Sections: reasoning (until `</think>`), content (until the format's tool marker), the tool-call block
    (kept whole and parsed at the end). eos or a stop string ends the reply; text after it is ignored.
    A reply that opens with `<think>` starts its reasoning there (R1 sometimes writes the tag itself).
    """

    def __init__(self, fmt: ChatFormat, in_reasoning: bool):
        self.fmt = fmt
        self.mode = "reasoning" if in_reasoning else "content"
        self.buf = ""  # text not decided yet
        self.text = {"reasoning": [], "content": []}
        self.block = None  # the tool-call block's raw text, from its marker on
        self.done = False  # eos or a stop string was seen
        self.started = False  # a leading <think> can no longer appear
        self.flushed = False
        self.reply = None

    def feed(self, delta: str) -> list[dict[str, str]]:
        """Delta pieces {"content": ...} / {"reasoning_content": ...} decided by this piece of text."""
        if self.done:
            return []
        self.buf += delta
        return self._drain(final=False)

    def flush(self) -> list[dict[str, str]]:
        """The pieces still held back at the end (and a malformed tool block, which becomes content)."""
        if self.flushed:
            return []
        out = [] if self.done else self._drain(final=True)
        self.done = self.flushed = True
        if self.block is not None and self._calls() is None:
            out += self._emit("content", self.block)
        return out

    def finish(self) -> Reply:
        """The whole reply (call `flush` first to stream its last pieces)."""
        if self.reply is None:
            self.flush()
            calls = self._calls() or []
            content = "".join(self.text["content"])
            reasoning = "".join(self.text["reasoning"])
            tool_calls = [{"id": call_id(i, n, a), "type": "function", "function": {"name": n, "arguments": a}}
                          for i, (n, a) in enumerate(calls)]
            self.reply = Reply(None if tool_calls and not content else content, reasoning or None, tool_calls)
        return self.reply

    def _calls(self):
        return None if self.block is None else self.fmt._parse_calls(self.block)

    def _emit(self, mode: str, text: str) -> list[dict[str, str]]:
        if not text:
            return []
        self.text[mode].append(text)
        return [{"reasoning_content" if mode == "reasoning" else "content": text}]

    def _markers(self) -> list[str]:
        ends = [self.fmt.eos, *self.fmt.stop_strings]
        if self.mode == "reasoning":
            return [*ends, END_THINK]
        if self.mode == "content" and self.fmt.tool_marker:
            return [*ends, self.fmt.tool_marker]
        return ends

    def _drain(self, final: bool) -> list[dict[str, str]]:
        out = []
        if not self.started and self.fmt.reasoning:
            if THINK.startswith(self.buf) and not final:
                return out  # could still be the opening tag
            if self.buf.startswith(THINK):
                self.buf, self.mode = self.buf[len(THINK):], "reasoning"
        self.started = True
        while not self.done:
            markers = self._markers()
            at, mk = _first(self.buf, markers)
            if mk is None:
                keep = 0 if final else _undecided(self.buf, markers)
                cut = len(self.buf) - keep
                out += self._take(self.buf[:cut])
                self.buf = self.buf[cut:]
                break
            out += self._take(self.buf[:at])
            self.buf = self.buf[at + len(mk):]
            if mk == END_THINK and self.mode == "reasoning":
                self.mode = "content"
            elif mk == self.fmt.tool_marker and self.mode == "content":
                self.mode, self.block = "tools", mk
            else:  # eos or a stop string
                self.done, self.buf = True, ""
        return out

    def _take(self, text: str) -> list[dict[str, str]]:
        if self.mode == "tools":
            self.block += text
            return []
        return self._emit(self.mode, text)
