"""Continuous batching: which requests run in the next step, prefill or decode.

Waiting requests sit in a priority queue (higher priority first, then arrival order). With mixed steps (one
pipeline stage) a step gives one decode token to every running request that has one to compute, then fills what is
left of its token budget (infer.prefill_chunk_size) with prefill chunks, of running requests first, then of those
admitted: streams keep receiving tokens while a long prompt is prefilled. Otherwise (pipeline parallelism, whose
micro-batches follow scheduler.pp_config) a step is homogeneous, as in Chitu: prefill whenever some admitted
request still has prompt tokens to compute, else one decode token for every running request. When the KV
cache runs out during decode, the lowest-ranked running request is preempted: its blocks are freed
and it goes back to the queue to be recomputed later, so nothing is lost and nothing is corrupted.
A request marked `runs_alone` (it was in a step that failed) is only ever batched by itself. With prefix
caching an admitted request starts from the cached blocks that hold its first tokens (engine/kv_cache.py). A
request is admitted beside running ones only if `watermark_blocks` stay free after its first chunk, so that the
running requests' next blocks do not have to be taken back at once (preemption thrash).

With pipeline parallelism up to pp_size batches (micro-batches) are in flight at once; a request in
one is skipped until its tokens come back, and micro-batch sizes follow scheduler.pp_config.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

from chitu.config.schema import ChituConfig
from chitu.engine.kv_cache import BlockManager
from chitu.engine.request import Request, RequestStatus


def micro_batch_limits(config: ChituConfig) -> tuple[int, int]:
    """The most requests in one prefill and in one decode batch, as the manual defines the
    scheduler.pp_config keys: with pp_size > 1, a prefill batch takes ceil(max_reqs / pp_size)
    requests (or prefill_num_tasks) and a decode batch max_reqs (or decode_num_tasks)."""
    infer, knobs = config.infer, config.scheduler.pp_config
    if infer.pp_size == 1:
        return infer.max_reqs, infer.max_reqs
    prefill = -(-infer.max_reqs // infer.pp_size) if knobs.prefill_num_tasks_divided_by_pp else knobs.prefill_num_tasks
    decode = infer.max_reqs if knobs.enforce_decode_num_tasks_max else knobs.decode_num_tasks
    return prefill, decode


@dataclass
class Batch:
    is_prefill: bool
    requests: list[Request]
    num_new_tokens: list[int]  # tokens computed for each request in this step

    def samples(self, index: int) -> bool:
        """Whether request `index` reaches its last known token this step, so a new token is sampled."""
        request = self.requests[index]
        return request.num_computed_tokens + self.num_new_tokens[index] == request.num_tokens


def _joins(batch: Batch | list[Request], request: Request) -> bool:
    """Whether `request` may join the batch: a request that runs alone shares no batch."""
    requests = batch.requests if isinstance(batch, Batch) else batch
    return not requests or not (request.runs_alone or requests[0].runs_alone)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_reqs: int, prefill_chunk_size: int | None,
                 max_prefill_batch: int | None = None, max_decode_batch: int | None = None, mixed_steps: bool = False,
                 watermark_blocks: int = 0):
        self.blocks = block_manager
        self.mixed_steps = mixed_steps
        self.watermark_blocks = watermark_blocks
        self.max_reqs = max_reqs
        self.prefill_budget = prefill_chunk_size
        self.max_prefill_batch = max_prefill_batch or max_reqs
        self.max_decode_batch = max_decode_batch or max_reqs
        self.waiting: list[tuple[tuple[int, int], Request]] = []
        self.running: list[Request] = []
        self.num_preemptions = 0
        self._alone_last = False  # whether the last decode batch was a request that runs alone

    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self.waiting, (request.schedule_key(), request))

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> Batch | None:
        if self.mixed_steps:
            return self._schedule_mixed()
        return self._schedule_prefill() or self._schedule_decode()

    def _schedule_mixed(self) -> Batch | None:
        """One decode token for every running request that has one to compute, then prefill chunks in what is
        left of the token budget: a prompt being prefilled does not hold back the streams already running."""
        batch = self._schedule_decode(stalled_preemption=False) or Batch(is_prefill=False, requests=[],
                                                                         num_new_tokens=[])
        budget = (self.prefill_budget or float("inf")) - len(batch.requests)
        prefill = self._schedule_prefill(batch, budget)
        if prefill is not None:
            return prefill
        if self.running and not any(r.in_flight for r in self.running):
            self.preempt(self._lowest_ranked())  # only stalled prefills: free the lowest-ranked one's blocks
            return self.schedule()
        return None

    def _schedule_prefill(self, batch: Batch | None = None, budget: float | None = None) -> Batch | None:
        """Prefill chunks of running requests, then admissions, within `budget` tokens, added to `batch` (a new
        one by default); the batch if it holds any request."""
        batch = batch or Batch(is_prefill=True, requests=[], num_new_tokens=[])
        budget = budget if budget is not None else self.prefill_budget or float("inf")
        for request in self.running:
            remaining = request.num_tokens - request.num_computed_tokens
            if (not request.in_flight and remaining > 1 and budget > 0 and len(batch.requests) < self.max_prefill_batch
                    and _joins(batch, request)):
                budget -= self._add_prefill(batch, request, remaining, budget)
        while (self.waiting and len(self.running) < self.max_reqs and budget > 0
               and len(batch.requests) < self.max_prefill_batch and _joins(batch, self.waiting[0][1])):
            request = self.waiting[0][1]
            prefix = self.blocks.cached_prefix(request)
            reused = len(prefix) * self.blocks.block_size
            reserve = self.watermark_blocks if self.running else 0  # alone, any request that fits may start
            if not self.blocks.can_admit(request, prefix, reused + min(request.num_tokens - reused, budget), reserve):
                break
            heapq.heappop(self.waiting)
            self.blocks.take_prefix(request, prefix)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            budget -= self._add_prefill(batch, request, request.num_tokens - reused, budget)
        return batch if batch.requests else None

    def _add_prefill(self, batch: Batch, request: Request, remaining: int, budget: float) -> int:
        chunk = int(min(remaining, budget))
        chunk = self._fit_to_blocks(request, chunk)
        if chunk == 0:
            return 0
        self.blocks.grow(request, request.num_computed_tokens + chunk)
        batch.is_prefill = True
        batch.requests.append(request)
        batch.num_new_tokens.append(chunk)
        return chunk

    def _fit_to_blocks(self, request: Request, chunk: int) -> int:
        """The largest chunk ≤ `chunk` whose KV fits in the blocks the request has plus the free ones."""
        capacity = (len(request.block_table) + self.blocks.num_free) * self.blocks.block_size
        return max(0, min(chunk, capacity - request.num_computed_tokens))

    def _schedule_decode(self, stalled_preemption: bool = True) -> Batch | None:
        scheduled: list[Request] = []
        for request in self._decode_order():
            num_tokens = request.num_tokens
            if len(scheduled) == self.max_decode_batch:
                break
            if (request.in_flight or request.status is not RequestStatus.RUNNING
                    or num_tokens - request.num_computed_tokens > 1 or not _joins(scheduled, request)):
                continue  # in a micro-batch, preempted while making room, a prefill stalled for want of blocks,
                # or kept apart
            while not self.blocks.can_hold(request, num_tokens):
                victim = self._lowest_ranked()
                if victim is None:
                    break  # the others are in flight: wait for them
                self.preempt(victim)
                if victim is request:
                    break
            if request.status is RequestStatus.RUNNING and self.blocks.can_hold(request, num_tokens):
                self.blocks.grow(request, num_tokens)
                scheduled.append(request)
        if scheduled:
            self._alone_last = scheduled[0].runs_alone
            return Batch(is_prefill=False, requests=scheduled, num_new_tokens=[1] * len(scheduled))
        if stalled_preemption and self.running and not any(r.in_flight for r in self.running):
            # only stalled prefills: free the lowest-ranked one's blocks for the others
            self.preempt(self._lowest_ranked())
            return self.schedule()
        return None

    def _decode_order(self) -> list[Request]:
        """Running requests, best ranked first; every other step those that run alone go first (the one
        with the fewest tokens leading), so that neither kind starves the other."""
        ranked = sorted(self.running, key=Request.schedule_key)
        if self._alone_last:
            return ranked
        alone = sorted((r for r in ranked if r.runs_alone), key=lambda r: len(r.output_token_ids))
        return alone + [r for r in ranked if not r.runs_alone]

    def continue_decode(self, batch: Batch, max_model_tokens: int) -> bool:
        """Whether the decode `batch`, whose tokens are not read yet, may run its next step now: nobody
        waits to be admitted or prefilled, no request can end by length at that step, and the cache
        holds one more token for each (those blocks are then taken)."""
        if batch.is_prefill or self.waiting or len(self.running) != len(batch.requests):
            return False
        for request in batch.requests:
            # after this step's token and the next one's
            if (request.is_finished or len(request.output_token_ids) + 2 > request.params.max_new_tokens
                    or request.num_tokens + 2 > max_model_tokens):
                return False
        missing = sum(self.blocks.blocks_missing(r, r.num_computed_tokens + 1) for r in batch.requests)
        if missing > self.blocks.num_free:
            return False
        for request in batch.requests:
            self.blocks.grow(request, request.num_computed_tokens + 1)
        return True

    def _lowest_ranked(self) -> Request | None:
        """The running request to preempt first; requests in flight are never preempted."""
        candidates = (r for r in self.running if r.status is RequestStatus.RUNNING and not r.in_flight)
        return max(candidates, key=Request.schedule_key, default=None)

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
