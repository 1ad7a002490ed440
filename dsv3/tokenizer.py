"""Text <-> token ids for a checkpoint directory, and its chat template.

`tokenizer.json` runs through the `tokenizers` library (no transformers needed);
bos/eos come from `generation_config.json`, `tokenizer_config.json` or `config.json`
(in that order of precedence for eos). The chat template in `tokenizer_config.json`
is untrusted code from the internet, so it renders in jinja2's immutable sandbox with
the helpers Hugging Face templates expect (`raise_exception`, `strftime_now`, a
non-escaping `tojson`), giving the same string as transformers' `apply_chat_template`.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from dsv3.errors import CheckpointError, UsageError

# The chat template of deepseek-ai/DeepSeek-V3 (tokenizer_config.json on the Hugging Face Hub,
# December 2024 release), character for character: its odd indentation is part of the
# template (the spaces before a `{%-` are stripped, the ones before `{% set` are not).
DEEPSEEK_V3_CHAT_TEMPLATE = (
    '{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% se'
    "t ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='') %}{%- for me"
    "ssage in messages %}    {%- if message['role'] == 'system' %}        {% set ns.system_prompt = messa"
    "ge['content'] %}    {%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in mes"
    "sages %}    {%- if message['role'] == 'user' %}    {%- set ns.is_tool = false -%}{{'<｜User｜>' + mess"
    "age['content']}}    {%- endif %}    {%- if message['role'] == 'assistant' and message['content'] is "
    "none %}        {%- set ns.is_tool = false -%}        {%- for tool in message['tool_calls']%}        "
    "    {%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type']"
    " + '<｜tool▁sep｜>' + tool['function']['name'] + '\\n' + '```json' + '\\n' + tool['function']['arguments"
    "'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}            {%- set ns.is_first = true -%}            {%- e"
    "lse %}{{'\\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\\"
    "n' + '```json' + '\\n' + tool['function']['arguments'] + '\\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜too"
    "l▁calls▁end｜><｜end▁of▁sentence｜>'}}                   {%- endif %}        {%- endfor %}    {%- endif"
    " %}    {%- if message['role'] == 'assistant' and message['content'] is not none %}        {%- if ns."
    "is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}        {%- set ns."
    "is_tool = false -%}        {%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'"
    "}}        {%- endif %}    {%- endif %}    {%- if message['role'] == 'tool' %}        {%- set ns.is_t"
    "ool = true -%}        {%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + "
    "message['content'] + '<｜tool▁output▁end｜>'}}        {%- set ns.is_output_first = false %}        {%-"
    " else %}{{'\\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}        {%- endif "
    "%}    {%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_ge"
    "neration_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"
)


class Tokenizer:
    """A checkpoint's tokenizer: `encode`, `decode`, `apply_chat_template`, `bos_id`, `eos_id`."""

    def __init__(self, tok, *, bos_token: str | None = None, eos_token: str | None = None,
                 eos_id: int | None = None, bos_id: int | None = None, chat_template: str | None = None,
                 add_bos: bool = False, special: dict[str, str] | None = None, source: str = "tokenizer"):
        self._tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = bos_id if bos_id is not None else (tok.token_to_id(bos_token) if bos_token else None)
        self.eos_id = eos_id if eos_id is not None else (tok.token_to_id(eos_token) if eos_token else None)
        if self.eos_token is None and self.eos_id is not None:
            self.eos_token = tok.id_to_token(self.eos_id)
        if self.bos_token is None and self.bos_id is not None:
            self.bos_token = tok.id_to_token(self.bos_id)
        self.chat_template = chat_template
        self.add_bos = add_bos
        self.special = special or {}
        self.source = source
        self._compiled = None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @classmethod
    def from_dir(cls, path) -> Tokenizer:
        """Read tokenizer.json (+ tokenizer_config.json, generation_config.json, config.json) from `path`."""

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{path}: no tokenizer.json (give token ids with --prompt-ids instead)")
        try:
            tok = HFTokenizer.from_file(str(file))
        except Exception as e:  # tokenizers raises plain Exception subclasses
            raise CheckpointError(f"{file}: not a readable tokenizers file ({str(e).splitlines()[0]})") from None
        cfg = _read_optional(path / "tokenizer_config.json")
        gen = _read_optional(path / "generation_config.json")
        model_cfg = _read_optional(path / "config.json")
        special = {k: _content(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
                   if _content(cfg.get(k)) is not None}
        eos_id = _first(gen.get("eos_token_id"))
        if eos_id is None and "eos_token" not in special:
            eos_id = _first(model_cfg.get("eos_token_id"))
        bos_id = _first(gen.get("bos_token_id"))
        if bos_id is None and "bos_token" not in special:
            bos_id = _first(model_cfg.get("bos_token_id"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        return cls(tok, bos_token=special.get("bos_token"), eos_token=special.get("eos_token"), eos_id=eos_id,
                   bos_id=bos_id, chat_template=template, add_bos=bool(cfg.get("add_bos_token", False)),
                   special=special, source=str(path))

    # ------------------------------------------------------------------ text
    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token strings in it become their ids. bos first if add_bos."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_id is not None:
            ids = [self.bos_id, *ids]
        return ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def stream(self, *, skip_special_tokens: bool = True) -> StreamDecoder:
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ------------------------------------------------------------------ chat
    def apply_chat_template(self, messages: list[dict[str, Any]], *, add_generation_prompt: bool = True,
                            tokenize: bool = False, **kwargs) -> str | list[int]:
        """Render `messages` with the checkpoint's chat template (as transformers does)."""
        if not self.chat_template:
            raise CheckpointError(f"{self.source}: tokenizer_config.json has no chat_template")
        if self._compiled is None:
            self._compiled = compile_template(self.chat_template)

        # As transformers does: keys whose value is None are dropped (APIs send content=None,
        # templates handle a missing key better), so both render the same string.
        messages = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special, **kwargs)
        except TemplateError as e:
            raise UsageError(f"chat template of {self.source}: {e}") from None
        return self.encode(text, add_bos=False) if tokenize else text


def compile_template(source: str):
    """A jinja2 template in an immutable sandbox, with Hugging Face's template helpers."""

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters, which would change the prompt
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise CheckpointError(f"chat_template: not a valid jinja2 template ({e.message}, line {e.lineno})") from None


class StreamDecoder:
    """Turns ids arriving one at a time into text pieces, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = True):
        self.tok, self.ids, self.emitted = tokenizer, [], ""
        self.skip = skip_special_tokens  # False keeps the markers a chat format parses (dsv3.chat_format)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else text
        self.emitted = text
        return piece

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end decodes as U+FFFD)."""
        text = self.tok.decode(self.ids, skip_special_tokens=self.skip)
        piece = text[len(self.emitted):] if text.startswith(self.emitted) else ""
        self.emitted = text
        return piece


def _content(v) -> str | None:
    if isinstance(v, dict):
        return v.get("content")
    return v if isinstance(v, str) else None


def _first(v) -> int | None:
    if isinstance(v, list):
        return v[0] if v else None
    return v if isinstance(v, int) else None


def _read_optional(file: Path) -> dict[str, Any]:
    if not file.is_file():
        return {}
    try:
        d = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return d
