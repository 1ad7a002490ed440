"""The suite can fail: each mutation below breaks one behaviour in a temporary copy of the repository
(package and tests), and the tests named for it must then fail.

Every mutation is applied to a fresh copy (`dsv3/`, `kernels/`, `tests/`, `pyproject.toml`) and the named
test node ids run there in a subprocess (`python -m pytest`, cwd = the copy, so `import dsv3` and every
child process the tests start -- the CLI, torchrun -- load the mutated package). The unmutated copy must
pass the same node ids first, so a failure is the mutation's doing. The mutation strings must occur exactly
once in their file: a refactoring that moves them fails here loudly instead of silently mutating nothing.

Slow (~1.5-2 minutes on 2 cores, two runs at a time), and part of CI: a skipped mutation run would prove
nothing. `pytest -q -m "not slow"` leaves it out while iterating.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# name: (file, old, new, node ids that must fail -- relative to tests/)
MUTATIONS = {
    "norm eps 10x": (
        "dsv3/layers.py", "xf.pow(2).mean(-1, keepdim=True) + self.eps)", "xf.pow(2).mean(-1, keepdim=True) + 10 * self.eps)",
        ["test_parity_transformers.py::test_logits_match_transformers[qlora-groups-yarn-naive]",
         "test_mtp.py::test_forward_mtp_matches_transformers[tiny]"]),
    "bias ignored in routing": (
        "dsv3/moe.py", "choice = scores if self.bias is None else scores + self.bias", "choice = scores",
        ["test_parity_transformers.py::test_logits_match_transformers[qlora-groups-yarn-naive]",
         "test_parity_transformers.py::test_correction_bias_changes_routing[qlora-groups-yarn]"]),
    "top-p ignored": (
        "dsv3/sampling.py", "    if top_p < 1.0:\n        sorted_p", "    if False:\n        sorted_p",
        ["test_sampling.py::test_sampling_probs_equal_the_definitions[0.8-0.9-0]",
         "test_sampling.py::test_sample_draws_the_reference_distribution[1.3-0.7-0]",
         "test_speculative.py::test_sampling_distribution_unchanged[0-0.75]"]),
    "--mtp ignored": (
        "dsv3/cli/generate.py", 'speculative="mtp" if ns.mtp else None', "speculative=None",
        ["test_speculative.py::test_cli_mtp_flag_drafts_and_accepts_when_sampling",
         "test_bundled_model.py::test_generate_mtp_on_the_bundled_model_accepts_drafts"]),
    "latent attention off by a transpose": (
        "dsv3/mla.py", 'q_lat = cpu_bf16.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, : self.nope])',
        'q_lat = cpu_bf16.einsum("bshd,hdc->bshc", q_nope, '
        'wkv_b[:, : self.nope].transpose(0, 1).reshape(wkv_b.shape[0], self.nope, -1))',
        ["test_mla.py::test_mla_matches_float64_reference[latent-tiny]",
         "test_mla.py::test_decode_steps_match_float64_reference[latent]",
         "test_parity_transformers.py::test_logits_match_transformers[qlora-groups-yarn-latent]"]),
    "a shard dim swapped": (
        "dsv3/names.py", '("self_attn.o_proj", "attn.wo", 1)', '("self_attn.o_proj", "attn.wo", 0)',
        ["test_parallel.py::test_name_table_splits_what_the_hand_written_table_splits"]),
    "FP8 dequantised with one block's scale": (
        "dsv3/fp8.py", "out = (blocks * s[..., :, None, :, None])",
        "out = (blocks * s[..., :1, None, :1, None])",
        ["test_checkpoint.py::test_fp8_matches_transformers_on_dequantised_weights"]),
    "info: active experts off by one": (
        "dsv3/info.py", "active += _numel(blk) - _moe_inactive(blk.ffn, args)",
        "active += _numel(blk) - _moe_inactive(blk.ffn, args.replace(n_activated_experts=args.n_activated_experts + 1))",
        ["test_info.py::test_info_counts_match_a_real_model"]),
    "MTP concatenates hidden state first": (
        "dsv3/mtp.py", "torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1)",
        "torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1)",
        ["test_mtp_module.py::test_module_is_its_formula"]),
    "streaming printed at the end": (
        "dsv3/cli/common.py", "        sys.stdout.write(piece)\n        sys.stdout.flush()\n",
        "        self.held = getattr(self, 'held', '') + piece\n",
        ["test_cli_generate.py::test_streaming_writes_tokens_as_they_come",
         "test_frontend.py::test_printer_writes_generated_tokens_of_row_0_only"]),
    "V3.2 indexer: the demo's interleaved RoPE": (
        "dsv3/indexer.py", "self.rope = apply_rope if args.index_rope_interleave else apply_rope_half",
        "self.rope = apply_rope",
        ["test_parity_v32.py::test_prefill_logits_match_transformers[latent]",
         "test_indexer.py::test_scores_and_selection_match_float64[False]"]),
    "V3.2 indexer score without n_heads^-1/2": (
        "dsv3/indexer.py", "self.scale = (self.n_heads * self.head_dim) ** -0.5", "self.scale = self.head_dim ** -0.5",
        ["test_indexer.py::test_scores_and_selection_match_float64[False]"]),
    "chat keeps a turn that did not fit": (
        "dsv3/cli/chat.py", "            messages.pop()\n", "",
        ["test_frontend.py::test_chat_script_blank_lines_eof_and_a_full_conversation"]),
}
# the streaming mutation holds the pieces back and writes them all in finish()
FINISH = ("    def finish(self) -> None:\n",
          "    def finish(self) -> None:\n        sys.stdout.write(getattr(self, 'held', ''))\n")


def _copy_repo(dst: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    shutil.copytree(ROOT / "dsv3", dst / "dsv3", symlinks=True, ignore=ignore)  # dsv3/kernels -> ../kernels
    shutil.copytree(ROOT / "kernels", dst / "kernels", ignore=ignore)
    shutil.copytree(ROOT / "tests", dst / "tests", ignore=shutil.ignore_patterns("__pycache__", "test_mutations.py"))
    shutil.copy(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def _mutate(root: Path, file: str, old: str, new: str) -> None:
    f = root / file
    text = f.read_text()
    assert text.count(old) == 1, f"{file}: the mutation's target occurs {text.count(old)} times (expected once)"
    text = text.replace(old, new)
    if old.startswith("        sys.stdout.write(piece)"):
        assert text.count(FINISH[0]) == 1
        text = text.replace(*FINISH)
    f.write_text(text)


def _pytest(root: Path, nodes: list[str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_", "COV_"))}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    env.pop("PYTHONPATH", None)
    # no nbval plugin (jupyter imports: ~4 s a process); no cache written into the copy
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:nbval", "-o", "addopts=", "--no-header",
           *(f"tests/{n}" for n in nodes)]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)


BASELINE = "(unmutated copy)"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, subprocess.CompletedProcess]:
    """Every pytest run, two at a time (the machines this runs on have 2 cores): the unmutated copy with
    all the node ids, then one run per mutation with its own."""
    def one(name: str) -> subprocess.CompletedProcess:
        root = _copy_repo(tmp_path_factory.mktemp("mutation") / "repo")
        if name == BASELINE:
            return _pytest(root, sorted({n for *_, ns in MUTATIONS.values() for n in ns}))
        file, old, new, nodes = MUTATIONS[name]
        _mutate(root, file, old, new)
        return _pytest(root, nodes)

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(one, name) for name in [BASELINE, *MUTATIONS]}
        return {name: f.result() for name, f in futures.items()}


def test_the_copy_imports_itself_and_passes(tmp_path, runs):
    root = _copy_repo(tmp_path / "repo")
    r = subprocess.run([sys.executable, "-c", "import dsv3, dsv3.kernels; print(dsv3.__file__)"], cwd=root,
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert r.returncode == 0 and Path(r.stdout.strip()).resolve().is_relative_to(root.resolve()), r
    r = runs[BASELINE]
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_mutation_is_caught(name, runs):
    nodes = MUTATIONS[name][3]
    r = runs[name]
    assert r.returncode == 1, f"{name}: pytest exited {r.returncode}\n" + r.stdout[-3000:] + r.stderr[-2000:]
    summary = r.stdout.strip().splitlines()[-1]
    assert "passed" not in summary, f"{name}: some of {nodes} still pass with the mutation: {summary}"
