"""The torch MoE expert computation against a per-token loop, over awkward sizes, a rank holding only
some experts (expert parallelism) or none of a step's, with the grouped matmul and without it."""
import pytest
import torch
import torch.nn.functional as F

from chitu.ops.torch_ref import moe


def per_token(x, gate_up, down, weights, ids, first_expert):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k]) - first_expert
            if 0 <= e < gate_up.shape[0]:
                gate, up = F.linear(x[t], gate_up[e]).chunk(2)
                out[t] += weights[t, k] * F.linear(F.silu(gate) * up, down[e])
    return out


@pytest.fixture(params=["grouped_mm", "per-expert matmuls"])
def path(request, monkeypatch):
    if request.param == "per-expert matmuls":
        monkeypatch.delattr(torch, "_grouped_mm", raising=False)
    return request.param


@pytest.mark.parametrize("tokens, experts, top_k, held", [
    (1, 8, 2, range(8)), (13, 7, 3, range(7)), (29, 10, 4, range(3, 8)), (5, 6, 2, range(5, 6))])
def test_fused_experts_match_per_token_loop(path, tokens, experts, top_k, held):
    torch.manual_seed(tokens)
    hidden, inter = 24, 10
    x = torch.randn(tokens, hidden)
    gate_up, down = torch.randn(len(held), 2 * inter, hidden), torch.randn(len(held), hidden, inter)
    weights, ids = moe.select_experts(torch.randn(tokens, experts), top_k, "softmax", False, None, 1, 1, 1.0)
    actual = moe.fused_experts(x, gate_up, down, weights, ids, held.start)
    expected = per_token(x, gate_up, down, weights, ids, held.start)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


def test_rank_holding_none_of_the_chosen_experts_contributes_zeros(path):
    x = torch.randn(3, 8)
    ids = torch.tensor([[0, 1], [1, 0], [0, 1]])
    out = moe.fused_experts(x, torch.randn(2, 6, 8), torch.randn(2, 8, 3), torch.ones(3, 2), ids, first_expert=2)
    assert torch.equal(out, torch.zeros(3, 8))


@pytest.mark.parametrize("group_by_max, expected_group", [(True, 0), (False, 1)])
def test_groups_ranked_by_their_best_score_or_their_two_best(group_by_max, expected_group):
    """Experts {0, 1} and {2, 3}: group 0 holds the best score, group 1 the best pair (DeepSeek-V2 ranks
    by the first, V3 by the second); one group stays eligible, and both picks come from it."""
    scores = torch.tensor([[0.4, 0.05, 0.3, 0.25]])
    weights, ids = moe.select_experts(scores.log(), 2, "softmax", False, None, 2, 1, 1.0, group_by_max)
    assert sorted(ids[0].tolist()) == ([0, 1] if expected_group == 0 else [2, 3])
    torch.testing.assert_close(weights, scores.gather(1, ids))
