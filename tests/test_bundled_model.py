"""The bundled model (dsv3/assets/dsv3-tiny): the release format, a complete DeepSeek-V3
architecture, a tokenizer with a chat template, and weights that learned English.

It loads through the same `dsv3.load_model` path as the real checkpoint (FP8 kept as FP8)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import jinja2
import pytest
import torch
from safetensors import safe_open

import dsv3
from dsv3 import ModelArgs, generate, load_model

CKPT = Path(dsv3.__file__).parent / "assets" / "dsv3-tiny"
SCENE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "tempest-act1-scene2.txt"
# held out from training (The Tempest is not in the training split, see dsv3.data.HELD_OUT)
TEMPEST = ("Be not afeard. The isle is full of noises,\nSounds, and sweet airs, that give delight, and hurt not.\n"
           "Sometimes a thousand twangling instruments\nWill hum about mine ears; and sometimes voices,\n")


@pytest.fixture(scope="module")
def model():
    return load_model(CKPT, dtype=torch.float32)


@pytest.fixture(scope="module")
def tok():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(CKPT / "tokenizer.json"))


def test_release_format_and_size():
    files = {p.name for p in CKPT.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"} <= files
    assert sum(p.stat().st_size for p in CKPT.iterdir()) <= 25 * 2**20
    cfg = json.loads((CKPT / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    shards = sorted(CKPT.glob("*.safetensors"))
    dtypes = {}
    for shard in shards:
        with safe_open(shard, "pt") as f:
            for k in f.keys():  # noqa: SIM118
                dtypes[k] = f.get_slice(k).get_dtype()
    q = "model.layers.1.self_attn.q_a_proj"
    assert dtypes[q + ".weight"] == "F8_E4M3" and dtypes[q + ".weight_scale_inv"] == "F32"
    assert dtypes["model.layers.1.mlp.gate.e_score_correction_bias"] == "F32"
    assert dtypes["lm_head.weight"] != "F8_E4M3"  # the head is not quantised in the release
    assert dtypes[f"model.layers.{cfg['num_hidden_layers']}.eh_proj.weight"] != "F8_E4M3"  # the MTP layer follows


def test_architecture_is_complete():
    a = ModelArgs.from_hf_config(CKPT)
    assert a.q_lora_rank > 0  # MLA with q compression
    assert a.n_routed_experts >= 16 and a.n_shared_experts >= 1
    assert 1 < a.n_expert_groups and 1 <= a.n_limited_groups < a.n_expert_groups  # group-limited top-k
    assert 1 <= a.n_dense_layers < a.n_layers  # dense first layer(s), then MoE
    assert a.score_func == "sigmoid" and a.gate_bias
    assert a.rope_factor > 1 and a.yarn  # YaRN
    assert a.n_mtp_layers == 1


def test_fp8_model_runs_and_matches_dequantised(model, tok):
    fp8_model = load_model(CKPT)  # weights stay FP8, as with the real checkpoint
    assert fp8_model.layers[1].attn.wq_a.weight.dtype == torch.float8_e4m3fn
    ids = torch.tensor([[0] + tok.encode(TEMPEST).ids])
    with torch.no_grad():
        a = fp8_model(ids).float()
        b = model(ids)
    assert float((a - b).norm() / b.norm()) < 0.05  # bf16 activations vs float32


def test_tokenizer_and_chat_template(tok):
    cfg = json.loads((CKPT / "tokenizer_config.json").read_text())
    assert tok.token_to_id("<｜begin▁of▁sentence｜>") == 0 and tok.token_to_id("<｜end▁of▁sentence｜>") == 1
    assert tok.token_to_id("<｜User｜>") is not None and tok.token_to_id("<｜Assistant｜>") is not None
    text = jinja2.Template(cfg["chat_template"]).render(
        messages=[{"role": "user", "content": "Who art thou?"}, {"role": "assistant", "content": "A ghost."}],
        bos_token=cfg["bos_token"]["content"], add_generation_prompt=False)
    assert text == "<｜begin▁of▁sentence｜><｜User｜>Who art thou?<｜Assistant｜>A ghost.<｜end▁of▁sentence｜>"
    assert tok.decode(tok.encode(TEMPEST).ids) == TEMPEST


def test_learned_english_and_mtp(model, tok):
    from dsv3.train import evaluate

    ids = torch.tensor([[0] + tok.encode(TEMPEST).ids])
    ev = evaluate(model, ids)
    uniform = torch.log(torch.tensor(float(model.args.vocab_size)))
    assert ev["loss"] < uniform - 2.0  # far better than guessing (about 7.6 nats for 2048 tokens)
    assert ev["mtp_loss"] < uniform - 2.0


def test_held_out_scene_perplexity_and_mtp_acceptance(model, tok):
    """Quality on text it never saw: The Tempest I.2 (the held-out scene chapter 05 routes), in consecutive
    windows of 128 predicted tokens as in docs/training.md. Measured (FP8 as stored): perplexity 50.8 here (the
    model before the retrain, 2.1 M parameters and 650 steps: 73.8, so the bound fails on it) and teacher-forced
    MTP acceptance 0.62 (before: 0.69 -- a sharper main model is harder to agree with; docs/training.md). The
    acceptance bound only catches a broken MTP module: a random one agrees about 1/2,048 of the time."""
    from dsv3.data import eval_windows
    from dsv3.train import evaluate

    ids = torch.tensor([0] + tok.encode(SCENE.read_text()).ids)
    windows = eval_windows(ids, 129)
    ev = evaluate(model, windows)
    with torch.no_grad():
        logits, ahead = model.forward_mtp(windows[:, :-1])
    acceptance = float((ahead.argmax(-1) == logits[:, 1:].argmax(-1)).float().mean())  # draft of i+2 == main's
    assert windows.shape[0] >= 30 and ev["ppl"] < 60 and acceptance > 0.5, (ev, acceptance)


def test_speculative_greedy_identical_and_accepting(model, tok):
    from dsv3.speculative import generate_mtp

    prompts = [[0] + tok.encode(t).ids for t in ("KING.", "To be, or not to be", "O Romeo,")]
    drafted = accepted = 0
    for batch in (1, 3):
        for i in range(0, 3, batch):
            ps = prompts[i: i + batch]
            st = {}
            assert generate_mtp(model, ps, 24, stats=st) == generate(model, ps, 24)
            drafted, accepted = drafted + st["drafted"], accepted + st["accepted"]
    assert accepted / drafted > 0.5


def test_logged_load_balance_gamma_vs_no_gamma():
    def tail_mean(path):
        rows = list(csv.DictReader(open(path)))
        return rows, {k: sum(float(r[k]) for r in rows[-50:]) / 50 for k in rows[0] if k.startswith("load_max")}

    rows0, g0 = tail_mean(CKPT / "train_log_gamma0.csv")
    rows1 = list(csv.DictReader(open(CKPT / "train_log.csv")))
    last = int(rows0[-1]["step"])
    window = [r for r in rows1 if last - 50 < int(r["step"]) <= last]  # the same steps as the γ = 0 run
    for k, v in g0.items():
        balanced = sum(float(r[k]) for r in window) / len(window)
        assert balanced < v, (k, balanced, v)


def test_bench_mtp_json():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "dsv3.cli", "bench", "mtp", "--json", "--new", "12", "--prompts", "2",
                          "--repeats", "1"], capture_output=True, text=True, env=env, check=True)
    res = json.loads(out.stdout)
    assert {"acceptance_rate", "tokens_per_s_plain", "tokens_per_s_mtp", "speedup", "identical_greedy"} <= set(res)
    assert res["identical_greedy"] is True and 0 <= res["acceptance_rate"] <= 1


def test_generate_command_uses_the_bundled_model_by_default():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "dsv3.cli", "generate", "To be, or not to be", "--max-new-tokens", "12", "--json"]
    plain = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    spec = subprocess.run(cmd + ["--mtp"], capture_output=True, text=True, env=env, check=True)
    out = json.loads(plain.stdout)
    assert len(out["tokens"][0]) == 12 and out["text"][0].strip()
    assert json.loads(spec.stdout) == out


def test_generate_mtp_on_the_bundled_model_accepts_drafts(mtp_runs, capsys):
    """--mtp is not ignored: the bundled model's MTP module drafts and most drafts are accepted."""
    from dsv3.cli import main

    assert main(["generate", "To be, or not to be", "--max-new-tokens", "12", "--json", "--mtp"]) == 0
    assert len(json.loads(capsys.readouterr().out)["tokens"][0]) == 12
    assert len(mtp_runs) == 1, "--mtp did not run speculative decoding"
    assert mtp_runs[0]["accepted"] > 0 and mtp_runs[0]["forwards"] < mtp_runs[0]["new_tokens"], mtp_runs[0]
