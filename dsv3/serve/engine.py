"""The continuous-batching engine: requests join and leave the running batch at every step.

`Engine.add` queues a request (refused up front when it can never fit: UsageError; when the queue is
full: Overloaded). Each `Engine.step`:

1. admits waiting requests, oldest first, while the batch has room (`max_batch`) and the paged cache can
   still promise every block the request could ever need (prompt + max_tokens): admitted requests never run
   out of cache, so nothing is ever preempted (with `prefix_sharing`, blocks already holding the prompt's
   head are taken as they are and their prefill skipped);
2. builds the batch: one token for every sequence that is decoding, then prompt chunks of the sequences still
   prefilling, at most `prefill_chunk` prompt tokens in all, so a long prompt is spread over several steps
   and never stalls the running decodes;
3. runs one packed forward (`runner.PagedRunner`) and samples, per sequence, with that request's own
   generator (seeded: the same tokens whatever else is in the batch);
4. retires finished sequences (a stop id, max_tokens, the context end) and gives their blocks back.

Greedy output equals `dsv3.generate` of the request alone (tests hold them equal, float32).

Under torchrun every rank holds an Engine over its shard: rank 0 (the server) broadcasts the adds and
aborts before each step and the tokens it sampled after it, the others run `follow()`, so every rank steps
the same batch; a failure on any rank is agreed on (`dsv3.distributed.agree`) and ends every rank.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import dataclass, field

import torch

from dsv3 import distributed
from dsv3.errors import Dsv3Error, Overloaded, UsageError
from dsv3.sampling import check_sampling, sample
from dsv3.serve.cache import PagedCache, blocks_for
from dsv3.serve.runner import Chunk, PagedRunner


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 16
    stop_ids: list[int] = field(default_factory=list)


@dataclass
class Request:
    id: str
    prompt: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass
class StepOutput:
    request_id: str
    token_id: int | None  # None: a prefill chunk that did not reach the prompt's end
    finished: bool
    finish_reason: str | None  # "stop", "length", "abort", "error"


@dataclass
class EngineConfig:
    cache_gb: float = 0.25
    block_size: int = 16
    max_batch: int = 32
    max_seq_len: int | None = None  # default: the model's max_seq_len
    prefill_chunk: int = 256
    max_queue: int = 256
    n_blocks: int | None = None  # exact pool size (overrides cache_gb): for tests and pictures
    prefix_sharing: bool = False  # identical prompt heads share their full blocks (cache.py)


@dataclass
class Sequence:
    request: Request
    tokens: list[int]
    generator: torch.Generator
    reserved: int  # blocks promised but not yet taken
    table: list[int] = field(default_factory=list)
    cached: int = 0  # positions already written to the cache
    names: list[int] = field(default_factory=list)  # prefix hashes of its first full blocks (prefix sharing)

    @property
    def generated(self) -> int:
        return len(self.tokens) - len(self.request.prompt)


class Engine:
    def __init__(self, model, config: EngineConfig | None = None, group=None):
        cfg = config or EngineConfig()
        self.model, self.config, self.group = model, cfg, group
        self.max_seq_len = min(cfg.max_seq_len or model.args.max_seq_len, model.args.max_seq_len)
        for name in ("block_size", "max_batch", "prefill_chunk", "max_queue"):
            if getattr(cfg, name) < 1:
                raise UsageError(f"EngineConfig.{name} must be >= 1, got {getattr(cfg, name)}")
        n_blocks = cfg.n_blocks or blocks_for(model, cfg.cache_gb, cfg.block_size)
        self.cache = PagedCache(model, n_blocks, cfg.block_size)
        self.runner = PagedRunner(model, self.cache)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.lead = distributed.rank_of(group) == 0
        self._commands: list[tuple] = []  # rank 0: adds/aborts since the last step, for the other ranks
        self.last = {"prefill_tokens": 0, "decode_tokens": 0}

    # ------------------------------------------------------------------ requests
    def check(self, req: Request) -> None:
        """Raise UsageError when `req` is malformed or can never fit (context, cache)."""
        p, vocab = req.params, self.model.args.vocab_size
        check_sampling(p.temperature, p.top_p, p.top_k, p.seed)
        if p.max_tokens < 1:
            raise UsageError(f"max_tokens must be >= 1, got {p.max_tokens}")
        if not req.prompt:
            raise UsageError("the prompt needs at least one token")
        bad = [t for t in list(req.prompt) + list(p.stop_ids) if not 0 <= t < vocab]
        if bad:
            raise UsageError(f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})")
        total = len(req.prompt) + p.max_tokens
        if total > self.max_seq_len:
            raise UsageError(f"prompt ({len(req.prompt)} tokens) + max_tokens ({p.max_tokens}) = {total} exceeds "
                             f"the context of {self.max_seq_len} tokens")
        need = self.cache.blocks_needed(total)
        if need > self.cache.n_blocks:
            raise UsageError(f"prompt + max_tokens = {total} tokens need {need} cache blocks of "
                             f"{self.cache.block_size}; the whole cache has {self.cache.n_blocks} (raise --cache-gb)")
        if self.find(req.id) is not None:
            raise UsageError(f"request id {req.id!r} is already in the engine")

    def add(self, req: Request) -> None:
        """Queue `req` (checked first; Overloaded when `max_queue` requests are already waiting)."""
        self.check(req)
        if len(self.waiting) >= self.config.max_queue:
            raise Overloaded(f"the queue is full ({self.config.max_queue} requests waiting): retry later")
        if req.params.seed is None and self.group is not None:
            # every rank must draw alike: rank 0 picks the seed the others receive with the request
            req.params.seed = secrets.randbits(63)
        self._enqueue(req)
        self._commands.append(("add", req))

    def _enqueue(self, req: Request) -> None:
        gen = torch.Generator(device=self.model.device)
        gen.manual_seed(req.params.seed if req.params.seed is not None else secrets.randbits(63))
        need = self.cache.blocks_needed(len(req.prompt) + req.params.max_tokens)
        self.waiting.append(Sequence(req, list(req.prompt), gen, need))

    def abort(self, request_id: str) -> bool:
        """Drop a request, waiting or running, and free its blocks; False when it is not (or no longer) here."""
        seq = self.find(request_id)
        if seq is None:
            return False
        self._commands.append(("abort", request_id))
        self._retire(seq)
        return True

    def find(self, request_id: str) -> Sequence | None:
        return next((s for s in [*self.running, *self.waiting] if s.request.id == request_id), None)

    def block_table(self, request_id: str) -> list[int]:
        seq = self.find(request_id)
        if seq is None:
            raise UsageError(f"no request {request_id!r} in the engine")
        return list(seq.table)

    def has_work(self) -> bool:
        return bool(self.running or self.waiting)

    def stats(self) -> dict:
        return {"running": len(self.running), "waiting": len(self.waiting), "blocks_total": self.cache.n_blocks,
                "blocks_used": self.cache.used, "blocks_free": self.cache.n_free, **self.last}

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[StepOutput]:
        """One scheduling step and one forward (nothing when idle); under torchrun, on rank 0."""
        if self.group is not None:
            self._sync(stop=False)
        return self._step()

    def follow(self) -> None:
        """On ranks > 0: apply rank 0's commands and step with it until rank 0 calls `close`."""
        while self._sync(stop=False):
            self._step()

    def close(self) -> None:
        """On rank 0 under torchrun: release the ranks in `follow`."""
        if self.group is not None and self.lead:
            self._sync(stop=True)

    def _sync(self, stop: bool) -> bool:
        cmds, stop = distributed.broadcast_object((self._commands, stop) if self.lead else None, self.group)
        self._commands = []
        if not self.lead:
            for kind, arg in cmds:
                if kind == "add":
                    self._enqueue(arg)
                elif (seq := self.find(arg)) is not None:
                    self._retire(seq)
        return not stop

    def _step(self) -> list[StepOutput]:
        self._admit()
        batch = self._schedule()
        if not batch:
            self.last = {"prefill_tokens": 0, "decode_tokens": 0}
            return []
        err = None
        try:
            logits = self.runner.forward([ch for _, ch in batch])
            tokens = self._sample(batch, logits)
        except Exception as e:  # noqa: BLE001 - under torchrun every rank must hear of it, not hang
            if self.group is None:
                raise
            err, tokens = f"{type(e).__name__}: {e}" if not isinstance(e, Dsv3Error) else str(e), None
        if self.group is not None:
            distributed.agree(err, self.group)  # every rank raises when any rank failed
            tokens = distributed.broadcast_object(tokens, self.group)
        return self._advance(batch, tokens)

    def _admit(self) -> None:
        cache = self.cache
        while self.waiting and len(self.running) < self.config.max_batch:
            seq = self.waiting[0]
            shared = cache.shared_prefix(seq.tokens) if self.config.prefix_sharing else []
            need = seq.reserved - len(shared)
            # shared blocks nobody holds count as free until adopted: the promise must cover them too
            if not cache.can_reserve(need + sum(b in cache.idle for b in shared)):
                return
            self.waiting.popleft()
            cache.adopt(shared)
            cache.reserve(need)
            seq.table, seq.reserved, seq.cached = list(shared), need, len(shared) * cache.block_size
            seq.names = cache.chain_hashes(seq.tokens, len(shared))
            self.running.append(seq)

    def _name_blocks(self, seq: Sequence) -> None:
        """Register the sequence's newly filled blocks for sharing."""
        b, full = self.cache.block_size, seq.cached // self.cache.block_size
        if full > len(seq.names):
            done = len(seq.names)
            new = self.cache.chain_hashes(seq.tokens[done * b:], full - done, seq.names[-1] if seq.names else None)
            for i, name in enumerate(new, start=done):
                self.cache.register(seq.table[i], name)
            seq.names += new

    def _schedule(self) -> list[tuple[Sequence, Chunk]]:
        """Every decoding sequence's next token, then prompt chunks up to `prefill_chunk` tokens."""
        decode = [s for s in self.running if s.cached == len(s.tokens) - 1]
        batch = [(s, Chunk(s.tokens[-1:], s.cached, s.table)) for s in decode]
        budget = self.config.prefill_chunk
        for s in self.running:
            if budget == 0:
                break
            if s.cached < len(s.tokens) - 1:  # still inside its prompt
                n = min(len(s.tokens) - s.cached, budget)
                batch.append((s, Chunk(s.tokens[s.cached: s.cached + n], s.cached, s.table)))
                budget -= n
        for s, ch in batch:
            before = len(s.table)
            self.cache.grow(s.table, ch.start + len(ch.tokens))
            s.reserved -= len(s.table) - before
        self.last = {"prefill_tokens": sum(len(ch.tokens) for s, ch in batch if s not in decode),
                     "decode_tokens": len(decode)}
        return batch

    def _sample(self, batch, logits: torch.Tensor) -> list[int | None]:
        """The next token of every chunk that reaches its sequence's end (-1: non-finite logits), else None.
        One finiteness check and one argmax (greedy) for the whole batch, taken to the host once: a call per
        row cost more than the sampling itself; a sampled row draws from its own generator."""
        lo, hi = torch.aminmax(logits, dim=-1)  # a NaN or inf anywhere in a row reaches its min or max
        finite = (torch.isfinite(lo) & torch.isfinite(hi)).tolist()
        greedy = logits.argmax(dim=-1).tolist()
        out: list[int | None] = []
        for i, (s, ch) in enumerate(batch):
            p = s.request.params
            if ch.start + len(ch.tokens) < len(s.tokens):
                out.append(None)  # a prompt chunk short of the prompt's end
            elif not finite[i]:
                out.append(-1)
            elif p.temperature == 0:
                out.append(greedy[i])
            else:
                out.append(int(sample(logits[i: i + 1], p.temperature, p.top_p, p.top_k, s.generator)[0]))
        return out

    def _advance(self, batch, tokens: list[int | None]) -> list[StepOutput]:
        outs = []
        for (s, ch), tok in zip(batch, tokens):
            s.cached = ch.start + len(ch.tokens)
            if self.config.prefix_sharing:
                self._name_blocks(s)
            if tok is None:
                outs.append(StepOutput(s.request.id, None, False, None))
                continue
            if tok < 0:
                reason = "error"
                tok = None
            else:
                s.tokens.append(tok)
                p = s.request.params
                reason = "stop" if tok in p.stop_ids else \
                    "length" if s.generated >= p.max_tokens or len(s.tokens) >= self.max_seq_len else None
            if reason is not None:
                self._retire(s)
            outs.append(StepOutput(s.request.id, tok, reason is not None, reason))
        return outs

    def _retire(self, seq: Sequence) -> None:
        if seq in self.running:
            self.running.remove(seq)
            self.cache.release(seq.table, seq.reserved)
        else:
            self.waiting.remove(seq)
        seq.reserved = 0
