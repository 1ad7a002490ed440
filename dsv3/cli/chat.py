"""Chat with a checkpoint in the terminal: multi-turn through its chat template; /exit, /clear.

Lines come from stdin (a prompt `> ` is shown only on a terminal), replies stream to stdout
as they are generated, one reply per turn followed by a newline; notices go to stderr.
Under torchrun, rank 0 owns the terminal: it reads each line and broadcasts it, every rank
generates (each holds its shard), and only rank 0 prints.
"""

from __future__ import annotations

import sys

from dsv3.cli.args import add_model_args, add_sampling_args
from dsv3.errors import UsageError

HELP = "Chat with a checkpoint in the terminal: multi-turn through its chat template; /exit, /clear."


def add_args(p) -> None:
    add_model_args(p)
    add_sampling_args(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="a system prompt for the conversation")


def run(ns) -> int:
    from dsv3.distributed import run_distributed

    return run_distributed(_chat, ns)


def _chat(ns) -> int:
    from dsv3 import distributed
    from dsv3.cli.common import Printer, check_sampling_args, load
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
    tok.apply_chat_template([{"role": "user", "content": "x"}])  # fails now if there is no usable template
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
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        room = model.args.max_seq_len - len(ids)
        if room <= 0:
            messages.pop()
            note(f"[conversation is {len(ids)} tokens, max_seq_len is {model.args.max_seq_len}: /clear to start over]")
            continue
        printer = Printer(tok)
        new = generate(model, [ids], min(ns.max_new_tokens, room), temperature=ns.temperature, top_p=ns.top_p,
                       top_k=ns.top_k, eos_id=eos, seed=seed, on_token=printer)[0]
        printer.finish()
        messages.append({"role": "assistant", "content": tok.decode(new)})
    return 0


def _read_line(n: int) -> tuple[str, str | None]:
    """(line, None), ("", None) at end of input, or ("", message) when line n is not UTF-8 text."""
    bad = f"standard input, line {n}: not valid UTF-8 text"
    try:
        line = sys.stdin.readline()
        line.encode("utf-8")  # a UTF-8-mode stdin (C locale) smuggles bad bytes in as lone surrogates
    except (UnicodeDecodeError, UnicodeEncodeError):
        return "", bad
    return line, None
