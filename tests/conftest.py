"""Shared fixtures: small dsv3 models with random, non-trivial weights."""

from __future__ import annotations

import pytest
import torch

from dsv3.config import ModelArgs
from dsv3.model import Transformer


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
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
    return model


@pytest.fixture
def make_model():
    """make_model(preset_or_args="tiny", seed=0, dtype=torch.float32, **overrides) -> Transformer in eval mode."""

    def make(spec: str | ModelArgs = "tiny", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
        args = ModelArgs.preset(spec) if isinstance(spec, str) else spec
        if overrides:
            args = args.replace(**overrides)
        return randomize_(Transformer(args, dtype=dtype), seed).eval()

    return make
