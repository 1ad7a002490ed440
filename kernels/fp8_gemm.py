"""The block-scaled FP8 GEMM of DeepSeek-V3, as a Triton kernel.

What it computes
    a (M, K) float8_e4m3fn with one float32 scale per row per 128 columns, a_s (M, ⌈K/128⌉);
    b (N, K) float8_e4m3fn (a Linear weight, out × in) with one scale per 128×128 block,
    b_s (⌈N/128⌉, ⌈K/128⌉). The output is

        C[m, n] = Σ_kb ( Σ_{k ∈ kb} a[m, k] · b[n, k] ) · a_s[m, kb] · b_s[n // 128, kb]

    i.e. for each 128-wide slice kb of K: an FP8 × FP8 tile product on the tensor cores,
    then one multiply by the two scales of that slice, added to a float32 accumulator.

Why the K step is exactly 128
    Inside one K slice every a[m, k] shares the scale a_s[m, kb] and every b[n, k] shares
    b_s[n // 128, kb], so the scales factor out of the inner sum and the tensor cores can
    multiply raw FP8 bytes. A K tile wider than 128 would mix two scales in one product;
    a narrower one works but wastes the scale multiply. It also bounds the precision problem
    the DeepSeek-V3 report points out: Hopper's FP8 MMA accumulates in ~22-bit precision, so
    promoting each 128-term partial sum into a true float32 accumulator (the `acc +=` below)
    keeps long K (up to 18432 here) from losing bits: measured on an H200, the error against a
    float64 product is ~1.3e-4 (≈ 2^-13) relative for K = 512 and K = 7168 alike.

Tiles and launch
    Each program computes one BLOCK_M × BLOCK_N tile of C, walking K in 128-steps. Programs
    are ordered in groups of GROUP_M row-tiles so neighbouring programs reuse the same columns
    of b from L2. Rows and columns past M and N wrap (`% M`, `% N`) so the loads need no mask
    and the stores are masked; K is masked only because its last slice may be partial (the
    masked elements load as 0 and add nothing). On GPUs triton.autotune picks the tile sizes
    per (N, K, M bucket); under TRITON_INTERPRET=1 a fixed small tile is used. With few rows
    (decode, M ≤ 64) a second variant also splits K over SPLIT_K programs that add their float32
    partial sums atomically into a zeroed buffer (the summation order then varies run to run,
    by float32 rounding only); otherwise there would be only N / BLOCK_N programs for 132 SMs.

    Leading batch dims of `a` are flattened into M. The output dtype is bfloat16 by default.
    Under the interpreter the float32→bfloat16 cast is done on the bits (see fp8_quant.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
import triton.testing

from dsv3.errors import UsageError
from dsv3.kernels.fp8_quant import interpreting, store_cast

BLOCK_K = 128  # = the scale block: see "Why the K step is exactly 128"


@triton.jit
def _fp8_gemm_kernel(a_ptr, b_ptr, c_ptr, a_s_ptr, b_s_ptr, M, N, K, M_BUCKET,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr, ATOMIC: tl.constexpr, EXACT_ROUND: tl.constexpr):
    # M_BUCKET only keys the autotuner (one tuning per power-of-two range of M).
    # ATOMIC: c is a zeroed float32 buffer and each of the SPLIT_K programs along axis 1 adds
    # the partial sum of its share of the K blocks (decode: few rows, so split K for parallelism).
    pid = tl.program_id(0)
    grid_m, grid_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    # grouped ordering: GROUP_M row-tiles share a column-tile of b while it is in L2
    group = pid // (GROUP_M * grid_n)
    first_m = group * GROUP_M
    group_m = tl.minimum(grid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * grid_n)) % group_m
    pid_n = (pid % (GROUP_M * grid_n)) // group_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)) % M  # wrapped rows: loads need no mask
    offs_n = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)) % N
    offs_k = tl.arange(0, BLOCK_K)
    nbk = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(nbk, SPLIT_K)
    kb_first = tl.program_id(1) * per_split
    kb_last = tl.minimum(kb_first + per_split, nbk)
    k0 = kb_first * BLOCK_K
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * K + (k0 + offs_k[None, :])  # (BLOCK_M, BLOCK_K)
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * K + (k0 + offs_k[:, None])  # (BLOCK_K, BLOCK_N): bᵀ
    a_s_ptrs = a_s_ptr + offs_m * nbk
    b_s_ptrs = b_s_ptr + (offs_n // BLOCK_K) * nbk  # the weight's block row of each column

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(kb_first, kb_last):
        k_left = K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        a_s = tl.load(a_s_ptrs + kb)
        b_s = tl.load(b_s_ptrs + kb)
        # one 128-deep FP8 product, promoted to float32 with both scales
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ptrs = c_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    c_mask = (rows[:, None] < M) & (cols[None, :] < N)
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=c_mask)
    else:
        store_cast(c_ptrs, acc, c_mask, EXACT_ROUND)


SPLIT_M = 64  # split K only for at most this many rows (decode) ...


def _gpu_configs() -> list[triton.Config]:
    """One program per output tile: a small search space, so the first call of each shape tunes quickly."""
    cfgs = []
    for bm, bn, warps, stages in [(16, 64, 4, 5), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 4),
                                  (64, 256, 8, 3), (128, 128, 8, 4), (128, 256, 8, 3)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "SPLIT_K": 1}, num_warps=warps,
                                  num_stages=stages))
    return cfgs


def _zero_c(nargs) -> None:
    nargs["c_ptr"].zero_()


def _gpu_split_configs() -> list[triton.Config]:
    """Decode tiles: few rows, so N / BLOCK_N programs alone cannot fill 132 SMs while each walks
    all of K; splitting K over 2–8 programs (float32 atomic adds) streams the weight in parallel."""
    cfgs = []
    for bm, bn, split, stages in [(16, 32, 4, 6), (16, 64, 1, 5), (16, 64, 2, 5), (16, 64, 4, 5), (16, 64, 8, 4),
                                  (16, 128, 2, 4), (16, 128, 4, 4), (32, 64, 4, 4), (64, 64, 4, 4)]:
        cfgs.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "GROUP_M": 8, "SPLIT_K": split}, num_warps=4,
                                  num_stages=stages, pre_hook=_zero_c))
    return cfgs


def _prune(configs, named_args, **kwargs):
    """Drop tiles much taller than M (decode): they only multiply wasted rows."""
    m = named_args["M"]
    keep = [c for c in configs if c.kwargs["BLOCK_M"] <= max(16, triton.next_power_of_2(m))]
    return keep or configs[:1]


def _quick_bench(fn, quantiles=None):
    """Shorter timing than the autotuner's default (25 + 100 ms per config): DeepSeek-V3 has
    dozens of (N, K, M) shapes and each one tunes once, on its first call."""
    return triton.testing.do_bench(fn, warmup=5, rep=20, quantiles=quantiles)


def _autotune(**kw):
    try:
        return triton.autotune(do_bench=_quick_bench, **kw)
    except TypeError:  # a triton without the do_bench hook (< 3.2): default timing
        return triton.autotune(**kw)


_fp8_gemm_tuned = _autotune(configs=_gpu_configs(), key=["N", "K", "M_BUCKET"],
                            prune_configs_by={"early_config_prune": _prune})(_fp8_gemm_kernel)
_fp8_gemm_split_tuned = _autotune(configs=_gpu_split_configs(), key=["N", "K", "M_BUCKET"],
                                  prune_configs_by={"early_config_prune": _prune})(_fp8_gemm_kernel)


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """a (..., K) fp8, a_s (..., ⌈K/128⌉) float32; b (N, K) fp8, b_s (⌈N/128⌉, ⌈K/128⌉) float32 → (..., N)."""
    for name, t, want in (("a", a, torch.float8_e4m3fn), ("a_s", a_s, torch.float32),
                          ("b", b, torch.float8_e4m3fn), ("b_s", b_s, torch.float32)):
        if not isinstance(t, torch.Tensor):
            raise UsageError(f"fp8_gemm: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != want:
            raise UsageError(f"fp8_gemm: {name} must be {want}, got {t.dtype}")
        if not t.is_contiguous():
            raise UsageError(f"fp8_gemm: {name} must be contiguous (call .contiguous()), got strides {tuple(t.stride())}")
        if t.device != a.device:
            raise UsageError(f"fp8_gemm: {name} is on {t.device} but a is on {a.device}")
    if a.dim() < 1 or b.dim() != 2:
        raise UsageError(f"fp8_gemm: a must be (..., K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    k, (n, kb_) = a.shape[-1], b.shape
    if kb_ != k:
        raise UsageError(f"fp8_gemm: K mismatch: a (..., K={k}) but b (N={n}, K={kb_})")
    nbk = triton.cdiv(k, BLOCK_K)
    if tuple(a_s.shape) != (*a.shape[:-1], nbk):
        raise UsageError(f"fp8_gemm: a_s must have shape {(*a.shape[:-1], nbk)} for a {tuple(a.shape)}, got {tuple(a_s.shape)}")
    if tuple(b_s.shape) != (triton.cdiv(n, BLOCK_K), nbk):
        raise UsageError(f"fp8_gemm: b_s must have shape {(triton.cdiv(n, BLOCK_K), nbk)} for b {tuple(b.shape)}, "
                         f"got {tuple(b_s.shape)}")
    if out_dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise UsageError(f"fp8_gemm: out_dtype must be bfloat16, float16 or float32, got {out_dtype}")
    m = a.numel() // k if k else 0
    c = torch.empty(*a.shape[:-1], n, dtype=out_dtype, device=a.device)
    if m == 0 or n == 0:
        return c
    if k == 0:
        return c.zero_()
    if interpreting():  # fixed small tiles; both variants, as on a GPU
        bm, bn, split = 16, 32, (2 if m <= SPLIT_M else 1)
        out = c if split == 1 or out_dtype == torch.float32 else torch.zeros(c.shape, dtype=torch.float32)
        if split > 1:
            out.zero_()
        grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
        _fp8_gemm_kernel[grid](a, b, out, a_s, b_s, m, n, k, 0, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=BLOCK_K,
                               GROUP_M=4, SPLIT_K=split, ATOMIC=split > 1, EXACT_ROUND=True)
        return c if out is c else c.copy_(out)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])
    m_bucket = min(triton.next_power_of_2(m), 4096)
    # ... and only when 16×64 output tiles alone would leave SMs idle (measured on an H200: splitting
    # N = 24576 or 32768 at M = 1 was 3× slower, N ≤ 7168 up to 2× faster)
    n_sm = torch.cuda.get_device_properties(a.device).multi_processor_count
    if m > SPLIT_M or triton.cdiv(m, 16) * triton.cdiv(n, 64) >= n_sm:
        _fp8_gemm_tuned[grid](a, b, c, a_s, b_s, m, n, k, m_bucket, BLOCK_K=BLOCK_K, ATOMIC=False, EXACT_ROUND=False)
        return c
    acc = c if out_dtype == torch.float32 else torch.empty(c.shape, dtype=torch.float32, device=c.device)
    _fp8_gemm_split_tuned[grid](a, b, acc, a_s, b_s, m, n, k, m_bucket, BLOCK_K=BLOCK_K, ATOMIC=True,
                                EXACT_ROUND=False)  # the configs' pre_hook zeroes acc before each run
    return c if acc is c else c.copy_(acc)
