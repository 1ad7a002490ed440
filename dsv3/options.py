"""Command-line options that check themselves: ranged number types, one-line argparse errors, help with defaults.

Every dsv3 command is built from these, so a bad value is refused before any work starts,
on one line that names the flag and the accepted range, with exit code 2 — the same shape
as every other dsv3 user error (`dsv3.errors`). Argparse's own multi-line usage dump is
replaced by that line and a pointer to --help.
"""

from __future__ import annotations

import argparse
import math


class Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors are one line: `dsv3 CMD: error: WHAT (see dsv3 CMD --help)`, exit 2."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks (lists stay lists); every option's help ends with its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "%(default)" in text or "default" in text.lower() or default in (None, False, "", argparse.SUPPRESS) \
                or not action.option_strings or isinstance(default, list) and not default:
            return text
        return f"{text} (default: %(default)s)"


def user_description(doc: str | None) -> str:
    """The part of a module docstring meant for users: everything before a line reading 'Notes:'."""
    return (doc or "").split("\nNotes:")[0].strip()


# ---------------------------------------------------------------------- ranged types
def _range_text(lo, hi, lo_open: bool, hi_open: bool) -> str:
    if hi is None:
        return f"> {lo}" if lo_open else f">= {lo}"
    if lo is None:
        return f"< {hi}" if hi_open else f"<= {hi}"
    return f"in {'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"


def integer(lo: int | None = None, hi: int | None = None, *, hi_open: bool = False, hi_text: str | None = None):
    """argparse type: an integer in [lo, hi] (or [lo, hi) with hi_open); hi_text names hi in the message."""
    text = _range_text(lo, hi_text or hi, False, hi_open)

    def parse(s: str) -> int:
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer {text}, got {s!r}") from None
        if (lo is not None and v < lo) or (hi is not None and (v >= hi if hi_open else v > hi)):
            raise argparse.ArgumentTypeError(f"expected an integer {text}, got {s}")
        return v

    parse.__name__ = "integer"
    return parse


def real(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False, hi_open: bool = False):
    """argparse type: a finite number in the range (NaN and ±inf are always refused)."""
    text = _range_text(lo, hi, lo_open, hi_open)

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number {text}, got {s!r}") from None
        bad = not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) \
            or (hi is not None and (v >= hi if hi_open else v > hi))
        if bad:
            raise argparse.ArgumentTypeError(f"expected a finite number {text}, got {s}")
        return v

    parse.__name__ = "number"
    return parse


def integer_list(lo: int = 1):
    """argparse type: comma-separated integers, each >= lo (e.g. batch sizes '1,8')."""
    def parse(s: str) -> tuple[int, ...]:
        try:
            vals = tuple(int(t) for t in s.split(",") if t.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {lo}, got {s!r}") from None
        if not vals or any(v < lo for v in vals):
            raise argparse.ArgumentTypeError(f"expected comma-separated integers >= {lo}, got {s!r}")
        return vals

    parse.__name__ = "list"
    return parse


def choice_list(choices: tuple[str, ...]):
    """argparse type: comma-separated names, each one of `choices` (e.g. peer engines 'transformers,llama.cpp')."""
    def parse(s: str) -> tuple[str, ...]:
        vals = tuple(dict.fromkeys(t.strip() for t in s.split(",") if t.strip()))
        if any(v not in choices for v in vals):
            raise argparse.ArgumentTypeError(f"expected comma-separated names from {', '.join(choices)}, got {s!r}")
        return vals

    parse.__name__ = "list"
    return parse


seed = integer(0, 2**63, hi_open=True, hi_text="2^63")  # as dsv3.generate accepts (torch takes [-2^63, 2^64))
positive = integer(1)
non_negative = integer(0)


def non_utf8_argument(argv: list[str]) -> str | None:
    """The first argument that is not valid UTF-8 (shown with U+FFFD for the bad bytes), else None.

    Python keeps undecodable argv bytes as lone surrogates; they would fail much later, deep in the
    tokenizer or a path, so they are refused up front."""
    for a in argv:
        try:
            a.encode("utf-8")
        except UnicodeEncodeError:
            return a.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return None
