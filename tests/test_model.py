"""Transformer-level equivalences: cache vs full recompute, chunked prefill, batch vs one-by-one
generation, MTP, and the 671B model on the meta device."""

from __future__ import annotations

import pytest
import torch
from conftest import force_attn_path  # tests/ is on sys.path under pytest

import dsv3
from dsv3.config import ModelArgs
from dsv3.errors import UsageError
from dsv3.model import Transformer


def _tokens(b: int, s: int, vocab: int, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("attn_path", ["latent", "expanded"])
def test_absorbed_equals_naive_model(make_model, attn_path, monkeypatch):
    ref = make_model(seed=1, attn_impl="naive")
    model = make_model(seed=1, attn_impl=force_attn_path(monkeypatch, attn_path))
    assert model.args.attn_impl == "absorb" and ref.args.attn_impl == "naive"  # two different code paths
    tokens = _tokens(2, 30, ref.args.vocab_size, 0)
    with torch.no_grad():
        a, b = model(tokens), ref(tokens)
    assert ((a - b).norm() / b.norm()).item() < 1e-5


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_token_by_token_decode_equals_full(make_model, attn_impl):
    model = make_model(seed=2, attn_impl=attn_impl)
    tokens = _tokens(2, 24, model.args.vocab_size, 1)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(2, 24)
        steps = torch.cat([model(tokens[:, i:i + 1], i, cache) for i in range(24)], dim=1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
@pytest.mark.parametrize("chunks", [(10, 14), (5, 3, 1, 9, 6), (1, 23)])
def test_chunked_prefill_equals_full(make_model, attn_impl, chunks):
    """Multi-token steps at start_pos > 0 (chunked prefill, MTP verification) give the full pass's logits."""
    model = make_model(seed=3, attn_impl=attn_impl)
    tokens = _tokens(3, sum(chunks), model.args.vocab_size, 2)
    with torch.no_grad():
        full = model(tokens)
        cache = model.new_cache(3, sum(chunks))
        outs, pos = [], 0
        for n in chunks:
            outs.append(model(tokens[:, pos:pos + n], pos, cache))
            pos += n
    torch.testing.assert_close(torch.cat(outs, dim=1), full, rtol=1e-4, atol=1e-4)


def _greedy_full_recompute(model, prompt: list[int], n: int) -> list[int]:
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            seq = torch.cat([seq, model(seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_batch_generation_equals_one_by_one(make_model, attn_impl):
    model = make_model(seed=4, attn_impl=attn_impl)
    v = model.args.vocab_size
    prompts = [_tokens(1, n, v, 10 + n)[0].tolist() for n in (3, 11, 1, 7)]
    batch = dsv3.generate(model, prompts, 8)
    alone = [dsv3.generate(model, [p], 8)[0] for p in prompts]
    assert batch == alone
    assert batch == [_greedy_full_recompute(model, p, 8) for p in prompts]
    assert all(len(t) == 8 for t in batch)


def test_generate_stops_at_eos_and_sampling_is_seeded(make_model):
    model = make_model(seed=5)
    prompt = [3, 1, 4, 1, 5]
    greedy = dsv3.generate(model, [prompt], 6)[0]
    eos = greedy[2]
    stopped = dsv3.generate(model, [prompt, [9, 2]], 6, eos_id=eos)
    assert stopped[0] == greedy[: greedy.index(eos) + 1]
    assert dsv3.generate(model, [prompt], 6, temperature=1.0, top_k=1, seed=0)[0] == greedy
    s1 = dsv3.generate(model, [prompt], 6, temperature=1.5, top_p=0.9, seed=123)
    s2 = dsv3.generate(model, [prompt], 6, temperature=1.5, top_p=0.9, seed=123)
    assert s1 == s2
    assert dsv3.generate(model, [prompt], 0) == [[]]


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_k=-1), "top_k"),
])
def test_generate_rejects_bad_sampling(make_model, kwargs, match):
    model = make_model()
    with pytest.raises(UsageError, match=match):
        dsv3.generate(model, [[1, 2]], 2, **kwargs)


def test_generate_rejects_bad_prompts(make_model):
    model = make_model()
    with pytest.raises(UsageError, match="outside the vocabulary"):
        dsv3.generate(model, [[1, model.args.vocab_size]], 2)
    with pytest.raises(UsageError, match="at least one token"):
        dsv3.generate(model, [[]], 2)
    with pytest.raises(UsageError, match="max_seq_len"):
        dsv3.generate(model, [[1, 2]], model.args.max_seq_len)


def test_forward_mtp_shapes_and_causality(make_model):
    model = make_model(seed=6)
    assert model.args.n_mtp_layers == 1
    b, s, v = 2, 12, model.args.vocab_size
    tokens = _tokens(b, s, v, 3)
    with torch.no_grad():
        logits, mtp = model.forward_mtp(tokens)
        torch.testing.assert_close(logits, model(tokens))
        assert mtp.shape == (b, s - 1, v)
        # position i of the MTP head sees tokens 0..i+1 only: changing token j leaves positions < j - 1 alone
        changed = tokens.clone()
        changed[:, 8] = (changed[:, 8] + 1) % v
        _, mtp2 = model.forward_mtp(changed)
    torch.testing.assert_close(mtp2[:, :7], mtp[:, :7])
    assert not torch.allclose(mtp2[:, 7], mtp[:, 7])


def test_forward_mtp_two_modules(make_model):
    model = make_model(seed=7, n_mtp_layers=2)
    tokens = _tokens(1, 9, model.args.vocab_size, 4)
    with torch.no_grad():
        _, outs = model.forward_mtp(tokens)
    assert [tuple(o.shape) for o in outs] == [(1, 8, model.args.vocab_size), (1, 7, model.args.vocab_size)]
    with pytest.raises(ValueError, match="no MTP"), torch.no_grad():
        make_model(n_mtp_layers=0).forward_mtp(tokens)


def test_sequence_longer_than_max_seq_len_is_refused(make_model):
    model = make_model(max_seq_len=16)
    with pytest.raises(ValueError, match="max_seq_len"), torch.no_grad():
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.slow  # ~5-13 s here: 61k modules are constructed, even if none holds memory
def test_671B_on_meta_device_has_no_storage():
    args = ModelArgs.preset("671B")
    with torch.device("meta"):
        model = Transformer(args)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.is_meta for t in tensors)
    total = sum(p.numel() for p in model.parameters())
    assert total > 680_000_000_000  # main model + MTP module: the real size, yet nothing allocated
    assert len(model.layers) == 61 and len(model.mtp) == 1
    assert model.rotary._table is None  # the rotary table is built on first use, not at construction


def test_last_only_is_the_last_row_of_the_full_logits(make_model):
    model = make_model("tiny")
    tokens = torch.randint(0, model.args.vocab_size, (2, 9))
    with torch.no_grad():
        full = model(tokens)
        last = model(tokens, last_only=True)
    assert last.shape == (2, 1, model.args.vocab_size)
    torch.testing.assert_close(last, full[:, -1:], rtol=1e-6, atol=1e-6)
