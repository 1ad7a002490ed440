"""Under torchrun nothing crashes, nothing is lost, nothing runs that shouldn't (issue #10, parallel part).

Every test is a real `torchrun --standalone --nproc-per-node 2` launch (gloo, CPU ranks):
the bundled model's "try it" commands from docs/distributed.md against the single process;
usage errors printed once, by rank 0; `--check-weights` naming a NaN that only rank 1 reads;
a rank stopped (SIGSTOP) or killed (SIGKILL) mid-decode ending the launch with rank 0's one line.

torchrun adds its own report whenever a worker exits non-zero (an `E... failed (exitcode: 2)` log
line, a Traceback of torchrun itself ending in `ChildFailedError`, a `===` block per failed rank),
and exits with 1. The assertions are about dsv3's own lines: exactly one, and no traceback from a rank.
`python -m dsv3.launch` drops torchrun's report: there stderr is the one line and the exit code 2.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from cli_run import assert_user_error, run_dsv3
from safetensors.torch import load_file, save_file

from dsv3.checkpoint import BUNDLED_MODEL_DIR
from dsv3.config import ModelArgs
from dsv3.errors import ConfigError
from dsv3.parallel import check_world_size, valid_world_sizes
from dsv3.testing import write_tiny_checkpoint

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]


def _env(**extra: str) -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "DSV3_DIST_TIMEOUT": "60", "DSV3_DIST_BACKEND": "gloo", **extra}


def torchrun(*args: str, timeout: float = 180, **env: str) -> subprocess.CompletedProcess:
    cmd = [*TORCHRUN, "--standalone", "--nproc-per-node=2", *args]
    return subprocess.run(cmd, env=_env(**env), cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def dsv3_lines(stderr: str) -> list[str]:
    """The lines dsv3 itself wrote (not torchrun's report, not a rank's traceback)."""
    return [ln for ln in stderr.splitlines() if ln.startswith("dsv3 ")]


def assert_one_dsv3_line(p: subprocess.CompletedProcess, *needles: str) -> str:
    """torchrun failed; dsv3 said exactly one line with the needles; no rank printed a traceback."""
    assert p.returncode != 0, p.stderr[-3000:]
    lines = dsv3_lines(p.stderr)
    assert len(lines) == 1, f"expected one dsv3 line, got {len(lines)}:\n{p.stderr[-4000:]}"
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
    # a rank's own traceback comes prefixed "[rank0]:"; the only traceback allowed is torchrun's own
    assert not re.search(r"^\[rank\d+\]", p.stderr, re.M), p.stderr[-4000:]
    frames = re.findall(r'File "([^"]+)"', p.stderr)
    assert all("torch/distributed/" in f or f.startswith("<frozen") for f in frames), p.stderr[-4000:]
    return lines[0]


# ---------------------------------------------------------------------- the bundled model
def test_bundled_model_refusal_says_why_and_what_to_do():
    """FP8 with 128-blocks and dims of 128-256: no world size > 1 keeps the blocks whole; the message says so, names
    the block size, and gives the world sizes that work once dequantised at load -- never an empty list."""
    args = ModelArgs.from_hf_config(BUNDLED_MODEL_DIR)
    assert args.dtype == "fp8" and args.block_size == 128
    assert valid_world_sizes(args) == [1]  # one process never cuts a block
    assert valid_world_sizes(args, fp8_blocks=False) == [1, 2, 4, 8]  # 8 heads
    with pytest.raises(ConfigError) as e:
        check_world_size(args, 2)
    msg = str(e.value)
    assert "not a multiple of the FP8 block size 128" in msg and "--dtype bf16" in msg and "1, 2, 4, 8" in msg
    assert not re.search(r"sizes[^:]*: *(\.|$|;)", msg), msg
    # a model no world size > 1 can split at all (one head): the message says to run one process
    with pytest.raises(ConfigError, match=r"n_heads = 1 is not divisible by 2.*No world size > 1 splits this model"):
        check_world_size(args.replace(n_heads=1, dtype="bf16"), 2)


def test_dequantised_rank_slices_equal_slices_of_the_single_process_model():
    """Each rank's share of the bundled FP8 model, dequantised at load from its own slices (64 of 128 rows:
    half a scale block), equals the same share cut from the whole model dequantised by one process."""
    import torch

    from dsv3 import load_model
    from dsv3.checkpoint import load_rank
    from dsv3.parallel import shard_model

    for rank in range(2):
        mine = load_rank(BUNDLED_MODEL_DIR, rank, 2, dtype=torch.float32).state_dict()
        ref = shard_model(load_model(BUNDLED_MODEL_DIR, dtype=torch.float32), rank, 2).state_dict()
        assert mine.keys() == ref.keys()
        for name, t in mine.items():
            assert t.dtype == ref[name].dtype and torch.equal(t, ref[name]), (rank, name)


def _try_it_commands() -> list[str]:
    """The commands of the "Try it" block in docs/distributed.md, in order."""
    text = (ROOT / "docs" / "distributed.md").read_text()
    block = re.search(r"## Try it.*?```bash\n(.*?)```", text, re.S)
    assert block, "docs/distributed.md has no '## Try it' section with a bash block"
    return [ln.split("  #")[0].strip() for ln in block.group(1).splitlines() if ln.strip() and not ln.startswith("#")]


def _as_argv(command: str) -> list[str]:
    """A documented command line, run with this interpreter: `dsv3` -> -m dsv3.cli, `torchrun` -> -m torch.distributed.run."""
    argv = shlex.split(command)
    if argv[0] == "dsv3":
        return [sys.executable, "-m", "dsv3.cli", *argv[1:]]
    assert argv[0] == "torchrun", command
    return [*TORCHRUN, *argv[1:]]


def test_try_it_commands_from_the_docs_give_the_single_process_tokens():
    """docs/distributed.md's "Try it": the bundled FP8 model, dequantised at load, on one process and on two
    ranks: the same greedy text, token for token."""
    commands = _try_it_commands()
    assert [c.split()[0] for c in commands] == ["dsv3", "torchrun"], commands
    single, multi = (subprocess.run(_as_argv(c), env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=180,
                                    stdin=subprocess.DEVNULL) for c in commands)
    assert single.returncode == 0, single.stderr[-2000:]
    assert multi.returncode == 0, multi.stderr[-3000:]
    assert len(single.stdout.strip()) > 20  # real text came out
    assert multi.stdout == single.stdout
    assert "--nproc-per-node 2" in commands[1] and "--dtype" in commands[1]


# ---------------------------------------------------------------------- usage errors, once
@pytest.mark.parametrize("argv, needles", [
    (["--temperature", "-1", "ROMEO:"], ["argument --temperature", "finite number >= 0"]),
    ([], ["no prompt"]),
    (["--ckpt", "/nonexistent/ckpt", "ROMEO:"], ["/nonexistent/ckpt", "expected a Hugging Face checkpoint"]),
], ids=["bad-value", "no-prompt", "bad-ckpt"])
def test_usage_error_printed_once_by_rank_0(argv, needles):
    """The same line a single process prints, once (rank 0), every rank exiting with 2 (or stopped by torchrun)."""
    one = run_dsv3("generate", *argv, env=_env(), timeout=120)
    line = assert_user_error(one, *needles)
    p = torchrun("-m", "dsv3.generate", *argv, timeout=120)
    assert assert_one_dsv3_line(p, *needles) == line
    codes = re.findall(r"exitcode\s*: (-?\d+)", p.stderr)  # torchrun's report, one entry per failed rank
    # a rank that exits 2 first makes torchrun SIGTERM the others (-15) if they have not exited yet: a race
    assert "2" in codes and set(codes) <= {"2", "-15"}, p.stderr[-3000:]


def test_dsv3_launch_ends_a_usage_error_with_one_line_and_exit_2():
    """`python -m dsv3.launch` = torchrun without torchrun's own report: stderr is dsv3's one line, exit 2."""
    cmd = [sys.executable, "-m", "dsv3.launch", "--standalone", "--nproc-per-node=2", "-m", "dsv3.generate",
           "--temperature", "-1", "ROMEO:"]
    p = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert_user_error(p, "argument --temperature", "finite number >= 0")


# ---------------------------------------------------------------------- --check-weights
def test_check_weights_names_a_nan_only_rank_1_reads(tmp_path):
    """One NaN in the rows of q_b_proj that rank 1 holds: under torchrun rank 1 finds it in its slice and rank 0
    prints that one line; a single process names the same tensor and file."""
    ckpt = write_tiny_checkpoint(tmp_path / "ckpt")
    name = "model.layers.0.self_attn.q_b_proj.weight"  # sharded along rows (dim 0): rank 1 reads rows 48..95
    shard = next(f for f in sorted(ckpt.glob("*.safetensors")) if name in load_file(f))
    tensors = load_file(shard)
    tensors[name][60, 3] = float("nan")
    save_file(tensors, shard)
    args = ["--ckpt", str(ckpt), "--prompt-ids", "5,17,200", "--max-new-tokens", "2", "--check-weights"]
    one = run_dsv3("generate", *args, env=_env(), timeout=120)
    assert_user_error(one, name, shard.name, "NaN/Inf")
    p = torchrun("-m", "dsv3.generate", *args)
    assert_one_dsv3_line(p, "rank 1 of 2 failed", name, shard.name, "NaN/Inf", "rank 1's slice")
    # without the flag nothing scans the weights, but the first non-finite logits stop generation, on every rank
    p = torchrun("-m", "dsv3.generate", *args[:-1])
    assert_one_dsv3_line(p, "non-finite logits")


# ---------------------------------------------------------------------- a rank stopped or killed mid-decode
def _rank_pid(launcher_pid: int, rank: int) -> int:
    """The pid of worker `rank` among the launcher's children, from their environment (RANK=...)."""
    kids = subprocess.run(["pgrep", "-P", str(launcher_pid)], capture_output=True, text=True).stdout.split()
    for k in kids:
        try:
            env = Path(f"/proc/{k}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return int(k)
    raise AssertionError(f"no child of {launcher_pid} with RANK={rank} (children: {kids})")


@pytest.mark.parametrize("sig, launcher", [(signal.SIGSTOP, "torchrun"), (signal.SIGKILL, "torchrun"),
                                           (signal.SIGKILL, "dsv3.launch")],
                         ids=["SIGSTOP", "SIGKILL", "SIGKILL-dsv3.launch"])
def test_rank_stopped_or_killed_mid_decode_ends_the_launch_with_one_line(sig, launcher):
    """Rank 1 stopped or killed while tokens stream: rank 0 gives up after DSV3_DIST_TIMEOUT (stopped) or at
    once (killed), names rank 1 and the timeout in one line; torchrun ends (a stopped rank is SIGKILLed
    by torchrun 30 s after its SIGTERM goes unanswered, hence the margin). Under dsv3.launch that line is
    all of stderr and the exit code is 2."""
    timeout_s = 10
    launch = TORCHRUN if launcher == "torchrun" else [sys.executable, "-m", "dsv3.launch"]
    cmd = [*launch, "--standalone", "--nproc-per-node=2", "-m", "dsv3.generate", "ROMEO:", "--dtype", "fp32",
           "--max-new-tokens", "480"]
    p = subprocess.Popen(cmd, env=_env(DSV3_DIST_TIMEOUT=str(timeout_s)), cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True)
    out: list[str] = []
    err: list[str] = []
    readers = [threading.Thread(target=lambda f=f, acc=acc: acc.extend(iter(lambda: f.read(1), "")), daemon=True)
               for f, acc in ((p.stdout, out), (p.stderr, err))]
    for t in readers:
        t.start()
    victim = None
    try:
        deadline = time.monotonic() + 120
        while not "".join(out).strip():  # decoding has started: rank 0 streams tokens
            assert p.poll() is None, "".join(err)[-3000:]
            assert time.monotonic() < deadline, "no token streamed within 120 s"
            time.sleep(0.05)
        victim = _rank_pid(p.pid, 1)
        os.kill(victim, sig)
        t0 = time.monotonic()
        p.wait(timeout=timeout_s + 5 + 30 + 30)  # timeout + rank 0's grace + torchrun's SIGTERM wait + slack
        took = time.monotonic() - t0
    finally:
        if victim is not None:
            for s in (signal.SIGCONT, signal.SIGKILL):
                try:
                    os.kill(victim, s)
                except ProcessLookupError:
                    pass
        if p.poll() is None:
            p.kill()
            p.wait()
        for t in readers:
            t.join(5)
    stderr = "".join(err)
    res = subprocess.CompletedProcess(cmd, p.returncode, "".join(out), stderr)
    needles = ("rank 1 of 2 did not report back", f"DSV3_DIST_TIMEOUT = {timeout_s} s")
    assert_one_dsv3_line(res, *needles)
    if launcher == "dsv3.launch":
        assert_user_error(res, *needles)
    print(f"{sig.name}: launch ended {took:.1f} s after the signal (timeout {timeout_s} s)")
