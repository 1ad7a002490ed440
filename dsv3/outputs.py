"""Output files: checked before any work starts, written whole or not at all.

A long generation or benchmark that fails only when it writes its result has wasted the
work and lost the result. So every command checks its output paths up front
(`check_output_path`), and writes them through `write_atomic`: a temporary file beside the
target, renamed over it when complete, so a full disk or an interruption leaves the old
file (or nothing) instead of half a file. Devices and pipes (`/dev/stdout`, `/dev/null`,
a FIFO) are written directly: they cannot be renamed over.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dsv3.errors import UsageError


def _is_special(path: Path) -> bool:
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


def check_output_path(path, flag: str) -> Path:
    """Raise UsageError unless `path` can be created or replaced as a file; returns it as a Path."""
    path = Path(path)
    where = f"{flag} {path}"
    if _is_special(path):
        if not os.access(path, os.W_OK):
            raise UsageError(f"{where}: not writable")
        return path
    if path.is_dir():
        raise UsageError(f"{where}: is a directory (expected a file name)")
    parent = path.parent
    if not parent.exists():
        raise UsageError(f"{where}: directory {parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{where}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"{where}: not writable (permission denied)")
    return path


def write_atomic(path, data: str | bytes, flag: str) -> None:
    """Write `data` to `path` whole (temporary file + rename); a failure raises UsageError and leaves no partial file."""
    path = Path(path)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    if _is_special(path):
        try:
            with open(path, "wb") as f:
                f.write(raw)
        except OSError as e:
            raise UsageError(f"{flag} {path}: cannot write ({e.strerror})") from None
        return
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise UsageError(f"{flag} {path}: cannot write ({e.strerror})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
