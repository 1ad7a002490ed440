"""Chat formats of the DeepSeek-V3 family: OpenAI-style messages -> prompt text, model output -> reply.

The released checkpoints describe their chat format in three ways: a jinja template in
`tokenizer_config.json` (V3, R1, V3.1) or a Python encoder shipped beside the weights (V3.2,
`encoding/encoding_dsv32.py`). The templates mishandle common OpenAI-style input (content None
with tool_calls raises once transformers drops the None; content "" with tool_calls loses the
calls in R1; a second round of tool calls loses its opening markers), and nothing in a release
parses the model's output back. So each family's format is written out here in Python: it
renders exactly as the released text does on well-formed conversations (tested against
transformers' `apply_chat_template` on the real templates, and against the V3.2 encoder's
output), makes one documented choice where the released text breaks (docs/chat.md), and parses
the reply into `content`, `reasoning_content` and `tool_calls`, in one go or while streaming.

A checkpoint whose template is none of these (the bundled tiny model) gets `TemplateFormat`:
its own template, rendered by `Tokenizer.apply_chat_template`, and a plain-text parse.
Parsing expects text decoded with special tokens kept (`skip_special_tokens=False`): the
markers are special tokens.
"""

from __future__ import annotations

import json
import re

from dsv3.chat_parse import (
    ASSISTANT,
    BOS,
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    DSML,
    END_THINK,
    EOS,
    OUTPUT_BEGIN,
    OUTPUT_END,
    OUTPUTS_BEGIN,
    OUTPUTS_END,
    THINK,
    TOOL_SEP,
    USER,
    ChatFormat,
    Reply,
    StreamParser,
    json_object,
    normalize_messages,
)
from dsv3.errors import CheckpointError, UsageError

__all__ = ["ChatFormat", "Reply", "StreamParser", "chat_format_for", "normalize_messages",
           "V3Format", "V31Format", "V32Format", "TemplateFormat"]


class V3Format(ChatFormat):
    """DeepSeek-V3 (the V3-0324 template) and R1 (`<think>\\n` opens every reply; tool outputs joined by newlines)."""

    def __init__(self, name: str = "v3", **kw):
        r1 = name == "r1"
        super().__init__(name, reasoning=r1, thinking_default=r1, tool_marker=CALLS_BEGIN, **kw)
        self.output_sep = "\n" if r1 else ""
        self.generation_prompt = ASSISTANT + (THINK + "\n" if r1 else "")

    def _render(self, msgs, tools, thinking, add_generation_prompt):
        out = [self.bos, "\n\n".join(m["content"] for m in msgs if m["role"] == "system")]
        in_outputs = False  # inside a block of tool results
        for m in msgs:
            role, content = m["role"], m["content"]
            if role == "system":
                continue  # all of them went first
            if in_outputs and role != "tool":
                out.append(OUTPUTS_END)  # the model generated its reply right after this marker
            if role == "user":
                out.append(USER + content)
            elif role == "assistant":
                if not in_outputs:
                    out.append(ASSISTANT)
                if not m["tool_calls"] and not in_outputs and END_THINK in content:
                    content = content.split(END_THINK)[-1]  # reasoning is dropped from history
                out.append((content or "") + self._calls_text(m["tool_calls"]) + self.eos)
            elif role == "tool":
                out.append((self.output_sep if in_outputs else OUTPUTS_BEGIN) + OUTPUT_BEGIN + content + OUTPUT_END)
            in_outputs = role == "tool"
        if in_outputs:
            out.append(OUTPUTS_END)
        elif add_generation_prompt:
            out.append(self.generation_prompt)
        return "".join(out)

    def _calls_text(self, calls):
        if not calls:
            return ""
        body = "\n".join(f"{CALL_BEGIN}function{TOOL_SEP}{c['name']}\n```json\n{c['arguments']}\n```{CALL_END}"
                         for c in calls)
        return CALLS_BEGIN + body + CALLS_END

    def _parse_calls(self, block):
        call = re.compile(re.escape(CALL_BEGIN) + r"function" + re.escape(TOOL_SEP)
                          + r"([^\n]+)\n```json\n(.*?)\n```" + re.escape(CALL_END), re.S)
        return _scan(block[len(CALLS_BEGIN):], call, CALLS_END, "\n")


class V31Format(ChatFormat):
    """DeepSeek-V3.1: thinking toggled by `<think>` / `</think>` after `<｜Assistant｜>`; `name<｜tool▁sep｜>{json}` calls."""

    def __init__(self, **kw):
        super().__init__("v3.1", reasoning=True, toggle=True, tool_marker=CALLS_BEGIN, **kw)

    def _render(self, msgs, tools, thinking, add_generation_prompt):
        out = [self.bos, "\n\n".join(m["content"] for m in msgs if m["role"] == "system")]
        last_user = in_outputs = False
        for m in msgs:
            role, content = m["role"], m["content"]
            if role == "system":
                continue  # all of them went first
            if role == "user":
                out.append(USER + content)
            elif role == "assistant":
                if last_user:
                    out.append(ASSISTANT + END_THINK)  # history is rendered as non-thinking turns
                if not m["tool_calls"] and not in_outputs and END_THINK in content:
                    content = content.split(END_THINK, 1)[1]
                out.append((content or "") + self._calls_text(m["tool_calls"]) + self.eos)
            elif role == "tool":
                out.append(OUTPUT_BEGIN + content + OUTPUT_END)
            last_user, in_outputs = role == "user", role == "tool"
        if add_generation_prompt and last_user:
            out.append(ASSISTANT + (THINK if thinking else END_THINK))
        return "".join(out)

    def _calls_text(self, calls):
        if not calls:
            return ""
        return CALLS_BEGIN + "".join(f"{CALL_BEGIN}{c['name']}{TOOL_SEP}{c['arguments']}{CALL_END}" for c in calls) + CALLS_END

    def _parse_calls(self, block):
        call = re.compile(re.escape(CALL_BEGIN) + r"(.+?)" + re.escape(TOOL_SEP) + r"(.*?)" + re.escape(CALL_END), re.S)
        return _scan(block[len(CALLS_BEGIN):], call, CALLS_END, "")


def _scan(body: str, call: re.Pattern, end: str, sep: str) -> list[tuple[str, str]] | None:
    """Calls matched back to back (joined by `sep`), then `end` (or nothing): [(name, arguments)] or None."""
    calls, pos = [], 0
    while True:
        m = call.match(body, pos)
        if m is None:
            break
        calls.append((m.group(1), m.group(2)))
        pos = m.end()
        if body.startswith(sep, pos) and call.match(body, pos + len(sep)):
            pos += len(sep)
    rest = body[pos:].strip()
    if not calls or rest not in ("", end) or not all(json_object(a) for _, a in calls):
        return None
    return calls




# The tool prompt of DeepSeek-V3.2's encoder (encoding/encoding_dsv32.py, TOOLS_SYSTEM_TEMPLATE), word for word.
V32_TOOLS = """## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "<{dsml}function_calls>" block like the following as part of your reply to the user:
<{dsml}function_calls>
<{dsml}invoke name="$FUNCTION_NAME">
<{dsml}parameter name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE</{dsml}parameter>
...
</{dsml}invoke>
<{dsml}invoke name="$FUNCTION_NAME2">
...
</{dsml}invoke>
</{dsml}function_calls>

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects \
should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for \
other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking \
block. Here is an example:

<{dsml}function_calls>
...
</{dsml}function_calls>

<function_results>
...
</function_results>

{think}...thinking about results{end_think}

Here are the functions available in JSONSchema format:
<functions>
{schemas}
</functions>
"""


def _to_json(v) -> str:
    return json.dumps(v, ensure_ascii=False)


class V32Format(ChatFormat):
    """DeepSeek-V3.2: DSML tool calls, `<function_results>`, reasoning kept for the turns after the last user message."""

    def __init__(self, **kw):
        super().__init__("v3.2", reasoning=True, toggle=True, tool_marker=f"\n\n<{DSML}function_calls", **kw)

    def _render(self, msgs, tools, thinking, add_generation_prompt):
        # The encoder opens the assistant turn after every user message and closing tool result,
        # so add_generation_prompt changes nothing here.
        last_user = max((i for i, m in enumerate(msgs) if m["role"] == "user"), default=-1)
        out = [self.bos]
        if tools and msgs[0]["role"] != "system":  # as an empty system message carrying the tools
            out.append("\n\n" + self._tools_text(tools))
        for i, m in enumerate(msgs):
            role, content = m["role"], m["content"]
            if role == "system":
                out.append(content + ("\n\n" + self._tools_text(tools) if tools and i == 0 else ""))
            elif role == "user":
                out.append(USER + content + ASSISTANT + (THINK if thinking and i == last_user else END_THINK))
            elif role == "tool":
                out.append(self._result(msgs, i, thinking and i >= last_user))
            else:
                if thinking and i > last_user:
                    if not (m["reasoning"] or m["tool_calls"]):
                        raise UsageError(f"messages[{i}].reasoning_content: V3.2 in thinking mode needs the reasoning "
                                         "(or tool calls) of an assistant turn after the last user message")
                    out.append((m["reasoning"] or "") + END_THINK)
                out.append((content or "") + self._dsml_calls(m["tool_calls"], i) + self.eos)
        return "".join(out)

    def _tools_text(self, tools) -> str:
        return V32_TOOLS.format(dsml=DSML, think=THINK, end_think=END_THINK,
                                schemas="\n".join(_to_json(t["function"]) for t in tools))

    def _result(self, msgs, i: int, think: bool) -> str:
        j = i - 1
        while j >= 0 and msgs[j]["role"] == "tool":
            j -= 1
        calls = msgs[j]["tool_calls"] if j >= 0 and msgs[j]["role"] == "assistant" else []
        order = i - j
        if order > len(calls):
            raise UsageError(f"messages[{i}]: a tool result must follow an assistant message with tool_calls "
                             f"(one result per call; found result {order} for {len(calls)} calls)")
        text = ("\n\n<function_results>" if order == 1 else "") + f"\n<result>{msgs[i]['content']}</result>"
        if order == len(calls):
            text += "\n</function_results>\n\n" + (THINK if think else END_THINK)
        return text

    def _dsml_calls(self, calls, i: int | None = None) -> str:
        if not calls:
            return ""
        invokes = []
        for j, c in enumerate(calls):
            try:
                args = json.loads(c["arguments"])
            except ValueError:
                args = None
            if not isinstance(args, dict):
                raise UsageError(f"messages[{i or 0}].tool_calls[{j}].function.arguments: V3.2 needs a JSON object")
            params = "\n".join(f'<{DSML}parameter name="{k}" string="{"true" if isinstance(v, str) else "false"}">'
                               f"{v if isinstance(v, str) else _to_json(v)}</{DSML}parameter>" for k, v in args.items())
            invokes.append(f'<{DSML}invoke name="{c["name"]}">\n{params}\n</{DSML}invoke>')
        return f"\n\n<{DSML}function_calls>\n" + "\n".join(invokes) + f"\n</{DSML}function_calls>"

    def _calls_text(self, calls):
        return self._dsml_calls(calls)

    def _parse_calls(self, block):
        body = block[len(self.tool_marker):]
        invoke = re.compile(f'<{DSML}invoke name="(.*?)">\n(.*?)</{DSML}invoke>\n', re.S)
        param = re.compile(f'<{DSML}parameter name="(.*?)" string="(true|false)">(.*?)</{DSML}parameter>\n', re.S)
        if not body.startswith(">\n"):
            return None
        calls, pos = [], 2
        while (m := invoke.match(body, pos)) is not None:
            inner, args, at = m.group(2), {}, 0
            inner = "" if inner == "\n" else inner  # no parameters
            while (p := param.match(inner, at)) is not None:
                name, is_str, value = p.groups()
                if name in args or (is_str == "false" and not _is_json(value)):
                    return None
                args[name] = _to_json(value) if is_str == "true" else value
                at = p.end()
            if at != len(inner):
                return None
            # as the encoder's decode_dsml_to_arguments writes them
            calls.append((m.group(1), "{" + ", ".join(f"{_to_json(k)}: {v}" for k, v in args.items()) + "}"))
            pos = m.end()
        if not calls or body[pos:].strip() != f"</{DSML}function_calls>":
            return None
        return calls


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except (ValueError, RecursionError):
        return False
    return True


class TemplateFormat(ChatFormat):
    """A checkpoint's own jinja template (e.g. the bundled model): rendered by the tokenizer, reply as plain text."""

    def __init__(self, tokenizer, **kw):
        stops = [USER] if USER in (tokenizer.chat_template or "") else []
        super().__init__("template", stop_strings=stops, **kw)
        self.tokenizer = tokenizer

    def render(self, messages, *, tools=None, thinking=None, add_generation_prompt: bool = True) -> str:
        normalize_messages(messages)  # the same checks and errors as the family formats
        kwargs = {"tools": tools} if tools else {}
        if thinking is not None:
            kwargs.update(thinking=bool(thinking), enable_thinking=bool(thinking))
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)


def detect_family(template: str) -> str | None:
    """Which released template `template` is ("v3", "r1", "v3.1"), from the markers it writes; None if none."""
    if "is_last_user" in template and "thinking" in template and CALLS_BEGIN in template:
        return "v3.1"
    if CALLS_BEGIN in template and "```json" in template:
        return "r1" if THINK in template else "v3"
    return None


def chat_format_for(tokenizer, config: dict | None = None) -> ChatFormat:
    """The chat format of a checkpoint: from config.json (V3.2 ships no template) or the template's text."""
    if config is not None and not isinstance(config, dict):
        raise UsageError(f"config: expected the config.json contents as a dict, got {type(config).__name__}")
    cfg = config or {}
    tokens = {"bos": tokenizer.bos_token or BOS, "eos": tokenizer.eos_token or EOS}
    if cfg.get("model_type") == "deepseek_v32" or "index_topk" in cfg:
        return V32Format(**tokens)
    template = tokenizer.chat_template
    if not template:
        raise CheckpointError(f"{tokenizer.source}: tokenizer_config.json has no chat_template and config.json "
                              "names no family that brings its own format (model_type deepseek_v32)")
    family = detect_family(template)
    if family == "v3.1":
        return V31Format(**tokens)
    if family in ("v3", "r1"):
        return V3Format(family, **tokens)
    return TemplateFormat(tokenizer, **tokens)
