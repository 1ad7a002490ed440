"""The engine's thread: the one place that calls `Engine.add/abort/step`, fed through a thread-safe inbox.

The HTTP handlers run on the asyncio loop; the model runs here, so a forward never blocks the loop. A
handler submits a request and gets a future that settles once the engine accepted (or refused) it; the
request's outputs then reach the handler's `sink` (a callable, thread-safe on the caller's side) one by
one. Aborts (a client gone) go through the same inbox. Under torchrun this thread is rank 0's: it keeps
stepping while idle (`heartbeat_s`) so the other ranks, waiting in `Engine.follow`, hear from it within
their collective timeout. A failure in the engine (a rank lost, a bug) is fatal: every open request gets
the error, `on_fatal` is called (the server stops) and `error` keeps it for the command to report.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import Future

from dsv3.errors import Dsv3Error
from dsv3.serve.engine import Engine, Request
from dsv3.serve.metrics import Metrics


class EngineWorker:
    def __init__(self, engine: Engine, metrics: Metrics | None = None, on_fatal=None, heartbeat_s: float = 1.0):
        self.engine, self.metrics, self.on_fatal = engine, metrics or Metrics(), on_fatal
        self.heartbeat_s = heartbeat_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.sinks: dict[str, tuple] = {}  # request id -> (sink, arrival time, last token time)
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="dsv3-engine", daemon=True)
        self.metrics.set_stats(engine.stats())

    def start(self) -> EngineWorker:
        self.thread.start()
        return self

    def submit(self, req: Request, sink) -> Future:
        fut: Future = Future()
        if self.error is not None:
            fut.set_exception(Dsv3Error(f"the engine has stopped: {self.error}"))
        else:
            self.inbox.put(("add", req, sink, fut))
        return fut

    def abort(self, request_id: str) -> None:
        self.inbox.put(("abort", request_id, None, None))

    def stop(self) -> None:
        self._stop.set()
        self.inbox.put(("wake", None, None, None))
        if self.thread.is_alive():
            self.thread.join()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        eng, last_beat = self.engine, time.monotonic()
        try:
            while not self._stop.is_set():
                self._drain(block=not eng.has_work())
                if eng.has_work() or (eng.group is not None and time.monotonic() - last_beat > self.heartbeat_s):
                    self._deliver(eng.step())
                    last_beat = time.monotonic()
                self.metrics.set_stats(eng.stats())
            eng.close()  # under torchrun: release the other ranks (a lost rank fails here too)
        except BaseException as e:  # noqa: BLE001 - fatal: tell every open request, then the server
            self.error = e
            for sink, *_ in self.sinks.values():
                sink(e)
            self.sinks.clear()
            self._fail_inbox(e)
            if self.on_fatal is not None:
                self.on_fatal(e)

    def _drain(self, block: bool) -> None:
        timeout = min(self.heartbeat_s, 0.25) if block else None
        while True:
            try:
                kind, arg, sink, fut = self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
            except queue.Empty:
                return
            timeout = None
            if kind == "add":
                try:
                    self.engine.add(arg)
                except Dsv3Error as e:
                    self.metrics.count("dsv3_requests_rejected_total")
                    fut.set_exception(e)
                    continue
                self.sinks[arg.id] = (sink, time.monotonic(), None)
                self.metrics.count("dsv3_requests_total")
                self.metrics.count("dsv3_prompt_tokens_total", len(arg.prompt))
                fut.set_result(None)
            elif kind == "abort" and self.engine.abort(arg):
                self.sinks.pop(arg, None)
                self.metrics.count("dsv3_requests_finished_total")

    def _deliver(self, outs) -> None:
        now = time.monotonic()
        for o in outs:
            entry = self.sinks.get(o.request_id)
            if entry is None:
                continue
            sink, arrived, last = entry
            if o.token_id is not None:
                self.metrics.count("dsv3_generation_tokens_total")
                self.metrics.observe(ttft=now - arrived if last is None else None, itl=None if last is None else now - last)
                self.sinks[o.request_id] = (sink, arrived, now)
            if o.finished:
                self.sinks.pop(o.request_id, None)
                self.metrics.count("dsv3_requests_finished_total")
            sink(o)

    def _fail_inbox(self, e: BaseException) -> None:
        while True:
            try:
                kind, _, _, fut = self.inbox.get_nowait()
            except queue.Empty:
                return
            if fut is not None and not fut.done():
                fut.set_exception(Dsv3Error(f"the engine has stopped: {e}"))
