"""Run dsv3 commands in real subprocesses and check how they fail.

A user error must end with a non-zero exit, exactly one line on stderr that names the
file, tensor, field or flag, and no traceback; the filesystem must be as it was (source
files byte-identical). In-process tests cannot see a traceback that the interpreter
prints, so the bad-input matrix runs every case through `run_dsv3`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

from dsv3 import testing


def cli_env(**extra: str) -> dict[str, str]:
    """dsv3.testing.cli_env (this checkout, one thread), without the test session's TRITON_INTERPRET."""
    env = {**testing.cli_env(), "OPENBLAS_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    env.update(extra)
    return env


def run_dsv3(*argv: str, stdin: str | bytes | None = None, env: dict | None = None, cwd=None, timeout: float = 300,
             module: str = "dsv3.cli") -> subprocess.CompletedProcess:
    """`python -m dsv3.cli ARGV...` (or another module); text output; stdin is empty unless given."""
    binary = isinstance(stdin, bytes)
    p = subprocess.run([sys.executable, "-m", module, *argv], input=stdin,
                       stdin=subprocess.DEVNULL if stdin is None else None, capture_output=True, text=not binary,
                       env=env or cli_env(), cwd=cwd, timeout=timeout)
    if binary:
        p.stdout = p.stdout.decode("utf-8", "replace")
        p.stderr = p.stderr.decode("utf-8", "replace")
    return p


def assert_user_error(p: subprocess.CompletedProcess, *needles: str, rc: int = 2) -> str:
    """Exit code `rc`, one non-empty stderr line containing every needle, no traceback; returns the line."""
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert "Traceback" not in p.stderr, p.stderr
    assert p.returncode == rc, (p.returncode, p.stderr)
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{p.stderr}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    return lines[0]


def tree_digest(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under root (directories as 'dir'): compare before and after."""
    root = Path(root)
    out: dict[str, str] = {}
    if not root.exists():
        return out
    for f in sorted(root.rglob("*")):
        rel = str(f.relative_to(root))
        out[rel] = "dir" if f.is_dir() else hashlib.sha256(f.read_bytes()).hexdigest()
    return out
