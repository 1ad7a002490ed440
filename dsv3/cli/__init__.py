"""The `dsv3` command: one subcommand per job, each with --help, each in its own module of this package.

User mistakes raise a `Dsv3Error`; `main` prints its message on one line and exits 2,
with no traceback. `main` also owns what every command shares at the top: refusing non-UTF-8
arguments and a closed stdout, a broken pipe, a full disk, signals, and torchrun's ranks
(only rank 0 prints usage errors; a rank leaves with `os._exit` once its work is done).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import os
import signal
import sys

from dsv3.errors import Dsv3Error
from dsv3.options import Parser, non_utf8_argument, user_description

# command -> module. Each module has HELP (its line in `dsv3 --help`), a docstring (the description in
# `dsv3 COMMAND --help`, up to a line "Notes:"), `add_args(parser)` and `run(namespace) -> int`. Building the
# parser imports every one of them, so their module-level imports stay light (no torch): each imports its
# work inside `run`.
COMMANDS = {
    "info": "dsv3.cli.info",
    "generate": "dsv3.cli.generate",
    "chat": "dsv3.cli.chat",
    "convert": "dsv3.cli.convert",
    "plan": "dsv3.cli.plan",
    "train": "dsv3.cli.train",
    "bench": "dsv3.cli.bench",
    "serve": "dsv3.cli.serve",
}


def add_commands(sub, table: dict[str, str], dest: str = "func") -> None:
    """One subparser per entry of `table` (name -> module), registered from the module's HELP, docstring,
    add_args and run (stored as `dest` on the namespace)."""
    for name, module in table.items():
        mod = importlib.import_module(module)
        c = sub.add_parser(name, help=mod.HELP, description=user_description(mod.__doc__))
        mod.add_args(c)
        c.set_defaults(**{dest: mod.run})


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="dsv3", description="DeepSeek-V3, understood and run.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_commands(sub, COMMANDS)
    return p


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
