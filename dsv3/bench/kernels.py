"""FP8 block-scaled GEMM vs bf16 matmul vs torch._scaled_mm on DeepSeek-V3's shapes (TFLOP/s, share of peak).

The work behind `dsv3 bench kernels`. What it computes, and why, is the command's description: the
docstring of `dsv3/cli/bench/kernels.py` (what `dsv3 bench kernels --help` shows), kept there so that --help needs no torch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from functools import partial

import torch

from dsv3 import fp8
from dsv3.errors import UsageError
from dsv3.outputs import check_output_path, write_atomic

MS = (1, 16, 128, 1024, 4096)
NKS = ((24576, 1536), (32768, 512), (7168, 16384), (18432, 7168), (7168, 18432), (2048, 7168), (7168, 2048),
       (576, 7168))
QUICK_MS = (1, 16)
QUICK_NKS = ((256, 256), (192, 320))

# dense (no sparsity) peaks in TFLOP/s: (bf16, fp8), from the vendors' data sheets
PEAKS = {
    "H200": (989.5, 1979.0),
    "H100 SXM": (989.5, 1979.0), "H100 80GB HBM3": (989.5, 1979.0), "H800": (989.5, 1979.0),
    "H100 PCIe": (756.0, 1513.0), "H100 NVL": (835.0, 1671.0), "H20": (148.0, 296.0),
    "L40S": (362.0, 733.0), "L4": (121.0, 242.0), "B200": (2250.0, 4500.0),
}


def _card_peaks(name: str) -> tuple[float | None, float | None]:
    for key in sorted(PEAKS, key=len, reverse=True):
        if key in name:
            return PEAKS[key]
    return None, None


def _scaled_mm(torch, a, b_t, sa, sb):
    """torch._scaled_mm across versions: older ones return (out, amax), newer just out."""
    out = torch._scaled_mm(a, b_t, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)
    return out[0] if isinstance(out, tuple) else out


def run(ns: argparse.Namespace) -> int:
    cuda = torch.cuda.is_available()
    if not cuda and not ns.quick:
        raise UsageError("bench kernels: the full DeepSeek-V3 shape set needs a CUDA GPU; use --quick on CPU")
    if not cuda and "triton" not in sys.modules:
        # Triton can only interpret on CPU, and decides so when it is first imported.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    if ns.json_out:
        check_output_path(ns.json_out, "--json-out")  # before the measurements, not after
    ms = ns.m or (QUICK_MS if ns.quick else MS)
    nks = QUICK_NKS if ns.quick else NKS


    impl, gemm, quant, weight_quant = _implementation(cuda)
    device = "cuda" if cuda else "cpu"
    card = torch.cuda.get_device_name() if cuda else "cpu"
    peak_bf16, peak_fp8 = _card_peaks(card) if cuda else (None, None)
    peak_bf16, peak_fp8 = ns.peak_bf16 or peak_bf16, ns.peak_fp8 or peak_fp8
    timeit = partial(_seconds_per_call, cuda=cuda, rep_ms=ns.rep_ms)

    result = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "device": card, "impl": impl,
              "torch": torch.__version__, "peak_tflops": {"bf16": peak_bf16, "fp8": peak_fp8},
              "quick": bool(ns.quick), "rows": []}
    if cuda:
        import triton

        result["triton"] = triton.__version__
    rows = result["rows"]
    if not ns.json:
        _print_head(result)
    gen = torch.Generator(device=device).manual_seed(0)
    for n, k in nks:
        w = torch.randn(n, k, device=device, generator=gen) * 0.02
        wq, ws = weight_quant(w)
        w16 = w.to(torch.bfloat16)
        wdeq = fp8.weight_dequant(wq, ws, dtype=torch.float32)
        for m in ms:
            x = torch.randn(m, k, device=device, generator=gen, dtype=torch.bfloat16)
            row = _measure(x, wq, ws, w16, wdeq, gemm=gemm, quant=quant, timeit=timeit, gen=gen,
                           peak_bf16=peak_bf16, peak_fp8=peak_fp8)
            rows.append(row)
            if not ns.json:
                _print_row(row)  # as it comes: the first autotuning of each shape takes a while

    if ns.json:
        print(json.dumps(result))
    else:
        _print_notes(result)
    if ns.json_out:
        write_atomic(ns.json_out, json.dumps(result, indent=1), "--json-out")
    return 0


def _implementation(cuda: bool):
    """(name, fp8 GEMM, activation quantiser, weight quantiser): the Triton kernels on CUDA or under the
    interpreter, else the torch references of dsv3.fp8."""

    impl, gemm, quant = "torch reference", fp8.fp8_gemm, fp8.act_quant
    weight_quant = fp8.weight_quant
    try:
        from dsv3.kernels import fp8_gemm as kgemm
        from dsv3.kernels import fp8_quant as kquant

        if cuda or kquant.interpreting():
            impl = "triton interpreter" if kquant.interpreting() else "triton"
            gemm, quant = kgemm.fp8_gemm, kquant.act_quant
        if cuda:
            weight_quant = kquant.weight_quant
    except ImportError:
        if cuda:
            raise
    return impl, gemm, quant, weight_quant


def _seconds_per_call(fn, *, cuda: bool, rep_ms: float) -> float:
    """Seconds per call."""
    if cuda:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=max(5.0, rep_ms / 4), rep=rep_ms) * 1e-3
    fn()
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _measure(x, wq, ws, w16, wdeq, *, gemm, quant, timeit, gen, peak_bf16, peak_fp8) -> dict:
    """One table row: x (M, K) bf16 times the (N, K) weight three ways, and fp8_gemm's error against float32."""

    (m, k), n = x.shape, w16.shape[0]
    xq, xs = quant(x)
    flops = 2.0 * m * n * k
    out = gemm(xq, xs, wq, ws)
    xdeq = (torch.nn.functional.pad(xq.float(), (0, (-k) % 128)).unflatten(-1, (-1, 128)) * xs[..., None])
    ref = xdeq.flatten(-2)[:, :k] @ wdeq.T
    err = ((out.float() - ref).norm() / ref.norm()).item()
    t_fp8 = timeit(partial(gemm, xq, xs, wq, ws))
    t_bf16 = timeit(partial(torch.matmul, x, w16.T))
    t_smm, smm_note = None, None
    try:
        sa = torch.rand(m, 1, device=x.device, generator=gen) + 0.5
        sb = torch.rand(1, n, device=x.device, generator=gen) + 0.5
        bt = wq.T  # (K, N) column-major, as cuBLAS wants the second operand
        _scaled_mm(torch, xq, bt, sa, sb)
        t_smm = timeit(partial(_scaled_mm, torch, xq, bt, sa, sb))
    except Exception as e:  # not supported by this torch / GPU / shape
        smm_note = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    row = {"M": m, "N": n, "K": k, "err": err,
           "fp8_gemm_tflops": flops / t_fp8 / 1e12, "bf16_tflops": flops / t_bf16 / 1e12,
           "scaled_mm_tflops": flops / t_smm / 1e12 if t_smm else None}
    row["fp8_pct_peak"] = 100 * row["fp8_gemm_tflops"] / peak_fp8 if peak_fp8 else None
    row["bf16_pct_peak"] = 100 * row["bf16_tflops"] / peak_bf16 if peak_bf16 else None
    row["scaled_mm_pct_peak"] = 100 * row["scaled_mm_tflops"] / peak_fp8 if peak_fp8 and t_smm else None
    row["fp8_vs_bf16"] = t_bf16 / t_fp8
    row["fp8_vs_scaled_mm"] = t_smm / t_fp8 if t_smm else None
    if smm_note:
        row["scaled_mm_note"] = smm_note
    return row


def _fmt(v, width: int, prec: int = 1) -> str:
    if v is None:
        return "-".rjust(width)
    return f"{v:>{width}.{prec if abs(v) >= 1 else 3}f}"


HEAD = (f"{'M':>5} {'N':>6} {'K':>6} | {'fp8_gemm':>8} {'%pk':>5} | {'bf16':>8} {'%pk':>5} | "
        f"{'scaled_mm':>9} {'%pk':>5} | {'fp8/bf16':>8} {'fp8/smm':>8} | {'err':>7}")


def _print_head(r: dict) -> None:
    pk = r["peak_tflops"]
    print(f"# {r['date']}  {r['device']}  fp8_gemm={r['impl']}  torch {r['torch']}  "
          f"peak TFLOP/s bf16={_fmt(pk['bf16'], 0, 0).strip()} fp8={_fmt(pk['fp8'], 0, 0).strip()}")
    if r["quick"] and r["device"] == "cpu":
        print("# CPU --quick: checks the command end to end; the timings are not meaningful")
    print("# TFLOP/s (2·M·N·K / time); %pk against the card's dense peak for the input type; err = fp8_gemm vs fp32")
    print(HEAD)
    print("-" * len(HEAD), flush=True)


def _print_row(x: dict) -> None:
    print(f"{x['M']:>5} {x['N']:>6} {x['K']:>6} | {_fmt(x['fp8_gemm_tflops'], 8)} {_fmt(x['fp8_pct_peak'], 5)} | "
          f"{_fmt(x['bf16_tflops'], 8)} {_fmt(x['bf16_pct_peak'], 5)} | "
          f"{_fmt(x['scaled_mm_tflops'], 9)} {_fmt(x['scaled_mm_pct_peak'], 5)} | "
          f"{_fmt(x['fp8_vs_bf16'], 7, 2)}x {_fmt(x['fp8_vs_scaled_mm'], 7, 2)}x | {x['err']:>7.1e}", flush=True)


def _print_notes(r: dict) -> None:
    notes = {x.get("scaled_mm_note") for x in r["rows"]} - {None}
    for note in sorted(notes):
        print(f"# scaled_mm unavailable: {note}")

