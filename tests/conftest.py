"""Shared fixtures: synthetic checkpoints in the exact Hugging Face layout (see dsv3.testing)."""

import shutil
from pathlib import Path

import pytest
import torch

from dsv3.testing import tiny_hf_args, write_checkpoint


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
