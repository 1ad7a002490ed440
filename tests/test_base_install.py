"""The base install (`pip install .`, no extras) runs every command that names no extra, warning-free.

A fresh virtual environment gets only what pyproject.toml's `dependencies` bring (with the
project's torch pin), then runs, on small checkpoints: generate, chat on scripted stdin,
convert to bf16 / fp32 / fp8, train two steps and resume, and a 2-rank torchrun generate
that must equal the single process. Every command must exit 0 with nothing on stderr (an
undeclared import — numpy was one — shows up here as a failure or torch's
"Failed to initialize NumPy" warning). It needs the package registry (or pip's cache), as
the README's install does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "dsv3" / "assets" / "dsv3-tiny"
EXTRAS = ("transformers", "matplotlib", "jupyterlab", "nbval", "pytest", "triton", "tiktoken", "fastapi", "uvicorn",
          "openai")
pytestmark = pytest.mark.slow


def _ignore(directory, names):
    return {n for n in names if n in {".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache", ".ruff_cache",
                                      "notebooks", "figures", "tests", "docs"} or n.endswith(".egg-info")}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(venv bin dir, environment) of a fresh venv holding the base install of a copy of this checkout."""
    where = tmp_path_factory.mktemp("base")
    src = where / "src"
    shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True, timeout=300)
    bin_ = where / "venv" / "bin"
    r = subprocess.run([str(bin_ / "pip"), "install", "-q", "--disable-pip-version-check", "-c",
                        str(ROOT / ".ci" / "constraints.txt"), str(src)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "TRITON", "VIRTUAL_ENV"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PATH=f"{bin_}{os.pathsep}{env.get('PATH', '')}")
    return bin_, env, where


def _run(base, *argv, stdin: str | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    bin_, env, where = base
    exe = argv[0] if argv[0] == "torchrun" else "dsv3"
    args = argv[1:] if exe == "torchrun" else argv
    r = subprocess.run([str(bin_ / exe), *args], input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
                       capture_output=True, text=True, env=env, cwd=where, timeout=timeout)
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stderr[-3000:]}"
    assert r.stderr.strip() == "", f"{argv} wrote to stderr:\n{r.stderr[-3000:]}"
    return r


def test_base_install_has_no_extras(base):
    bin_, env, _ = base
    out = subprocess.run([str(bin_ / "python"), "-c", "import importlib.util, json, sys; "
                          f"print(json.dumps([m for m in {list(EXTRAS)!r} if importlib.util.find_spec(m)]))"],
                         capture_output=True, text=True, env=env, check=True).stdout
    assert json.loads(out) == [], "the base install pulled in an extra's package"


def test_help_and_generate(base):
    assert "generate" in _run(base, "--help").stdout
    out = _run(base, "generate", "ROMEO:", "--max-new-tokens", "6", "--json").stdout
    assert len(json.loads(out)["tokens"][0]) == 6
    _run(base, "info", "671B")


def test_serve_without_its_extra_says_what_to_install(base):
    bin_, env, where = base
    r = subprocess.run([str(bin_ / "dsv3"), "serve"], capture_output=True, text=True, env=env, cwd=where, timeout=120,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and "pip install 'dsv3[serve]'" in r.stderr, r.stderr


def test_chat_on_scripted_stdin(base):
    r = _run(base, "chat", "--max-new-tokens", "5", stdin="Good morrow.\nHow now?\n/exit\n")
    assert len([ln for ln in r.stdout.splitlines() if ln.strip()]) == 2  # one reply per turn


def test_convert_bf16_fp32_fp8(base):
    _, _, where = base
    _run(base, "convert", str(BUNDLED), str(where / "bf16"), "--dtype", "bf16")
    _run(base, "convert", str(BUNDLED), str(where / "fp32"), "--dtype", "fp32")
    _run(base, "convert", str(where / "bf16"), str(where / "fp8"), "--dtype", "fp8")
    for d in ("bf16", "fp32", "fp8"):
        out = _run(base, "generate", "--ckpt", str(where / d), "ROMEO:", "--max-new-tokens", "3", "--json").stdout
        assert len(json.loads(out)["tokens"][0]) == 3


def test_bench_slice_small_on_cpu(base):
    """`dsv3 bench slice` (issue #16's GPU run) needs no extra: a tiny-width slice on CPU, parity checked."""
    _, _, where = base
    r = _run(base, "bench", "slice", "--dir", str(where / "slice"), "--config", "tiny", "--device", "cpu",
             "--batch", "1", "--context", "12", "--mode", "readable,static", "--steps", "2", "--prefill", "16")
    assert r.stdout.splitlines()[-1] == "parity: ok"


def test_train_two_steps_and_resume(base):
    _, _, where = base
    corpus = where / "corpus"
    corpus.mkdir()
    text = (BUNDLED / "tokenizer.json").read_text()[:20000]  # any text will do: it only has to tokenize
    (corpus / "a.txt").write_text(text[:10000])
    (corpus / "b.txt").write_text(text[10000:])
    common = ["--out", str(where / "run"), "--data", str(corpus), "--vocab-size", "300", "--config", "tiny",
              "--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-windows", "2", "--quiet"]
    first = json.loads(_run(base, "train", *common, "--stop-after", "1").stdout)
    assert first["step"] == 1
    second = json.loads(_run(base, "train", *common).stdout)
    assert second["step"] == 2


def test_torchrun_two_ranks_equals_one_process(base):
    bin_, env, where = base
    ckpt = where / "tiny-dist"
    subprocess.run([str(bin_ / "python"), "-c", "import sys; from dsv3.testing import write_checkpoint, tiny_hf_args; "
                    "write_checkpoint(sys.argv[1], tiny_hf_args(dtype='bf16'), n_shards=2)", str(ckpt)],
                   check=True, env=env, timeout=300)
    argv = ["--ckpt", str(ckpt), "--prompt-ids", "1,2,3", "--max-new-tokens", "5", "--json"]
    one = json.loads(_run(base, "generate", *argv).stdout)
    two = _run(base, "torchrun", "--standalone", "--nproc-per-node", "2", "-m", "dsv3.generate", *argv)
    assert json.loads(two.stdout.strip().splitlines()[-1]) == one
