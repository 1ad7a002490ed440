"""llama.cpp as a peer engine for `dsv3 bench decode --compare llama.cpp`.

The GGUF is made from the same HF directory the other engines load, by llama.cpp's own converter
(`convert_hf_to_gguf.py`, shipped in the llama-cpp-python source distribution under `vendor/llama.cpp/`), and
cached beside the checkpoint. llama.cpp then runs through its Python binding (`llama_cpp`, the optional peer):
its C++ engine does the work, Python only hands it token ids and reads the last position's logits.

Two things the converter needs that a random benchmark checkpoint does not have, supplied without touching
what it converts:
  - a tokenizer: a minimal byte-level BPE (the 256 byte symbols and one merge; the converter pads the
    vocabulary to the config's `vocab_size` with unused entries). The benchmark feeds token ids, so which
    tokenizer is irrelevant to the timing;
  - a recognised pre-tokenizer: the converter identifies one by hashing how the tokenizer splits a fixed text,
    and refuses unknown ones; the driver below answers "gpt-2" (the regex the bundled tokenizer uses) in place
    of that lookup. Everything else -- tensor names, MLA's k_b/v_b split, the merged experts -- is the
    converter's own code.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from dsv3.errors import UsageError

SRC_ENV = "DSV3_LLAMA_CPP_SRC"
GET_SOURCE = ("pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 && "
              "tar xzf llama_cpp_python-0.3.36.tar.gz, then pass --llama-cpp-src "
              "llama_cpp_python-0.3.36/vendor/llama.cpp (or set " + SRC_ENV + ")")

GGML_TYPE_BF16 = 30  # ggml.h's enum value; the binding (0.3.36) names F32 and F16 only

# Run in a fresh interpreter: the converter's own packages (gguf-py, conversion/) come first on its path.
_DRIVER = """
import runpy, sys
src = sys.argv[1]
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def check_available(src: str | None) -> Path:
    """The llama.cpp source directory holding the converter, with the binding importable; else a UsageError."""
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise UsageError("--compare llama.cpp needs the llama-cpp-python package (pip install llama-cpp-python, "
                         "built from source: it compiles llama.cpp)") from None
    src = src or os.environ.get(SRC_ENV)
    if not src:
        raise UsageError("--compare llama.cpp needs llama.cpp's converter (convert_hf_to_gguf.py): " + GET_SOURCE)
    path = Path(src)
    if not (path / "convert_hf_to_gguf.py").is_file() or not (path / "gguf-py").is_dir():
        raise UsageError(f"--llama-cpp-src {src}: expected a llama.cpp source directory holding convert_hf_to_gguf.py "
                         f"and gguf-py/; get one with: {GET_SOURCE}")
    return path


def ensure_gguf(ckpt: Path, dtype: str, src: Path) -> Path:
    """`ckpt` converted by llama.cpp's converter to a GGUF of `dtype` (f32 or bf16), written once beside it."""
    out = ckpt.parent / f"{ckpt.name}-{ {'float32': 'f32', 'bfloat16': 'bf16'}[dtype]}.gguf"
    if out.is_file():
        return out
    stage = ckpt.parent / f".{ckpt.name}-gguf-src"
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    try:
        for f in ckpt.iterdir():
            if f.name.endswith((".safetensors", ".json")) and not f.name.startswith("tokenizer"):
                (stage / f.name).symlink_to(f.resolve())
        _byte_tokenizer(stage)
        tmp = out.with_suffix(".gguf.partial")
        r = subprocess.run([sys.executable, "-c", _DRIVER, str(src), str(stage), "--outtype", out.stem.rsplit("-", 1)[1],
                            "--outfile", str(tmp)], capture_output=True, text=True)
        if r.returncode != 0:
            tmp.unlink(missing_ok=True)
            raise RuntimeError(f"llama.cpp's converter failed on {ckpt}:\n{r.stderr[-3000:]}")
        tmp.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return out


def _byte_tokenizer(path: Path) -> None:
    """tokenizer.json + tokenizer_config.json: byte-level BPE over the 256 byte symbols and one merge (ids 0-256)."""
    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {sym: i for i, sym in enumerate(symbols)} | {"\u0120t": len(symbols)}  # "Ġt": space + t
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("\u0120", "t")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


class LlamaCppRunner:
    """One llama.cpp context over `gguf` holding `batch` sequences (its own seq ids, not kv_unified: the
    sequences share no prefix). `exact`: flash attention off, so that float32 is float32 throughout (the
    agreement check); otherwise llama.cpp's defaults. `prefill(ids (b, s))` / `step(ids (b, s), pos)` return the last position's
    logits of every sequence as a (b, 1, vocab) float32 torch tensor, as the other engines' runners do."""

    def __init__(self, gguf: Path, n_ctx: int, threads: int, dtype: str, batch: int = 1, exact: bool = False):
        import llama_cpp as L

        L.llama_backend_init()
        self._quiet = L.llama_log_callback(lambda level, text, user: None)  # kept: C holds the pointer
        L.llama_log_set(self._quiet, None)
        self.L, self.b = L, batch
        self.model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cp = L.llama_context_default_params()
        cp.n_ctx, cp.n_seq_max, cp.kv_unified = n_ctx * batch, batch, False
        cp.n_batch = cp.n_ubatch = 512
        cp.n_threads = cp.n_threads_batch = threads
        # the cache in the weights' dtype, as dsv3 and transformers keep it (llama.cpp's default is float16)
        cp.type_k = cp.type_v = {"float32": L.GGML_TYPE_F32, "bfloat16": GGML_TYPE_BF16}[dtype]
        if exact:  # its CPU flash attention (on by default) rounds to float16 inside: 4-6e-3 relative in float32
            cp.flash_attn_type = L.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = L.llama_init_from_model(self.model, cp)
        if not self.ctx:
            raise RuntimeError(f"llama.cpp could not create a context of {n_ctx * batch} positions for {gguf}")
        self.n_vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(self.model))
        self.batch = L.llama_batch_init(512, 0, 1)
        self.n_past = 0

    def _run(self, ids, start: int):
        """Feed ids (b, s) at positions start.. to their sequences, 512 tokens per llama_decode."""
        L, batch = self.L, self.batch
        rows = ids.tolist()
        pending = [(seq, start + i, tok) for seq, row in enumerate(rows) for i, tok in enumerate(row)]
        last = {}  # seq -> logits row of its last position
        for lo in range(0, len(pending), 512):
            chunk = pending[lo:lo + 512]
            batch.n_tokens = len(chunk)
            for j, (seq, pos, tok) in enumerate(chunk):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.seq_id[j][0] = tok, pos, 1, seq
                batch.logits[j] = pos == start + len(rows[seq]) - 1
            if L.llama_decode(self.ctx, batch) != 0:
                raise RuntimeError(f"llama_decode failed at positions {chunk[0][1]}..{chunk[-1][1]}")
            for j, (seq, _, _) in enumerate(chunk):
                if batch.logits[j]:
                    ptr = L.llama_get_logits_ith(self.ctx, j)
                    last[seq] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
        self.n_past = start + len(rows[0])
        return torch.from_numpy(np.stack([last[q] for q in range(len(rows))]))[:, None]

    def prefill(self, x):
        self.L.llama_memory_clear(self.L.llama_get_memory(self.ctx), True)
        return self._run(x, 0)

    def step(self, x, pos: int):
        if pos != self.n_past:
            raise RuntimeError(f"llama.cpp runner: step at position {pos}, but its cache holds {self.n_past}")
        return self._run(x, pos)

    def cache_bytes(self) -> int:
        """The saved state's size: the cache of the tokens held (and the last logits, a rounding error)."""
        return int(self.L.llama_state_get_size(self.ctx))
