"""Chat with a checkpoint in the terminal: multi-turn through its chat template; /exit, /clear.

Lines come from stdin (a prompt `> ` is shown only on a terminal), replies stream to stdout
as they are generated, one reply per turn followed by a newline; notices go to stderr.
"""

from __future__ import annotations

import sys


def add_args(p) -> None:
    from dsv3.frontend import add_model_args, add_sampling_args

    add_model_args(p)
    add_sampling_args(p, max_new_tokens=256)
    p.add_argument("--system", default=None, help="a system prompt for the conversation")


def run(ns) -> int:
    from dsv3.errors import UsageError
    from dsv3.frontend import _Printer, check_sampling_args, load
    from dsv3.generation import generate

    check_sampling_args(ns)
    if ns.preset:
        raise UsageError("chat needs a tokenizer and chat template: give --ckpt DIR (not --preset)")
    model, tok, eos = load(ns)
    if tok is None:
        raise UsageError(f"{ns.ckpt or 'the bundled model'} has no tokenizer.json: chat needs one")
    tok.apply_chat_template([{"role": "user", "content": "x"}])  # fails now if there is no usable template
    interactive = sys.stdin.isatty()
    start = [{"role": "system", "content": ns.system}] if ns.system else []
    messages = list(start)
    if interactive:
        print("dsv3 chat: /clear starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if not text.strip():
            continue
        if text.strip() == "/exit":
            break
        if text.strip() == "/clear":
            messages = list(start)
            print("[conversation cleared]", file=sys.stderr)
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        room = model.args.max_seq_len - len(ids)
        if room <= 0:
            messages.pop()
            print(f"[conversation is {len(ids)} tokens, max_seq_len is {model.args.max_seq_len}: /clear to "
                  "start over]", file=sys.stderr)
            continue
        printer = _Printer(tok)
        new = generate(model, [ids], min(ns.max_new_tokens, room), temperature=ns.temperature, top_p=ns.top_p,
                       top_k=ns.top_k, eos_id=eos, seed=ns.seed, on_token=printer)[0]
        printer.finish()
        messages.append({"role": "assistant", "content": tok.decode(new)})
    return 0
