"""Continuous batching: which requests run in the next step, prefill or decode.

Waiting requests sit in a priority queue (higher priority first, then arrival order). A step is
homogeneous, as in Chitu: prefill whenever some admitted request still has prompt tokens to compute
(chunked by a token budget), otherwise one decode token for every running request. When the KV
cache runs out during decode, the lowest-ranked running request is preempted: its blocks are freed
and it goes back to the queue to be recomputed later, so nothing is lost and nothing is corrupted.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from chitu.engine.kv_cache import BlockManager
from chitu.engine.request import Request, RequestStatus


@dataclass
class Batch:
    is_prefill: bool
    requests: list[Request]
    num_new_tokens: list[int]  # tokens computed for each request in this step

    def samples(self, index: int) -> bool:
        """Whether request `index` reaches its last known token this step, so a new token is sampled."""
        request = self.requests[index]
        return request.num_computed_tokens + self.num_new_tokens[index] == request.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_reqs: int, prefill_chunk_size: int | None):
        self.blocks = block_manager
        self.max_reqs = max_reqs
        self.prefill_budget = prefill_chunk_size
        self.waiting: list[tuple[tuple[int, int], Request]] = []
        self.running: list[Request] = []
        self.num_preemptions = 0

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self.waiting, (request.schedule_key(), request))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_prefill(self) -> Batch | None:
        batch = Batch(is_prefill=True, requests=[], num_new_tokens=[])
        budget = self.prefill_budget or float("inf")
        for request in self.running:
            remaining = request.num_tokens - request.num_computed_tokens
            if remaining > 1 and budget > 0:
                budget -= self._add_prefill(batch, request, remaining, budget)
        while self.waiting and len(self.running) < self.max_reqs and budget > 0:
            request = self.waiting[0][1]
            chunk = min(request.num_tokens, budget)
            if not self.blocks.can_hold(request, chunk):
                break
            heapq.heappop(self.waiting)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            budget -= self._add_prefill(batch, request, request.num_tokens, budget)
        return batch if batch.requests else None

    def _add_prefill(self, batch: Batch, request: Request, remaining: int, budget: float) -> int:
        chunk = int(min(remaining, budget))
        chunk = self._fit_to_blocks(request, chunk)
        if chunk == 0:
            return 0
        self.blocks.grow(request, request.num_computed_tokens + chunk)
        batch.requests.append(request)
        batch.num_new_tokens.append(chunk)
        return chunk

    def _fit_to_blocks(self, request: Request, chunk: int) -> int:
        """The largest chunk ≤ `chunk` whose KV fits in the blocks the request has plus the free ones."""
        capacity = (len(request.block_table) + self.blocks.num_free) * self.blocks.block_size
        return max(0, min(chunk, capacity - request.num_computed_tokens))

    def _schedule_decode(self) -> Batch | None:
        scheduled: list[Request] = []
        for request in sorted(self.running, key=Request.schedule_key):
            num_tokens = request.num_tokens
            if request.status is not RequestStatus.RUNNING or num_tokens - request.num_computed_tokens > 1:
                continue  # preempted while making room, or a prefill stalled for want of blocks
            while not self.blocks.can_hold(request, num_tokens):
                victim = self._lowest_ranked()
                self.preempt(victim)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING:
                self.blocks.grow(request, num_tokens)
                scheduled.append(request)
        if scheduled:
            return Batch(is_prefill=False, requests=scheduled, num_new_tokens=[1] * len(scheduled))
        if self.running:  # only stalled prefills: free the lowest-ranked one's blocks for the others
            self.preempt(self._lowest_ranked())
            return self.schedule()
        return None

    def _lowest_ranked(self) -> Request:
        return max((r for r in self.running if r.status is RequestStatus.RUNNING), key=Request.schedule_key)

    def preempt(self, request: Request) -> None:
        """Free the request's KV; it is recomputed from its prompt and outputs when readmitted."""
        self.running.remove(request)
        self.blocks.release(request)
        self.add(request)
        self.num_preemptions += 1

    def finish(self, request: Request, reason: str) -> None:
        if request in self.running:
            self.running.remove(request)
        else:
            self.waiting = [(key, r) for key, r in self.waiting if r is not request]
            heapq.heapify(self.waiting)
        self.blocks.release(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
