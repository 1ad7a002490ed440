"""`dsv3 convert`: FP8 <-> BF16/FP32 round trips, the release's quantization rule, a transformers-loadable
output, atomic writes (temporary directory + rename, --force), side files and quantization_config."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from cli_run import assert_user_error, cli_env, run_dsv3, tree_digest  # tests/ is on sys.path under pytest

from dsv3 import convert as conv
from dsv3.checkpoint import load_model, scan
from dsv3.errors import CheckpointError
from dsv3.fp8 import weight_dequant, weight_quant
from dsv3.names import is_quantized_in_release
from dsv3.safetensors_io import iter_tensors
from dsv3.testing import run_cli, write_checkpoint

TOKENS = torch.tensor([[3, 17, 101, 250, 8, 64, 299, 12]])


def _cfg(p):
    return json.loads((p / "config.json").read_text())


def test_fp8_to_bf16_is_a_valid_hf_checkpoint(fp8_ckpt, tmp_path):
    dst = tmp_path / "bf16"
    r = run_cli("convert", fp8_ckpt, dst, "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout
    assert "quantization_config" not in _cfg(dst) and _cfg(dst)["torch_dtype"] == "bfloat16"
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (dst / f).read_bytes() == (fp8_ckpt / f).read_bytes()
    infos = scan(dst)
    assert not any(n.endswith("_scale_inv") for n in infos)
    assert {i.dtype for n, i in infos.items() if not n.endswith("e_score_correction_bias")} == {torch.bfloat16}
    # the same weights as dequantising at load
    a, b = load_model(dst), load_model(fp8_ckpt, dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_transformers_loads_the_bf16_output(fp8_ckpt, tmp_path):
    transformers = pytest.importorskip("transformers")
    dst = tmp_path / "bf16"
    conv.convert(fp8_ckpt, dst, "bf16")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
    ours = load_model(dst, dtype=torch.float32)
    with torch.no_grad():
        ref, out = hf(TOKENS).logits.float(), ours(TOKENS)
    # measured 7.5e-7 (max-abs and norm); see RTOL in test_parity_transformers.py for why 5e-6
    assert ((out - ref).abs().max() / ref.abs().max()).item() < 5e-6


def test_fp8_fp32_fp8_round_trip_is_exact(fp8_ckpt, tmp_path):
    conv.convert(fp8_ckpt, tmp_path / "f32", "fp32")
    assert _cfg(tmp_path / "f32")["torch_dtype"] == "float32"
    conv.convert(tmp_path / "f32", tmp_path / "fp8", "fp8")
    assert _cfg(tmp_path / "fp8")["quantization_config"]["weight_block_size"] == [128, 128]
    orig, back = dict(iter_tensors(fp8_ckpt)), dict(iter_tensors(tmp_path / "fp8"))
    assert orig.keys() == back.keys()
    for n, t in orig.items():
        u = back[n]
        if t.dtype == torch.float8_e4m3fn:
            assert torch.equal(t.view(torch.uint8), u.view(torch.uint8)), n
        elif n.endswith("_scale_inv"):
            torch.testing.assert_close(u, t, rtol=1e-6, atol=0)
        else:
            assert torch.equal(u, t.to(u.dtype)), n


def test_bf16_to_fp8_uses_the_release_format(bf16_ckpt, tmp_path):
    dst = tmp_path / "fp8"
    conv.convert(bf16_ckpt, dst, "fp8")
    src, out = dict(iter_tensors(bf16_ckpt)), dict(iter_tensors(dst))
    for n, t in src.items():
        if is_quantized_in_release(n):
            q, s = weight_quant(t.float(), 128)
            assert out[n].dtype == torch.float8_e4m3fn and torch.equal(out[n].view(torch.uint8), q.view(torch.uint8))
            assert torch.equal(out[n + "_scale_inv"], s)
        else:
            assert n + "_scale_inv" not in out and out[n].dtype == t.dtype, n
    # the unquantized ones, by name: embeddings, head, norms, gate weight + bias, MTP eh_proj/shared_head/embed
    kept = {n for n in out if n not in src or not is_quantized_in_release(n)} - {n for n in out if "scale_inv" in n}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.2.eh_proj.weight",
            "model.layers.2.shared_head.head.weight", "model.layers.2.embed_tokens.weight",
            "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"} <= kept
    assert out["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    m = load_model(dst)
    assert m.layers[1].ffn.experts[0].w1.is_fp8 and not m.head.is_fp8
    # every quantized weight within e4m3's rounding of the original: half an ulp (2^-4 relative),
    # or half the smallest subnormal step (scale * 2^-10) near zero
    for n, t in src.items():
        if is_quantized_in_release(n):
            s = out[n + "_scale_inv"]
            deq = weight_dequant(out[n], s, 128, torch.float32)
            floor = s.repeat_interleave(128, 0)[: t.shape[0]].repeat_interleave(128, 1)[:, : t.shape[1]] * 2**-10
            assert ((deq - t.float()).abs() <= t.float().abs() * 2**-4 + floor * 1.001).all(), n


def test_force_replaces_only_an_earlier_convert_output(fp8_ckpt, tmp_path):
    dst = tmp_path / "out"
    r = run_dsv3("convert", str(fp8_ckpt), str(dst), "--dtype", "bf16")
    assert r.returncode == 0, r.stderr
    marker = json.loads((dst / conv.MARKER).read_text())
    assert marker == {"format": conv.MARKER_FORMAT, "source": str(fp8_ckpt.resolve()), "dtype": "bf16"}
    before = tree_digest(dst)
    assert_user_error(run_dsv3("convert", str(fp8_ckpt), str(dst), "--dtype", "fp32"), str(dst), "already exists")
    assert tree_digest(dst) == before
    r = run_dsv3("convert", str(fp8_ckpt), str(dst), "--dtype", "fp32", "--force")
    assert r.returncode == 0, r.stderr
    assert _cfg(dst)["torch_dtype"] == "float32" and json.loads((dst / conv.MARKER).read_text())["dtype"] == "fp32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary or old directory left


def test_converting_a_converted_checkpoint_writes_its_own_marker(fp8_ckpt, tmp_path):
    conv.convert(fp8_ckpt, tmp_path / "a", "bf16")
    (tmp_path / "a" / "trainer_state.json").write_text("{}")  # a training run's state is not the model's
    conv.convert(tmp_path / "a", tmp_path / "b", "fp8")
    assert json.loads((tmp_path / "b" / conv.MARKER).read_text())["source"] == str((tmp_path / "a").resolve())
    assert not (tmp_path / "b" / "trainer_state.json").exists()


def test_writes_without_numpy(fp8_ckpt, tmp_path):
    """_write_shard hands the tensor's bytes to the file itself: a process where numpy cannot be imported converts."""
    code = ("import sys; sys.modules['numpy'] = None\n"  # any `import numpy` now raises ImportError
            "from dsv3.convert import convert\n"
            f"convert({str(fp8_ckpt)!r}, {str(tmp_path / 'out')!r}, 'fp32')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    a, b = dict(iter_tensors(tmp_path / "out")), dict(iter_tensors(fp8_ckpt))
    assert a.keys() == {n for n in b if not n.endswith("_scale_inv")}
    assert torch.equal(a["model.embed_tokens.weight"], b["model.embed_tokens.weight"].float())


def test_interrupted_conversion_leaves_nothing(fp8_ckpt, tmp_path, monkeypatch):
    calls = []
    real = conv._write_shard

    def failing(file, entries, produce):
        calls.append(file)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(file, entries, produce)

    monkeypatch.setattr(conv, "_write_shard", failing)
    with pytest.raises(KeyboardInterrupt):
        conv.convert(fp8_ckpt, tmp_path / "out", "bf16")
    assert list(tmp_path.iterdir()) == []


def test_bad_source_fails_before_writing(fp8_ckpt, copy_ckpt, tmp_path):
    p = copy_ckpt(fp8_ckpt)
    (p / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        conv.convert(p, tmp_path / "out", "bf16")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------- bad input: one line, exit 2, nothing touched
def _link(tmp, name, target):
    (tmp / name).symlink_to(target, target_is_directory=True)
    return tmp / name


# case -> (setup(tmp, src) -> argv after "convert", needles); src is tmp/ckpts/fp8, a private copy
BAD = {
    "dst is src": lambda t, s: ([s, s, "--dtype", "bf16"], ["is the source checkpoint"]),
    "dst is src, --force": lambda t, s: ([s, s, "--dtype", "bf16", "--force"], ["is the source checkpoint"]),
    "dst is src through a symlinked parent": lambda t, s: (
        [s, _link(t, "alias", s.parent) / "fp8", "--dtype", "bf16", "--force"], ["is the source checkpoint"]),
    "dst inside src": lambda t, s: ([s, s / "out", "--dtype", "bf16"], ["is inside the source checkpoint"]),
    "dst inside src, deeper": lambda t, s: ([s, s / "a" / "b", "--dtype", "bf16"], ["is inside the source"]),
    "dst is src's parent, --force": lambda t, s: ([s, s.parent, "--dtype", "bf16", "--force"],
                                                  ["contains the source checkpoint", "would delete the source"]),
    "dst is an ancestor of src, --force": lambda t, s: ([s, t, "--dtype", "fp8", "--force"], ["contains the source"]),
    "dst is an ancestor via ..": lambda t, s: ([s, f"{s}/..", "--dtype", "bf16", "--force"], ["contains the source"]),
    "dst is an ancestor through a symlink": lambda t, s: (
        [s, _link(t, "up", t) / "ckpts", "--dtype", "bf16", "--force"], ["contains the source"]),
    "dst is a symlink": lambda t, s: ([s, _link(t, "ln", t / "ckpts"), "--dtype", "bf16", "--force"],
                                      ["symbolic link"]),
    "dst is a plain file": lambda t, s: (_touch(t / "f.txt") and [s, t / "f.txt", "--dtype", "bf16"],
                                         ["f.txt", "not a directory"]),
    "dst is a plain file, --force": lambda t, s: (_touch(t / "f.txt") and [s, t / "f.txt", "--dtype", "bf16", "--force"],
                                                  ["f.txt", "not a directory"]),
    "dst exists": lambda t, s: (_mkdir(t / "mine") and [s, t / "mine", "--dtype", "bf16"], ["mine", "already exists"]),
    "dst exists, --force, no marker": lambda t, s: (
        _mkdir(t / "mine") and [s, t / "mine", "--dtype", "bf16", "--force"],
        ["mine", "was not written by dsv3 convert", "remove it yourself"]),
    "dst exists, --force, bogus marker": lambda t, s: (
        _touch(t / "mine" / conv.MARKER, "{not json") and [s, t / "mine", "--dtype", "bf16", "--force"],
        ["was not written by dsv3 convert"]),
    "dst parent is a file": lambda t, s: (_touch(t / "f.txt") and [s, t / "f.txt" / "out", "--dtype", "bf16"],
                                          ["f.txt is not a directory"]),
    "dst grandparent is a file": lambda t, s: (
        _touch(t / "f.txt") and [s, t / "f.txt" / "a" / "out", "--dtype", "bf16"], ["f.txt is not a directory"]),
    "another convert is writing dst": lambda t, s: (
        _mkdir(t / f".out.partial-{os.getpid()}") and [s, t / "out", "--dtype", "bf16"],
        ["another dsv3 convert", f"pid {os.getpid()}", f".out.partial-{os.getpid()}"]),
    "src missing": lambda t, s: ([t / "nope", t / "out", "--dtype", "bf16"], ["nope", "no such directory"]),
    "src is a file": lambda t, s: (_touch(t / "f.txt") and [t / "f.txt", t / "out", "--dtype", "bf16"],
                                   ["f.txt", "not a directory"]),
    "src has no config.json": lambda t, s: (_mkdir(t / "empty") and [t / "empty", t / "out", "--dtype", "bf16"],
                                            ["no config.json"]),
    "src misses a shard": lambda t, s: ((s / "model-00002-of-00003.safetensors").unlink() or
                                        [s, t / "out", "--dtype", "bf16"], ["model-00002-of-00003", "missing"]),
    "--dtype unknown": lambda t, s: ([s, t / "out", "--dtype", "fp16"], ["--dtype", "invalid choice", "bf16"]),
    "--dtype missing": lambda t, s: ([s, t / "out"], ["--dtype", "required"]),
    "dst missing": lambda t, s: ([s, "--dtype", "bf16"], ["dst", "required"]),
}


def _touch(p, text="x"):
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return True


def _mkdir(p):
    p.mkdir(parents=True)
    return True


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_on_one_line_and_touches_nothing(case, fp8_ckpt, tmp_path):
    src = tmp_path / "ckpts" / "fp8"
    src.parent.mkdir()
    shutil.copytree(fp8_ckpt, src)
    argv, needles = BAD[case](tmp_path, src)
    before = tree_digest(tmp_path)
    assert_user_error(run_dsv3("convert", *map(str, argv)), *needles)
    assert tree_digest(tmp_path) == before  # source byte-identical, nothing created or removed


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_unwritable_dst_parent_is_refused(fp8_ckpt, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o555)
    assert_user_error(run_dsv3("convert", str(fp8_ckpt), str(ro / "out"), "--dtype", "bf16"), "permission denied")
    assert list(ro.iterdir()) == []


def test_failure_mid_conversion_restores_the_filesystem(tmp_path):
    """A tensor with NaN (found by --check-weights in the 2nd shard) fails the run after shard 1 was written:
    no DST, no partial directory, not even the parent directories the run created for DST."""
    from safetensors.torch import load_file, save_file

    src = write_checkpoint(tmp_path / "src", seed=3)
    shard = src / "model-00002-of-00003.safetensors"
    tensors = load_file(shard)
    name = next(n for n, t in tensors.items() if t.dtype == torch.bfloat16 and t.dim() == 2)
    tensors[name][0, 0] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    before = tree_digest(tmp_path)
    assert_user_error(run_dsv3("convert", str(src), str(tmp_path / "a" / "b" / "c" / "out"), "--dtype", "fp32",
                               "--check-weights"), name, "NaN")
    assert tree_digest(tmp_path) == before and not (tmp_path / "a").exists()


# ---------------------------------------------------------------------- signals and kills (real processes)
def _start_held(src, dst):
    """A `dsv3 convert` subprocess held for a minute after each shard (test hook), and its partial directory
    once it appears (polled with a deadline: the process needs a few seconds to import torch)."""
    proc = subprocess.Popen([sys.executable, "-m", "dsv3.cli", "convert", str(src), str(dst), "--dtype", "fp32"],
                            env=cli_env(DSV3_TEST_CONVERT_SHARD_DELAY="60"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    partial = dst.parent / f".{dst.name}.partial-{proc.pid}"
    deadline = time.monotonic() + 120
    while not (partial / "model-00001-of-00003.safetensors").exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "convert never started writing"
        time.sleep(0.02)
    return proc, partial


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_a_signal_removes_the_partial_output(sig, fp8_ckpt, tmp_path):
    before = tree_digest(fp8_ckpt)
    dst = tmp_path / "new" / "dir" / "out"  # new/ and new/dir/ do not exist: the run creates them
    proc, partial = _start_held(fp8_ckpt, dst)
    proc.send_signal(getattr(signal, sig))
    _, err = proc.communicate(timeout=60)
    p = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert_user_error(p, f"interrupted by {sig}", str(partial), rc=128 + getattr(signal, sig))
    assert list(tmp_path.iterdir()) == []  # no DST, no partial, no parent created for it
    assert tree_digest(fp8_ckpt) == before


def test_after_a_kill_the_next_run_cleans_up_and_succeeds(fp8_ckpt, tmp_path):
    before = tree_digest(fp8_ckpt)
    dst = tmp_path / "out"
    proc, partial = _start_held(fp8_ckpt, dst)
    proc.kill()  # SIGKILL cannot be caught: the partial directory stays
    proc.communicate(timeout=60)
    assert partial.is_dir() and not dst.exists()
    r = run_dsv3("convert", str(fp8_ckpt), str(dst), "--dtype", "fp32")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the dead run's partial directory is gone
    assert _cfg(dst)["torch_dtype"] == "float32" and (dst / conv.MARKER).is_file()
    assert tree_digest(fp8_ckpt) == before


def test_a_force_swap_cut_by_a_kill_puts_the_old_output_back(fp8_ckpt, tmp_path):
    """Killed between moving the old output aside and moving the new one in: the next run restores DST."""
    dst = tmp_path / "out"
    conv.convert(fp8_ckpt, dst, "bf16")
    before = tree_digest(dst)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    old = tmp_path / f".out.old-{int(dead.stdout)}"  # the pid of a process that has exited
    dst.rename(old)
    assert conv.check_destination(fp8_ckpt, dst)[0] == dst.resolve()  # DST missing: no complaint
    conv._remove_stale(dst.resolve())
    assert tree_digest(dst) == before and not old.exists()


def test_signal_handlers_are_restored(fp8_ckpt, tmp_path):
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    conv.convert(fp8_ckpt, tmp_path / "out", "bf16")
    assert {s: signal.getsignal(s) for s in handlers} == handlers


def test_too_little_free_space_is_refused_before_writing(fp8_ckpt, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(conv.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(conv.UsageError, match="GB free"):
        conv.convert(fp8_ckpt, tmp_path / "a" / "out", "bf16")
    assert list(tmp_path.iterdir()) == []


def test_a_dst_that_appears_during_the_run_is_not_replaced(fp8_ckpt, tmp_path, monkeypatch):
    """Checked absent at the start, created by someone else while converting: left as it is, output dropped."""
    dst = tmp_path / "out"
    real = conv._write_shard

    def racing(file, entries, produce):
        if not dst.exists():
            dst.mkdir()
            (dst / "theirs.txt").write_text("keep")
        return real(file, entries, produce)

    monkeypatch.setattr(conv, "_write_shard", racing)
    with pytest.raises(conv.UsageError, match="appeared while converting"):
        conv.convert(fp8_ckpt, dst, "bf16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and [p.name for p in dst.iterdir()] == ["theirs.txt"]
