"""Training: losses aligned with their targets, the aux-loss-free bias rule balances load,
the sequence-wise balance loss matches the report's formula, runs are deterministic and
resume exactly, and checkpoints load through the ordinary HF loader."""

import argparse
import json
import math

import jinja2
import pytest
import torch
import torch.nn.functional as F

from dsv3 import ModelArgs, Transformer, load_model
from dsv3 import data as dsdata
from dsv3 import train as tr
from dsv3.cli import train as train_cli
from dsv3.moe import Gate

TEXT = ("Shall I compare thee to a summer's day? Thou art more lovely and more temperate. "
        "Rough winds do shake the darling buds of May, and summer's lease hath all too short a date. ")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpus")
    for i in range(3):
        (d / f"doc{i}.txt").write_text((TEXT * 12 + f"\n\n\n\nEnd of part {i}.\n") * (i + 1))
    return d


def parse(*argv):
    p = argparse.ArgumentParser()
    train_cli.add_args(p)
    return p.parse_args(list(argv))


def base_args(corpus, out, *extra):
    return parse("--out", str(out), "--data", str(corpus), "--vocab-size", "300", "--config", "tiny",
                 "--steps", "4", "--batch-size", "2", "--seq-len", "24", "--warmup", "2", "--eval-every", "2",
                 "--eval-windows", "2", "--save-every", "100", "--quiet", "--lr", "1e-2", *extra)


def test_lr_schedule():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, steps=110)
    assert tr.lr_at(0, **kw) == pytest.approx(0.1)
    assert tr.lr_at(9, **kw) == pytest.approx(1.0)
    assert tr.lr_at(60, **kw) == pytest.approx(0.55)
    assert tr.lr_at(110, **kw) == pytest.approx(0.1)


def test_losses_target_alignment():
    torch.manual_seed(0)
    m = Transformer(ModelArgs.preset("tiny"))
    tokens = torch.randint(0, 512, (2, 9))
    total, ce, mtp = tr.losses(m, tokens, 0.5)
    logits, mtp_logits = m.forward_mtp(tokens[:, :-1])
    # position i of the main head predicts token i+1; of the depth-1 MTP head, token i+2
    ref_ce = sum(F.cross_entropy(logits[:, i], tokens[:, i + 1]) for i in range(8)) / 8
    ref_mtp = sum(F.cross_entropy(mtp_logits[:, i], tokens[:, i + 2]) for i in range(7)) / 7
    torch.testing.assert_close(ce, ref_ce)
    torch.testing.assert_close(mtp, ref_mtp)
    torch.testing.assert_close(total, ref_ce + 0.5 * ref_mtp)


def test_bias_update_balances_a_skewed_gate():
    args = ModelArgs.preset("tiny")
    torch.manual_seed(0)
    gate = Gate(args)
    with torch.no_grad():
        gate.weight.normal_(0, 0.2)
        gate.weight[:3] += 0.5  # experts 0..2 favoured by every token
    g = torch.Generator().manual_seed(0)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = torch.nn.Module()
            self.ffn.gate = gate

    stats = tr.RouterStats(Holder())
    ratios = []
    w_before = gate.weight.clone()
    for _ in range(300):
        stats.reset()
        gate(torch.randn(512, args.dim, generator=g) + 1.0)  # a fresh batch of tokens each step
        ratios.append(stats.load_summary()["ffn"])
        stats.update_bias(0.005)
    assert ratios[0] > 2.5  # badly unbalanced at the start
    # the bias alone brought the busiest expert near the mean (sampling noise alone gives ~1.3 here)
    assert sum(ratios[-50:]) / 50 < 0.6 * ratios[0] and sum(ratios[-50:]) / 50 < 1.7
    assert torch.equal(gate.weight, w_before)  # only the bias moved (no gradient involved)


def test_train_step_updates_weights_by_adamw_and_biases_by_the_counts_of_its_forward():
    model = tr.build_model(ModelArgs.preset("tiny"), seed=0)
    batch = torch.randint(0, model.args.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    gates = {n: m for n, m in model.named_modules() if isinstance(m, Gate)}
    counts = {}  # the reference: route the same tokens with the pre-step weights, outside the trainer
    hooks = [g.register_forward_hook(lambda g, i, o, n=n: counts.__setitem__(n, torch.bincount(
        o[1].flatten(), minlength=g.weight.shape[0]))) for n, g in gates.items()]
    with torch.no_grad():
        model.forward_mtp(batch[:, :-1])
    for h in hooks:
        h.remove()
    before = {n: g.bias.clone() for n, g in gates.items()}
    w_before = model.layers[0].attn.wq_a.weight.detach().clone()
    stats = tr.RouterStats(model)
    opt = tr.make_optimizer(model, 1e-3, 0.1)
    ce, mtp_ce, gnorm = tr.train_step(model, opt, stats, batch, mtp_lambda=0.3, grad_clip=1.0, bias_gamma=0.25)
    stats.close()
    assert math.isfinite(float(ce)) and math.isfinite(float(mtp_ce)) and float(gnorm) > 0
    for n, g in gates.items():
        c = counts[n].double()
        torch.testing.assert_close(g.bias - before[n], 0.25 * torch.sign(c.mean() - c).float(), rtol=0, atol=1e-7)
    assert not torch.equal(model.layers[0].attn.wq_a.weight, w_before)  # AdamW moved the weights


def test_sequence_balance_loss_matches_the_report_formula():
    args = ModelArgs.preset("tiny")
    torch.manual_seed(0)
    gate = Gate(args)
    torch.nn.init.normal_(gate.weight, 0, 0.3)
    b, s, e, k = 3, 5, args.n_routed_experts, args.n_activated_experts
    x = torch.randn(b * s, args.dim)

    class Holder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ffn = torch.nn.Module()
            self.ffn.gate = gate

    alpha = 0.01
    stats = tr.RouterStats(Holder(), alpha=alpha)
    stats.batch = b
    _, idx = gate(x)
    ref = 0.0
    scores = gate.scores(x).double().view(b, s, e)
    idx = idx.view(b, s, k)
    for j in range(b):  # L = α Σ_i f_i P_i, per sequence, then averaged
        f = [e / (k * s) * sum(int(i in idx[j, t].tolist()) for t in range(s)) for i in range(e)]
        norm = scores[j] / scores[j].sum(-1, keepdim=True)
        p = norm.mean(0)
        ref += alpha * sum(f[i] * float(p[i].detach()) for i in range(e)) / b
    assert float(stats.balance_loss.detach()) == pytest.approx(ref, rel=1e-5)
    stats.balance_loss.backward()
    assert gate.weight.grad is not None and gate.weight.grad.abs().sum() > 0


def test_corpus_split_tokenizer_and_unigram(corpus, tmp_path):
    texts = dsdata.load_corpus(corpus)
    train_docs, val_docs = dsdata.split_corpus(texts)
    assert len(val_docs) == 1 and len(train_docs) == 2
    assert "\n\n\n" not in val_docs[0]
    tok = dsdata.train_tokenizer(train_docs, 300)
    assert [tok.token_to_id(t) for t in dsdata.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.decode(tok.encode("Rough winds do shake").ids) == "Rough winds do shake"
    dsdata.save_tokenizer(tok, tmp_path, 256)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    chat = jinja2.Template(cfg["chat_template"]).render(
        messages=[{"role": "user", "content": "Hi"}], bos_token=cfg["bos_token"]["content"], add_generation_prompt=True)
    assert chat == "<｜begin▁of▁sentence｜><｜User｜>Hi<｜Assistant｜>"
    tr_ids, va_ids = dsdata.encode_docs(tok, train_docs), dsdata.encode_docs(tok, val_docs)
    counts = torch.bincount(tr_ids, minlength=300).double() + 1
    ref = -sum(math.log(counts[t] / counts.sum()) for t in va_ids.tolist()) / len(va_ids)
    assert dsdata.unigram_loss(tr_ids, va_ids, 300) == pytest.approx(ref)


def test_training_is_deterministic_resumable_and_loadable(corpus, tmp_path):
    full = tr.train(base_args(corpus, tmp_path / "a"))
    again = tr.train(base_args(corpus, tmp_path / "b"))
    tr.train(base_args(corpus, tmp_path / "c", "--stop-after", "2"))
    state = json.loads((tmp_path / "c" / "trainer_state.json").read_text())
    assert state["step"] == 2 and not list((tmp_path / "c").glob("*.pt"))
    resumed = tr.train(base_args(corpus, tmp_path / "c"))
    assert full == again
    assert resumed["loss"] == full["loss"]
    ma = load_model(tmp_path / "a", dtype=torch.float32)
    mc = load_model(tmp_path / "c", dtype=torch.float32)
    for (n, a), (_, c) in zip(ma.state_dict().items(), mc.state_dict().items()):
        assert torch.equal(a, c), n
    # the trained gate biases moved (γ > 0) and were saved
    assert any(m.ffn.gate.bias.abs().sum() > 0 for m in ma.layers if hasattr(m.ffn, "gate"))
    # the checkpoint reproduces the final held-out loss through the ordinary loader
    tok_ids = dsdata.encode_docs(__import__("tokenizers").Tokenizer.from_file(str(tmp_path / "a" / "tokenizer.json")),
                                 dsdata.split_corpus(dsdata.load_corpus(corpus))[1])
    ev = tr.evaluate(ma, dsdata.eval_windows(tok_ids, 25, 2))
    assert ev["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert full["loss"] < full["unigram_loss"] + 1.0
    log = json.loads((tmp_path / "a" / "train_log.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert {"loss", "mtp_loss", "tokens_per_s", "load_max_over_mean"} <= set(log[0])
    header = (tmp_path / "a" / "train_log.csv").read_text().splitlines()[0].split(",")
    assert "load_max_over_mean/layers.1.ffn" in header and "val_loss" in header


def test_bf16_autocast_runs(corpus, tmp_path):
    out = tr.train(base_args(corpus, tmp_path / "bf", "--dtype", "bf16", "--steps", "2"))
    assert math.isfinite(out["loss"])


def test_resume_with_other_steps_is_refused(corpus, tmp_path):
    from dsv3.errors import UsageError

    tr.train(base_args(corpus, tmp_path / "r", "--stop-after", "1"))
    with pytest.raises(UsageError, match="--steps"):
        tr.train(base_args(corpus, tmp_path / "r", "--steps", "9"))


@pytest.mark.slow
def test_ctrl_c_saves_a_resumable_checkpoint(corpus, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "int"
    cmd = [sys.executable, "-m", "dsv3.cli", "train", "--out", str(out), "--data", str(corpus), "--vocab-size", "300",
           "--config", "tiny", "--steps", "100000", "--batch-size", "2", "--seq-len", "24", "--save-every", "1",
           "--eval-every", "100000", "--eval-windows", "2", "--quiet"]
    proc = subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1"), stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "trainer_state.json").is_file():  # a step is done and saved: Ctrl-C now stops a running loop
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    state = json.loads((out / "trainer_state.json").read_text())
    assert 1 <= state["step"] < 100000
    assert len(json.loads((out / "train_log.json").read_text())) == state["step"]
    resumed = tr.train(base_args(corpus, out, "--steps", "100000", "--stop-after", "1", "--eval-every", "100000",
                                 "--save-every", "100000"))
    assert resumed["step"] == state["step"] + 1
