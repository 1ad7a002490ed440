"""Convert a DeepSeek-V3 checkpoint between FP8 (the release format), BF16 and FP32, on CPU.

FP8 -> BF16/FP32 needs no FP8-capable GPU (the official cast script does); BF16/FP32 -> FP8
quantises exactly the tensors the release quantises (128×128 e4m3 blocks, float32
`weight_scale_inv`), so our own models ship in the real format. Shard by shard, tensor
by tensor: each output shard's header is known in advance, so tensors are written as
they are produced and memory stays around one tensor. Tokenizer and other side files are
copied; `quantization_config` is removed or added in config.json. DeepSeek-V3.1's
`scale_fmt: ue8m0` is kept: --dtype fp8 from such a source (or with --scale-fmt ue8m0) writes
power-of-two weight scales and records scale_fmt, so FP8 -> BF16 -> FP8 is lossless.

--from-official SRC DST merges the official repository's layout (`model{i}-mp{n}.safetensors`, written
by deepseek-ai/DeepSeek-V3 inference/convert.py) back into a Hugging Face checkpoint: official names
to Hugging Face names, each rank's slices concatenated, each expert from the rank that holds it,
tensors otherwise as they are (the MTP layer, which that script drops, stays absent). The layout has
no config.json: --config gives the one the shards were made for. The result is checked as a
checkpoint before it is renamed to DST (a failure or Ctrl-C leaves nothing; unlike the dtype path it
does not catch SIGTERM/SIGHUP).

Nothing is lost (docs/reliability-convert-train.md):
- every check (source headers, every output path, free space) runs before any tensor is read;
- DST may not be SRC, inside SRC or above it (symlinks resolved), with or without --force;
- the output carries a marker file (`dsv3-convert.json`), and --force replaces only a directory
  that has one: never a directory dsv3 did not write;
- the output is written to `.DST.partial-PID` beside DST and renamed at the end; a failure or
  SIGINT/SIGTERM/SIGHUP removes it (and any parent directories this run created), so the
  filesystem is as it was; after a SIGKILL, the next run removes partial directories whose
  process is gone and refuses to run beside one whose process is alive.
"""

from __future__ import annotations

HELP = "Convert a DeepSeek-V3 checkpoint between FP8 (the release format), BF16 and FP32, on CPU."
DTYPES = ("bf16", "fp32", "fp8")  # = dsv3.convert.DTYPES (not imported: --help stays free of the work's imports)


def add_args(p) -> None:
    p.add_argument("src", help="Hugging Face DeepSeek-V3 checkpoint directory, or with --from-official the official "
                               "layout's (read only; never modified)")
    p.add_argument("dst", help="output directory: must not exist, unless --force and an earlier dsv3 convert wrote it; "
                               "not SRC, inside SRC or above SRC")
    p.add_argument("--dtype", choices=DTYPES,
                   help="bf16/fp32: dequantise FP8 weights; fp8: quantise to DeepSeek's 128×128 block format "
                        "(required unless --from-official, no default)")
    p.add_argument("--from-official", action="store_true",
                   help="SRC is the official repository's layout (model{i}-mp{n}.safetensors from "
                        "deepseek-ai/DeepSeek-V3 inference/convert.py): merge it back into a Hugging Face "
                        "checkpoint, tensors as they are (default: off)")
    p.add_argument("--config", default=None,
                   help="with --from-official: the config the shards were made for (official configs/config_*.json, "
                        "a Hugging Face config.json or a preset; default: SRC/config.json)")
    p.add_argument("--scale-fmt", choices=["ue8m0"], default=None,
                   help="with --dtype fp8: power-of-two weight scales, scale_fmt recorded in config.json "
                        "(DeepSeek-V3.1's format; default: an FP8 source's own scale_fmt, else none)")
    p.add_argument("--force", action="store_true",
                   help="replace DST if an earlier dsv3 convert wrote it (it holds dsv3-convert.json); "
                        "never any other directory (default: off)")
    p.add_argument("--check-weights", action="store_true",
                   help="scan every tensor for NaN/Inf while converting (default: off)")


def run(ns) -> int:
    from dsv3.errors import UsageError

    if ns.from_official:
        if ns.dtype or ns.scale_fmt:
            raise UsageError("--from-official writes the tensors as they are: no --dtype/--scale-fmt (convert "
                             "its output afterwards)")
        from dsv3.official_layout import official_to_hf

        stats = official_to_hf(ns.src, ns.dst, ns.config, force=ns.force)
        print(f"wrote {ns.dst}: {stats['tensors']} tensors from {stats['ranks']} rank file(s) into "
              f"{stats['shards']} shard(s), {stats['dst_bytes'] / 1e9:.3f} GB in {stats['seconds']:.1f} s")
        return 0
    if ns.config:
        raise UsageError("--config goes with --from-official (a Hugging Face checkpoint carries its config.json)")
    if ns.dtype is None:
        raise UsageError("--dtype is required (bf16, fp32 or fp8), unless --from-official")
    from dsv3.convert import convert

    stats = convert(ns.src, ns.dst, ns.dtype, force=ns.force, check_weights=ns.check_weights, scale_fmt=ns.scale_fmt)
    print(f"wrote {ns.dst}: {stats['tensors']} tensors in {stats['shards']} shard(s), "
          f"{stats['src_bytes'] / 1e9:.3f} GB -> {stats['dst_bytes'] / 1e9:.3f} GB in {stats['seconds']:.1f} s")
    return 0
