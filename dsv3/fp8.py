"""FP8 block formats of DeepSeek-V3 and their plain torch references.

Weights: float8_e4m3fn with one float32 scale per 128×128 block (HF name
`weight_scale_inv`, although it is a multiplier: real = fp8 × scale); edge blocks
may be partial. Activations: one scale per token per 128 channels,
s = max(amax, 1e-4) / 448. The GEMM accumulates each 128-wide K block in float32
and multiplies the partial sum by both scales:

    C[m, n] = Σ_kb (Σ_{k ∈ kb} a[m, k] · b[n, k]) · a_s[m, kb] · b_s[n // 128, kb]

These functions are what runs on CPU and the oracle the Triton kernels in
`dsv3.kernels` are tested against. On CUDA, `fp8_linear` dispatches to the kernels
(imported lazily: the model runs without triton).

Exactness. Quantisation is defined as torch's own cast of the scaled values,
`(x / s).clamp(-448, 448).to(torch.float8_e4m3fn)`: IEEE float32 division, then
round-to-nearest-even onto the e4m3 grid, saturating at ±448 (torch's cast alone
would turn values past 464 into NaN, hence the clamp). The Triton kernels produce
the same bytes. `ue8m0` scales are rounded up to a power of two on the float's bits,
exactly (`ceil(log2(s))` in float32 can round down for s just above a power of two).

NaN/Inf policy (kernels and references alike). A NaN anywhere in a tile makes the
tile's amax, hence its scale, NaN: every element of the tile quantises to NaN.
An ±Inf makes the scale Inf: the Inf itself becomes NaN (Inf/Inf) and its finite
neighbours ±0. Either way the tile's partial sums in `fp8_gemm` are NaN and so is
every output of that row: a non-finite activation is never silently saturated to
±448. NaN bytes may differ in their sign bit between torch and a GPU; compare NaN
positions, not NaN bytes. The amax floor 1e-4 keeps an all-zero tile's scale
positive (it quantises to zeros, -0.0 stays -0.0).
"""

from __future__ import annotations

import torch

from dsv3 import cpu_bf16
from dsv3.errors import UsageError

E4M3_MAX = 448.0
AMAX_FLOOR = 1e-4


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pad_to_blocks(x: torch.Tensor, block_size: int, dims: tuple[int, ...]) -> torch.Tensor:
    pad: list[int] = []
    for d in range(x.dim() - 1, -1, -1):
        extra = (-x.shape[d]) % block_size if d in dims else 0
        pad += [0, extra]
    return torch.nn.functional.pad(x, pad) if any(pad) else x


def round_scale_ue8m0(s: torch.Tensor) -> torch.Tensor:
    """Round positive float32 scales up to the next power of two, exactly (NaN and Inf pass through).

    Done on the bits: keep the exponent, add one to it if any mantissa bit is set.
    """
    bits = s.float().view(torch.int32)
    up = (bits & 0x7F800000) + torch.where((bits & 0x007FFFFF) != 0, 0x00800000, 0).to(torch.int32)
    return torch.where(torch.isnan(s), s, up.view(torch.float32))


def act_quant(x: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last axis of x in tiles of `block_size`: (y float8_e4m3fn like x, s float32 (..., ceil(K/bs)))."""
    k = x.shape[-1]
    nb = _ceil_div(k, block_size)
    xf = _pad_to_blocks(x.float(), block_size, (x.dim() - 1,)).unflatten(-1, (nb, block_size))
    amax = xf.abs().amax(-1).clamp_min(AMAX_FLOOR)  # (..., nb)
    s = amax / E4M3_MAX
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    elif scale_fmt is not None:
        raise UsageError(f"act_quant: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    y = (xf / s[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return y.flatten(-2)[..., :k].contiguous(), s


def weight_quant(w: torch.Tensor, block_size: int = 128, scale_fmt: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a 2-D weight (N, K) per block_size² block: (q float8_e4m3fn (N, K), s float32 (⌈N/bs⌉, ⌈K/bs⌉)).

    scale_fmt "ue8m0": scales rounded up to powers of two, as DeepSeek-V3.1's released weight scales are
    (still stored float32); dequantising such a weight to bf16 is then exact."""
    n, k = w.shape
    nbn, nbk = _ceil_div(n, block_size), _ceil_div(k, block_size)
    wb = _pad_to_blocks(w.float(), block_size, (0, 1)).reshape(nbn, block_size, nbk, block_size)
    s = wb.abs().amax(dim=(1, 3)).clamp_min(AMAX_FLOOR) / E4M3_MAX  # (nbn, nbk)
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    elif scale_fmt is not None:
        raise UsageError(f"weight_quant: scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    q = (wb / s[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.reshape(nbn * block_size, nbk * block_size)[:n, :k].contiguous(), s


def weight_dequant(q: torch.Tensor, s: torch.Tensor, block_size: int = 128,
                   dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q (..., N, K) fp8 × per-block s (..., ⌈N/bs⌉, ⌈K/bs⌉) → (..., N, K) in `dtype`, computed in float32.

    Leading axes are a batch of weights (the static decode step's gathered experts). Computed like
    `weight_quant`: padded to whole blocks, viewed as (..., ⌈N/bs⌉, bs, ⌈K/bs⌉, bs) and multiplied by the
    broadcast scales. (Expanding the scales to (N, K) with `repeat_interleave` or by indexing computes the
    same eagerly, but Inductor on CPU, torch 2.13, miscompiles those forms fused with the FP8 cast: the
    compiled static step gave NaN. tests/test_fp8.py compiles this one.)"""
    n, k = q.shape[-2:]
    nbn, nbk = s.shape[-2:]
    blocks = _pad_to_blocks(q.float(), block_size, (q.dim() - 2, q.dim() - 1))
    blocks = blocks.unflatten(-1, (nbk, block_size)).unflatten(-3, (nbn, block_size))  # (..., nbn, bs, nbk, bs)
    out = (blocks * s[..., :, None, :, None]).flatten(-4, -3).flatten(-2, -1)
    return out[..., :n, :k].to(dtype)


def act_dequant(y: torch.Tensor, s: torch.Tensor, block_size: int = 128, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The values `act_quant` stands for: y (..., K) fp8 × s (..., ⌈K/bs⌉) → (..., K) in `dtype`."""
    k = y.shape[-1]
    blocks = _pad_to_blocks(y.float(), block_size, (y.dim() - 1,)).unflatten(-1, (s.shape[-1], block_size))
    return (blocks * s[..., None]).flatten(-2)[..., :k].to(dtype)  # as weight_dequant: no repeat_interleave


def fp8_gemm(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
             out_dtype: torch.dtype = torch.bfloat16, block_size: int = 128) -> torch.Tensor:
    """a (..., K) fp8 with a_s (..., ⌈K/bs⌉); b (N, K) fp8 with b_s (⌈N/bs⌉, ⌈K/bs⌉) → (..., N)."""
    k = a.shape[-1]
    n = b.shape[0]
    nb = _ceil_div(k, block_size)
    af = _pad_to_blocks(a.float(), block_size, (a.dim() - 1,)).unflatten(-1, (nb, block_size))  # (..., kb, 128)
    bf = _pad_to_blocks(b.float(), block_size, (1,)).unflatten(-1, (nb, block_size))  # (N, kb, 128)
    partial = torch.einsum("...ic,nic->...ni", af, bf)  # (..., N, kb): one fp32 sum per K block
    bscale = b_s.repeat_interleave(block_size, 0)[:n]  # (N, kb)
    out = (partial * a_s.unsqueeze(-2) * bscale).sum(-1)
    return out.to(out_dtype)


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, *, gemm_impl: str = "bf16",
               block_size: int = 128, scale_fmt: str | None = None) -> torch.Tensor:
    """y = x Wᵀ for an FP8 block-scaled W, by dequantising W ("bf16") or through act_quant + fp8_gemm ("fp8")."""
    if gemm_impl == "bf16":
        return cpu_bf16.linear(x, weight_dequant(weight, scale, block_size, x.dtype))
    if gemm_impl != "fp8":
        raise UsageError(f"fp8_linear: gemm_impl must be 'bf16' or 'fp8', got {gemm_impl!r}")
    if x.is_cuda:
        from dsv3.kernels import fp8_gemm as kgemm
        from dsv3.kernels import fp8_quant as kquant

        xq, xs = kquant.act_quant(x.contiguous(), block_size, scale_fmt)
        return kgemm.fp8_gemm(xq, xs, weight, scale, out_dtype=x.dtype)
    xq, xs = act_quant(x, block_size, scale_fmt)
    return fp8_gemm(xq, xs, weight, scale, out_dtype=x.dtype, block_size=block_size)
