"""The communication formula of `dsv3.plan.comm_bytes_per_token` against the collectives a sharded model
actually issues (counted in-process on torch's fake process group: shapes are real, values are not)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from dsv3.model import Transformer
from dsv3.parallel import parallelize
from dsv3.plan import comm_bytes_per_token
from dsv3.testing import tiny_dist_args as tiny_args


@pytest.fixture
def fake_group():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=4)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_counted_collectives_match_formula(fake_group, monkeypatch):
    sent = {"all_reduce": [], "all_gather": []}
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(t, *a, **k):
        sent["all_reduce"].append(t.numel() * t.element_size())
        return real_reduce(t, *a, **k)

    def all_gather(parts, t, *a, **k):
        sent["all_gather"].append(sum(p.numel() * p.element_size() for p in parts))
        return real_gather(parts, t, *a, **k)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    monkeypatch.setattr(dist, "all_gather", all_gather)
    args = tiny_args()
    torch.manual_seed(0)
    model = parallelize(Transformer(args).eval(), fake_group)
    with torch.inference_mode():
        logits = model(torch.tensor([[7]]))  # one token: one decode step
    assert logits.shape == (1, 1, args.vocab_size)
    # two all-reduces per block (attention, FFN/MoE) and one for the embedding, each of m float32 values
    assert sent["all_reduce"] == [args.dim * 4] * (2 * args.n_layers + 1)
    assert sent["all_gather"] == [args.vocab_size * 4]
    n = 4
    counted = 2 * (n - 1) / n * sum(sent["all_reduce"]) + (n - 1) / n * sum(sent["all_gather"])
    assert comm_bytes_per_token(args, n, act_bytes=4)["total"] == pytest.approx(counted)
