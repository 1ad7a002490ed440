"""dsv3.names: every HF name classified with its kind and shard dim; what an FP8 checkpoint stores."""

import pytest

from dsv3.config import ModelArgs
from dsv3.names import Kind, classify, dsv3_to_hf, meta_state, stored_state
from dsv3.testing import tiny_hf_args


def test_every_name_of_the_model_classifies_back_to_itself():
    args = tiny_hf_args()
    for ours, hf in dsv3_to_hf(args).items():
        n = classify(hf, args)
        assert n.ours == ours and n.kind is (Kind.SCALE if ours.endswith(".scale") else Kind.WEIGHT), hf
        assert n.hf == hf


def test_kinds_of_the_names_dsv3_does_not_load_as_they_are():
    args = tiny_hf_args()  # 2 layers + 1 MTP layer at model.layers.2
    assert classify("model.layers.2.embed_tokens.weight", args).kind is Kind.MTP_COPY
    assert classify("model.layers.2.shared_head.head.weight", args).ours == "head.weight"
    deeper = classify("model.layers.3.self_attn.o_proj.weight", args)
    assert deeper.kind is Kind.SKIPPED and deeper.layer == 3
    assert classify("model.layers.0.self_attn.o_proj.weight_scale_inv", args).shard_dim == 1
    assert classify("model.layers.0.unknown.weight", args) is None and classify("nope", args) is None


@pytest.mark.parametrize("args", [tiny_hf_args(), tiny_hf_args(n_mtp_layers=2, q_lora_rank=0),
                                  ModelArgs.tiny("tiny-dist", dtype="fp8", block_size=8)])
def test_stored_state_is_the_fp8_models_state(args):
    """What the loader expects an FP8 checkpoint to store, derived from the dequantised model it builds,
    equals the state of a model built in FP8 (so the loader builds one meta model, not two)."""
    want = meta_state(args)
    got = stored_state(meta_state(args.replace(dtype="bf16")), args)
    assert want.keys() == got.keys()
    for k, t in want.items():
        assert (t.shape, t.dtype) == (got[k].shape, got[k].dtype), k
