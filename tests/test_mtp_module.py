"""dsv3.mtp.MTPModule on its own (the parity with transformers is in test_mtp.py): its formula written
out with plain torch ops, the embedding-first concatenation, causality, cached steps, and the model's
use of it (`forward_mtp` = the module applied to the main model's final hidden state)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_  # tests/ is on sys.path under pytest

from dsv3.config import ModelArgs
from dsv3.model import Transformer
from dsv3.mtp import MTPModule


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@pytest.fixture(scope="module")
def model():
    args = ModelArgs.preset("tiny", n_mtp_layers=2)
    torch.manual_seed(0)
    return randomize_(Transformer(args), 4).eval()


def _inputs(model, s: int = 11, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(2, s, model.args.dim, generator=g)
    emb = torch.randn(2, s, model.args.dim, generator=g)
    return h, emb


def test_module_is_its_formula(model):
    """h' = block(eh_proj([enorm(emb) ; hnorm(h)])), then shared_head.norm -- embedding first."""
    m: MTPModule = model.mtp[0]
    eps = model.args.norm_eps
    h, emb = _inputs(model)
    cos, sin = model.rotary(0, h.shape[1], h.device)
    with torch.no_grad():
        out = m(h, emb, 0, cos, sin)
        x = F.linear(torch.cat([_rms(emb, m.enorm.weight, eps), _rms(h, m.hnorm.weight, eps)], -1), m.eh_proj.weight)
        ref = _rms(m.block(x, 0, cos, sin), m.norm.weight, eps)
        swapped = F.linear(torch.cat([_rms(h, m.hnorm.weight, eps), _rms(emb, m.enorm.weight, eps)], -1),
                           m.eh_proj.weight)
    assert out.shape == h.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (_rms(m.block(swapped, 0, cos, sin), m.norm.weight, eps) - out).abs().max() > 1e-2  # order matters


def test_module_is_causal(model):
    m = model.mtp[0]
    h, emb = _inputs(model, seed=1)
    cos, sin = model.rotary(0, h.shape[1], h.device)
    h2, emb2 = h.clone(), emb.clone()
    h2[:, 7:] += 1.0
    emb2[:, 7:] -= 1.0
    with torch.no_grad():
        a, b = m(h, emb, 0, cos, sin), m(h2, emb2, 0, cos, sin)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-6)
    assert (a[:, 7:] - b[:, 7:]).abs().max() > 1e-2


def test_cached_steps_equal_the_full_pass(model):
    m = model.mtp[0]
    h, emb = _inputs(model, s=12, seed=2)
    with torch.no_grad():
        cos, sin = model.rotary(0, 12, h.device)
        full = m(h, emb, 0, cos, sin)
        cache = model.new_cache(2, 12, mtp=True).mtp[0]
        outs, pos = [], 0
        for n in (5, 1, 1, 3, 2):
            c, s_ = model.rotary(pos, n, h.device)
            outs.append(m(h[:, pos:pos + n], emb[:, pos:pos + n], pos, c, s_, cache))
            pos += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)


def test_forward_mtp_chains_the_modules_on_the_main_hidden_state(model):
    """Depth 1 combines the main model's final (normed) hidden state at i with token i+1; depth 2 the
    depth-1 state at i with token i+2; logits through the shared head."""
    tokens = torch.randint(0, model.args.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    s = tokens.shape[1]
    with torch.no_grad():
        logits, mtp_logits = model.forward_mtp(tokens)
        h = model.hidden(tokens, 0)  # (b, s, m), after the final norm
        torch.testing.assert_close(model.head(h), logits, rtol=1e-5, atol=1e-5)
        for k, m in enumerate(model.mtp, start=1):
            n = s - k
            cos, sin = model.rotary(0, n, h.device)
            h = m(h[:, :n], model.embed(tokens[:, k:]), 0, cos, sin)
            torch.testing.assert_close(mtp_logits[k - 1], model.head(h), rtol=1e-5, atol=1e-5)
    assert len(mtp_logits) == 2 and mtp_logits[1].shape == (2, s - 2, model.args.vocab_size)


def test_no_mtp_module_when_the_config_has_none():
    m = Transformer(ModelArgs.preset("tiny", n_mtp_layers=0))
    assert len(m.mtp) == 0
    assert not any(name.startswith("mtp.") for name in m.state_dict())
