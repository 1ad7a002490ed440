"""dsv3.tokenizer against transformers: encode/decode and DeepSeek-V3's chat template, on a BPE trained here."""

import pytest

from dsv3.errors import CheckpointError, UsageError
from dsv3.testing import BOS, EOS, write_tokenizer
from dsv3.tokenizer import DEEPSEEK_V3_CHAT_TEMPLATE, Tokenizer, compile_template

CONVERSATIONS = [
    [{"role": "user", "content": "Hello, how are you?"}],
    [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a story about a robot."}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [
         {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
         {"type": "function", "function": {"name": "get_time", "arguments": '{"tz": "CET"}'}}]},
     {"role": "tool", "content": "18C, sunny"}, {"role": "tool", "content": "14:00"},
     {"role": "assistant", "content": "It is 18C and sunny at 14:00."}],
    [{"role": "user", "content": "Ünïcödé 中文 🙂 and <｜User｜> inside text"}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"), vocab_size=400)


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(tok_dir / "tokenizer.json"), bos_token=BOS,
                                                eos_token=EOS, chat_template=DEEPSEEK_V3_CHAT_TEMPLATE)


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
def test_chat_template_equals_transformers(tok_dir, hf_tok, i, gen):
    ours = Tokenizer.from_dir(tok_dir)
    msgs = CONVERSATIONS[i]
    want = hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == want
    want_ids = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
    if hasattr(want_ids, "keys"):  # transformers 5 returns a BatchEncoding
        want_ids = want_ids["input_ids"]
    assert ours.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True) == list(want_ids)


def test_none_content_fails_like_transformers(tok_dir, hf_tok):
    """transformers drops None-valued keys, after which DeepSeek-V3's template cannot read `content`: same for us."""
    msgs = [{"role": "user", "content": "x"}, {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{}"}}]}]
    with pytest.raises(Exception, match="has no attribute 'content'"):
        hf_tok.apply_chat_template(msgs, tokenize=False)
    with pytest.raises(UsageError, match="has no attribute 'content'"):
        Tokenizer.from_dir(tok_dir).apply_chat_template(msgs)


def test_template_shape(tok_dir):
    """What the DeepSeek-V3 template renders (a quirk included: 8 spaces before bos when there is a system prompt)."""
    ours = Tokenizer.from_dir(tok_dir)
    assert ours.apply_chat_template(CONVERSATIONS[0]) == f"{BOS}<｜User｜>Hello, how are you?<｜Assistant｜>"
    assert ours.apply_chat_template(CONVERSATIONS[1]).startswith(f"        {BOS}You are a helpful assistant.<｜User｜>")


def test_encode_decode_equal_transformers(tok_dir, hf_tok):
    ours = Tokenizer.from_dir(tok_dir)
    for text in ["Hello, how are you?", "Ünïcödé 中文 🙂", f"{BOS}x{EOS}", "  spaces\tand\nnewlines  "]:
        ids = ours.encode(text)
        assert ids == hf_tok.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == hf_tok.decode(ids, skip_special_tokens=True)
    assert ours.bos_id == hf_tok.bos_token_id == 0 and ours.eos_id == hf_tok.eos_token_id == 1


def test_stream_decoder_holds_back_partial_characters(tok_dir):
    ours = Tokenizer.from_dir(tok_dir)
    text = "Ünïcödé 中文 🙂 robot"
    ids = ours.encode(text)
    s = ours.stream()
    pieces = [s.push(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)


def test_sandbox_and_helpers():
    t = compile_template("{{ x|tojson }}|{{ strftime_now('%Y') | length }}")
    assert t.render(x={"a": "<é>"}) == '{"a": "<é>"}|4'
    with pytest.raises(Exception, match="unsafe|access"):
        compile_template("{{ ''.__class__.__mro__ }}").render()
    with pytest.raises(Exception, match="unsafe"):
        compile_template("{% set l = [1] %}{{ l.append(2) }}").render()


def test_raise_exception_in_template(tok_dir):
    ours = Tokenizer.from_dir(tok_dir)
    ours.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(UsageError, match="roles must alternate"):
        ours.apply_chat_template([{"role": "user", "content": "x"}])


def test_eos_sources(tmp_path):
    import json

    d = write_tokenizer(tmp_path / "t", vocab_size=300)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1], "bos_token_id": 0}))
    assert Tokenizer.from_dir(d).eos_id == 3  # generation_config wins
    (d / "generation_config.json").unlink()
    assert Tokenizer.from_dir(d).eos_id == 1  # tokenizer_config's eos_token


def test_missing_or_bad_tokenizer(tmp_path):
    with pytest.raises(CheckpointError, match="no tokenizer.json"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(CheckpointError, match="tokenizer.json: not a readable tokenizers file"):
        Tokenizer.from_dir(tmp_path)
