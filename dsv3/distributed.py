"""The torchrun runtime: one process per rank, started by `torchrun -m dsv3.generate` or `python -m dsv3.launch`.

`maybe_init_distributed` makes the default process group under torchrun (WORLD_SIZE > 1; nccl on
CUDA, gloo on CPU, every collective bounded by DSV3_DIST_TIMEOUT) and `shutdown` tears it down;
`current_group`, `rank_of` and `device_for` tell a command where it runs. Rank 0 owns the terminal
and the files: `broadcast_object` hands its prompts and lines to the others, `shared_seed` gives
every rank the same sampling seed. `agree` exchanges one error message per rank, so that a failure
on any rank makes every rank raise the failing rank's message instead of hanging in a collective the
others never reach; `checked_on_every_rank` runs argument checks that way. `run_distributed` runs a
command on every rank: rank 0 prints, the others stay quiet, and a rank that stops or dies mid-run is
named on rank 0 (asked over a separate gloo control group).

What is sharded, and how, is `dsv3.parallel`'s business; this module knows only ranks and groups.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist

from dsv3.errors import ConfigError, DistributedError, Dsv3Error


# ---------------------------------------------------------------------- agreeing on failures
def checked_on_every_rank(fn, group):
    """`fn()` (argument checks) on every rank, then one exchange: if it raised a `Dsv3Error` on any
    rank, every rank raises (the message unchanged when every rank failed alike), so no rank goes on
    into a collective that the others never reach. Returns fn's result."""
    if group is None:
        return fn()
    err, out = None, None
    try:
        out = fn()
    except Dsv3Error as e:
        err = e
    try:
        agree(None if err is None else str(err), group)
    except DistributedError:
        if err is not None and rank_of(group) == 0:
            raise err from None  # rank 0's own error, worded as a single process words it
        raise
    return out


def agree(err: str | None, group) -> None:
    """Collective: raise DistributedError on every rank if any rank passed an error message."""
    msgs: list[str | None] = [None] * dist.get_world_size(group)
    try:
        dist.all_gather_object(msgs, err, group=group)
    except Exception as e:  # noqa: BLE001 - a rank died or stalled past the group's timeout
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"rank {dist.get_rank(group)}: the other ranks did not report back ({first})"
                               + (f"; this rank's own error: {err}" if err else ""), rank=0) from None
    failed = [(r, m) for r, m in enumerate(msgs) if m is not None]
    if len(failed) == len(msgs) and len(set(msgs)) == 1:
        # the same error everywhere (a bad config, world size or argument): say it as one process would
        raise DistributedError(msgs[0], rank=dist.get_rank(group))
    if failed:
        r, m = failed[0]
        more = f" ({len(failed) - 1} more rank(s) failed too)" if len(failed) > 1 else ""
        raise DistributedError(f"rank {r} of {len(msgs)} failed: {m}{more}", rank=dist.get_rank(group))


# ---------------------------------------------------------------------- launching
def maybe_init_distributed(timeout_s: float | None = None):
    """Under torchrun (WORLD_SIZE > 1): init the default group (nccl on CUDA, gloo on CPU), return it.

    Returns None for a plain single process. DSV3_DIST_BACKEND=gloo forces CPU ranks on a GPU machine
    (the tests do). The timeout (env DSV3_DIST_TIMEOUT, seconds, default
    300) bounds every collective, so a rank that dies or stalls cannot hang the others forever.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    if not dist.is_initialized():
        timeout_s = timeout_s or dist_timeout_s()
        backend = os.environ.get("DSV3_DIST_BACKEND") or ("nccl" if torch.cuda.is_available() else "gloo")
        if backend not in ("nccl", "gloo"):
            raise ConfigError(f"DSV3_DIST_BACKEND must be 'nccl' or 'gloo', got {backend!r}")
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD


def dist_timeout_s() -> float:
    """The collective timeout in seconds: env DSV3_DIST_TIMEOUT, default 300."""
    raw = os.environ.get("DSV3_DIST_TIMEOUT", "300")
    try:
        t = float(raw)
    except ValueError:
        t = -1.0
    if not t > 0:
        raise ConfigError(f"DSV3_DIST_TIMEOUT must be a positive number of seconds, got {raw!r}")
    return t


def current_group():
    """The default process group when this process runs under torchrun with WORLD_SIZE > 1, else None."""
    d = torch.distributed
    return d.group.WORLD if d.is_available() and d.is_initialized() and d.get_world_size() > 1 else None


def run_distributed(fn, *args, **kwargs) -> int:
    """Run a command `fn(*args, **kwargs) -> int` on every rank of a torchrun launch (or plainly, alone).

    Rank 0 owns the terminal: other ranks' stdout goes to /dev/null, and a `Dsv3Error` (a usage error
    that every rank finds alike, or a `DistributedError` that every rank raises with the same message)
    is printed by rank 0 only; the other ranks exit with the same code 2, silently. The group is torn
    down after.

    A collective that fails mid-run (a rank stopped or killed: gloo times out after DSV3_DIST_TIMEOUT
    seconds, or finds the connection closed) ends the command on every rank that is still alive:
    rank 0 asks the others over a separate control group which of them are still there, and raises
    one `DistributedError` naming the ranks that did not report back and the timeout.
    """
    try:
        group = maybe_init_distributed()
    except Dsv3Error:
        if os.environ.get("RANK", "0") != "0":
            return 2  # e.g. a bad DSV3_DIST_TIMEOUT: every rank finds it, rank 0 says it
        raise
    quiet = group is not None and rank_of(group) != 0
    # made while every rank is known to be alive: after a failure it is the one channel left to ask on
    # (gloo also beside NCCL; where gloo cannot connect, failures are still reported, without names)
    control = None
    if group is not None:
        with contextlib.suppress(RuntimeError):
            control = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=dist_timeout_s()))
    together, reporting = True, []
    restore = _stop_on_sigterm(reporting) if group is not None and not quiet else None
    try:
        with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
            return fn(*args, **kwargs)
    except Dsv3Error:
        if quiet:
            return 2  # rank 0 prints the message once
        raise
    except RuntimeError as e:
        if group is None or not _is_comm_error(e):
            raise  # a bug, not a lost rank: keep its traceback
        reporting.append(True)
        together = False  # a rank is gone: a farewell barrier would only wait out the timeout again
        err = _lost_ranks_error(e, group, control)
        if quiet:
            return 2
        raise err from None
    finally:
        if restore is not None:
            restore()
        shutdown(group, together=together)


def _stop_on_sigterm(reporting: list):
    """On rank 0: turn torchrun's SIGTERM (sent when another rank exited, e.g. was killed) into a failed
    collective, so that rank 0 still says which rank is gone instead of dying silently; while it is
    already reporting, the SIGTERM waits for the report. Returns the function that restores the handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def on_term(signum, frame):
        if not reporting:
            raise torch.distributed.DistError("SIGTERM from torchrun (it stops every worker once one has exited)")

    old = signal.signal(signal.SIGTERM, on_term)
    return lambda: signal.signal(signal.SIGTERM, old)


def _is_comm_error(e: RuntimeError) -> bool:
    """A failed collective (gloo raises plain RuntimeErrors naming its sources; NCCL a DistError)."""
    return isinstance(e, torch.distributed.DistError) or "/gloo/" in str(e)


def _lost_ranks_error(e: RuntimeError, group, control, grace_s: float = 5.0) -> DistributedError:
    """After a failed collective: every rank that is still alive tells rank 0 so over `control`; rank 0
    waits up to `grace_s` (at most the timeout) for them and names the ranks that did not report back.

    The ranks still alive are all blocked in the same step's collectives, so their own timeouts fire
    within about one step of rank 0's: a few seconds of grace reach all of them.
    """
    rank, world, timeout = dist.get_rank(group), dist.get_world_size(group), dist_timeout_s()
    cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    # gloo's "[.../pair.cc:553] Connection closed by peer [addr]:port. This is typically caused by ...":
    # keep the what, drop the source position and the boilerplate advice
    cause = re.split(r"\. (?=[A-Z])", re.sub(r"^\[[^\]]*\] ", "", cause))[0]
    if control is None:
        return DistributedError(f"a collective failed (DSV3_DIST_TIMEOUT = {timeout:g} s; a rank stopped or died, "
                                f"which one is unknown: no control group): {cause}", rank=rank)
    if rank != 0:
        with contextlib.suppress(Exception):  # rank 0 may be the one that is gone
            dist.send(torch.tensor([rank]), dst=0, group=control)
        return DistributedError(cause, rank=rank)
    deadline = time.monotonic() + min(grace_s, timeout)
    works, missing = {}, []
    for r in range(1, world):
        try:
            works[r] = dist.irecv(torch.zeros(1, dtype=torch.long), src=r, group=control)
        except Exception:  # noqa: BLE001 - that rank's connection is already closed: it died
            missing.append(r)
    for r, w in works.items():
        try:
            w.wait(timedelta(seconds=max(deadline - time.monotonic(), 0.01)))
        except Exception:  # noqa: BLE001 - timed out, or that rank's connection closed meanwhile
            missing.append(r)
    missing.sort()
    who = (f"rank {missing[0]}" if len(missing) == 1 else f"ranks {', '.join(map(str, missing))}") if missing else None
    if who:
        return DistributedError(f"{who} of {world} did not report back (collectives time out after "
                                f"DSV3_DIST_TIMEOUT = {timeout:g} s; stopped or died during the run): {cause}")
    return DistributedError(f"a collective failed on rank 0 though every rank reported back afterwards "
                            f"(DSV3_DIST_TIMEOUT = {timeout:g} s): {cause}")


def shared_seed(seed: int | None, group) -> int | None:
    """The same sampling seed on every rank (rank 0 draws one if none was given): ranks must sample alike."""
    if group is None or seed is not None:
        return seed
    return broadcast_object(int(torch.randint(2**31, ()).item()), group)


def device_for(group) -> torch.device:
    """Where this rank's weights go: its local GPU under NCCL, else the CPU."""
    if group is not None and torch.distributed.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_of(group) -> int:
    return 0 if group is None else torch.distributed.get_rank(group)


def broadcast_object(obj, group, src: int = 0):
    """Rank src's `obj` on every rank (prompts, seeds: rank 0 owns the terminal and files)."""
    if group is None:
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=src, group=group)
    return box[0]


def shutdown(group, together: bool = True) -> None:
    """Tear the default group down; `together=False` skips the farewell barrier (a rank is gone)."""
    if group is not None and torch.distributed.is_initialized():
        # leave together: a rank that tears down its store/threads while another still talks to them
        # can abort the other at exit
        if together:
            with contextlib.suppress(Exception):
                torch.distributed.barrier(group)
        torch.distributed.destroy_process_group()
