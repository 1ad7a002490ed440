"""`dsv3 serve` as a command: its one-line errors, SIGTERM draining the requests in flight (exit 0), and a
torchrun x2 (gloo) server giving the single process's answers.

The subprocess tests start a real server (`--port 0`: it prints the port it got) and talk to it over httpx.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch

from dsv3.checkpoint import load_model
from dsv3.cli import main
from dsv3.generation import generate
from dsv3.testing import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "DSV3_DIST_TIMEOUT": "60",
       "DSV3_DIST_BACKEND": "gloo"}
BANNER = re.compile(r"on (http://[\d.]+:\d+) .*pid (\d+)\)")


def test_without_the_extra_one_line_names_it(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["serve"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'dsv3[serve]'" in err


@pytest.mark.parametrize("argv, words", [(["--port", "70000"], "--port"), (["--cache-gb", "0"], "--cache-gb"),
                                         (["--max-batch", "0"], "--max-batch"), (["--block-size", "x"], "--block-size")])
def test_flags_are_range_checked_at_parse_time(capsys, argv, words):
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "Traceback" not in err


def start(cmd: list[str]) -> tuple[subprocess.Popen, str, int]:
    """Launch a server; (process, base url, pid of the process that serves HTTP) once it listens."""
    # its own session: `stop` can end the launcher's workers too, whatever state the test left them in
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if m := BANNER.search(line):
            return proc, m.group(1), int(m.group(2))
    stop(proc)
    raise AssertionError(f"the server did not start (exit {proc.returncode}):\n{''.join(seen)[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    """Kill whatever is left of the server: its process group, and every process below it -- torchrun starts
    each rank in a session of its own, so killing the launcher's group alone would leave the ranks running."""
    below = _descendants(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for pid in below:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=30)
    proc.stderr.close()


def _descendants(pid: int) -> list[int]:
    """Every live process below `pid` (Linux /proc; [] elsewhere)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def stream_tokens(url: str, prompt: list[int], n: int, after_first=None) -> list[str]:
    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [next(lines)]
        if after_first is not None:
            after_first()
        got += list(lines)
    return [ln for ln in got if ln]


@pytest.mark.slow
def test_sigterm_drains_the_request_in_flight_then_exits_0():
    proc, url, pid = start([sys.executable, "-m", "dsv3.cli", "serve", "--preset", "tiny", "--port", "0",
                            "--cache-gb", "0.01", "--prefix-sharing"])
    try:
        events = stream_tokens(url, [5, 6, 7], 200, after_first=lambda: os.kill(pid, signal.SIGTERM))
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        assert usage["completion_tokens"] == 200  # finished whole after the signal
        assert proc.wait(timeout=30) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        stop(proc)


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_two_ranks_serve_the_single_process_answers_and_a_lost_rank_ends_it(tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "dist")
    prompts = [[5, 17, 200, 3, 99, 42, 7], [250, 1, 64, 128], [9]]
    model = load_model(ckpt, dtype=torch.float32)
    want = [generate(model, [p], 8)[0] for p in prompts]
    proc, url, pid = start([sys.executable, "-m", "dsv3.launch", "--standalone", "--nproc-per-node=2", "-m",
                            "dsv3.cli", "serve", "--ckpt", str(ckpt), "--port", "0", "--cache-gb", "0.01"])
    try:
        def ask(p, **kw):
            body = {"prompt": p, "max_tokens": 8, "temperature": 0, "return_token_ids": True, **kw}
            r = httpx.post(url + "/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        assert [ask(p) for p in prompts] == want
        time.sleep(1.5)  # idle past a heartbeat: the other rank waits in a collective meanwhile, and stays
        sampled = dict(temperature=0.9, top_p=0.9, seed=3)
        assert ask(prompts[0], **sampled) == generate(model, [prompts[0]], 8, **sampled)[0]
        # a rank lost: the server ends with one line naming it, within the collective timeout, nothing hangs
        (other,) = [c for c in children(proc.pid) if c != pid]
        os.kill(other, signal.SIGKILL)
        assert proc.wait(timeout=90) != 0
        err = [ln for ln in proc.stderr.read().splitlines() if ln.strip()]
        assert len(err) == 1 and err[0].startswith("dsv3 serve: ") and "rank 1" in err[0], err
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=5)
    finally:
        stop(proc)


def children(pid: int) -> list[int]:
    """The pids of the dsv3 processes whose parent is `pid` (torchrun's workers, not its helpers)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ours = int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid
            if ours and b"dsv3.cli" in (stat.parent / "cmdline").read_bytes():
                out.append(int(stat.parent.name))
        except OSError:
            continue  # gone meanwhile
    return out


def test_a_taken_port_is_one_line(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--port", str(port), "--cache-gb", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot listen on 127.0.0.1:{port}" in err, err
