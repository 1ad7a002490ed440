"""A full-width slice in the FP8 release format, end to end: parity, memory against the plan, decode speed, projection.

The work behind `dsv3 bench slice`. What it computes, and why, is the command's description: the
docstring of `dsv3/cli/bench/slice.py` (what `dsv3 bench slice --help` shows), kept there so that --help needs
no torch.
"""

from __future__ import annotations

import copy
import gc
import json
import math
import platform
import shutil
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from dsv3.checkpoint import load_model
from dsv3.config import ModelArgs
from dsv3.decode_step import DecodeRunner
from dsv3.errors import UsageError
from dsv3.info import param_counts
from dsv3.layers import Linear
from dsv3.moe import MoE
from dsv3.plan import RUNTIME_OVERHEAD, plan, weights_bytes_per_rank
from dsv3.testing import write_checkpoint

PROMPT = 32  # tokens of the parity prompt
# Median relative L2 of the logits against the slice dequantised to bf16 at load. bf16 GEMM: the same bf16
# weights, so only summation order differs. FP8 GEMM: every GEMM's input is rounded to e4m3 (relative step 2^-3,
# ~3.6% rms), ~8 GEMMs deep per layer, on random weights with no trained redundancy; measured 0.09 (tiny) and
# 0.15 (1024 wide, 32 experts) on CPU. A wrong scale or block layout gives O(1).
TOLERANCE = {"bf16": 1e-2, "fp8": 0.25}
WARMUP = 3  # decode steps before timing (the CUDA graph is captured, the compiled step compiled, on the first)
SHARD_BYTES = 2 * 10**9


def slice_args(full: ModelArgs, dense: int, moe: int, max_len: int) -> ModelArgs:
    """`full`'s widths with `dense` dense and `moe` MoE layers, FP8, no MTP module."""
    return full.replace(n_layers=dense + moe, n_dense_layers=dense, n_mtp_layers=0, dtype="fp8",
                        max_seq_len=max(full.max_seq_len, max_len))


def ensure_slice(path: Path, args: ModelArgs, device: torch.device, seed: int) -> bool:
    """Write the slice into `path` unless it already holds it; True if written. Written into `path.partial`
    and renamed, so an interrupted write leaves nothing that looks like a checkpoint."""
    want = json.loads(json.dumps(args.to_hf_config()))
    if (path / "config.json").is_file():
        try:
            have = json.loads((path / "config.json").read_text())
        except (OSError, ValueError) as e:
            raise UsageError(f"--dir {path}: its config.json is unreadable ({e}); choose a new --dir") from None
        if {**have, "torch_dtype": None} == {**want, "torch_dtype": None}:
            return False
        raise UsageError(f"--dir {path}: it holds a checkpoint with another config.json; choose a new --dir")
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"--dir {path}: exists and is not a slice written by this command; choose a new --dir")
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    n_shards = max(1, math.ceil(weights_bytes_per_rank(args, 1) / SHARD_BYTES))
    try:
        write_checkpoint(partial, args, fp8=True, n_shards=n_shards, seed=seed, std=args.dim ** -0.5,
                         mtp_copies=False, device=device)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if path.exists():
        path.rmdir()
    partial.rename(path)
    return True


def set_gemm_impl(model: nn.Module, impl: str) -> None:
    """How every FP8 Linear (and the stacked experts) multiplies: "fp8" (FP8 GEMM) or "bf16" (dequantise W)."""
    for mod in model.modules():
        if isinstance(mod, MoE) or (isinstance(mod, Linear) and mod.is_fp8):
            mod.gemm_impl = impl


def relative_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Median over positions of |out - ref| / |ref| (logits (b, s, v))."""
    err = (out - ref).flatten(0, 1).norm(dim=-1) / ref.flatten(0, 1).norm(dim=-1)
    return statistics.median(err.tolist())


def truncated(model: nn.Module, n_layers: int) -> nn.Module:
    """The same model object's first `n_layers` blocks (shared weights, no copy): for per-layer step times."""
    sub = copy.copy(model)
    sub._modules = dict(model._modules)  # a shallow copy shares the dict: replace it before setting `layers`
    sub.layers = nn.ModuleList(list(model.layers)[:n_layers])
    return sub


def time_decode(model, batch: int, ctx: int, mode: str, steps: int, sync) -> float:
    """ms per decode step at positions ctx - steps .. ctx - 1, the cache filled with random latents."""
    runner = None if mode == "readable" else DecodeRunner(model, batch, ctx, mode)
    cache = model.new_cache(batch, ctx) if runner is None else runner.cache
    for layer in cache.layers:
        for buf in layer.tensors.values():
            buf.normal_()
    tokens = torch.randint(0, model.args.vocab_size, (batch, 1), device=model.device)

    def step(pos: int):
        if runner is None:
            return model(tokens, pos, cache, last_only=True)
        return runner.step(tokens, pos)

    first = ctx - steps - WARMUP
    for p in range(first, first + WARMUP):
        step(p)
    sync()
    t = time.perf_counter()
    for p in range(first + WARMUP, ctx):
        step(p)
    sync()
    return (time.perf_counter() - t) / steps * 1e3


def project(layer_ms: list[float], dense: int, full: ModelArgs, gpus: int, allreduce_us: float,
            hbm_tbs: float) -> dict:
    """Batch-1 ms/token of `full` on `gpus` GPUs from step times of the slice cut to 0..n layers (`layer_ms[k]`:
    the first k blocks; the first `dense` are dense). Memory-bound scaling: every rank reads 1/gpus of the bytes
    (the routed experts assumed spread evenly), plus two all-reduces per block, one for the embedding and one
    logits all-gather, each at `allreduce_us`."""
    t_rest = layer_ms[0]
    t_dense = (layer_ms[dense] - t_rest) / dense if dense else 0.0
    n_moe = len(layer_ms) - 1 - dense
    t_moe = (layer_ms[-1] - layer_ms[dense]) / n_moe
    n_dense_full = full.n_dense_layers
    one_gpu = t_rest + n_dense_full * t_dense + (full.n_layers - n_dense_full) * t_moe
    compute = one_gpu / gpus
    comm = (2 * full.n_layers + 2) * allreduce_us / 1e3 if gpus > 1 else 0.0
    counts = param_counts(full)
    head = full.vocab_size * full.dim
    active_bytes = counts["active_params_without_embedding_and_head"] + 2 * head  # FP8 1 B, the head bf16
    floor = active_bytes / (gpus * hbm_tbs * 1e12) * 1e3
    total = compute + comm
    return {"t_rest_ms": t_rest, "t_dense_ms": t_dense, "t_moe_ms": t_moe, "one_gpu_ms": one_gpu,
            "compute_ms": compute, "allreduce_ms": comm, "ms_per_token": total, "tok_s": 1e3 / total,
            "floor_ms": floor, "floor_tok_s": 1e3 / floor, "vs_floor": total / floor,
            "active_bytes": active_bytes, "gpus": gpus, "allreduce_us": allreduce_us, "hbm_tbs": hbm_tbs}


def _check(ns, device: torch.device, full: ModelArgs) -> tuple[int, int]:
    if len(ns.layers) != 2:
        raise UsageError(f"--layers DENSE,MOE: two numbers, got {len(ns.layers)}")
    dense, moe = ns.layers
    if moe < 1:
        raise UsageError("--layers: the slice needs at least one MoE layer (DENSE,MOE with MOE >= 1)")
    if dense < 1 and full.n_dense_layers > 0:
        raise UsageError(f"--layers: {ns.config} has {full.n_dense_layers} dense layer(s); the slice needs one to time it")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: this machine has no CUDA device (on CPU: --device cpu and --mode readable,static,compile)")
    if device.type != "cuda" and any("cuda-graph" in m for m in ns.mode):
        raise UsageError(f"--mode: CUDA-graph modes need --device cuda (device is {device})")
    short = [c for c in ns.context if c < ns.steps + WARMUP + 1]
    if short:
        raise UsageError(f"--context {short[0]}: must exceed --steps + {WARMUP} (= {ns.steps + WARMUP})")
    return dense, moe


def run(ns) -> int:
    device = torch.device(ns.device)
    full = ModelArgs.load(ns.config)
    dense, moe = _check(ns, device, full)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    args = slice_args(full, dense, moe, max(max(ns.context), ns.prefill, PROMPT))
    path = Path(ns.dir)
    res: dict = {"config": str(ns.config), "layers": [dense, moe], "full_layers": full.n_layers, "device": str(device),
                 "device_name": torch.cuda.get_device_name(device) if device.type == "cuda"
                 else platform.processor() or platform.machine(),
                 "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    t = time.perf_counter()
    res["written"] = ensure_slice(path, args, device, ns.seed)
    res["write_s"] = time.perf_counter() - t
    _progress(f"slice {'written' if res['written'] else 'found'} in {path} ({res['write_s']:.0f} s)")

    # the reference first (the slice dequantised to bf16 at load), so that parity is known before any timing
    tokens = torch.randint(0, args.vocab_size, (1, PROMPT), generator=torch.Generator().manual_seed(1)).to(device)
    reference = load_model(path, device=device, dtype=torch.bfloat16)
    with torch.inference_mode():
        ref = reference(tokens).cpu()
    del reference
    _free(device)
    t = time.perf_counter()
    model = load_model(path, device=device, gemm_impl="fp8")
    res["load_s"] = time.perf_counter() - t
    _progress(f"loaded FP8 in {res['load_s']:.1f} s")
    res["memory"] = _memory(model, args, ns, device, sync)
    _progress(f"memory and prefill: {json.dumps(res['memory'])}")
    res["parity"] = {}
    with torch.inference_mode():
        for impl in ("fp8", "bf16"):
            set_gemm_impl(model, impl)
            out = model(tokens).cpu()
            res["parity"][impl] = {"rel_l2": relative_l2(out, ref), "tolerance": TOLERANCE[impl],
                                   "top1_agree": int((out.argmax(-1) == ref.argmax(-1)).sum()), "positions": PROMPT}
        set_gemm_impl(model, "fp8")
        ok = all(p["rel_l2"] <= p["tolerance"] for p in res["parity"].values())
        res["parity_ok"] = ok
        _progress(f"parity: {json.dumps(res['parity'])}")
        res["cells"] = _decode_cells(model, ns, sync)
        res["projection"] = _projection(model, res["cells"], dense, full, ns, sync)
    if ns.json_out:
        Path(ns.json_out).write_text(json.dumps(res, indent=1))
    _print(res, args)
    return 0 if ok else 1


def _free(device: torch.device) -> None:
    gc.collect()  # runners, captured graphs and compiled steps of the cell just timed
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _progress(text: str) -> None:
    """One line per finished stage, flushed: if the run is cut short (a device session's time), the log
    still holds what was measured."""
    print(f"[slice] {text}", flush=True)


def _memory(model, args: ModelArgs, ns, device: torch.device, sync) -> dict:
    """Loaded weight bytes and the peak of a prefill against `dsv3 plan` for the slice on one GPU; prefill tok/s."""
    loaded = sum(p.numel() * p.element_size() for p in model.parameters())
    predicted = plan(args, 1, ns.gpu_mem_gb, batch=1, max_seq_len=ns.prefill, prefill_tokens=ns.prefill, search=False)
    tokens = torch.randint(0, args.vocab_size, (1, ns.prefill), device=device)
    out = {"weights_bytes": loaded, "plan_weights_bytes": predicted["weights_bytes_per_gpu"],
           "plan_used_bytes_without_runtime": predicted["used_bytes_per_gpu"] - RUNTIME_OVERHEAD, "peak_bytes": None}
    with torch.inference_mode():
        times = []
        for i in range(2):  # the first run is the warm-up (and the one whose peak is measured on CUDA)
            cache = model.new_cache(1, ns.prefill)
            if device.type == "cuda" and i == 0:
                torch.cuda.reset_peak_memory_stats(device)
            sync()
            t = time.perf_counter()
            model(tokens, 0, cache, last_only=True)
            sync()
            times.append(time.perf_counter() - t)
            if device.type == "cuda" and i == 0:
                out["peak_bytes"] = torch.cuda.max_memory_allocated(device)
            del cache
    out["prefill_tokens"] = ns.prefill
    out["prefill_tok_s"] = ns.prefill / times[-1]
    return out


def _decode_cells(model, ns, sync) -> list[dict]:
    cells = []
    start = time.monotonic()
    for batch in ns.batch:
        for ctx in ns.context:
            for mode in ns.mode:
                cell = {"batch": batch, "context": ctx, "mode": mode}
                if mode.startswith("compile") and batch not in ns.compile_batches:
                    cell["skipped"] = "--compile-batches"
                elif time.monotonic() - start > ns.budget_s:
                    cell["skipped"] = "--budget-s"
                else:
                    cell.update(_timed(model, batch, ctx, mode, ns.steps, sync))
                    _progress(f"decode {json.dumps(cell)}")
                cells.append(cell)
    return cells


def _timed(model, batch: int, ctx: int, mode: str, steps: int, sync) -> dict:
    t = time.perf_counter()
    try:
        ms = time_decode(model, batch, ctx, mode, steps, sync)
    except Exception as e:  # noqa: BLE001 - one mode failing (compiler, capture, memory) must not stop the rest
        out = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"}
    else:
        out = {"ms_per_step": ms, "tok_s": batch * 1e3 / ms}
    finally:
        if mode.startswith("compile"):
            torch._dynamo.reset()
        _free(model.device)
    out["cell_s"] = time.perf_counter() - t
    return out


def _projection(model, cells: list[dict], dense: int, full: ModelArgs, ns, sync) -> dict | None:
    """Per-layer batch-1 step times at the shortest context, in the fastest non-compiled mode measured."""
    ctx = min(ns.context)
    timed = [c for c in cells if c["batch"] == 1 and c["context"] == ctx and "ms_per_step" in c
             and not c["mode"].startswith("compile")]
    if not timed:
        return None
    mode = min(timed, key=lambda c: c["ms_per_step"])["mode"]
    layer_ms = [time_decode(truncated(model, k), 1, ctx, mode, ns.steps, sync) for k in range(len(model.layers) + 1)]
    _free(model.device)
    out = project(layer_ms, dense, full, ns.gpus, ns.allreduce_us, ns.hbm_tbs)
    out.update(mode=mode, context=ctx, layer_ms=layer_ms)
    return out


def _print(res: dict, args: ModelArgs) -> None:
    gb = lambda b: "-" if b is None else f"{b / 1e9:.2f} GB"  # noqa: E731
    m = res["memory"]
    print(f"\n== slice of {res['config']}: {res['layers'][0]} dense + {res['layers'][1]} MoE layers, dim {args.dim}, "
          f"{args.n_heads} heads, {args.n_routed_experts} experts top-{args.n_activated_experts}; FP8; "
          f"{res['device']} ({res['device_name']}), torch {res['torch']}, {res['date']}")
    print(f"write {res['write_s']:.0f} s ({'written' if res['written'] else 'reused'}), load {res['load_s']:.1f} s")
    print(f"weights loaded {gb(m['weights_bytes'])} | plan {gb(m['plan_weights_bytes'])}"
          f" | peak of a {m['prefill_tokens']}-token prefill {gb(m['peak_bytes'])}"
          f" | plan (without its {RUNTIME_OVERHEAD / 1e9:.0f} GB runtime reserve) {gb(m['plan_used_bytes_without_runtime'])}")
    print(f"prefill {m['prefill_tokens']} tokens: {m['prefill_tok_s']:.0f} tok/s")
    for impl, p in res["parity"].items():
        print(f"logits, FP8 as stored with the {impl} GEMM vs dequantised to bf16 at load: rel L2 {p['rel_l2']:.2e}"
              f" (tolerance {p['tolerance']:g}), top-1 {p['top1_agree']}/{p['positions']}")
    modes = list(dict.fromkeys(c["mode"] for c in res["cells"]))
    print("decode ms/step      | " + " | ".join(f"{mo:>18}" for mo in modes))
    for key in dict.fromkeys((c["batch"], c["context"]) for c in res["cells"]):
        row = {c["mode"]: c for c in res["cells"] if (c["batch"], c["context"]) == key}
        cells = [f"{row[mo]['ms_per_step']:18.2f}" if "ms_per_step" in row[mo]
                 else f"{('skip' if 'skipped' in row[mo] else 'error'):>18}" for mo in modes]
        print(f"batch {key[0]:>3} ctx {key[1]:>6} | " + " | ".join(cells))
    for c in res["cells"]:
        if "error" in c:
            print(f"  error at batch {c['batch']}, ctx {c['context']}, {c['mode']}: {c['error']}")
    p = res["projection"]
    if p:
        print(f"projection, the full {res['full_layers']}-layer model at batch 1 on {p['gpus']} GPUs ({p['mode']}, ctx "
              f"{p['context']}): {p['ms_per_token']:.2f} ms/token = {p['tok_s']:.0f} tok/s (compute {p['compute_ms']:.2f}"
              f" ms, all-reduces {p['allreduce_ms']:.2f} ms at an assumed {p['allreduce_us']:g} µs each); floor "
              f"{p['floor_ms']:.2f} ms ({p['floor_tok_s']:.0f} tok/s), {p['vs_floor']:.2f}x the floor")
    print("parity: " + ("ok" if res["parity_ok"] else "FAILED (see the tolerances above)"))
