"""Prefill and decode speed of dsv3 (optionally beside transformers and llama.cpp) against the memory-bandwidth floor.

The work behind `dsv3 bench decode`. What it computes, and why, is the command's description: the
docstring of `dsv3/cli/bench/decode.py` (what `dsv3 bench decode --help` shows), kept there so that --help needs no torch.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from dsv3.bench import llama_cpp
from dsv3.bench.agreement import AGREE_NEW, check_agreement
from dsv3.checkpoint import load_model, save_model
from dsv3.config import ModelArgs
from dsv3.convert import convert
from dsv3.decode_step import DecodeRunner
from dsv3.errors import UsageError
from dsv3.info import param_counts
from dsv3.memory import keep_freed_memory
from dsv3.model import Transformer
from dsv3.outputs import check_output_path

FP8_STORED = "dsv3-fp8:absorb"  # --dtype fp8: the FP8 weights kept FP8 (dequantised per product on CPU)
STORED = "stored"  # a worker dtype: load_model(dtype=None)
BENCH_DIR = Path(os.environ.get("DSV3_BENCH_DIR", Path.home() / ".cache" / "dsv3" / "bench"))


# ---------------------------------------------------------------------- checkpoint
# `--sparse K`: the preset plus a V3.2 lightning indexer. Its per-key cost (heads x width = 256 multiply-adds) is
# ~1/9 of the bench preset's absorbed MLA per key (8 heads x (2 x 128 + 32)), near V3.2's 1/17 (64 x 128 vs
# 128 x (2 x 512 + 64)) -- so the sparse/dense ratio measured on the small model is not flattered.
BENCH_INDEXER = dict(index_n_heads=4, index_head_dim=64)


def ensure_checkpoint(preset: str, dtype: str, index_topk: int = 0) -> Path:
    """A random checkpoint of `preset` in the HF layout (with index_topk, + BENCH_INDEXER), written once and reused."""

    path = BENCH_DIR / (f"{preset}-v32-top{index_topk}-{dtype}" if index_topk else f"{preset}-{dtype}")
    if (path / "config.json").is_file():
        return path
    if dtype == "fp8":  # the release format, made by dsv3's own converter from the bf16 checkpoint
        convert(ensure_checkpoint(preset, "bfloat16"), path, "fp8", progress=False)
        return path
    args = ModelArgs.preset(preset)
    if index_topk:
        args = args.replace(**BENCH_INDEXER, index_topk=index_topk)
    torch.manual_seed(0)
    model = Transformer(args, dtype=getattr(torch, dtype))
    with torch.no_grad():  # a non-zero correction bias, so routing depends on it as in the release
        for layer in model.layers:
            gate = getattr(layer.ffn, "gate", None)
            if gate is not None and gate.bias is not None:
                gate.bias.normal_(0, 0.01)
    save_model(model, path)
    return path


# ---------------------------------------------------------------------- floor
def read_bandwidth(threads: int, mbytes: int = 256) -> float:
    """Bytes/s streamed by an fp32 matrix-vector product over `mbytes` MB (best of 5)."""

    torch.set_num_threads(threads)
    n = 4096
    k = mbytes * 2**20 // (4 * n)
    w = torch.randn(k, n)  # (K, N) row-major: x @ w streams it in order
    x = torch.randn(1, k)
    x @ w
    best = float("inf")
    for _ in range(5):
        t = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - t)
    return w.numel() * 4 / best


def floor_bytes(args, batch: int, bytes_per_param: int) -> float:
    pc = param_counts(args)
    expert = 3 * args.dim * args.moe_inter_dim
    n_moe = args.n_layers - args.n_dense_layers
    e, k = args.n_routed_experts, args.n_activated_experts
    distinct = e * (1 - (1 - k / e) ** batch)
    active = pc["active_params"] - pc["embedding_params"] + n_moe * (distinct - k) * expert
    return active * bytes_per_param


# ---------------------------------------------------------------------- workers
def _rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    dtype = None if spec["dtype"] == STORED else getattr(torch, spec["dtype"])
    device = torch.device(spec.get("device", "cpu"))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    b, prompt, new = spec["batch"], spec["prompt"], spec["new"]
    contexts = spec.get("contexts") or []
    total = max([prompt + new] + [c + 9 for c in contexts])
    tokens = torch.randint(0, spec["vocab"], (b, total)).to(device)
    rss0 = _rss_bytes()
    if spec["impl"] == "transformers":
        step, prefill, cache_bytes, weights_bytes = _transformers_runner(spec["ckpt"], dtype, device)
    elif spec["impl"] == "llama.cpp":
        runner = llama_cpp.LlamaCppRunner(Path(spec["gguf"]), total, spec["threads"], spec["dtype"], b,
                                          exact=bool(spec.get("agree")))
        step, prefill, cache_bytes = runner.step, runner.prefill, runner.cache_bytes
        weights_bytes = Path(spec["gguf"]).stat().st_size
    else:
        if device.type == "cpu":
            keep_freed_memory()  # as dsv3's commands run (dsv3.cli.common.load)
        step, prefill, cache_bytes, weights_bytes = _dsv3_runner(spec["ckpt"], dtype, spec["impl"], total, b,
                                                                 spec.get("mode", "readable"), device)
    out: dict = {"rss_after_load": _rss_bytes(), "rss_before_load": rss0}
    if spec.get("agree"):  # the agreement check before any timing: greedy tokens, teacher-forced logits
        n = spec["agree"]
        with torch.inference_mode():
            ids = [int(prefill(tokens[:, :prompt])[0, -1].argmax())]
            for i in range(n - 1):
                ids.append(int(step(torch.tensor([[ids[-1]]], device=device), prompt + i)[0, -1].argmax()))
            rows = [prefill(tokens[:, :prompt])[0, -1]]  # the same positions fed the same tokens in every engine
            rows += [step(tokens[:, prompt + i:prompt + i + 1], prompt + i)[0, -1] for i in range(n - 1)]
        return {"greedy": ids, "logits": torch.stack(rows).float().cpu().tolist()}
    with torch.inference_mode():
        prefill(tokens[:, :8])  # warm-up (kernel selection, lazy tables)
        sync()
        t = time.perf_counter()
        logits = prefill(tokens[:, :prompt])
        sync()
        out["prefill_s"] = time.perf_counter() - t
        nxt = logits[:, -1].argmax(-1, keepdim=True)
        times = []
        for i in range(new):
            t = time.perf_counter()
            logits = step(nxt, prompt + i)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            sync()
            times.append(time.perf_counter() - t)
        out["decode_step_s"] = statistics.median(times[1:] if len(times) > 1 else times)
        out["first_step_s"] = times[0]  # includes compilation / graph capture for those modes
        out["kv_bytes_per_token"] = cache_bytes() / (b * (prompt + new))
        curve = []
        if contexts:  # step time as the context grows: extend the cache in chunks, time 8 steps at each
            pos = prompt + new
            for c in sorted(contexts):
                if c > pos:
                    prefill_more = step(tokens[:, pos:c], pos)
                    nxt = prefill_more[:, -1].argmax(-1, keepdim=True)
                    pos = c
                ts = []
                for _ in range(8):
                    t = time.perf_counter()
                    logits = step(nxt, pos)
                    sync()
                    ts.append(time.perf_counter() - t)
                    nxt = logits[:, -1].argmax(-1, keepdim=True)
                    pos += 1
                curve.append((c, statistics.median(ts)))
        out["curve"] = curve
    out["peak_rss"] = _rss_bytes()
    out["cuda_peak_bytes"] = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    out["peak_rss_growth"] = out["peak_rss"] - rss0  # what loading and running added to the interpreter
    out["weights_bytes"] = weights_bytes
    return out


def _dsv3_runner(ckpt: str, dtype, impl: str, max_len: int, batch: int, mode: str, device):
    """Readable path (`model(x, pos, cache)`) or a `DecodeRunner` mode (static step, compiled, CUDA graph)."""

    attn = impl.split(":")[1]
    model = load_model(ckpt, dtype=dtype, device=device, attn_impl=attn, max_seq_len=max(max_len, 16))
    if mode == "readable":
        cache = model.new_cache(batch, max_len)

        def step(x, pos):
            return model(x, pos, cache, last_only=True)
    else:
        runner = DecodeRunner(model, batch, max_len, mode)
        cache, step = runner.cache, runner

    def prefill(x):
        return step(x, 0)

    return step, prefill, cache.nbytes, _param_bytes(model)


def _transformers_runner(ckpt: str, dtype, device):
    from transformers import DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=dtype).to(device).eval()
    state = {}

    def prefill(x):
        out = model(input_ids=x, use_cache=True, logits_to_keep=1)  # what its generate() asks for
        state["pkv"] = out.past_key_values
        return out.logits

    def step(x, pos):
        out = model(input_ids=x, past_key_values=state["pkv"], use_cache=True, logits_to_keep=1)
        state["pkv"] = out.past_key_values
        return out.logits

    def cache_bytes():
        total = 0
        for t in _tensors(state["pkv"]):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
        return total

    return step, prefill, cache_bytes, _param_bytes(model)


def _param_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _tensors(obj, depth=0):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o, depth + 1)
    elif depth < 4 and hasattr(obj, "layers"):
        for layer in obj.layers:
            for name in ("keys", "values", "key_cache", "value_cache"):
                if hasattr(layer, name):
                    yield from _tensors(getattr(layer, name), depth + 1)


def spawn_worker(spec: dict) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS=str(spec["threads"]))
    r = subprocess.run([sys.executable, "-m", "dsv3.bench.decode", "--worker", json.dumps(spec)],
                       capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise RuntimeError(f"benchmark worker failed ({spec['impl']}):\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------- driver
def run(ns) -> int:
    if ns.worker:
        print(json.dumps(worker(json.loads(ns.worker))))
        return 0
    _check_args(ns)
    ckpt = Path(ns.ckpt) if ns.ckpt else ensure_checkpoint(ns.preset, ns.dtype)
    args = ModelArgs.from_hf_config(ckpt)
    impls, specs = _implementations(ns, ckpt, args.vocab_size)
    peers = [i for i in impls if i in PEER_KEYS]
    agreement = check_agreement({i: specs[i] for i in ["dsv3:absorb"] + peers}, spawn_worker, ns.dtype) if peers else {}
    bw = read_bandwidth(ns.threads) if ns.device == "cpu" else ns.hbm_gb_s * 1e9
    bpp = 4 if ns.dtype == "float32" else 2  # fp8: the floor of the same weights in bf16
    rows = []
    for batch in ns.batch:
        for prompt in ns.prompt:
            cell: dict[str, list[dict]] = {i: [] for i in impls}
            for _ in range(ns.repeats):
                for impl in impls:  # alternate implementations run by run
                    cell[impl].append(spawn_worker(specs[impl] | dict(batch=batch, prompt=prompt, new=ns.new)))
            floor_s = floor_bytes(args, batch, bpp) / bw
            rows += [_row(impl, batch, prompt, runs, floor_s) for impl, runs in cell.items() if runs]
    curves = {}
    if ns.contexts:
        ctx = list(ns.contexts)
        for impl in impls:
            curves[impl] = spawn_worker(specs[impl] | dict(batch=1, prompt=min(ctx), new=1, contexts=ctx))["curve"]
    floor_ms = {b: 1e3 * floor_bytes(args, b, bpp) / bw for b in ns.batch}
    _add_ratios(rows)
    result = dict(ckpt=str(ckpt), dtype=ns.dtype, device=ns.device, threads=ns.threads, read_gb_s=bw / 1e9,
                  floor_ms=floor_ms, agreement=agreement, rows=rows, curves=curves, machine=machine_info())
    if ns.plot and curves:
        _plot(curves, floor_ms[min(floor_ms)], ns.plot, ns.dtype)
    if ns.json:
        print(json.dumps(result))
    else:
        _print_table(result)
    return 0


def _check_args(ns) -> None:
    """The refusals that need no checkpoint, before one is read or written."""
    attn = [a for a in ns.attn.split(",") if a]
    if not attn or any(a not in ("absorb", "naive") for a in attn):
        raise UsageError(f"--attn {ns.attn!r}: expected absorb, naive or absorb,naive")
    if ns.sparse and ns.ckpt:
        raise UsageError("--sparse times the preset with and without an indexer: give --preset, not --ckpt")
    if ns.dtype == "fp8" and (ns.compare or ns.sparse):
        raise UsageError("--dtype fp8 times dsv3 on the FP8 release format against itself dequantised to bf16: "
                         "drop --compare and --sparse")
    if ns.cuda_graph and not ns.device.startswith("cuda"):
        raise UsageError(f"--cuda-graph needs --device cuda (got --device {ns.device})")
    if ns.plot:
        check_output_path(ns.plot, "--plot")


def _implementations(ns, ckpt: Path, vocab: int) -> tuple[list[str], dict[str, dict]]:
    """The implementations to time, in order, and each one's worker spec (batch, prompt and new added per cell)."""
    attn = [a for a in ns.attn.split(",") if a]
    impls = [f"dsv3:{a}" for a in attn]
    modes = {}  # impl name -> DecodeRunner mode
    if ns.static:
        modes["dsv3-static:absorb"] = "static"
    if ns.compile and not ns.cuda_graph:
        modes["dsv3-compile:absorb"] = "compile"
    if ns.cuda_graph:
        modes["dsv3-compile+cudagraph:absorb" if ns.compile else "dsv3-cudagraph:absorb"] = \
            "compile+cuda-graph" if ns.compile else "cuda-graph"
    impls += list(modes)
    if ns.dtype == "fp8":  # the FP8 checkpoint as stored, beside the same dequantised to bf16 at load (the others)
        impls.append(FP8_STORED)
    ckpts = dict.fromkeys(impls + list(ns.compare) + ["dsv3:absorb"], ckpt)
    if ns.sparse:  # V3.2's sparse attention beside the dense rows (the preset without an indexer)
        sparse = [f"dsv3-sparse{ns.sparse}:{a}" for a in attn]
        ckpts |= dict.fromkeys(sparse, ensure_checkpoint(ns.preset, ns.dtype, ns.sparse))
        impls += sparse
    extra: dict[str, dict] = {}  # impl -> extra worker spec fields
    if "llama.cpp" in ns.compare:
        src = llama_cpp.check_available(ns.llama_cpp_src)
        extra["llama.cpp"] = dict(gguf=str(llama_cpp.ensure_gguf(ckpt, ns.dtype, src)))
    impls += list(ns.compare)
    specs = {i: extra.get(i, {}) | dict(impl=i, ckpt=str(ckpts[i]), dtype=_worker_dtype(i, ns.dtype),
                                        threads=ns.threads, device=ns.device, vocab=vocab,
                                        mode=modes.get(i, "readable"))
             for i in impls + ["dsv3:absorb"]}
    return impls, specs


def _worker_dtype(impl: str, dtype: str) -> str:
    """What a worker loads the weights as: --dtype, except for an FP8 checkpoint (as stored, or bf16)."""
    if dtype != "fp8":
        return dtype
    return STORED if impl == FP8_STORED else "bfloat16"


def _row(impl: str, batch: int, prompt: int, runs: list[dict], floor_s: float) -> dict:
    """One table row from a cell's fresh-process runs: medians."""
    def med(k):
        return statistics.median(r[k] for r in runs)

    return dict(impl=impl, batch=batch, prompt=prompt, prefill_tok_s=batch * prompt / med("prefill_s"),
                decode_tok_s=batch / med("decode_step_s"), decode_step_ms=1e3 * med("decode_step_s"),
                first_step_s=med("first_step_s"), x_floor=med("decode_step_s") / floor_s,
                peak_rss_mb=med("peak_rss") / 2**20, rss_growth_mb=med("peak_rss_growth") / 2**20,
                kv_bytes_per_token=med("kv_bytes_per_token"), weights_mb=med("weights_bytes") / 2**20)


PEER_KEYS = {"transformers": "transformers", "llama.cpp": "llama_cpp"}


def _add_ratios(rows: list[dict]) -> None:
    """decode/prefill_vs_transformers and _vs_llama_cpp on every dsv3 row that has the peer in its cell."""
    for peer, key in PEER_KEYS.items():
        ref = {(r["batch"], r["prompt"]): r for r in rows if r["impl"] == peer}
        for r in rows:
            t = ref.get((r["batch"], r["prompt"]))
            if t and r["impl"] not in PEER_KEYS:
                r[f"decode_vs_{key}"] = r["decode_tok_s"] / t["decode_tok_s"]
                r[f"prefill_vs_{key}"] = r["prefill_tok_s"] / t["prefill_tok_s"]


def machine_info() -> dict:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else ""
    return dict(cpu=cpu, gpu=gpu, python=platform.python_version(), torch=torch.__version__, commit=commit,
                date=time.strftime("%Y-%m-%d"))


def _print_table(res: dict) -> None:
    print(f"checkpoint {res['ckpt']}  dtype {res['dtype']}  device {res['device']}  threads {res['threads']}  "
          f"read bandwidth {res['read_gb_s']:.1f} GB/s  machine: {res['machine']['gpu'] or res['machine']['cpu']}")
    print("floor (ms/step): " + ", ".join(f"batch {b}: {v:.2f}" for b, v in res["floor_ms"].items()))
    peers = [(p, k) for p, k in PEER_KEYS.items() if any(r["impl"] == p for r in res["rows"])]
    short = {"transformers": "HF", "llama.cpp": "llama"}
    hdr = f"{'impl':<30}{'batch':>6}{'prompt':>7}{'prefill tok/s':>15}{'decode tok/s':>14}{'ms/step':>9}{'x floor':>9}"
    hdr += "".join(f"{'vs ' + short[p] + ' dec':>13}{'vs ' + short[p] + ' pre':>13}" for p, _ in peers)
    print(hdr + f"{'RSS MB':>9}{'+load MB':>9}{'KV B/tok':>10}")
    for r in res["rows"]:
        line = (f"{r['impl']:<30}{r['batch']:>6}{r['prompt']:>7}{r['prefill_tok_s']:>15.0f}{r['decode_tok_s']:>14.1f}"
                f"{r['decode_step_ms']:>9.2f}{r['x_floor']:>9.2f}")
        for _, k in peers:
            for what in ("decode", "prefill"):
                v = r.get(f"{what}_vs_{k}")
                line += f"{(f'{v:.2f}x' if v else '-'):>13}"
        print(line + f"{r['peak_rss_mb']:>9.0f}{r['rss_growth_mb']:>9.0f}{r['kv_bytes_per_token']:>10.0f}")
    for peer, a in res["agreement"].items():
        print(f"{peer} vs dsv3 before timing: teacher-forced logits {a['rel_err']:.1e} (median relative L2), "
              f"greedy tokens equal for {a['greedy_same']} of {AGREE_NEW} steps")
    for impl, curve in res["curves"].items():
        print(f"{impl}: step ms by context " + ", ".join(f"{c}: {1e3 * s:.2f}" for c, s in curve))


def _plot(curves: dict, floor_ms: float, path: str, dtype: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for impl, curve in curves.items():
        ax.plot([c for c, _ in curve], [1e3 * s for _, s in curve], marker="o", label=impl)
    ax.axhline(floor_ms, color="k", ls="--", lw=1, label="floor (weights read once)")
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("decode step (ms), batch 1")
    ax.set_title(f"decode step vs context ({dtype}, 1 thread)")
    ax.set_ylim(bottom=0)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":  # a measurement in a fresh process (`_spawn`): python -m dsv3.bench.decode --worker SPEC
    print(json.dumps(worker(json.loads(sys.argv[sys.argv.index("--worker") + 1]))))
