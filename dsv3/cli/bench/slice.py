"""A slice of a model at full width (671B by default: 7168 wide, 128 heads, 256 experts, top-8 of 8 groups),
with few layers (1 dense + 2 MoE: ~25 GB in FP8), run end to end in the FP8 release format.

Steps, each reported (and printed as a short table last):
1. write the slice's random weights in the FP8 release format into --dir (drawn and quantised on --device,
   written via `DIR.partial` + rename; reused when --dir already holds the same config);
2. load it with `load_model(dir, device=...)`: FP8 weights stay FP8 (`gemm_impl` fp8: activations quantised per
   1x128 tile, the block-scaled FP8 GEMM -- the Triton kernel on CUDA); the weights' bytes and the peak memory of a
   --prefill-token prefill against `dsv3 plan`'s prediction for the slice (on CUDA: allocated bytes; `dsv3 plan`
   adds a fixed 2 GB for the CUDA context and communication buffers, left out of the comparison);
3. logits of a 32-token prompt, FP8 as stored (both gemm_impls) against the same slice dequantised to bf16 at load:
   median relative L2 over positions must stay <= 1e-2 (bf16 GEMM: the same bf16 weights) and <= 0.25 (FP8 GEMM:
   every GEMM's input rounded to e4m3, ~8 GEMMs deep per layer, random weights; a wrong scale gives O(1)), and
   the top-1 token agreement is reported; the exit status is 1 if either is exceeded;
4. decode ms/step at each --batch and --context, per --mode: `readable` (model(tokens, pos, cache)), `static`
   (dsv3.decode_step, eager), `cuda-graph`, `compile`, `compile+cuda-graph` (compiled modes only for
   --compile-batches: each shape compiles anew). The cache is filled with random latents instead of a prefill
   (a step's cost depends on the context length, not on what the cache holds); prefill tok/s at --prefill tokens;
5. a projection of the 61-layer model at batch 1 on --gpus GPUs, from per-layer step times (the slice truncated to
   0..3 layers, the fastest measured batch-1 mode): compute = (t_rest + 3 t_dense + 58 t_moe) / gpus, plus two
   all-reduces per layer at --allreduce-us each (an assumption, not measured: the order of NCCL's small-message
   latency on NVSwitch systems), against the weight-streaming floor (activated bytes / (gpus x --hbm-tbs)).
The bf16 reference is loaded (and freed) first, so parity is known before any timing; each stage prints a
`[slice]` line as it finishes, so a run cut short still leaves what it measured in the log.
--budget-s bounds the timed part: cells not reached are reported as skipped. Cells that fail (e.g. a mode the
device does not support) report their error and the rest go on.
"""

from __future__ import annotations

from dsv3.options import choice_list, integer_list, positive, real

HELP = "A 671B-width slice (1 dense + 2 MoE layers) in the FP8 release format: parity, memory vs plan, decode speed, projection."
MODES = ("readable", "static", "cuda-graph", "compile", "compile+cuda-graph")


def add_args(p) -> None:
    p.add_argument("--dir", required=True, help="where the slice is written (or found, if written before)")
    p.add_argument("--config", default="671B", help="the full-width config: preset, config file or directory (default 671B)")
    p.add_argument("--layers", type=integer_list(0), default=(1, 2), metavar="DENSE,MOE",
                   help="dense and MoE layers of the slice (default 1,2)")
    p.add_argument("--device", default="cuda", help="where to write, load and run (default cuda)")
    p.add_argument("--batch", type=integer_list(1), default=(1, 8, 64), help="decode batch sizes (default 1,8,64)")
    p.add_argument("--context", type=integer_list(1), default=(1024, 8192), help="decode contexts (default 1024,8192)")
    p.add_argument("--mode", type=choice_list(MODES), default=MODES,
                   help="decode modes (default: all of " + ",".join(MODES) + ")")
    p.add_argument("--compile-batches", type=integer_list(1), default=(1,),
                   help="batch sizes the compiled modes run at (default 1)")
    p.add_argument("--steps", type=positive, default=10, help="timed decode steps per cell (default 10)")
    p.add_argument("--prefill", type=positive, default=4096, help="prefill tokens timed, batch 1 (default 4096)")
    p.add_argument("--gpus", type=positive, default=8, help="GPUs of the projection (default 8)")
    p.add_argument("--hbm-tbs", type=real(0, lo_open=True), default=4.8, help="HBM bandwidth per GPU in TB/s (default 4.8: H200)")
    p.add_argument("--allreduce-us", type=real(0), default=10.0,
                   help="assumed latency of one small all-reduce, µs (default 10)")
    p.add_argument("--gpu-mem-gb", type=real(0, lo_open=True), default=141.0, help="GPU memory for `dsv3 plan` (default 141: H200)")
    p.add_argument("--budget-s", type=real(0), default=300.0, help="time for the decode cells (default 300)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--json-out", default=None, help="also write the full results as JSON here")


def run(ns) -> int:
    from dsv3.bench import slice as work

    return work.run(ns)
