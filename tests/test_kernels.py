"""The Triton kernels of dsv3.kernels against the torch references of dsv3.fp8 and float64.

Every check runs twice: on CPU through the Triton interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py before triton is imported), and on CUDA with the real compiler (marked
`gpu`, skipped without CUDA). FP8 bytes must be
identical to the reference (NaN compared by position), GEMMs within stated ‖out−ref‖/‖ref‖.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from dsv3 import ModelArgs, Transformer, fp8
from dsv3.errors import UsageError

pytest.importorskip("triton")
# the interpreter runs numpy on NaN/Inf inputs on purpose (the NaN/Inf policy tests)
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _kernels(device: str) -> SimpleNamespace:
    from dsv3.kernels import fp8_gemm as gemm
    from dsv3.kernels import fp8_quant as quant

    return SimpleNamespace(quant=quant, gemm=gemm, device=device, interp=quant.interpreting())


@pytest.fixture(scope="module")
def interpreted():
    """The kernels as run by the Triton interpreter on CPU tensors (tests/conftest.py sets
    TRITON_INTERPRET=1 before triton is imported when there is no CUDA)."""
    k = _kernels("cpu")
    if not k.interp:
        pytest.skip("triton was imported without TRITON_INTERPRET=1 (a CUDA machine): the `cuda` variant runs instead")
    return k


@pytest.fixture(scope="module")
def compiled():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    k = _kernels("cuda")
    if k.interp:
        pytest.skip("TRITON_INTERPRET=1 in this process: the compiled kernels are not available")
    return k


@pytest.fixture(params=["interpreter", pytest.param("cuda", marks=pytest.mark.gpu)])
def k(request):
    return request.getfixturevalue("interpreted" if request.param == "interpreter" else "compiled")


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.cpu(), b.cpu()
    na, nb = torch.isnan(a.float()), torch.isnan(b.float())
    return a.shape == b.shape and torch.equal(na, nb) and torch.equal(a.view(torch.uint8)[~na], b.view(torch.uint8)[~nb])


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.cpu().double(), ref.cpu().double()
    return ((out - ref).norm() / ref.norm()).item()


def tie_values() -> torch.Tensor:
    """All midpoints between neighbouring e4m3 values, ±: the ties (and the carries, e.g. 1.9375 → 2)."""
    g = torch.arange(0x7F, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (g[1:] + g[:-1]) / 2
    return torch.cat([mids, -mids])


ACT_SHAPES = [(1, 128), (5, 200), (2, 3, 300), (3, 1), (33, 256)]


# ------------------------------------------------------------------------------------ act_quant
@pytest.mark.parametrize("shape", ACT_SHAPES)
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_act_quant_bytes_match_reference(k, shape, scale_fmt, dtype):
    torch.manual_seed(0)
    x = (torch.randn(shape) * torch.logspace(-2, 3, shape[-1])).to(dtype)
    y, s = k.quant.act_quant(x.to(k.device), scale_fmt=scale_fmt)
    yr, sr = fp8.act_quant(x, scale_fmt=scale_fmt)
    assert same_bytes(y, yr) and torch.equal(s.cpu(), sr)


def test_act_quant_ties_and_carries(k):
    """Rows [448, v...] have scale exactly 1, so y is the cast of v itself: every e4m3 tie."""
    v = tie_values()
    v = torch.nn.functional.pad(v, (0, (-len(v)) % 127)).reshape(-1, 127)
    x = torch.cat([torch.full((len(v), 1), 448.0), v], dim=1)  # one 128-wide tile per row
    ref = x.clamp(-448, 448).to(torch.float8_e4m3fn)
    y, s = k.quant.act_quant(x.to(k.device))
    assert torch.equal(s.cpu(), torch.ones_like(s.cpu())) and same_bytes(y, ref)
    raw, _ = k.quant.act_quant(x.to(k.device), exact_round=False)
    wrong = raw.cpu().view(torch.uint8) != ref.view(torch.uint8)
    if k.interp:
        # The interpreter's own float32→fp8 cast (triton issue 8322) gets ties/carries wrong: this is why
        # EXACT_ROUND exists. If this stops failing, the bug is fixed upstream and the flag can go.
        assert wrong.any(), "interpreter fp8 cast now rounds ties correctly: EXACT_ROUND may be unnecessary"
        assert torch.equal(y.cpu().view(torch.uint8), ref.view(torch.uint8))
    else:
        assert not wrong.any(), "the hardware cast must round to nearest even by itself"
        exact, _ = k.quant.act_quant(x.to(k.device), exact_round=True)  # the interpreter's path, compiled
        assert same_bytes(exact, ref)


def test_act_quant_edge_values(k):
    x = torch.randn(4, 256)
    x[0, :128] = 0.0  # all-zero tile: the 1e-4 floor
    x[0, 5] = -0.0
    x[1] = torch.linspace(-5000, 5000, 256)  # beyond ±448 before scaling
    x[2, 3] = float("nan")
    x[3, 200] = float("inf")
    x[3, 10] = float("-inf")
    y, s = k.quant.act_quant(x.to(k.device))
    yr, sr = fp8.act_quant(x)
    assert same_bytes(y, yr) and torch.equal(torch.isnan(s.cpu()), torch.isnan(sr))
    assert torch.equal(s.cpu().nan_to_num(), sr.nan_to_num())
    assert y.cpu()[0, 5].view(torch.uint8).item() == 0x80
    assert s.cpu()[0, 0].item() == pytest.approx(1e-4 / 448)
    assert torch.isnan(y.cpu()[2, :128].float()).all() and torch.isinf(s.cpu()[3]).all()


def test_weight_quant_and_dequant_match_reference(k):
    torch.manual_seed(1)
    shapes = [(130, 200), (1, 7)] if k.interp else [(128, 128), (130, 200), (1, 7), (257, 300), (7168, 2048)]
    for shape in shapes:  # the interpreter takes ~0.4 s per 128×128 block
        w = torch.randn(shape) * 0.05
        w[0, 0] = 7.0
        q, s = k.quant.weight_quant(w.to(k.device))
        qr, sr = fp8.weight_quant(w)
        assert same_bytes(q, qr) and torch.equal(s.cpu(), sr), shape
        for dtype in (torch.bfloat16, torch.float32, torch.float16):
            d = k.quant.weight_dequant(q, s, dtype=dtype)
            assert d.dtype == dtype and torch.equal(d.cpu(), fp8.weight_dequant(qr, sr, dtype=dtype)), (shape, dtype)


# ------------------------------------------------------------------------------------ fp8_gemm
# M ≤ 64 goes through the split-K variant (atomic float32 adds), larger M through one program per tile
GEMM_SHAPES = [((1,), 128, 256), ((7,), 130, 200), ((2, 3), 257, 300), ((33,), 64, 384), ((4,), 1, 129),
               ((3, 27), 96, 200)]


@pytest.mark.parametrize("lead,n,kdim", GEMM_SHAPES)
def test_fp8_gemm_against_reference_and_float64(k, lead, n, kdim):
    torch.manual_seed(2)
    x, w = torch.randn(*lead, kdim), torch.randn(n, kdim) * 0.05
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    dev = lambda *ts: [t.to(k.device) for t in ts]
    out = k.gemm.fp8_gemm(*dev(xq, xs, wq, ws), out_dtype=torch.float32)
    ref = fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    a = torch.nn.functional.pad(xq.double(), (0, (-kdim) % 128)).unflatten(-1, (-1, 128)) * xs.double()[..., None]
    exact = a.flatten(-2)[..., :kdim] @ fp8.weight_dequant(wq, ws, dtype=torch.float64).T
    assert out.shape == (*lead, n)
    tol = 1e-6 if k.interp or math.prod(lead) <= 16 else 4e-4  # BLOCK_M ≥ 64 may use wgmma: see below
    assert rel(out, ref) < tol and rel(out, exact) < tol
    out16 = k.gemm.fp8_gemm(*dev(xq, xs, wq, ws))
    assert out16.dtype == torch.bfloat16 and rel(out16, exact) < 2**-8
    assert rel(out, x.double() @ w.double().T) < 0.08  # what FP8 costs against the unquantised product


def test_fp8_gemm_nan_row_and_zero_blocks(k):
    torch.manual_seed(3)
    x = torch.randn(5, 256)
    x[1, :128] = 0.0  # all-zero activation tile: contributes exactly 0
    x[3, 17] = float("nan")
    w = torch.randn(100, 256) * 0.05
    w[:, 128:] = 0.0  # all-zero weight blocks
    xq, xs = fp8.act_quant(x)
    wq, ws = fp8.weight_quant(w)
    out = k.gemm.fp8_gemm(*[t.to(k.device) for t in (xq, xs, wq, ws)], out_dtype=torch.float32).cpu()
    assert torch.isnan(out[3]).all() and torch.isfinite(out[[0, 1, 2, 4]]).all()
    assert torch.equal(out[1], torch.zeros(100))
    assert rel(out[[0, 2, 4]], fp8.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)[[0, 2, 4]]) < 1e-6


def test_bad_arguments_raise_clear_errors(k):
    xq, xs = fp8.act_quant(torch.randn(4, 256))
    wq, ws = fp8.weight_quant(torch.randn(64, 256))
    xq, xs, wq, ws = (t.to(k.device) for t in (xq, xs, wq, ws))
    g, q = k.gemm.fp8_gemm, k.quant
    with pytest.raises(UsageError, match="a must be torch.float8_e4m3fn"):
        g(xq.float(), xs, wq, ws)
    with pytest.raises(UsageError, match="K mismatch"):
        g(xq[:, :200].contiguous(), xs, wq, ws)
    with pytest.raises(UsageError, match="b_s must have shape"):
        g(xq, xs, wq, ws[:, :1].contiguous())
    with pytest.raises(UsageError, match="a_s must have shape"):
        g(xq, xs[:3], wq, ws)
    with pytest.raises(UsageError, match="contiguous"):
        g(xq, xs, wq.t().contiguous().t(), ws)
    with pytest.raises(UsageError, match="out_dtype"):
        g(xq, xs, wq, ws, out_dtype=torch.int32)
    with pytest.raises(UsageError, match="block_size must be 128"):
        q.act_quant(torch.randn(2, 64, device=k.device), block_size=64)
    with pytest.raises(UsageError, match="float32, bfloat16 or float16"):
        q.act_quant(torch.ones(2, 128, dtype=torch.int32, device=k.device))
    with pytest.raises(UsageError, match="scale_fmt"):
        q.act_quant(torch.randn(2, 128, device=k.device), scale_fmt="e8m0")
    with pytest.raises(UsageError, match="2-D"):
        q.weight_quant(torch.randn(2, 3, 128, device=k.device))
    with pytest.raises(UsageError, match="s must be float32 of shape"):
        q.weight_dequant(wq, ws[:, :1].contiguous())


# ------------------------------------------------------------------------------------ GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("m,n,kdim", [(1, 7168, 2048), (16, 576, 7168), (300, 1536, 7168), (1024, 2048, 512)])
def test_fp8_gemm_model_shapes_on_gpu(compiled, m, n, kdim):
    """Model-sized shapes through the autotuned kernel (every tile config the pruner keeps)."""
    torch.manual_seed(4)
    x = torch.randn(m, kdim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, kdim, device="cuda") * 0.02
    xq, xs = compiled.quant.act_quant(x)
    wq, ws = compiled.quant.weight_quant(w)
    out = compiled.gemm.fp8_gemm(xq, xs, wq, ws, out_dtype=torch.float32)
    ref = fp8.fp8_gemm(xq.cpu(), xs.cpu(), wq.cpu(), ws.cpu(), out_dtype=torch.float32)
    # Hopper's FP8 tensor-core MMA (wgmma, BLOCK_M ≥ 64) keeps only ~14 bits while it sums one
    # 128-deep K block: measured 1.3e-4 ≈ 2^-13 for K = 512 and K = 7168 alike, i.e. it does not
    # grow with K because every block is promoted to float32. (mma.sync tiles are exact to ~1e-7.)
    assert rel(out, ref) < 4e-4


@pytest.mark.gpu
def test_model_fp8_path_vs_bf16_path_on_gpu(compiled):
    torch.manual_seed(5)
    args = ModelArgs.preset("tiny", dtype="fp8")
    m16 = Transformer(args).cuda()
    m8 = Transformer(args.replace(gemm_impl="fp8")).cuda()
    m8.load_state_dict(m16.state_dict())
    m8_cpu = Transformer(args.replace(gemm_impl="fp8"))
    m8_cpu.load_state_dict(m16.state_dict())
    tokens = torch.randint(0, args.vocab_size, (2, 9))
    with torch.no_grad():
        l16, l8, l8_cpu = m16(tokens.cuda()), m8(tokens.cuda()), m8_cpu(tokens)
    assert torch.isfinite(l8).all()
    assert rel(l8, l16) < 0.1  # fp8 GEMMs vs dequantised weights: the cost of FP8 activations (~0.05)
    assert rel(l8, l8_cpu) < 1e-4  # Triton kernels vs the torch reference of the same arithmetic


# ------------------------------------------------------------------------------------ benchmark command
def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsv3.cli", *args], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_bench_kernels_quick_runs_end_to_end():
    r = _cli("bench", "kernels", "--quick", "--json", "--m", "1,3")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert [(x["M"], x["N"], x["K"]) for x in out["rows"]] == [(1, 256, 256), (3, 256, 256), (1, 192, 320), (3, 192, 320)]
    for x in out["rows"]:
        assert x["err"] < 2**-7  # the kernel (or reference) against a float32 matmul, bf16 output
        assert x["fp8_gemm_tflops"] > 0 and x["bf16_tflops"] > 0 and x["fp8_vs_bf16"] > 0
    if not torch.cuda.is_available():
        assert out["impl"] == "triton interpreter" and out["device"] == "cpu"


def test_bench_kernels_needs_quick_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("this checks the CPU-only error")
    r = _cli("bench", "kernels", "--m", "1")
    assert r.returncode == 2 and "use --quick" in r.stderr and "Traceback" not in r.stderr
