"""Test-session setup and shared fixtures.

Triton decides between compiling and interpreting when *it* is imported (its own library
functions, tl.cdiv, tl.max, ..., are decorated then), not when our kernels are called. A
process that wants the interpreter must therefore set TRITON_INTERPRET=1 before anything
imports triton. Without CUDA the interpreter is the only way to run the kernels at all, so
the test session asks for it here, first, unless the caller chose otherwise.

`make_model` builds small dsv3 models with random, non-trivial weights.
"""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402

from dsv3.config import ModelArgs  # noqa: E402
from dsv3.mla import MLA  # noqa: E402
from dsv3.model import Transformer  # noqa: E402
from dsv3.testing import tiny_hf_args, write_checkpoint  # noqa: E402


@torch.no_grad()
def randomize_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Matrices ~ N(0, 1/fan_in), norm gains 1 ± 0.2, embeddings N(0, 1), gate biases N(0, 0.5²).

    (init_weights' std 0.02 makes attention nearly uniform and routing nearly random:
    equivalence tests would prove less on such a model.)
    """
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("gate.bias"):
            p.copy_(0.5 * torch.randn(p.shape, generator=g))
        elif name.startswith("embed"):
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    return model


# Every attention code path: naive, and absorbed with each branch of `MLA.expanding_pays` forced --
# "latent" (scores against the cached latents: every decode step) and "expanded" (SDPA on K/V expanded
# from the latents: long prefills). Left to itself the choice depends on s, so a test at one length
# would check only one branch.

@torch.no_grad()
def randomize_hf(model: torch.nn.Module, seed: int) -> None:
    """A transformers model's non-trivial weights: matrices ~ N(0, 1/fan_in), norm gains ~ 1 +- 0.2 (LayerNorm
    biases ~ 0.2 N(0, 1): V3.2's indexer k_norm), a gate bias that matters."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight") or "layernorm" in name:
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif name.endswith("norm.bias"):
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        elif "embed_tokens" in name:
            p.copy_(torch.randn(p.shape, generator=g))
        else:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[-1]))
    for name, b in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            b.copy_(0.5 * torch.randn(b.shape, generator=g))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(||a-b|| / ||b||, max|a-b| / max|b|)."""
    return ((a - b).norm() / b.norm()).item(), ((a - b).abs().max() / b.abs().max()).item()

ATTN_PATHS = ["naive", "latent", "expanded"]


def force_attn_path(monkeypatch, path: str) -> str:
    """Force `path` for the rest of the test (monkeypatch undoes it); return the attn_impl to build with."""
    if path == "naive":
        return "naive"
    expand = {"latent": False, "expanded": True}[path]
    monkeypatch.setattr(MLA, "expanding_pays", lambda self, s: expand)
    return "absorb"


@pytest.fixture
def mtp_runs(monkeypatch):
    """Records the stats of every `dsv3.speculative.generate_mtp` call made in this test (a list of dicts:
    drafted, accepted, forwards, new tokens), so a command's `--mtp` can be shown to draft and accept."""
    import dsv3.speculative as spec

    runs, real = [], spec.generate_mtp

    def spy(*args, **kw):
        stats = {}
        out = real(*args, **{**kw, "stats": stats})
        runs.append({**stats, "new_tokens": sum(len(o) for o in out)})
        return out

    monkeypatch.setattr(spec, "generate_mtp", spy)
    return runs


@pytest.fixture
def make_model():
    """make_model(preset_or_args="tiny", seed=0, dtype=torch.float32, **overrides) -> Transformer in eval mode."""

    def make(spec: str | ModelArgs = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
        args = ModelArgs.preset(spec) if isinstance(spec, str) else spec
        if overrides:
            args = args.replace(**overrides)
        return randomize_(Transformer(args, dtype=dtype), seed).eval()

    return make


# ---------------------------------------------------------------------- synthetic HF checkpoints (dsv3.testing)
@pytest.fixture(scope="session")
def fp8_ckpt(tmp_path_factory) -> Path:
    """FP8 release format (bf16 non-quantized tensors), 3 shards, MTP layer, tokenizer files."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "fp8", tokenizer=True)


@pytest.fixture(scope="session")
def fp8_ckpt_f32(tmp_path_factory) -> Path:
    """FP8 weights with float32 non-quantized tensors: dequantising is then the only difference."""
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "fp8f32", float_dtype=torch.float32, seed=1)


@pytest.fixture(scope="session")
def bf16_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "bf16", tiny_hf_args(dtype="bf16"), tokenizer=True,
                            seed=2)


@pytest.fixture
def copy_ckpt(tmp_path):
    """copy_ckpt(src) -> a private copy to corrupt."""
    def make(src: Path) -> Path:
        dst = tmp_path / src.name
        shutil.copytree(src, dst)
        return dst
    return make
