"""Expert selection from router logits in one launch: one program per token holds all of its expert
scores and picks the top-k, as chitu.ops.torch_ref.moe.select_experts does in some ten kernels."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from chitu.ops.triton import pdl


@triton.jit
def _first_max(values, offs, BLOCK: tl.constexpr):
    """(the largest value, the lowest index holding it)"""
    best = tl.max(values, axis=0)
    return best, tl.min(tl.where(values == best, offs, BLOCK), axis=0)


@triton.jit
def _select_kernel(logits_ptr, bias_ptr, weights_ptr, ids_ptr, num_experts, stride_l, scaling,
                   TOP_K: tl.constexpr, SOFTMAX: tl.constexpr, HAS_BIAS: tl.constexpr, RENORMALIZE: tl.constexpr,
                   GROUPS: tl.constexpr, TOP_GROUPS: tl.constexpr, GROUP_BY_MAX: tl.constexpr,
                   BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_G: tl.constexpr, PDL: tl.constexpr):
    pdl.let_next_start(PDL)
    pdl.wait_for_previous(PDL)
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    valid = offs < num_experts
    logits = tl.load(logits_ptr + row * stride_l + offs, mask=valid, other=float("-inf"))
    if SOFTMAX:
        p = tl.exp(logits - tl.max(logits, axis=0))
        scores = p / tl.sum(p, axis=0)
    else:
        scores = tl.sigmoid(logits)
    choice = scores
    if HAS_BIAS:
        choice += tl.load(bias_ptr + offs, mask=valid, other=0.0)
    choice = tl.where(valid, choice, float("-inf"))
    if GROUPS > 1:
        # rank the groups by the sum of their two best scores (or the best alone); only the TOP_GROUPS best
        # stay eligible
        group_of = offs // (num_experts // GROUPS)
        group_offs = tl.arange(0, BLOCK_G)
        group_scores = tl.full((BLOCK_G,), float("-inf"), dtype=tl.float32)
        for g in tl.static_range(GROUPS):
            members = tl.where(group_of == g, choice, float("-inf"))
            first, at = _first_max(members, offs, BLOCK_E)
            if not GROUP_BY_MAX:
                first += tl.max(tl.where(offs == at, float("-inf"), members), axis=0)
            group_scores = tl.where(group_offs == g, first, group_scores)
        eligible = tl.zeros((BLOCK_E,), dtype=tl.int1)
        for _ in tl.static_range(TOP_GROUPS):
            _, g = _first_max(group_scores, group_offs, BLOCK_G)
            eligible = eligible | (group_of == g)
            group_scores = tl.where(group_offs == g, float("-inf"), group_scores)
        choice = tl.where(eligible, choice, float("-inf"))
    k_offs = tl.arange(0, BLOCK_K)
    chosen = tl.zeros((BLOCK_K,), dtype=tl.int64)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        best, expert = _first_max(choice, offs, BLOCK_E)
        if HAS_BIAS:  # the choice was biased: the weight is the expert's own score
            best = tl.sum(tl.where(offs == expert, scores, 0.0), axis=0)
        chosen = tl.where(k_offs == k, expert, chosen)
        weights = tl.where(k_offs == k, best, weights)
        choice = tl.where(offs == expert, float("-inf"), choice)
    if RENORMALIZE:
        weights = weights / (tl.sum(weights, axis=0) + 1e-20)
    k_mask = k_offs < TOP_K
    tl.store(weights_ptr + row * TOP_K + k_offs, weights * scaling, mask=k_mask)
    tl.store(ids_ptr + row * TOP_K + k_offs, chosen, mask=k_mask)


def select_experts(router_logits: torch.Tensor, top_k: int, scoring: str, renormalize: bool,
                   correction_bias: torch.Tensor | None, num_groups: int, top_groups: int,
                   scaling_factor: float, group_by_max: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """As chitu.ops.torch_ref.moe.select_experts, for float32 logits on CUDA (ties go to the lower index)."""
    num_tokens, num_experts = router_logits.shape
    weights = torch.empty(num_tokens, top_k, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(num_tokens, top_k, dtype=torch.int64, device=router_logits.device)
    if num_tokens:
        block_e = triton.next_power_of_2(num_experts)
        _select_kernel[(num_tokens,)](
            router_logits, correction_bias if correction_bias is not None else router_logits, weights, ids,
            num_experts, router_logits.stride(0), scaling_factor, TOP_K=top_k, SOFTMAX=scoring == "softmax",
            HAS_BIAS=correction_bias is not None, RENORMALIZE=renormalize, GROUPS=num_groups,
            TOP_GROUPS=top_groups, GROUP_BY_MAX=group_by_max, BLOCK_E=block_e, BLOCK_K=triton.next_power_of_2(top_k),
            # one warp reduces by shuffles alone, no shared-memory round trips: the k picks are serial
            BLOCK_G=triton.next_power_of_2(num_groups), num_warps=max(1, block_e // 256),
            **pdl.launch_options(router_logits.device))
    return weights, ids
