"""Mixture-of-experts routing and expert computation in plain torch: exact, and one matmul per active
expert (tokens are grouped by expert with a sort, never looped over)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from chitu.ops.torch_ref.activation import silu_and_mul


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
                   correction_bias: torch.Tensor | None, num_groups: int, top_groups: int,
                   scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, expert ids [T, top_k] int64) from router logits [T, E] (float32).

    softmax: the top-k of the softmax over all experts (Qwen3-MoE, Mixtral). sigmoid: the top-k of
    sigmoid scores plus a correction bias, which only steers the choice, within the `top_groups` of
    `num_groups` expert groups ranked by their two best biased scores (DeepSeek-V3, GLM-4.5).
    """
    scores = router_logits.softmax(dim=-1) if scoring == "softmax" else router_logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias
    if num_groups > 1:
        groups = choice.view(choice.shape[0], num_groups, -1)
        best_groups = groups.topk(2, dim=-1).values.sum(dim=-1).topk(top_groups, dim=-1).indices
        keep = torch.zeros_like(groups[..., 0], dtype=torch.bool).scatter_(1, best_groups, True)
        choice = groups.masked_fill(~keep[..., None], float("-inf")).flatten(1)
    ids = choice.topk(top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if renormalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scaling_factor, ids


def fused_experts(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor, first_expert: int) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{ids[t, k]}(x[t]) over the experts held here, gate_up [E, 2I, H] and
    down [E, H, I] being experts first_expert .. first_expert + E - 1; others contribute nothing."""
    num_local = gate_up.shape[0]
    local = ids.flatten() - first_expert
    held = (local >= 0) & (local < num_local)
    slots = held.nonzero().squeeze(1)  # positions in the flattened [T * top_k] routing
    local = local[slots]
    order = local.argsort(stable=True)
    slots, local = slots[order], local[order]
    counts = torch.bincount(local, minlength=num_local).tolist()
    tokens = slots // ids.shape[1]
    routed_weights = weights.flatten()[slots]
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            rows = tokens[start:start + count]
            h = silu_and_mul(F.linear(x[rows], gate_up[expert]))
            h = F.linear(h, down[expert]) * routed_weights[start:start + count, None].to(x.dtype)
            out.index_add_(0, rows, h)
            start += count
    return out
