"""DeepSeekMoE: the gate against a float64 reference written from the formulas, and the expert paths.

The reference (`ref_gate`) follows /work/shared/reference/deepseek-v3.md line by line, one token
at a time in float64: scores = softmax or sigmoid of x·Wgᵀ; the correction bias only for
choosing; group score = sum of the top-2 biased scores (max without a bias); keep the best
n_limited_groups groups; top-k; weights = unbiased scores, renormalised for sigmoid, × route_scale.
It covers the softmax routings of the 16B/236B shapes, which transformers' DeepseekV3 does not.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv3.config import ModelArgs
from dsv3.fp8 import weight_quant
from dsv3.model import linear_kwargs
from dsv3.moe import MoE, experts_all, experts_dense_reference, experts_grouped, experts_loop, experts_stacked


def ref_gate(x, weight, bias, args: ModelArgs):
    """Per-token float64 routing from the formulas: list of {expert: weight} dicts."""
    out = []
    for xt in x.double():
        logits = weight.double() @ xt
        scores = logits.softmax(-1) if args.score_func == "softmax" else logits.sigmoid()
        choice = scores + bias.double() if bias is not None else scores.clone()
        if args.n_expert_groups > 1:
            per = args.n_routed_experts // args.n_expert_groups
            rows = [g.tolist() for g in choice.view(args.n_expert_groups, per)]
            gscore = [sum(sorted(r, reverse=True)[:2]) if bias is not None else max(r) for r in rows]
            kept = sorted(range(args.n_expert_groups), key=lambda i: -gscore[i])[: args.n_limited_groups]
            eligible = [e for e in range(args.n_routed_experts) if e // per in kept]
        else:
            eligible = list(range(args.n_routed_experts))
        chosen = sorted(eligible, key=lambda e: -choice[e].item())[: args.n_activated_experts]
        w = {e: scores[e].item() for e in chosen}
        if args.score_func == "sigmoid":
            total = sum(w.values())
            w = {e: v / total for e, v in w.items()}
        out.append({e: v * args.route_scale for e, v in w.items()})
    return out


SHAPES = {
    # the routing shapes of the released models, on a small model width
    "16B-softmax": ModelArgs.preset("16B"),
    "236B-softmax-groups-max": ModelArgs.preset("236B"),
    "671B-sigmoid-bias-groups-top2": ModelArgs.preset("671B"),
    "sigmoid-bias-no-groups": ModelArgs.preset("671B").replace(n_expert_groups=1, n_limited_groups=1),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_gate_matches_float64_reference(shape):
    args = SHAPES[shape].replace(dim=24)
    from dsv3.moe import Gate

    gate = Gate(args)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        if gate.bias is not None:
            gate.bias.copy_(0.3 * torch.randn(gate.bias.shape, generator=g))
    assert (gate.bias is not None) == (args.score_func == "sigmoid")
    x = torch.randn(48, args.dim, generator=g)
    weights, indices = gate(x)
    assert weights.shape == indices.shape == (48, args.n_activated_experts)
    ref = ref_gate(x, gate.weight, gate.bias, args)
    for t, r in enumerate(ref):
        got = dict(zip(indices[t].tolist(), weights[t].tolist()))
        assert set(got) == set(r), f"token {t}: experts {sorted(got)} != reference {sorted(r)}"
        for e in r:
            assert got[e] == pytest.approx(r[e], rel=1e-5, abs=1e-6)
    if args.score_func == "sigmoid":
        torch.testing.assert_close(weights.sum(-1), torch.full((48,), args.route_scale), rtol=1e-5, atol=1e-5)


def test_group_limit_is_respected():
    """Every chosen expert lies in at most n_limited_groups groups, for every token."""
    args = ModelArgs.preset("671B").replace(dim=16)
    from dsv3.moe import Gate

    gate = Gate(args)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(gate.weight.shape, generator=g))
        gate.bias.copy_(torch.randn(gate.bias.shape, generator=g))
    _, idx = gate(torch.randn(200, 16, generator=g))
    per = args.n_routed_experts // args.n_expert_groups
    groups_used = torch.tensor([len(set((row // per).tolist())) for row in idx])
    assert groups_used.max() <= args.n_limited_groups
    assert (idx.sort(-1)[0].diff(dim=-1) > 0).all()  # k distinct experts


def _tiny_moe(seed: int, **changes) -> tuple[MoE, ModelArgs]:
    args = ModelArgs.preset("tiny").replace(**changes)
    moe = MoE(args)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        if moe.gate.bias is not None:
            moe.gate.bias.copy_(0.5 * torch.randn(moe.gate.bias.shape, generator=g))
    return moe, args


@pytest.mark.parametrize("n_tokens", [1, 3, 37])
def test_grouped_equals_loop_equals_dense_reference(n_tokens):
    moe, args = _tiny_moe(seed=n_tokens)
    x = torch.randn(n_tokens, args.dim, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        w, idx = moe.gate(x)
        ref = experts_dense_reference(moe.experts, x, w, idx)
        loop = experts_loop(moe.experts, x, w, idx)
        grouped = experts_grouped(moe.experts, x, w, idx)
    assert ref.abs().max() > 0
    torch.testing.assert_close(loop, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grouped, ref, rtol=1e-5, atol=1e-6)


def test_expert_paths_with_idle_experts():
    """Some experts receive no token (hand-made routing): both paths skip them and still agree."""
    moe, args = _tiny_moe(seed=5)
    x = torch.randn(4, args.dim, generator=torch.Generator().manual_seed(2))
    idx = torch.tensor([[0, 3, 7, 2], [3, 0, 2, 15], [15, 2, 3, 0], [7, 15, 0, 3]])
    w = torch.rand(4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = experts_dense_reference(moe.experts, x, w, idx)
        torch.testing.assert_close(experts_loop(moe.experts, x, w, idx), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(experts_grouped(moe.experts, x, w, idx), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(experts_stacked(moe.stacked_experts(), x, w, idx), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_shared", [0, 1, 2])
def test_moe_forward_with_shared_experts_float64(n_shared):
    """MoE(x) = Σ routed + shared MLP of width n_shared·moe_inter_dim, checked in float64 by hand."""
    moe, args = _tiny_moe(seed=7, n_shared_experts=n_shared)
    if n_shared:
        assert moe.shared_experts.w1.weight.shape == (n_shared * args.moe_inter_dim, args.dim)
    else:
        assert moe.shared_experts is None
    x = torch.randn(2, 5, args.dim, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = moe(x)
        xf = x.reshape(-1, args.dim).double()
        routing = ref_gate(xf, moe.gate.weight, moe.gate.bias, args)

        def mlp(m, v):
            return F.linear(F.silu(F.linear(v, m.w1.weight.double())) * F.linear(v, m.w3.weight.double()),
                            m.w2.weight.double())

        ref = torch.stack([sum(wt * mlp(moe.experts[e], xt) for e, wt in r.items()) for xt, r in zip(xf, routing)])
        if n_shared:
            ref = ref + mlp(moe.shared_experts, xf)
    assert out.shape == x.shape
    torch.testing.assert_close(out.reshape(-1, args.dim).double(), ref, rtol=1e-5, atol=1e-6)


def test_moe_impl_loop_equals_grouped():
    moe_g, args = _tiny_moe(seed=8)
    moe_l, _ = _tiny_moe(seed=8, moe_impl="loop")
    x = torch.randn(3, 11, args.dim, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        torch.testing.assert_close(moe_l(x), moe_g(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("n_tokens", [1, 37])
def test_stacked_experts_equal_the_loop_and_share_the_weights(n_tokens):
    """The stacked path (the static decode step's) gives the loop's sum; its stacks are the experts' own storage."""
    moe, args = _tiny_moe(seed=10 + n_tokens)
    x = torch.randn(n_tokens, args.dim, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = moe(x)
        stacked = moe.stacked_experts()
        for name, stack in stacked.items():
            assert all(getattr(e, name).weight.data_ptr() == stack[i].data_ptr() for i, e in enumerate(moe.experts))
        torch.testing.assert_close(moe(x, stacked), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(moe(x), ref, rtol=0, atol=0)  # re-pointing changed no value


@pytest.mark.parametrize("gemm_impl", ["bf16", "fp8"])
@pytest.mark.parametrize("block_size", [128, 32])
def test_static_paths_on_fp8_experts_equal_the_loop(gemm_impl, block_size):
    """FP8 experts with partial blocks (dim 200, width 72): gathering FP8 rows + scales and dequantising them,
    and running every expert through its own FP8 Linear, both give the loop's sum (the readable FP8 path)."""
    args = ModelArgs.tiny("tiny-hf", block_size=block_size, gemm_impl=gemm_impl)
    moe = MoE(args, **linear_kwargs(args, torch.float32))
    g = torch.Generator().manual_seed(12)
    with torch.no_grad():
        for mod in moe.modules():
            if getattr(mod, "is_fp8", False):
                q, s = weight_quant(torch.randn(mod.weight.shape, generator=g) / mod.in_features ** 0.5, block_size)
                mod.weight.copy_(q)
                mod.scale.copy_(s)
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) / args.dim ** 0.5)
        x = torch.randn(5, args.dim, generator=g)
        w, idx = moe.gate(x)
        ref = experts_loop(moe.experts, x, w, idx)
        stacked = moe.stacked_experts()
        e, blocks = args.n_routed_experts, lambda d: -(-d // block_size)
        assert stacked["w1"].dtype == torch.float8_e4m3fn
        assert stacked["w2.scale"].shape == (e, blocks(args.dim), blocks(args.moe_inter_dim))
        assert all(ex.w2.scale.data_ptr() == stacked["w2.scale"][i].data_ptr() for i, ex in enumerate(moe.experts))
        torch.testing.assert_close(experts_stacked(stacked, x, w, idx, block_size, gemm_impl), ref,
                                   rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(experts_all(moe.experts, x, w, idx), ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(experts_loop(moe.experts, x, w, idx), ref, rtol=0, atol=0)  # values unchanged
