"""Synthetic checkpoints in the exact Hugging Face DeepSeek-V3 layout, for tests and notebooks.

`write_checkpoint` writes random weights the way the release stores them: FP8 e4m3 block
weights with float32 `weight_scale_inv` (partial edge blocks when a dimension is not a
multiple of 128), bf16 non-quantized tensors, a float32 gate correction bias, the MTP
layer at `model.layers.{n_layers + k}` with its copies of embedding and head, several
shards and a `model.safetensors.index.json`. Tensors are generated and written one shard
at a time, so large test checkpoints do not need a whole model in memory.
`write_tokenizer` adds a small byte-level BPE trained on the spot plus DeepSeek-V3's
chat template. `write_tiny_checkpoint` saves a random `tiny_dist_args` model for the parallel tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from dsv3.checkpoint import save_model
from dsv3.config import ModelArgs
from dsv3.fp8 import weight_quant
from dsv3.layers import LayerNorm, RMSNorm
from dsv3.model import Transformer
from dsv3.moe import Gate
from dsv3.names import dsv3_name_to_hf, is_quantized_in_release, meta_state
from dsv3.safetensors_io import write_index, write_shard
from dsv3.tokenizer import DEEPSEEK_V3_CHAT_TEMPLATE

# Special tokens of the DeepSeek-V3 tokenizer that the chat template uses ("▁" is U+2581).
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<｜▁pad▁｜>"]

_CORPUS = """DeepSeek-V3 is a mixture-of-experts language model with 671 billion parameters, of which 37 billion
are activated for each token. It uses multi-head latent attention and an auxiliary-loss-free strategy for load
balancing, and it is trained with a multi-token prediction objective. The weights are released in FP8 with one
scale per block of 128 by 128 values. Hello, how are you? I am fine, thank you. What is the capital of France?
The capital of France is Paris. Tell me a story about a small robot who learns to read. Once upon a time there
was a robot. 1 2 3 4 5 6 7 8 9 10. def add(a, b): return a + b. Ünïcödé tëxt, 中文, emoji 🙂 too."""


def tiny_hf_args(**overrides) -> ModelArgs:
    """A small DeepSeek-V3-shaped config whose FP8 blocks include partial ones (dims 200, 136, 160, ...):
    the "tiny-hf" member of the tiny family (`ModelArgs.tiny`)."""
    return ModelArgs.tiny("tiny-hf", **overrides)


# A V3.2 lightning indexer small enough for the tiny family: top-k below the test prompts' lengths.
TINY_INDEXER = dict(index_n_heads=4, index_head_dim=32, index_topk=6)


def tiny_v32_args(**overrides) -> ModelArgs:
    """`tiny_hf_args` plus a lightning indexer (DeepSeek-V3.2; model_type deepseek_v32 in config.json)."""
    return ModelArgs.tiny("tiny-hf", **{**TINY_INDEXER, **overrides})


def tiny_dist_args(fp8: bool = False, v32: bool = False) -> ModelArgs:
    """What 1, 2 and 4 ranks split ("tiny-dist"); with FP8 a block size of 8
    (quantization_config.weight_block_size) so sharded rows and columns stay whole blocks; `v32` adds an indexer."""
    return ModelArgs.tiny("tiny-dist", **(dict(dtype="fp8", block_size=8) if fp8 else {}),
                          **(TINY_INDEXER if v32 else {}))


def write_tiny_checkpoint(path, fp8: bool = False, seed: int = 0, v32: bool = False) -> Path:
    """A random `tiny_dist_args(fp8, v32)` model saved in three shards: everything but the routed experts,
    experts 0-3 (rank 0's at world size 2) and experts 4-7 (rank 1's), so a test can break a shard that only
    one rank reads. Float32, or FP8 with 8×8 blocks."""
    args = tiny_dist_args(fp8, v32)
    torch.manual_seed(seed)
    model = Transformer(args)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, Gate) and mod.bias is not None:
                mod.bias.normal_(0, 0.05)  # non-zero correction bias: selection differs from weighting
            if isinstance(mod, (RMSNorm, LayerNorm)):
                mod.weight.normal_(1.0, 0.1)
            if isinstance(mod, LayerNorm):
                mod.bias.normal_(0, 0.1)

    def shard_of(name: str) -> str:
        m = re.search(r"\.experts\.(\d+)\.", name)
        return f"model-0000{1 if m is None else (2 if int(m.group(1)) < 4 else 3)}-of-00003.safetensors"

    save_model(model, path, mtp_copies=True, shard_of=shard_of)
    return Path(path)


def write_checkpoint(path, args: ModelArgs | None = None, *, fp8: bool | None = None, n_shards: int = 3,
                     seed: int = 0, float_dtype: torch.dtype = torch.bfloat16, std: float = 0.05,
                     tokenizer: bool = False, mtp_copies: bool = True, device: str | torch.device = "cpu") -> Path:
    """Write a random checkpoint for `args` (default `tiny_hf_args()`) to `path`; return the path.

    fp8 (default: args.dtype == "fp8") quantises exactly the tensors the release quantises.
    `device`: where the values are drawn and quantised (a GPU writes a 25 GB slice in seconds, a CPU
    core takes minutes); the values depend on the device's generator, so seed only repeats per device.
    """
    args = args or tiny_hf_args()
    fp8 = args.dtype == "fp8" if fp8 is None else fp8
    args = args.replace(dtype="fp8" if fp8 else "bf16")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator(device).manual_seed(seed)
    names = list(meta_state(args.replace(dtype="bf16")).items())
    chunks = [names[i * len(names) // n_shards:(i + 1) * len(names) // n_shards] for i in range(n_shards)]
    shared: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total = 0
    for i, chunk in enumerate(chunks):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        tensors: dict[str, torch.Tensor] = {}
        for ours, meta in chunk:
            hf = dsv3_name_to_hf(ours, args)
            t = _random(ours, tuple(meta.shape), gen, std, device)
            if ours in ("embed.weight", "head.weight"):
                shared[ours] = t
            if fp8 and is_quantized_in_release(hf):
                q, s = weight_quant(t, args.block_size, args.scale_fmt)  # V3.1: power-of-two scales
                tensors[hf], tensors[hf + "_scale_inv"] = q.cpu(), s.cpu()
            else:
                tensors[hf] = (t if ours.endswith("gate.bias") else t.to(float_dtype)).cpu()
            if ours in shared:
                shared[ours] = shared[ours].cpu()
        if i == n_shards - 1 and mtp_copies:
            for k in range(args.n_mtp_layers):
                layer = args.n_layers + k
                tensors[f"model.layers.{layer}.embed_tokens.weight"] = shared["embed.weight"].to(float_dtype).clone()
                tensors[f"model.layers.{layer}.shared_head.head.weight"] = shared["head.weight"].to(float_dtype).clone()
        write_shard(path / fname, tensors)
        for n, t in tensors.items():
            weight_map[n] = fname
            total += t.numel() * t.element_size()
    write_index(path, weight_map, total)
    cfg = args.to_hf_config()
    cfg["torch_dtype"] = str(float_dtype).replace("torch.", "")
    if tokenizer:
        cfg.update(bos_token_id=0, eos_token_id=1)
        write_tokenizer(path, args.vocab_size)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


def _random(ours: str, shape: tuple[int, ...], gen: torch.Generator, std: float, device="cpu") -> torch.Tensor:
    r = torch.randn(shape, generator=gen, device=device)
    if ours.endswith("norm.weight"):
        return 1 + 0.1 * r
    if ours.endswith("gate.bias"):
        return 0.1 * r
    return std * r


def write_tokenizer(path, vocab_size: int = 320, corpus: str = _CORPUS) -> Path:
    """A byte-level BPE (DeepSeek's special tokens first: bos 0, eos 1) trained on `corpus`, with
    tokenizer_config.json carrying DeepSeek-V3's chat template and generation_config.json."""

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.split("\n") * 4, trainer)
    tok.save(str(path / "tokenizer.json"))

    def added(s: str) -> dict:
        return {"__type": "AddedToken", "content": s, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    (path / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "bos_token": added(BOS), "eos_token": added(EOS),
        "pad_token": None, "unk_token": None, "chat_template": DEEPSEEK_V3_CHAT_TEMPLATE,
        "model_max_length": 131072, "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
    }, indent=2, ensure_ascii=False))
    (path / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}, indent=2))
    return path


def cli_env() -> dict[str, str]:
    """Environment for a subprocess that runs this checkout's dsv3 (PYTHONPATH = repository root)."""
    return dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")


def run_cli(*args, input: str | None = None, module: str = "dsv3.cli", timeout: float = 180):
    """`python -m dsv3.cli ARGS...` in a subprocess: the CompletedProcess (text mode)."""
    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True, input=input,
                          env=cli_env(), cwd=str(Path(__file__).resolve().parents[1]), timeout=timeout)
