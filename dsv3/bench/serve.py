"""Output throughput, time to first token and inter-token latency of `dsv3 serve` beside `transformers serve`.

The work behind `dsv3 bench serve`. What it measures, and why, is the command's description: the
docstring of `dsv3/cli/bench/serve.py` (what `dsv3 bench serve --help` shows), kept there so that --help
needs no torch. Here: the servers as fresh subprocesses, a streaming HTTP client (the standard library's
`http.client`, one thread per concurrent user), the percentiles and the table.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import queue
import random
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from dsv3.bench.decode import ensure_checkpoint, machine_info
from dsv3.config import ModelArgs
from dsv3.errors import NumericalError, ResourceError, UsageError

ENGINES = ("dsv3", "transformers")
# what each server imports, and the extra that installs it
SERVER_NEEDS = {"dsv3": (("fastapi", "uvicorn"), "serve"),
                "transformers": (("transformers", "fastapi", "uvicorn", "openai"), "bench")}
PERCENTILES = (50, 90, 99)


# ---------------------------------------------------------------------- checkpoint
def word_tokenizer(path: Path, vocab_size: int) -> None:
    """tokenizer.json with one word per id ("w0" ... "w{V-1}"), no bos/eos: text <-> ids is exact, every
    streamed chunk is one token, and a random model never stops early on an end-of-sequence token. The chat
    template (which `dsv3 serve` requires; the benchmark only uses /v1/completions) joins the messages' words."""
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "model_max_length": 1 << 20,
        "chat_template": "{% for m in messages %}{{ m['content'] }} {% endfor %}"}, indent=2))


def serve_checkpoint(preset: str, dtype: str) -> Path:
    """The `dsv3 bench decode` checkpoint of `preset` (random weights, HF layout) plus the word tokenizer
    (written every time: a few kB, and the directory is the benchmark's own)."""
    path = ensure_checkpoint(preset, dtype)
    word_tokenizer(path, ModelArgs.from_hf_config(path).vocab_size)
    return path


def prompt_set(n: int, length: int, vocab: int, seed: int = 0) -> list[str]:
    """`n` fixed prompts of `length` words (ids drawn once from a seeded generator)."""
    rng = random.Random(seed)
    return [" ".join(f"w{rng.randrange(vocab)}" for _ in range(length)) for _ in range(n)]


# ---------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(engine: str, ckpt: str, port: int, ns) -> list[str]:
    """The command line that starts `engine` on 127.0.0.1:`port` (same checkpoint, dtype and threads)."""
    if engine == "dsv3":
        return [sys.executable, "-m", "dsv3.cli", "serve", "--ckpt", ckpt, "--host", "127.0.0.1", "--port", str(port),
                "--device", "cpu", "--dtype", ns.dtype, "--max-batch", str(ns.max_batch), "--cache-gb", str(ns.cache_gb)]
    cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", ckpt, "--host", "127.0.0.1",
           "--port", str(port), "--device", "cpu", "--dtype", ns.dtype]
    return cmd + (["--continuous-batching"] if ns.transformers_cb != "off" else [])


class Server:
    """A server in a fresh subprocess (its own process group), ready once /v1/models answers (`model`: the
    id it lists, which the requests name)."""

    def __init__(self, engine: str, ckpt: str, ns):
        self.engine, self.port, self.log = engine, free_port(), b""
        env = dict(os.environ, OMP_NUM_THREADS=str(ns.threads), MKL_NUM_THREADS=str(ns.threads),
                   TOKENIZERS_PARALLELISM="false")
        self.proc = subprocess.Popen(server_command(engine, ckpt, self.port, ns), env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        self.model = None
        try:
            self._wait(ns.startup_timeout)
        except BaseException:
            self.stop()
            raise

    def _wait(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise ResourceError(f"{self.engine} server exited with code {self.proc.returncode} before it was "
                                 f"ready:\n{self.proc.stdout.read().decode(errors='replace')[-2000:]}")
            try:
                c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                c.request("GET", "/v1/models")
                r = c.getresponse()
                body = r.read()
                c.close()
                if r.status == 200:
                    self.model = json.loads(body)["data"][0]["id"]
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise ResourceError(f"{self.engine} server not ready on port {self.port} after {timeout:g} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


# ---------------------------------------------------------------------- client
def stream_completion(port: int, model: str, prompt: str, max_tokens: int, timeout: float = 600) -> dict:
    """One streamed /v1/completions request (greedy): arrival time of every chunk that carries text."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True, "stream_options": {"include_usage": True}})  # token counts from the server
    t0 = time.perf_counter()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    c.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status != 200:
        raise ResourceError(f"HTTP {r.status} from port {port}: {r.read()[:500]!r}")
    times, text, usage = [], [], None
    for raw in r:  # server-sent events: lines "data: {...}", blank lines between them, "data: [DONE]" at the end
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        obj = json.loads(data)
        if "error" in obj:
            raise ResourceError(f"server on port {port} streamed an error: {obj['error']}")
        piece = "".join(ch.get("text") or "" for ch in obj.get("choices", []))
        if piece:
            times.append(time.perf_counter() - t0)
            text.append(piece)
        usage = obj.get("usage") or usage
    c.close()
    out = "".join(text)
    n = (usage or {}).get("completion_tokens") or len(out.split())
    return {"times": times, "text": out, "tokens": n, "end": time.perf_counter() - t0}


def run_load(port: int, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> dict:
    """`concurrency` users, each sending its next prompt as soon as its last reply ended, until none are left."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for p in prompts:
        todo.put(p)
    results, errors = [], []

    def user():
        while True:
            try:
                p = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results.append(stream_completion(port, model, p, max_tokens))
            except Exception as e:  # reported after the join, on the main thread
                errors.append(e)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=user) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise ResourceError(f"{len(errors)} of {len(prompts)} requests failed: {errors[0]}")
    return summarize(results, wall)


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(results: list[dict], wall: float) -> dict:
    ttft = [r["times"][0] for r in results if r["times"]]
    itl = [b - a for r in results for a, b in zip(r["times"], r["times"][1:])]
    tokens = sum(r["tokens"] for r in results)
    out = {"requests": len(results), "output_tokens": tokens, "wall_s": wall, "output_tok_s": tokens / wall}
    for q in PERCENTILES:
        out[f"ttft_p{q}_ms"] = 1e3 * percentile(ttft, q)
        out[f"itl_p{q}_ms"] = 1e3 * percentile(itl, q)
    return out


# ---------------------------------------------------------------------- driver
def check_args(ns) -> list[str]:
    engines = [e for e in ns.engines.split(",") if e]
    if not engines or any(e not in ENGINES for e in engines) or len(set(engines)) != len(engines):
        raise UsageError(f"--engines {ns.engines!r}: expected dsv3, transformers or dsv3,transformers")
    if ns.cache_gb <= 0:
        raise UsageError(f"--cache-gb must be > 0, got {ns.cache_gb:g}")
    for e in engines:
        modules, extra = SERVER_NEEDS[e]
        missing = [m for m in modules if importlib.util.find_spec(m) is None]
        if missing:
            raise UsageError(f"the {e} server needs {', '.join(missing)}: pip install 'dsv3[{extra}]' "
                             f"(or --engines without {e})")
    return engines


def start_checked(e: str, ckpt: Path, prompt: str, ns, check: dict) -> Server:
    """A fresh server for engine `e`; on its first start, its greedy tokens for `prompt` go into `check` and must
    equal the engines' before it (NumericalError otherwise, unless --no-check), before it is timed.

    With `--transformers-cb auto`, transformers starts with --continuous-batching; when that server fails the
    request, the failure is recorded in `check` and transformers runs without it from then on."""
    while True:
        srv = Server(e, str(ckpt), ns)
        if e in check["texts"]:
            return srv
        try:
            check["texts"][e] = stream_completion(srv.port, srv.model, prompt, ns.max_tokens)["text"].split()
            break
        except ResourceError as err:
            srv.stop()
            if e != "transformers" or ns.transformers_cb != "auto":
                raise
            check["transformers_cb_error"], ns.transformers_cb = str(err), "off"
    first_engine = next(iter(check["texts"]))
    first, mine = check["texts"][first_engine], check["texts"][e]
    if mine != first:
        check["match"] = False
        if not ns.no_check:
            srv.stop()
            at = next((i for i, (x, y) in enumerate(zip(first, mine)) if x != y), min(len(first), len(mine)))
            raise NumericalError(f"greedy tokens differ between {first_engine} and {e} at token {at}: "
                                 f"{' '.join(first[:at + 3])!r} vs {' '.join(mine[:at + 3])!r} (--no-check to time anyway)")
    return srv


def measure(ckpt: Path, engines: list[str], prompts: list[str], ns) -> tuple[dict, dict]:
    """runs[engine][concurrency] = one summary per repeat, and the greedy check. Each repeat starts each engine's
    server afresh, engines alternating, and walks every concurrency after a warm-up request."""
    check = {"prompt": prompts[0], "texts": {}, "match": True, "transformers_cb_error": None}
    runs = {e: {c: [] for c in ns.concurrency} for e in engines}
    for _ in range(ns.repeats):
        for e in engines:
            srv = start_checked(e, ckpt, prompts[0], ns, check)
            try:
                stream_completion(srv.port, srv.model, prompts[-1], 2)  # warm-up: lazy init, first allocation
                for c in ns.concurrency:
                    runs[e][c].append(run_load(srv.port, srv.model, prompts[:c * ns.rounds], c, ns.max_tokens))
            finally:
                srv.stop()
    return runs, check


def run(ns) -> int:
    engines = check_args(ns)
    ckpt = Path(ns.ckpt) if ns.ckpt else serve_checkpoint(ns.preset, ns.dtype)
    if not (ckpt / "config.json").is_file():
        raise UsageError(f"--ckpt {ckpt}: no config.json there (expected a Hugging Face DeepSeek-V3 directory)")
    args = ModelArgs.from_hf_config(ckpt)
    if ns.prompt_len + ns.max_tokens > args.max_seq_len:
        raise UsageError(f"--prompt-len {ns.prompt_len} + --max-tokens {ns.max_tokens} exceeds the checkpoint's "
                         f"context of {args.max_seq_len} tokens")
    prompts = prompt_set(max(ns.concurrency) * ns.rounds, ns.prompt_len, args.vocab_size)
    machine = machine_info()  # the commit the run started from
    runs, check = measure(ckpt, engines, prompts, ns)
    rows = []
    for e in engines:
        for c in ns.concurrency:
            keys = runs[e][c][0].keys()
            rows.append({"engine": e, "concurrency": c, "repeats": len(runs[e][c]),
                         **{k: statistics.median(r[k] for r in runs[e][c]) for k in keys}})
    result = {"ckpt": str(ckpt), "dtype": ns.dtype, "threads": ns.threads, "prompt_len": ns.prompt_len,
              "max_tokens": ns.max_tokens, "rounds": ns.rounds,
              "transformers_continuous_batching": ns.transformers_cb != "off",
              "greedy_check": check, "rows": rows, "ratios": ratios(rows), "machine": machine}
    if ns.json:
        print(json.dumps(result))
    else:
        print_table(result)
    return 0


def ratios(rows: list[dict]) -> list[dict]:
    """dsv3 / transformers per concurrency: output throughput (higher is better) and latencies (lower is)."""
    by = {(r["engine"], r["concurrency"]): r for r in rows}
    out = []
    for (e, c), d in by.items():
        t = by.get(("transformers", c))
        if e == "dsv3" and t is not None:
            out.append({"concurrency": c, "throughput_x": d["output_tok_s"] / t["output_tok_s"],
                        "ttft_p50_x": d["ttft_p50_ms"] / t["ttft_p50_ms"], "itl_p50_x": d["itl_p50_ms"] / t["itl_p50_ms"]})
    return out


def print_table(res: dict) -> None:
    m = res["machine"]
    print(f"checkpoint {res['ckpt']}  dtype {res['dtype']}  threads {res['threads']}  prompt {res['prompt_len']} "
          f"tokens  max_tokens {res['max_tokens']}  {res['rounds']} requests per user  "
          f"machine: {m['cpu']}  commit {m['commit']}  {m['date']}")
    g = res["greedy_check"]
    if g["transformers_cb_error"]:
        print(f"transformers serve --continuous-batching failed on this model, so transformers ran without it: "
              f"{g['transformers_cb_error'][:300]}")
    n = len(next(iter(g["texts"].values())))
    print(f"greedy check ({', '.join(g['texts'])}, one prompt): " + (f"the same {n} tokens" if g["match"]
                                                                     else "TOKENS DIFFER (--no-check)"))
    hdr = f"{'engine':<14}{'conc':>5}{'tok/s':>9}" + "".join(f"{'TTFT p' + str(q):>11}" for q in PERCENTILES) + \
          "".join(f"{'ITL p' + str(q):>10}" for q in PERCENTILES) + "   (ms)"
    print(hdr)
    for r in res["rows"]:
        print(f"{r['engine']:<14}{r['concurrency']:>5}{r['output_tok_s']:>9.1f}"
              + "".join(f"{r[f'ttft_p{q}_ms']:>11.1f}" for q in PERCENTILES)
              + "".join(f"{r[f'itl_p{q}_ms']:>10.1f}" for q in PERCENTILES))
    for x in res["ratios"]:
        print(f"concurrency {x['concurrency']:>3}: dsv3/transformers output tok/s {x['throughput_x']:.2f}x, "
              f"TTFT p50 {x['ttft_p50_x']:.2f}x, ITL p50 {x['itl_p50_x']:.2f}x")
