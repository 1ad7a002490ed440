"""`dsv3 serve`'s work once the model is loaded: the engine, its thread, the app and uvicorn; or, on a rank
other than 0 under torchrun, the engine following rank 0's steps.

The socket is bound before uvicorn starts, so a taken port is a one-line error and `--port 0` can say which
port it got. uvicorn owns SIGINT/SIGTERM: it stops accepting, lets the requests in flight finish (the engine
keeps stepping meanwhile), and returns; then the engine's thread stops and, under torchrun, releases the
other ranks. A fatal engine failure (a rank lost, a bug) stops uvicorn and is raised here, once.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
import time

import uvicorn

from dsv3 import distributed
from dsv3.chat_format import chat_format_for
from dsv3.errors import Dsv3Error, UsageError
from dsv3.memory import check_fits
from dsv3.serve.app import build_app
from dsv3.serve.cache import block_bytes
from dsv3.serve.engine import Engine, EngineConfig
from dsv3.serve.textgen import Served
from dsv3.serve.worker import EngineWorker


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as e:
        raise UsageError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


def sized_config(model, cfg: EngineConfig) -> EngineConfig:
    """`cfg` with n_blocks fixed: what --cache-gb holds, capped at what max_batch full-length sequences can
    use (more would never be touched), checked against the device's free memory before allocating."""
    per = block_bytes(model, cfg.block_size)
    ctx = min(cfg.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
    most = cfg.max_batch * -(-ctx // cfg.block_size)
    n = min(int(cfg.cache_gb * 2**30 // per), most)
    if n < 1:
        raise UsageError(f"--cache-gb {cfg.cache_gb:g} holds no cache block ({per} bytes each)")
    check_fits(n * per, model.device, f"the paged cache (--cache-gb {cfg.cache_gb:g})")
    return EngineConfig(**{**vars(cfg), "n_blocks": n})


@contextlib.contextmanager
def drained_signals_end_quietly():
    """uvicorn drains on SIGINT/SIGTERM and then raises the signal again, to die of it: once the requests in
    flight are done that second delivery is a no-op here, so a drained server exits 0."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def bind_on_rank0(host: str, port: int, group) -> socket.socket | None:
    """Rank 0's listening socket, bound before the model loads (a taken port fails in a second, not after the
    load); every rank learns of a failure, so none goes on to wait for the others."""
    lead = distributed.rank_of(group) == 0
    return distributed.checked_on_every_rank(lambda: bind(host, port) if lead else None, group)


def run_server(model, tokenizer, eos_id: int | None, cfg: EngineConfig, *, sock: socket.socket | None,
               model_name: str, group=None, config: dict | None = None) -> None:
    """Serve on `sock` (rank 0's, from `bind_on_rank0`) until SIGINT/SIGTERM, or follow rank 0 (the other
    ranks). `config`: the checkpoint's config.json, naming a family whose chat format is not in its template."""
    lead = distributed.rank_of(group) == 0
    try:  # a cache too big for a rank is agreed on: none is left waiting in `follow` for a rank 0 that gave up
        engine = distributed.checked_on_every_rank(lambda: Engine(model, sized_config(model, cfg), group), group)
    except Dsv3Error:
        if sock is not None:
            sock.close()
        raise
    if not lead:
        engine.follow()
        return
    server: uvicorn.Server | None = None

    def fatal(e: BaseException) -> None:
        if server is not None:
            server.should_exit = True

    worker = EngineWorker(engine, on_fatal=fatal)
    fmt = chat_format_for(tokenizer, config) if tokenizer is not None else None
    served = Served(worker, tokenizer, fmt, model_name, eos_id, engine.max_seq_len)
    config = uvicorn.Config(build_app(served), log_level="warning", access_log=False, lifespan="off")
    server = uvicorn.Server(config)
    where = sock.getsockname()
    st = engine.stats()
    print(f"dsv3 serve: {model_name} on http://{where[0]}:{where[1]} ({st['blocks_total']} cache blocks of "
          f"{cfg.block_size} tokens, batch <= {cfg.max_batch}, context {engine.max_seq_len}; pid {os.getpid()})",
          file=sys.stderr, flush=True)
    worker.start()
    try:
        with drained_signals_end_quietly():
            server.run(sockets=[sock])
    finally:
        worker.stop()
        sock.close()
    if worker.error is not None:
        # a Dsv3Error prints as one line; a failed collective lets dsv3.distributed.run_distributed name the
        # rank that is gone; anything else is a bug and keeps its traceback
        raise worker.error


class BackgroundServer:
    """The app served from a thread of this process (tests, notebooks, in-process benchmarks): `url`, `stop()`.

    `served` is a `textgen.Served` whose worker is started here and stopped with the server."""

    def __init__(self, served: Served, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 30.0):
        self.served, self.sock = served, bind(host, port)
        host, port = self.sock.getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.server = uvicorn.Server(uvicorn.Config(build_app(served), log_level="warning", access_log=False,
                                                    lifespan="off"))
        served.worker.on_fatal = lambda e: setattr(self.server, "should_exit", True)
        served.worker.start()
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                self.stop()
                raise Dsv3Error(f"the server at {self.url} did not start within {timeout_s:g} s")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.served.worker.stop()
        self.sock.close()

    @classmethod
    def for_engine(cls, engine: Engine, tokenizer, model_name: str = "dsv3-tiny", **kw) -> BackgroundServer:
        fmt = chat_format_for(tokenizer) if tokenizer is not None else None
        eos = tokenizer.eos_id if tokenizer is not None else None
        return cls(Served(EngineWorker(engine), tokenizer, fmt, model_name, eos, engine.max_seq_len), **kw)
