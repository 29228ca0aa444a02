"""Which experts of an MoE layer a rank holds, and which slice of each.

The tensor ranks of a pipeline stage form infer.ep_size expert groups of tp_size / ep_size ranks:
group g holds a contiguous range of the experts, and within a group each expert's intermediate
columns are split over the group's ranks (ep_size=1: every rank slices every expert; ep_size=tp_size:
whole experts, one group per rank). Attention stays tensor-parallel over the whole stage, so every
rank of the stage sees every token: a rank computes its experts' share of the tokens routed to
them, and one all-reduce over the stage combines the shares.
"""
from __future__ import annotations

from dataclasses import dataclass

from chitu.distributed.parallel_state import ParallelState
from chitu.distributed.sharding import Span, balanced_span


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    experts: Span        # the experts this rank holds (global ids)
    columns: Span        # the intermediate columns of each of them this rank holds

    @classmethod
    def for_rank(cls, state: ParallelState, num_experts: int, intermediate_size: int) -> ExpertPlacement:
        ep_rank, group_rank = divmod(state.tp_rank, state.moe_tp_size)
        return cls(num_experts, balanced_span(num_experts, state.ep_size, ep_rank),
                   balanced_span(intermediate_size, state.moe_tp_size, group_rank))

