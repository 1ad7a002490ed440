"""Packaging: `kernels/` is importable as `dsv3.kernels` -- never as a top-level `kernels` that would
shadow Hugging Face's package of that name -- in editable and regular installs, run from the repo
root and from elsewhere; and the model imports and runs without triton.

The installs go into child venvs of the running interpreter (its site-packages made visible by a
.pth file, so torch/transformers are not reinstalled) from a copy of the repo (symlinks kept),
with `pip install --no-deps --no-build-isolation` (offline, seconds; with pip's isolated build as
a fallback where the running environment's setuptools is too old to build the project).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = "_packaging_probe"  # a module added to kernels/ in the copy: proves files under kernels/ ship

CHECK = textwrap.dedent(f"""
    import importlib.util, json, sys
    import dsv3, dsv3.kernels
    spec = importlib.util.find_spec("kernels")
    from transformers.utils import import_utils
    print(json.dumps({{
        "dsv3": dsv3.__file__,
        "dsv3.kernels": list(dsv3.kernels.__path__),
        "probe": importlib.import_module("dsv3.kernels.{PROBE}").VALUE,
        "kernels_spec": None if spec is None else {{"origin": spec.origin,
                                                   "locations": list(spec.submodule_search_locations or [])}},
        "is_kernels_available": import_utils.is_kernels_available(),
    }}))
""")


def _ignore(directory, names):
    return {n for n in names if n in {".git", ".venv", "__pycache__", "build", "dist", ".pytest_cache",
                                      ".ruff_cache", "notebooks", "figures"} or n.endswith(".egg-info")}


def _child_venv(where: Path) -> Path:
    """A venv without pip whose interpreter also sees the running interpreter's site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True, timeout=120)
    py = where / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             check=True, capture_output=True, text=True).stdout.strip()
    parent = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "_parent_site.pth").write_text("\n".join(sorted(parent)) + "\n")
    return py


@pytest.fixture(scope="module")
def installs(tmp_path_factory):
    pytest.importorskip("setuptools", reason="--no-build-isolation needs setuptools in the running environment")
    pytest.importorskip("pip")
    pytest.importorskip("transformers")
    base = tmp_path_factory.mktemp("pkg")
    out = {}
    for kind in ("editable", "regular"):
        src = base / f"repo-{kind}"
        shutil.copytree(ROOT, src, symlinks=True, ignore=_ignore)
        (src / "kernels" / f"{PROBE}.py").write_text("VALUE = 42\n")
        py = _child_venv(base / f"venv-{kind}")
        target = ["-e", str(src)] if kind == "editable" else [str(src)]
        fast = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index", *target]
        r = subprocess.run(fast, capture_output=True, text=True, timeout=300, cwd=base)
        if r.returncode != 0:
            # the running environment's setuptools cannot build it (e.g. an old one without `wheel`):
            # let pip fetch the build backend pyproject.toml asks for, as the README's install does
            r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", *target], capture_output=True,
                               text=True, timeout=600, cwd=base)
        assert r.returncode == 0, r.stdout + r.stderr
        out[kind] = (py, src)
    (base / "elsewhere").mkdir()
    out["elsewhere"] = base / "elsewhere"
    return out


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)  # only the install may provide dsv3
    return env


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["editable", "regular"])
@pytest.mark.parametrize("cwd", ["repo-root", "elsewhere"])
def test_dsv3_kernels_importable_top_level_kernels_not(installs, kind, cwd):
    py, src = installs[kind]
    run_in = src if cwd == "repo-root" else installs["elsewhere"]
    r = subprocess.run([str(py), "-c", CHECK], capture_output=True, text=True, cwd=run_in, env=_env(), timeout=300)
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout.strip().splitlines()[-1])
    assert info["probe"] == 42  # a module under kernels/ is dsv3.kernels.<module>
    if kind == "regular" and cwd == "elsewhere":
        venv = py.parent.parent.resolve()  # the copy in the child venv's site-packages, not the source tree
        assert Path(info["dsv3"]).resolve().is_relative_to(venv)
        assert all(Path(p).resolve().is_relative_to(venv) for p in info["dsv3.kernels"])
    else:
        assert Path(info["dsv3"]).resolve().is_relative_to(src.resolve())
    spec = info["kernels_spec"]
    if cwd == "elsewhere":
        assert spec is None, f"a top-level `kernels` is importable from the install: {spec}"
    else:
        # Python puts the working directory first on sys.path, so from the repo root kernels/ is at most an
        # implicit namespace portion: no module of its own, and any real `kernels` package wins over it.
        assert spec is None or spec["origin"] is None, spec
    assert info["is_kernels_available"] is False


@pytest.mark.slow
def test_a_real_kernels_package_wins_from_the_repo_root(installs, tmp_path):
    """Hugging Face's `kernels`, when installed, is the one imported, even from our repo root."""
    py, src = installs["editable"]
    fake = tmp_path / "site"
    (fake / "kernels").mkdir(parents=True)
    (fake / "kernels" / "__init__.py").write_text("__version__ = '0.0.hf'\n")
    env = dict(_env(), PYTHONPATH=str(fake))
    r = subprocess.run([str(py), "-c", "import kernels; print(kernels.__version__)"], capture_output=True,
                       text=True, cwd=src, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0.0.hf"


NO_TRITON = textwrap.dedent("""
    import importlib.abc, sys

    class BlockTriton(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "triton" or name.startswith("triton."):
                raise ImportError("triton is blocked for this test")
            return None

    sys.meta_path.insert(0, BlockTriton())
    import torch, dsv3
    from dsv3.model import Transformer
    torch.manual_seed(0)
    model = Transformer(dsv3.ModelArgs.preset("tiny")).eval()
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]]))
    assert logits.shape == (1, 4, model.args.vocab_size) and torch.isfinite(logits).all()
    print(dsv3.generate(model, [[1, 2, 3]], 4))
    assert not any(m == "triton" or m.startswith("triton.") for m in sys.modules), "triton got imported"
    try:
        import triton  # noqa: F401
    except ImportError:
        print("triton blocked")
""")


def test_model_imports_and_runs_without_triton():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = subprocess.run([sys.executable, "-c", NO_TRITON], capture_output=True, text=True, env=env, cwd=ROOT,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == "triton blocked" and len(json.loads(lines[-2])[0]) == 4
