"""The small building blocks: RMSNorm, LayerNorm (V3.2's indexer), Linear (bf16/fp32 or FP8 + block scales), the SwiGLU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsv3 import cpu_bf16, fp8


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 and cast back (as the released model was trained)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class LayerNorm(nn.Module):
    """(x - mean) / std * weight + bias over the last axis, in float32 and cast back: V3.2's indexer `k_norm`
    (the official code's LayerNorm; not an RMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6, dtype: torch.dtype | None = None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


class Linear(nn.Module):
    """y = x Wᵀ, no bias. W is stored as given (bf16/fp32) or as FP8 e4m3 with one float32
    scale per `block_size`² block (`scale`, HF name `weight_scale_inv`).

    With an FP8 weight, `gemm_impl` chooses the arithmetic: "bf16" dequantises W and
    multiplies in x's dtype; "fp8" quantises x per 1×128 tile and runs the block-scaled
    FP8 GEMM (Triton on CUDA, the torch reference elsewhere).
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype | None = None,
                 fp8_weight: bool = False, block_size: int = 128, gemm_impl: str = "bf16",
                 scale_fmt: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.block_size, self.gemm_impl, self.scale_fmt = block_size, gemm_impl, scale_fmt
        wdtype = torch.float8_e4m3fn if fp8_weight else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype), requires_grad=not fp8_weight)
        if fp8_weight:
            sshape = (-(-out_features // block_size), -(-in_features // block_size))
            self.scale = nn.Parameter(torch.empty(sshape, dtype=torch.float32), requires_grad=False)
        else:
            self.register_parameter("scale", None)

    @property
    def is_fp8(self) -> bool:
        return self.weight.dtype == torch.float8_e4m3fn

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """W in a floating dtype (the weight itself when it is not FP8)."""
        if not self.is_fp8:
            return self.weight if dtype is None else self.weight.to(dtype)
        return fp8.weight_dequant(self.weight, self.scale, self.block_size, dtype or torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.is_fp8:
            return cpu_bf16.linear(x, self.weight)
        return fp8.fp8_linear(x, self.weight, self.scale, gemm_impl=self.gemm_impl,
                              block_size=self.block_size, scale_fmt=self.scale_fmt)

    def extra_repr(self) -> str:
        kind = f"fp8 blocks={self.block_size} gemm={self.gemm_impl}" if self.is_fp8 else str(self.weight.dtype)
        return f"in={self.in_features}, out={self.out_features}, {kind}"


def column_major_(linear: Linear) -> Linear:
    """Store W (N, K) column-major, i.e. Wᵀ contiguous. F.linear then streams Wᵀ in order: for a tall
    matrix such as the head (vocab × dim), MKL's matrix-vector product runs ~2.5× faster on one CPU
    thread (32000 × 512 fp32: 6.1 ms -> 2.4 ms). float32 only: torch's bf16 product is 7.5× *slower*
    column-major (3.7 ms -> 27.8 ms). Values, shape and state_dict are unchanged."""
    if linear.weight.dtype == torch.float32 and linear.weight.stride(0) != 1:
        linear.weight.data = linear.weight.data.t().contiguous().t()
    return linear


class MLP(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x). HF names: gate_proj = w1, up_proj = w3, down_proj = w2."""

    def __init__(self, dim: int, inter_dim: int, **linear_kw):
        super().__init__()
        self.w1 = Linear(dim, inter_dim, **linear_kw)
        self.w2 = Linear(inter_dim, dim, **linear_kw)
        self.w3 = Linear(dim, inter_dim, **linear_kw)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))
