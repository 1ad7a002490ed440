"""Speculative decoding with MTP drafts: greedy output identical to plain greedy decoding,
and sampling distribution unchanged (the acceptance rule checked statistically)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_sampling import chi2, chi2_critical, reference_probs_rows  # tests/ is on sys.path under pytest

from dsv3 import ModelArgs, Transformer, UsageError, generate
from dsv3.speculative import generate_mtp, verify


def model_with(vocab: int, seed: int, std: float = 0.3) -> Transformer:
    """A tiny random model whose (random) MTP drafts are right often enough to exercise acceptance."""
    torch.manual_seed(seed)
    m = Transformer(ModelArgs.preset("tiny", vocab_size=vocab)).eval()
    m.init_weights(std=std, generator=torch.Generator().manual_seed(seed))
    return m


@pytest.mark.parametrize("vocab,seed", [(5, 1), (7, 2), (64, 3)])
def test_greedy_identical_to_plain_greedy(vocab, seed):
    m = model_with(vocab, seed)
    g = torch.Generator().manual_seed(seed)
    accepted = 0
    for batch in (1, 2, 3, 5):
        for trial in range(2):
            prompts = [torch.randint(0, vocab, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).tolist()
                       for _ in range(batch)]
            eos = 0 if trial == 1 else None
            plain = generate(m, prompts, 14, eos_id=eos)
            stats = {}
            spec = generate_mtp(m, prompts, 14, eos_id=eos, stats=stats)
            assert spec == plain, (batch, prompts)
            assert generate(m, prompts, 14, eos_id=eos, speculative="mtp") == plain
            accepted += stats["accepted"]
    assert accepted > 0  # the two-tokens-per-forward path ran


def test_on_token_streams_like_plain_generate():
    m = model_with(5, 1)
    prompts = [[1, 2, 3], [4]]

    def recorder(streams):
        def on_token(pos, tok, live):
            for i in range(len(streams)):
                if live[i]:
                    streams[i].append((pos, int(tok[i])))
        return on_token

    plain, spec = [[], []], [[], []]
    out = generate(m, prompts, 10, on_token=recorder(plain))
    assert generate_mtp(m, prompts, 10, on_token=recorder(spec)) == out
    assert spec == plain


def test_verify_keeps_the_target_distribution():
    g = torch.Generator().manual_seed(0)
    v, n = 4, 200_000
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    draft = torch.multinomial(q, n, replacement=True, generator=g)
    tok, acc = verify(p.expand(n, v), q.expand(n, v), draft, greedy=False, gen=g)
    freq = torch.bincount(tok, minlength=v).double() / n
    assert torch.allclose(freq, p.double(), atol=0.006), freq
    assert abs(acc.double().mean() - torch.minimum(p, q).sum()) < 0.006  # P(accept) = Σ min(p, q)


@pytest.mark.parametrize("top_k,top_p", [(0, 1.0), (3, 1.0), (0, 0.75)])
def test_sampling_distribution_unchanged(top_k, top_p):
    """Two new tokens, drawn N times with MTP speculation: their joint distribution matches the
    exact one computed from the main model alone with the float64 reference of the sampling
    definitions (tests/test_sampling.py, not dsv3's `sampling_probs`), chi-square at p = 0.001."""
    vocab, temperature = 5, 1.3
    m = model_with(vocab, 1)
    prompt = [1, 2, 3]
    with torch.no_grad():
        p1 = reference_probs_rows(m(torch.tensor([prompt]))[:, -1], temperature, top_p, top_k)[0]
        seqs = torch.tensor([prompt + [i] for i in range(vocab)])
        p2 = reference_probs_rows(m(seqs)[:, -1], temperature, top_p, top_k)  # (v, v): row i = p(t2 | t1 = i)
    joint = (p1[:, None] * p2).flatten()
    if top_p < 1:  # the nucleus did cut tokens, at both steps
        assert (p1 == 0).any() and (p2 == 0).any()
    n = 500
    counts = torch.zeros(vocab * vocab, dtype=torch.float64)
    accepted = 0
    for s in range(n):
        stats = {}
        t1, t2 = generate_mtp(m, [prompt], 2, temperature=temperature, top_k=top_k, top_p=top_p, seed=s,
                              stats=stats)[0]
        counts[t1 * vocab + t2] += 1
        accepted += stats["accepted"]
    stat, df = chi2(counts, joint)
    assert stat < chi2_critical(df), (stat, df)
    assert accepted > n // 10  # drafts were accepted, so both paths were sampled


def test_errors():
    m = model_with(5, 1)
    with pytest.raises(UsageError, match="speculative"):
        generate(m, [[1]], 3, speculative="medusa")
    no_mtp = Transformer(ModelArgs.preset("tiny", n_mtp_layers=0)).eval()
    with pytest.raises(UsageError, match="MTP"):
        generate(no_mtp, [[1]], 3, speculative="mtp")
    with pytest.raises(UsageError, match="max_seq_len"):
        generate(m, [[1] * 250], 10, speculative="mtp")


def test_cli_mtp_flag_gives_the_same_greedy_tokens():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dsv3.cli", "generate", "--preset", "tiny", "--prompt-ids", "5,17,300",
           "--prompt-ids", "7", "--max-new-tokens", "8", "--json"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    spec = subprocess.run(cmd + ["--mtp"], capture_output=True, text=True, env=env, check=True)
    assert json.loads(spec.stdout) == json.loads(plain.stdout)


def test_cli_mtp_flag_drafts_and_accepts_when_sampling(mtp_runs, capsys):
    """In-process on the bundled (trained) model, sampling: --mtp really decodes speculatively -- drafts
    accepted, fewer main forwards than tokens (a random tiny model's drafts are never right)."""
    from dsv3.cli import main

    argv = ["generate", "--prompt-ids", "5,17,30", "--max-new-tokens", "16", "--json", "--temperature", "0.7",
            "--seed", "3"]
    assert main(argv) == 0 and not mtp_runs
    assert main(argv + ["--mtp"]) == 0
    assert len(json.loads(capsys.readouterr().out.splitlines()[-1])["tokens"][0]) == 16
    assert len(mtp_runs) == 1, "--mtp did not run speculative decoding"
    run = mtp_runs[0]
    assert run["drafted"] > 0 and run["accepted"] > 0, run
    assert run["forwards"] < run["new_tokens"], run  # some forwards yielded two tokens
