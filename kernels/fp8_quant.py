"""Triton kernels that quantise to, and dequantise from, DeepSeek-V3's FP8 block format.

What FP8 e4m3 can hold
    float8_e4m3fn has 1 sign bit, 4 exponent bits (bias 7) and 3 mantissa bits: 8 steps per
    power of two, largest finite value 448, smallest normal 2^-6, subnormals down to 2^-9, no
    infinities (0x7F/0xFF are NaN). Every value must therefore be *scaled* into [-448, 448]
    before the cast, and the scale kept beside it:  real ≈ fp8 × s.

Why blocks
    One scale for a whole tensor lets a single outlier (activations have channels 100× larger
    than the rest) push every ordinary value into the subnormal range, where 3 mantissa bits
    become 1 or 0. DeepSeek-V3 keeps a scale per 1×128 tile of an activation row (one per token
    per 128 channels) and per 128×128 block of a weight, so an outlier only coarsens its own
    tile. The tile width 128 is also the K step of the GEMM (see fp8_gemm.py), which is why
    activations are tiled along K and only along K.

The three launchers
    act_quant(x)        x (..., K) → y fp8 (..., K), s float32 (..., ⌈K/128⌉);  s = max(amax, 1e-4)/448
    weight_quant(w)     w (N, K)   → q fp8 (N, K),   s float32 (⌈N/128⌉, ⌈K/128⌉)
    weight_dequant(q,s) q (N, K)   → q·s in bf16 (or the dtype asked), computed in float32

    Partial edge tiles are masked: missing elements count as 0 for the amax and are not stored.
    `scale_fmt="ue8m0"` (DeepSeek-V3.1) rounds s *up* to a power of two, done on the float's
    bits so it is exact (log2/exp2 are approximate on GPUs).

Exactness contract (tested against `dsv3.fp8`, the plain torch reference)
    The bytes are identical to torch's `((x / s).clamp(-448, 448)).to(torch.float8_e4m3fn)`:
    the divisions are IEEE round-to-nearest (`div_rn`; Triton's `/` is approximate on GPUs),
    the cast rounds to nearest-even and the clamp saturates. NaN/Inf policy (same as the
    reference): a NaN anywhere in a tile makes the tile's amax and scale NaN, so all its bytes
    are NaN; an ±Inf makes the scale Inf, so the Inf becomes NaN and its finite neighbours ±0.
    Either way a non-finite input stays visible downstream instead of being saturated away.

The interpreter caveat
    Under TRITON_INTERPRET=1 the interpreter's own float32→fp8 conversion is wrong on ties and
    on mantissa carries (triton issue 8322). The launchers then set the constexpr EXACT_ROUND,
    which rounds to the e4m3 grid explicitly in float32 arithmetic and assembles the byte from
    integer bits (`_e4m3_bits`; its float32→bfloat16 cast truncates too, so `_bf16_bits`).
    On a GPU the flag is off and the hardware cast (cvt.rn.satfinite) does the same rounding
    at no cost.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from dsv3.errors import UsageError


def interpreting() -> bool:
    """True when Triton runs these kernels in its interpreter (TRITON_INTERPRET=1 when triton was imported),
    false when it compiles them for a GPU; the one test of it for dsv3.kernels."""
    return isinstance(_act_quant_kernel, InterpretedFunction)


@triton.jit
def _nanmax(a, b):
    # tl.max drops NaNs on GPUs (max.f32 returns the other operand); we want them kept.
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _e4m3_bits(v):
    """The float8_e4m3fn byte of float32 v (|v| ≤ 448 or NaN), rounded to nearest, ties to even.

    Integer and exact float32 arithmetic only, so the interpreter's cast is never involved.
    The spacing of e4m3 values around v is ulp = 2^(max(e, -6) - 3) for v's binary exponent
    e (below 2^-6 the subnormals keep the 2^-9 spacing); v / ulp is exact (a power of two);
    adding and subtracting 1.5·2^23 rounds it to an integer with the FPU's ties-to-even, and a
    carry (1.9375 → 2.0) needs no special case. Then the byte is assembled from the rounded
    value's bits: sign, exponent rebiased from 127 to 7, the top 3 mantissa bits; subnormals
    are r·2^9. The sign comes from v, so -0.0 and tiny negatives give 0x80 as torch's cast does.
    """
    bits = v.to(tl.uint32, bitcast=True)
    sign = (bits >> 24) & 0x80
    mag = bits & 0x7FFFFFFF
    e = tl.maximum((mag >> 23).to(tl.int32), 127 - 6)  # biased exponent, subnormals share 2^-6's spacing
    ulp = ((e - 3) << 23).to(tl.float32, bitcast=True)
    inv_ulp = ((257 - e) << 23).to(tl.float32, bitcast=True)
    t = mag.to(tl.float32, bitcast=True) * inv_ulp  # exact: scaling by a power of two
    r = ((t + 12582912.0) - 12582912.0) * ulp  # 12582912 = 1.5·2^23: rint, ties to even; r is on the grid
    rb = r.to(tl.uint32, bitcast=True)
    re = (rb >> 23).to(tl.int32) - 120  # e4m3 biased exponent (bias 7 instead of 127)
    normal = (re << 3) | ((rb >> 20) & 7).to(tl.int32)
    subnormal = (r * 512.0).to(tl.int32)  # r < 2^-6: a multiple of 2^-9, 0..7
    code = tl.where(re >= 1, normal, subnormal)
    code = tl.where(mag > 0x7F800000, 0x7F, code)  # NaN
    return (code | sign.to(tl.int32)).to(tl.uint8)


@triton.jit
def _bf16_bits(v):
    """The bfloat16 bits of float32 v, rounded to nearest, ties to even (NaN kept quiet)."""
    bits = v.to(tl.uint32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    return tl.where(nan, (bits >> 16) | 0x40, rounded).to(tl.uint16)


@triton.jit
def store_cast(ptr, v, mask, EXACT_ROUND: tl.constexpr):
    """Store float32 v into ptr's dtype; under EXACT_ROUND a bf16 target is rounded on the bits."""
    if EXACT_ROUND and ptr.dtype.element_ty == tl.bfloat16:
        tl.store(ptr, _bf16_bits(v).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, v.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _ue8m0(s):
    """Round positive float32 s up to a power of two, exactly (NaN and Inf pass through)."""
    bits = s.to(tl.uint32, bitcast=True)
    up = (bits & 0x7F800000) + tl.where((bits & 0x007FFFFF) != 0, 0x00800000, 0)
    return tl.where(s != s, s, up.to(tl.float32, bitcast=True))


@triton.jit
def _to_e4m3(y, EXACT_ROUND: tl.constexpr):
    """Saturate to ±448 (keeping NaN) and cast to float8e4nv."""
    y = tl.clamp(y, -448.0, 448.0, propagate_nan=tl.PropagateNan.ALL)
    if EXACT_ROUND:
        return _e4m3_bits(y).to(tl.float8e4nv, bitcast=True)
    return y.to(tl.float8e4nv)


@triton.jit
def _act_quant_kernel(x_ptr, y_ptr, s_ptr, M, K,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, UE8M0: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """One program: BLOCK_M rows × one 128-wide K tile; one scale per row of the tile."""
    pid_m, pid_k = tl.program_id(0), tl.program_id(1)
    nbk = tl.cdiv(K, BLOCK_K)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.abs(x), 1, _nanmax)  # (BLOCK_M,)
    amax = tl.maximum(amax, 1e-4, propagate_nan=tl.PropagateNan.ALL)  # an all-zero tile gets a tiny scale, not 0
    s = tl.math.div_rn(amax, 448.0)
    if UE8M0:
        s = _ue8m0(s)
    y = _to_e4m3(tl.math.div_rn(x, s[:, None]), EXACT_ROUND)
    tl.store(y_ptr + offs, y, mask=mask)
    tl.store(s_ptr + rows.to(tl.int64) * nbk + pid_k, s, mask=rows < M)


@triton.jit
def _weight_quant_kernel(w_ptr, q_ptr, s_ptr, N, K, BLOCK: tl.constexpr, EXACT_ROUND: tl.constexpr):
    """One program: one BLOCK×BLOCK weight block, one scale."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    nbk = tl.cdiv(K, BLOCK)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    amax = tl.reduce(tl.reduce(tl.abs(w), 1, _nanmax), 0, _nanmax)
    amax = tl.maximum(amax, 1e-4, propagate_nan=tl.PropagateNan.ALL)
    s = tl.math.div_rn(amax, 448.0)
    tl.store(q_ptr + offs, _to_e4m3(tl.math.div_rn(w, s), EXACT_ROUND), mask=mask)
    tl.store(s_ptr + pid_n * nbk + pid_k, s)


@triton.jit
def _weight_dequant_kernel(q_ptr, s_ptr, y_ptr, N, K, BLOCK: tl.constexpr, EXACT_ROUND: tl.constexpr):
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    nbk = tl.cdiv(K, BLOCK)
    rows = pid_n * BLOCK + tl.arange(0, BLOCK)
    cols = pid_k * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < N) & (cols[None, :] < K)
    offs = rows[:, None].to(tl.int64) * K + cols[None, :]
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + pid_n * nbk + pid_k)
    store_cast(y_ptr + offs, q * s, mask, EXACT_ROUND)


# ---------------------------------------------------------------------------- launchers
_FLOAT_INPUTS = (torch.float32, torch.bfloat16, torch.float16)


def _check_block(block_size: int) -> None:
    if block_size != 128:
        raise UsageError(f"block_size must be 128 for the Triton kernels (the DeepSeek-V3 format), got {block_size}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise UsageError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_INPUTS:
        raise UsageError(f"{name} must be float32, bfloat16 or float16, got {t.dtype}")
    if not t.is_contiguous():
        raise UsageError(f"{name} must be contiguous (call .contiguous()), got strides {tuple(t.stride())}")


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None,
              exact_round: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (..., K) float → (y float8_e4m3fn (..., K), s float32 (..., ⌈K/128⌉)).

    `exact_round` forces the explicit e4m3 rounding on or off (default: on under the
    interpreter only); tests use it to show why it exists.
    """
    _check_block(block_size)
    _check_float("act_quant: x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        raise UsageError(f"act_quant: x must have a non-empty last axis, got shape {tuple(x.shape)}")
    if scale_fmt not in (None, "ue8m0"):
        raise UsageError(f"act_quant: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    k = x.shape[-1]
    m = x.numel() // k
    nbk = triton.cdiv(k, block_size)
    y = torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(*x.shape[:-1], nbk, dtype=torch.float32, device=x.device)
    if m == 0:
        return y, s
    exact = interpreting() if exact_round is None else exact_round
    block_m = 4 if interpreting() else 16
    grid = (triton.cdiv(m, block_m), nbk)
    _act_quant_kernel[grid](x, y, s, m, k, BLOCK_M=block_m, BLOCK_K=block_size,
                            UE8M0=scale_fmt == "ue8m0", EXACT_ROUND=exact, num_warps=4)
    return y, s


def weight_quant(w: torch.Tensor, block_size: int = 128,
                 exact_round: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (N, K) float → (q float8_e4m3fn (N, K), s float32 (⌈N/128⌉, ⌈K/128⌉))."""
    _check_block(block_size)
    _check_float("weight_quant: w", w)
    if w.dim() != 2:
        raise UsageError(f"weight_quant: w must be 2-D (N, K), got shape {tuple(w.shape)}")
    n, k = w.shape
    grid = (triton.cdiv(n, block_size), triton.cdiv(k, block_size))
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn, device=w.device)
    s = torch.empty(grid, dtype=torch.float32, device=w.device)
    if w.numel():
        exact = interpreting() if exact_round is None else exact_round
        _weight_quant_kernel[grid](w, q, s, n, k, BLOCK=block_size, EXACT_ROUND=exact, num_warps=8)
    return q, s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q (N, K) float8_e4m3fn × s (⌈N/128⌉, ⌈K/128⌉) float32 → (N, K) in `dtype`."""
    _check_block(block_size)
    if q.dtype != torch.float8_e4m3fn or q.dim() != 2:
        raise UsageError(f"weight_dequant: q must be a 2-D float8_e4m3fn tensor, got {q.dtype} {tuple(q.shape)}")
    n, k = q.shape
    want = (triton.cdiv(n, block_size), triton.cdiv(k, block_size))
    if s.dtype != torch.float32 or tuple(s.shape) != want:
        raise UsageError(f"weight_dequant: s must be float32 of shape {want} for q {tuple(q.shape)}, "
                         f"got {s.dtype} {tuple(s.shape)}")
    if not (q.is_contiguous() and s.is_contiguous()):
        raise UsageError("weight_dequant: q and s must be contiguous")
    if q.device != s.device:
        raise UsageError(f"weight_dequant: q is on {q.device} but s on {s.device}")
    if dtype not in _FLOAT_INPUTS:
        raise UsageError(f"weight_dequant: dtype must be float32, bfloat16 or float16, got {dtype}")
    y = torch.empty(n, k, dtype=dtype, device=q.device)
    if q.numel():
        _weight_dequant_kernel[want](q, s, y, n, k, BLOCK=block_size, EXACT_ROUND=interpreting(), num_warps=8)
    return y
