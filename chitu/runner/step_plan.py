"""What the driver (rank 0) tells every rank to compute in one step, and what comes back.

A plan is plain data, so it can be pickled to the other ranks: the scheduler's Batch of Requests
reduced to token ids, cache positions and the rows of the ranks' block tables, with the entries those rows
gained since the last plan; plus the sampling settings of requests the sampling rank has not seen yet (with
the prompt of those whose repetition penalty covers it) and the ids of those it may forget.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from chitu.engine.sampling_params import SamplingParams
from chitu.engine.request import Request
from chitu.engine.scheduler import Batch


class PlanKind(enum.Enum):
    STEP = "step"
    HEARTBEAT = "heartbeat"  # the driver is idle but alive: waiting ranks restart their timeout
    SHUTDOWN = "shutdown"


@dataclass
class StepPlan:
    kind: PlanKind = PlanKind.STEP
    is_prefill: bool = False
    request_ids: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)       # each request's new tokens, concatenated
    num_new_tokens: list[int] = field(default_factory=list)
    context_lens: list[int] = field(default_factory=list)    # tokens in the cache once this step has run
    table_rows: list[int] = field(default_factory=list)      # each request's row of the block tables
    table_updates: list[tuple[int, int, list[int]]] = field(default_factory=list)  # (row, first index, block ids)
    sampling_rows: list[int] = field(default_factory=list)   # requests that sample a token after this step
    new_requests: dict[str, SamplingParams] = field(default_factory=dict)
    prompt_token_ids: dict[str, list[int]] = field(default_factory=dict)  # new requests whose sampling reads them
    released: list[str] = field(default_factory=list)
    tokens_from_previous: bool = False  # decode inputs are the previous step's samples, still on the device

    @classmethod
    def from_batch(cls, batch: Batch, new_requests: dict[str, SamplingParams], released: list[str]) -> StepPlan:
        plan = cls(is_prefill=batch.is_prefill, num_new_tokens=batch.num_new_tokens,
                   new_requests=new_requests, released=released)
        for i, (request, n) in enumerate(zip(batch.requests, batch.num_new_tokens)):
            start = request.num_computed_tokens
            plan.request_ids.append(request.request_id)
            plan.token_ids += request.token_ids(start, start + n)
            plan.context_lens.append(start + n)
            plan.add_table_row(request)
            if batch.samples(i):
                plan.sampling_rows.append(i)
            if request.request_id in new_requests and request.params.penalises_prompt:
                plan.prompt_token_ids[request.request_id] = request.prompt_token_ids
        return plan

    @classmethod
    def continuing(cls, batch: Batch, released: list[str]) -> StepPlan:
        """The decode step after `batch` (whose tokens are not read yet) for the same requests: its input
        tokens are `batch`'s samples, one position further."""
        n = len(batch.requests)
        plan = cls(request_ids=[r.request_id for r in batch.requests], token_ids=[0] * n, num_new_tokens=[1] * n,
                   context_lens=[r.num_computed_tokens + 1 for r in batch.requests], sampling_rows=list(range(n)),
                   released=released, tokens_from_previous=True)
        for request in batch.requests:
            plan.add_table_row(request)
        return plan

    def add_table_row(self, request: Request) -> None:
        """The request's block-table row, with the entries the ranks do not hold yet."""
        self.table_rows.append(request.table_row)
        if len(request.block_table) > request.blocks_sent:
            self.table_updates.append((request.table_row, request.blocks_sent, request.block_table[request.blocks_sent:]))
            request.blocks_sent = len(request.block_table)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class StepResult:
    """The tokens sampled for a plan's sampling rows, in order, with their logprobs when asked for."""

    token_ids: list[int]
    logprobs: list[float] | None = None
    top_token_ids: list[list[int]] | None = None
    top_logprobs: list[list[float]] | None = None
