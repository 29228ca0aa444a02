"""Mixture-of-experts routing and expert computation in plain torch: exact, and one matmul per active
expert (tokens are grouped by expert with a sort, never looped over)."""
from __future__ import annotations

from functools import cached_property

import torch
import torch.nn.functional as F

from chitu.ops.torch_ref.activation import silu_and_mul


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
                   correction_bias: torch.Tensor | None, num_groups: int, top_groups: int,
                   scaling_factor: float, group_by_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, top_k] float32, expert ids [T, top_k] int64) from router logits [T, E] (float32).

    softmax: the top-k of the softmax over all experts (Qwen3-MoE, Mixtral). sigmoid: the top-k of
    sigmoid scores plus a correction bias, which only steers the choice, within the `top_groups` of
    `num_groups` expert groups ranked by their two best biased scores (DeepSeek-V3, GLM-4.5), or by
    their best score alone when group_by_max (DeepSeek-V2's group_limited_greedy).
    """
    scores = router_logits.softmax(dim=-1) if scoring == "softmax" else router_logits.sigmoid()
    choice = scores if correction_bias is None else scores + correction_bias
    if num_groups > 1:
        groups = choice.view(choice.shape[0], num_groups, -1)
        group_scores = groups.amax(dim=-1) if group_by_max else groups.topk(2, dim=-1).values.sum(dim=-1)
        best_groups = group_scores.topk(top_groups, dim=-1).indices
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
    down [E, H, I] being experts first_expert .. first_expert + E - 1; others contribute nothing.

    The (token, expert) pairs held here are sorted by expert, so each expert's rows are contiguous:
    one grouped matmul per projection, then each pair's output lands in its slot and the slots sum."""
    num_tokens, top_k = ids.shape
    num_local = gate_up.shape[0]
    local = ids.flatten() - first_expert
    slots = ((local >= 0) & (local < num_local)).nonzero().squeeze(1)  # positions in the [T * top_k] routing
    local = local[slots]
    order = local.argsort(stable=True)
    slots = slots[order]
    groups = _ExpertGroups(torch.bincount(local, minlength=num_local))
    out = torch.zeros(num_tokens * top_k, x.shape[1], dtype=x.dtype, device=x.device)
    if slots.numel():
        h = silu_and_mul(groups.linear(x[slots // top_k], gate_up))
        y = groups.linear(h, down)
        out[slots] = y * weights.flatten()[slots, None].to(x.dtype)
    return out.view(num_tokens, top_k, -1).sum(dim=1)


class _ExpertGroups:
    """Rows grouped by expert, counts[e] rows for expert e in order; the offsets or the sizes (a host
    sync) are computed once for both projections."""

    def __init__(self, counts: torch.Tensor):
        self.counts = counts

    @cached_property
    def offsets(self) -> torch.Tensor:
        return self.counts.cumsum(0).to(torch.int32)

    @cached_property
    def sizes(self) -> list[int]:
        return self.counts.tolist()

    def linear(self, x: torch.Tensor, weights) -> torch.Tensor:
        """Each group's rows of x times its expert's weights^T (a stacked tensor, or quantized experts with
        `expert_linear`: quant/int8.py)."""
        if isinstance(weights, torch.Tensor):
            out_features, in_features = weights.shape[1:]
            aligned = (out_features * x.element_size()) % 16 == 0 and (in_features * x.element_size()) % 16 == 0
            grouped = x.dtype in (torch.float32, torch.bfloat16, torch.float16) and hasattr(torch, "_grouped_mm")
            if x.device.type == "cpu" and aligned and grouped:  # it needs 16-byte strides
                return torch._grouped_mm(x, weights.transpose(1, 2), offs=self.offsets)
        expert_linear = weights.expert_linear if not isinstance(weights, torch.Tensor) else \
            (lambda e, rows: F.linear(rows, weights[e]))
        return torch.cat([expert_linear(e, r) for e, r in enumerate(x.split(self.sizes)) if r.shape[0]])
