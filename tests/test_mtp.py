"""MTP module parity: dsv3's `forward_mtp` against transformers' `MtpModel` (DeepseekV3) on tiny
random checkpoints, float32, 5e-6 relative (see RTOL).

dsv3 builds the random model and writes it in the release layout (`dsv3.train_state.save_checkpoint`:
the MTP layer at `model.layers.{n_layers}` with its own copies of embedding and head);
transformers loads it with its own code: `DeepseekV3ForCausalLM.from_pretrained` for the main
model, then `MtpModel.from_pretrained(main)`, which renames `model.layers.{N}.*` to
`layers.0.mtp_block.*` / `enorm` / `hnorm` / `eh_proj` / `post_norm` (= `shared_head.norm`) and
takes embedding and head from the main model (the checkpoint's MTP copies are ignored --
dsv3 does the same and checks they are equal copies).

transformers 5.24 only looks for MTP weights under the names of the 671B model
(`model.layers.61.*`, its `_keys_to_ignore_on_load_unexpected`); the test points that pattern
at the tiny model's MTP layer.
"""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_  # tests/ is on sys.path under pytest

from dsv3 import ModelArgs, Transformer
from dsv3.train_state import save_checkpoint

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV3ForCausalLM  # noqa: E402
from transformers.modeling_layers import MtpModel  # noqa: E402

# measured 5.1-6.0e-7 (main logits), 6.8-7.6e-7 (MTP logits, depth 1 and 2) relative in norm: float32
# rounding of the same sums in another order. 5e-6: ~7x margin; a 10x wrong RMSNorm eps fails it.
RTOL = 5e-6

CONFIGS = {
    "tiny": dict(),  # q-LoRA, 4 groups / 2 kept, sigmoid + bias, YaRN, 1 dense layer
    "no-qlora-plain-rope-2mtp": dict(q_lora_rank=0, rope_factor=1.0, n_mtp_layers=2, n_expert_groups=1,
                                     n_limited_groups=1, n_dense_layers=0),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    args = ModelArgs.preset("tiny", vocab_size=97, max_seq_len=64, **CONFIGS[request.param])
    torch.manual_seed(0)
    ours = Transformer(args, dtype=torch.float32).eval()
    randomize_(ours, 1)
    path = tmp_path_factory.mktemp(request.param)
    save_checkpoint(ours, path)
    main = DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    main._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}\..*"
                                               for n in range(args.n_layers, args.n_layers + args.n_mtp_layers)]
    mtp = MtpModel.from_pretrained(main).eval()
    return ours, main, mtp, args


def test_hf_loaded_every_mtp_weight(pair):
    ours, main, mtp, args = pair
    assert mtp.num_mtp_layers == args.n_mtp_layers
    for k, m in enumerate(ours.mtp):
        layer = mtp.layers[k]
        torch.testing.assert_close(layer.eh_proj.weight, m.eh_proj.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.post_norm.weight, m.norm.weight, rtol=0, atol=0)
        torch.testing.assert_close(layer.mtp_block.self_attn.kv_b_proj.weight, m.block.attn.wkv_b.weight, rtol=0, atol=0)
    assert mtp.embed_tokens.weight is main.get_input_embeddings().weight  # shared, as in dsv3


def test_forward_mtp_matches_transformers(pair):
    ours, main, mtp, args = pair
    tokens = torch.randint(0, args.vocab_size, (2, 23), generator=torch.Generator().manual_seed(5))
    s = tokens.shape[1]
    with torch.no_grad():
        logits, mtp_logits = ours.forward_mtp(tokens)
        mtp_logits = mtp_logits if isinstance(mtp_logits, list) else [mtp_logits]
        out = main(tokens, output_hidden_states=True)
        assert rel_err(logits, out.logits.float()) < RTOL
        h = out.hidden_states[-1]  # after the final norm: what the first MTP module combines
        for k in range(1, args.n_mtp_layers + 1):
            # depth k: hidden of depth k-1 at positions 0..s-k-1 with tokens k..s-1 -> predicts token i+k+1
            pos = torch.arange(s - k)[None].expand(2, -1)
            h = mtp.forward_layer(k - 1, h[:, : s - k], pos, None, input_ids=tokens[:, k:])
            ref = mtp._project_to_logits(h).float()
            assert mtp_logits[k - 1].shape == (2, s - k, args.vocab_size)
            assert rel_err(mtp_logits[k - 1], ref) < RTOL, k
            assert (mtp_logits[k - 1].argmax(-1) == ref.argmax(-1)).float().mean() > 0.99


def test_checkpoint_mtp_copies_are_the_main_embedding_and_head(pair, tmp_path):
    ours, _, _, args = pair
    from safetensors.torch import load_file

    save_checkpoint(ours, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    n = args.n_layers
    assert torch.equal(sd[f"model.layers.{n}.embed_tokens.weight"], sd["model.embed_tokens.weight"])
    assert torch.equal(sd[f"model.layers.{n}.shared_head.head.weight"], sd["lm_head.weight"])
