"""Chat with a checkpoint in the terminal: multi-turn through its chat template; /exit, /clear.

Lines come from stdin (a prompt `> ` is shown only on a terminal), replies stream to stdout
as they are generated, one reply per turn followed by a newline; notices go to stderr.
Under torchrun, rank 0 owns the terminal: it reads each line and broadcasts it, every rank
generates (each holds its shard), and only rank 0 prints.
"""

from __future__ import annotations

import argparse
import sys

from dsv3.cli.args import add_model_args, add_sampling_args
from dsv3.errors import UsageError

HELP = "Chat with a checkpoint in the terminal: multi-turn through its chat template; /exit, /clear."


def add_args(p) -> None:
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="a system prompt for the conversation")
    p.add_argument("--thinking", action=argparse.BooleanOptionalAction, default=None,
                   help="reason before answering, for formats with a toggle (V3.1, V3.2); default: the format's")


def run(ns) -> int:
    from dsv3.distributed import run_distributed

    return run_distributed(_chat, ns)


def _chat(ns) -> int:
    from dsv3 import distributed
    from dsv3.chat_format import chat_format_for
    from dsv3.cli.common import check_sampling_args, load
    from dsv3.generation import generate

    group = distributed.current_group()

    def checks():
        check_sampling_args(ns)
        if distributed.rank_of(group) == 0 and sys.stdin is None:  # started with `<&-`
            raise UsageError("standard input is closed: chat reads one turn per line from it")
        if ns.preset:
            raise UsageError("chat needs a tokenizer and chat template: give --ckpt DIR (not --preset)")

    distributed.checked_on_every_rank(checks, group)  # every rank learns of a failed check before any loads
    model, tok, eos = load(ns)
    if tok is None:
        raise UsageError(f"{ns.ckpt or 'the bundled model'} has no tokenizer.json: chat needs one")
    fmt = chat_format_for(tok, _config(ns))
    fmt.render([{"role": "user", "content": "x"}], thinking=ns.thinking)  # fails now if there is no usable template
    lead = distributed.rank_of(group) == 0  # owns stdin, stdout and stderr
    seed = ns.seed if ns.temperature == 0 else distributed.shared_seed(ns.seed, group)

    def note(msg: str) -> None:
        if lead:
            print(msg, file=sys.stderr)

    interactive = lead and sys.stdin.isatty()
    start = [{"role": "system", "content": ns.system}] if ns.system else []
    messages = list(start)
    line_no = 1
    if interactive:
        note("dsv3 chat: /clear starts over, /exit (or Ctrl-D) quits")
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line, err = distributed.broadcast_object(_read_line(line_no) if lead else None, group)
        line_no += 1
        if err:  # every rank raises, rank 0 prints
            raise UsageError(err)
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/clear":
            messages = list(start)
            note("[conversation cleared]")
            continue
        messages.append({"role": "user", "content": text})
        prompt = fmt.render(messages, thinking=ns.thinking)
        ids = tok.encode(prompt, add_bos=False)  # the prompt text carries its bos
        room = model.args.max_seq_len - len(ids)
        if room <= 0:
            messages.pop()
            note(f"[conversation is {len(ids)} tokens, max_seq_len is {model.args.max_seq_len}: /clear to start over]")
            continue
        printer = ReplyPrinter(tok, fmt.stream_parser(prompt=prompt), sys.stdout if lead else None)
        generate(model, [ids], min(ns.max_new_tokens, room), temperature=ns.temperature, top_p=ns.top_p,
                 top_k=ns.top_k, eos_id=eos, seed=seed, on_token=printer)
        # the format's render drops reasoning from history the way the released template does
        messages.append(printer.finish().message())
    return 0


def _config(ns) -> dict | None:
    """config.json of the checkpoint (it names V3.2, whose format is not in the tokenizer's template)."""
    import json
    from pathlib import Path

    from dsv3.checkpoint import default_checkpoint

    f = (Path(ns.ckpt) if ns.ckpt else default_checkpoint()) / "config.json"
    try:
        d = json.loads(f.read_text())
    except (OSError, ValueError):
        return None  # load() has already reported a missing or broken config.json
    return d if isinstance(d, dict) else None


class ReplyPrinter:
    """on_token callback: streams row 0's reply with its reasoning shown apart (dimmed on a terminal,
    between "[reasoning]" and "[answer]" lines otherwise) and tool calls listed at the end."""

    DIM, PLAIN = "\x1b[2m", "\x1b[0m"

    def __init__(self, tok, parser, out):
        self.dec, self.parser, self.out = tok.stream(skip_special_tokens=False), parser, out
        self.tty = out is not None and out.isatty()
        self.section = None

    def __call__(self, step, tokens, generated) -> None:
        if bool(generated[0]):
            self.show(self.parser.feed(self.dec.push(int(tokens[0]))))

    def show(self, pieces) -> None:
        if self.out is None:
            return
        for p in pieces:
            kind, text = next(iter(p.items()))
            if kind != self.section:
                self.out.write(self._switch(kind))
                self.section = kind
            self.out.write(text)
        self.out.flush()

    def _switch(self, kind: str) -> str:
        if self.tty:
            return self.DIM if kind == "reasoning_content" else (self.PLAIN + "\n" if self.section else "")
        if kind == "reasoning_content":
            return "[reasoning]\n"
        return "\n[answer]\n" if self.section else ""

    def finish(self):
        self.show(self.parser.feed(self.dec.flush()) + self.parser.flush())
        reply = self.parser.finish()
        if self.out is not None:
            if self.tty and self.section == "reasoning_content":
                self.out.write(self.PLAIN)
            for c in reply.tool_calls:
                self.out.write(f"\n[tool call] {c['function']['name']}({c['function']['arguments']})")
            self.out.write("\n")
            self.out.flush()
        return reply


def _read_line(n: int) -> tuple[str, str | None]:
    """(line, None), ("", None) at end of input, or ("", message) when line n is not UTF-8 text."""
    bad = f"standard input, line {n}: not valid UTF-8 text"
    try:
        line = sys.stdin.readline()
        line.encode("utf-8")  # a UTF-8-mode stdin (C locale) smuggles bad bytes in as lone surrogates
    except (UnicodeDecodeError, UnicodeEncodeError):
        return "", bad
    return line, None
