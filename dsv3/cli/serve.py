"""Serve a checkpoint over an OpenAI-compatible HTTP API, with continuous batching over a paged latent cache.

Endpoints: POST /v1/chat/completions and /v1/completions (stream: true for server-sent events),
GET /v1/models, /health and /metrics (Prometheus). Default: the bundled small model on 127.0.0.1:8000.
Needs the serve extra: pip install 'dsv3[serve]'.

Notes: under torchrun (WORLD_SIZE > 1) every rank loads its shard; rank 0 owns HTTP and scheduling, and
every rank steps the same batch. SIGTERM or Ctrl-C drains the requests in flight, then exits 0.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from dsv3.cli.args import add_model_args
from dsv3.errors import UsageError
from dsv3.options import integer, positive, real

HELP = "serve a checkpoint over an OpenAI-compatible HTTP API (needs dsv3[serve])"
EXTRA = "dsv3 serve needs the serve extra (FastAPI, uvicorn): pip install 'dsv3[serve]'"


def add_args(p) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=integer(0, 65535), default=8000, help="TCP port (0: any free port, printed)")
    p.add_argument("--served-model-name", default=None, help="the model id clients name (default: the directory name)")
    p.add_argument("--cache-gb", type=real(0, lo_open=True), default=1.0,
                   help="GiB reserved once for the paged latent cache")
    p.add_argument("--block-size", type=integer(1, 4096), default=16, help="tokens per cache block")
    p.add_argument("--max-batch", type=integer(1, 4096), default=32, help="sequences stepped together at most")
    p.add_argument("--prefill-chunk", type=positive, default=256, help="prompt tokens prefilled per step at most")
    p.add_argument("--max-queue", type=integer(1, 1_000_000), default=256,
                   help="requests waiting for admission before new ones get 429")
    p.add_argument("--prefix-sharing", action="store_true",
                   help="identical prompt heads share their full cache blocks (their prefill is skipped)")


def run(ns) -> int:
    """`dsv3 serve`; under torchrun every rank loads its shard and steps, rank 0 serves HTTP."""
    if importlib.util.find_spec("fastapi") is None or importlib.util.find_spec("uvicorn") is None:
        raise UsageError(EXTRA)
    from dsv3.distributed import run_distributed

    return run_distributed(main_serve, ns)


def main_serve(ns) -> int:
    from dsv3 import distributed
    from dsv3.checkpoint import default_checkpoint
    from dsv3.cli.common import load
    from dsv3.serve.engine import EngineConfig
    from dsv3.serve.server import bind_on_rank0, run_server

    vars(ns).setdefault("seed", None)  # --preset builds its random weights from it
    group = distributed.current_group()
    sock = bind_on_rank0(ns.host, ns.port, group)
    model, tok, eos = load(ns)
    name = ns.served_model_name or (Path(ns.ckpt).resolve().name if ns.ckpt else ns.preset or "dsv3-tiny")
    cfg = EngineConfig(cache_gb=ns.cache_gb, block_size=ns.block_size, max_batch=ns.max_batch,
                       max_seq_len=ns.max_seq_len, prefill_chunk=ns.prefill_chunk, max_queue=ns.max_queue,
                       prefix_sharing=ns.prefix_sharing)
    path = Path(ns.ckpt) if ns.ckpt else None if ns.preset else default_checkpoint()
    config = json.loads((path / "config.json").read_text()) if path is not None else None
    run_server(model, tok, eos, cfg, sock=sock, model_name=name, group=group, config=config)
    return 0
