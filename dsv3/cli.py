"""The `dsv3` command: one subcommand per job, each with --help.

User mistakes raise a `Dsv3Error`; `main` prints its message on one line and exits 2,
with no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import json
import os
import signal
import sys

from dsv3.errors import Dsv3Error
from dsv3.options import Parser, non_utf8_argument, user_description


def _cmd_info(ns: argparse.Namespace) -> int:
    from dsv3.config import ModelArgs
    from dsv3.info import info

    args = ModelArgs.load(ns.config)
    out = info(args)
    if ns.json:
        print(json.dumps(out))
        return 0
    print(f"config                          {ns.config}")
    print(f"total parameters (main model)   {out['total_params']:>20,}")
    print(f"activated per token             {out['active_params']:>20,}  (incl. embedding and head)")
    print(f"MTP modules ({args.n_mtp_layers})                 {out['mtp_params']:>20,}  (unique parameters)")
    print(f"KV cache per token, absorbed    {out['kv_cache_bytes_per_token']:>20,} B  (bf16)")
    print(f"KV cache per token, naive       {out['kv_cache_bytes_per_token_naive']:>20,} B  (bf16)")
    return 0


def _cmd_generate(ns: argparse.Namespace) -> int:
    from dsv3.frontend import run_generate

    return run_generate(ns)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dsv3", description="DeepSeek-V3, understood and run.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    q = sub.add_parser("info", help="parameter counts and KV-cache size of a config",
                       description="Total / activated / MTP parameters and KV-cache bytes per token.")
    q.add_argument("config", help="preset (tiny, 16B, 236B, 671B), official config JSON, or HF directory")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    q.set_defaults(func=_cmd_info)

    from dsv3.frontend import add_generate_args

    g = sub.add_parser("generate", help="generate text or tokens from a checkpoint or preset",
                       description="Generate from a Hugging Face DeepSeek-V3 checkpoint (or a random preset).")
    add_generate_args(g)
    g.set_defaults(func=_cmd_generate)

    # Commands that live in their own module: each module has `add_args(parser)` and
    # `run(namespace) -> int`, and help text in its docstring's first line.
    for name, module in COMMAND_MODULES.items():
        mod = importlib.import_module(module)
        c = sub.add_parser(name, help=mod.__doc__.strip().splitlines()[0],
                           description=user_description(mod.__doc__))
        mod.add_args(c)
        c.set_defaults(func=mod.run)
    return p


# command -> module; each module is imported only when the parser is built
COMMAND_MODULES = {
    "chat": "dsv3.chat",
    "convert": "dsv3.convert",
    "plan": "dsv3.plan",
    "train": "dsv3.train",
    "bench": "dsv3.bench",
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    bad = non_utf8_argument(argv)
    if bad is not None:
        print(f"dsv3: error: argument {bad!r} is not valid UTF-8 (U+FFFD marks the bad bytes)", file=sys.stderr)
        return 2
    if sys.stdout is None:  # started with stdout closed (`>&-`): the next open() would take fd 1
        print("dsv3: error: standard output is closed (redirect it to a file or /dev/null)", file=sys.stderr)
        return 2
    try:
        if os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a torchrun rank other than 0: argparse's usage errors (and --help) are rank 0's to print;
            # this rank exits with the same code 2, silently
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null), contextlib.redirect_stdout(null):
                ns = build_parser().parse_args(argv)
        else:
            ns = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a bad option (2, already printed on one line): a code, like every path
        return e.code if isinstance(e.code, int) else 2
    rc = _run(ns)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # a torchrun rank whose work is done (process group already torn down): skip the interpreter's
        # teardown, where gloo's threads can still abort the process ("terminate called ...") at random
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    return rc


def _run(ns) -> int:
    name = " ".join(filter(None, [ns.command, getattr(ns, "bench", None)]))
    try:
        rc = ns.func(ns)
        sys.stdout.flush()  # inside the try: a full stdout must fail here, not in the interpreter's exit
        return rc
    except Dsv3Error as e:
        print(f"dsv3 {name}: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `dsv3 generate ... | head`: the reader left, nothing to report
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as e:  # Ctrl-C, or dsv3.errors.Interrupted from a command's own signal handler
        print(f"dsv3 {name}: {str(e) or 'interrupted'}", file=sys.stderr)
        return 128 + getattr(e, "signum", signal.SIGINT)
    except OSError as e:
        if e.filename is not None or e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EFBIG):
            raise
        # a write to stdout failed (`> /dev/full`, a full disk): say so once, and drop the unwritable buffer
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        print(f"dsv3 {name}: error: cannot write to standard output ({os.strerror(e.errno)})", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
