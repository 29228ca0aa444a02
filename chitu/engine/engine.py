"""The engine: admits requests, runs scheduler → runner → sampler steps, reports what each step made."""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass, field

from torch import nn

from chitu.config.schema import ChituConfig
from chitu.distributed.comm import CommError
from chitu.distributed.parallel_state import check_world_size
from chitu.engine.detokenizer import IncrementalDetokenizer, step_text
from chitu.engine.kv_cache import BlockManager
from chitu.engine.request import Request, TokenLogprob
from chitu.engine.sampling_params import InvalidSamplingParam, SamplingParams
from chitu.engine.scheduler import Batch, Scheduler, micro_batch_limits
from chitu.engine.worker import Worker
from chitu.runner.model_runner import PendingSamples, SamplingFailed
from chitu.runner.step_plan import PlanKind, StepPlan, StepResult
from chitu.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """A request the engine cannot serve as asked (too long for infer.max_seq_len, …)."""


class InvalidRequestField(RequestRejected):
    """A rejected request whose fault lies in one field: a sampling parameter out of range, or a token
    id (logit_bias key, stop_token_ids entry) outside the vocabulary; `param` names it."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # pickled to the server's process
        return type(self), (self.param, str(self))


class StepError(RuntimeError):
    """A step failed; `requests` are the ones it ran, whose state can no longer be trusted. Raised by
    `step()` only for a step that ran one request: a failed step over several is retried with each of
    its requests alone, so that only the one at fault fails."""

    def __init__(self, requests: list[Request], ranks_in_step: bool = True):
        super().__init__(f"an engine step over {len(requests)} request(s) failed")
        self.requests = requests
        self.ranks_in_step = ranks_in_step  # False: other ranks may wait in a collective rank 0 never joins


@dataclass
class StepOutput:
    request: Request
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""  # with detokenize_in_step; else the consumer's to make (engine/detokenizer.py step_text)
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    stop_reason: str | None = None  # what ended the request at this token ("stop", "length"), if anything

    @property
    def finished(self) -> bool:
        return self.request.is_finished


class EngineDead(RuntimeError):
    """The engine cannot go on: another rank failed or stopped answering, or ranks fell out of step."""


@dataclass
class InFlight:
    batch: Batch
    plan: StepPlan
    pending: PendingSamples | None  # this rank's samples, being copied to the host
    result: StepResult | None = None  # the tokens, once read (or received from the sampling rank)


class LLMEngine:
    """Loads the configured checkpoint and tokenizer, or takes a ready `model` (random-weight benchmarks);
    without a tokenizer, prompts must be token ids and outputs carry no text.

    `load_tokenizer=False` runs a checkpoint that has no tokenizer (token-id prompts only).
    Under torchrun every rank builds an LLMEngine; only rank 0's (`is_driver`) schedules and takes
    requests, the others call `follow_driver()`, which returns when the driver closes.
    """

    def __init__(self, config: ChituConfig, model: nn.Module | None = None, tokenizer: Tokenizer | None = None,
                 load_tokenizer: bool = True):
        self.config = config
        check_world_size(config)
        if tokenizer is None and model is None and load_tokenizer and int(os.environ.get("RANK", "0")) == 0:
            tokenizer = Tokenizer(config.models.tokenizer_location())
        self.worker = Worker(config, model)
        self.parallel = self.worker.parallel
        self.device = self.worker.device
        self.model_config = self.worker.model.config
        self.tokenizer = tokenizer
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer else frozenset()
        infer = config.infer
        self.blocks = BlockManager(self.worker.num_blocks, infer.block_size, infer.enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, infer.max_reqs, infer.prefill_chunk_size, *micro_batch_limits(config),
                                   mixed_steps=infer.pp_size == 1,
                                   watermark_blocks=int(infer.kv_watermark * self.blocks.num_blocks))
        self.requests: dict[str, Request] = {}
        self.in_flight: deque[InFlight] = deque()
        self._announced: set[str] = set()  # requests whose sampling settings the sampling rank holds
        self._released: list[str] = []     # announced requests that ended since the last plan
        self._last_plan_at = time.monotonic()
        self._closed = False
        # Enqueue a decode step's successor before reading its tokens, so the host's work between steps
        # overlaps the device's. Pays only where the device runs ahead of the host (CUDA).
        self.overlap_steps = self.device.type == "cuda" and self.parallel.world_size == 1
        # Off (the server's engine loop): requests get no detokenizer, outputs no text; the server detokenizes.
        self.detokenize_in_step = True

    @property
    def is_driver(self) -> bool:
        return self.parallel.is_driver

    def follow_driver(self) -> None:
        """On ranks other than 0: compute the driver's steps until it shuts down. SIGINT and SIGTERM
        are ignored meanwhile: the driver drains its requests and then releases this rank."""
        for handled in (signal.SIGINT, signal.SIGTERM):
            signal.signal(handled, signal.SIG_IGN)
        try:
            self.worker.follow_driver()
        except CommError as e:
            logger.error("%s", e)
            raise SystemExit(1) from None
        except Exception:  # the driver sees this rank vanish and names it; the cause is logged here
            logger.exception("rank %d failed while computing a step", self.parallel.rank)
            raise SystemExit(1) from None

    @property
    def max_model_tokens(self) -> int:
        """The most tokens (prompt + output) one request may hold."""
        return min(self.config.infer.max_seq_len, self.blocks.num_blocks * self.blocks.block_size)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0) -> Request:
        """Admit a request, or raise RequestRejected: its length and every sampling setting are checked
        here, so that none can fail inside a step. (Token-id prompts are the caller's to check.)"""
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_params(params, token_ids)
        self._check_length(len(token_ids), params.max_new_tokens)
        request = Request(request_id or uuid.uuid4().hex, token_ids, params, priority)
        if self.tokenizer is not None and self.detokenize_in_step:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer.hf, token_ids)
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request

    def _check_params(self, params: SamplingParams, prompt: list[int]) -> None:
        try:
            params.validate()  # again: its fields may have been changed since it was made
        except InvalidSamplingParam as e:
            raise InvalidRequestField(e.param, str(e)) from None
        vocab_size = self.model_config.vocab_size
        named_ids = (("prompt", "prompt token id", prompt), ("logit_bias", "logit_bias key", params.logit_bias or ()),
                     ("stop_token_ids", "stop_token_ids entry", params.stop_token_ids))
        for param, what, token_ids in named_ids:
            bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
            if bad is not None:
                raise InvalidRequestField(param, f"{what} {bad} is outside the vocabulary [0, {vocab_size})")

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty")
        if prompt_len + max_new_tokens > self.max_model_tokens:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                f"exceeds the limit of {self.max_model_tokens} tokens (infer.max_seq_len={self.config.infer.max_seq_len})"
            )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or any(not r.is_finished for f in self.in_flight for r in f.batch.requests)

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and not request.is_finished:
            self._finish(request, "abort")

    def _finish(self, request: Request, reason: str) -> None:
        self.scheduler.finish(request, reason)
        self.requests.pop(request.request_id, None)
        if request.request_id in self._announced:
            self._announced.discard(request.request_id)
            self._released.append(request.request_id)

    def step(self) -> list[StepOutput]:
        """Launch what the scheduler allows (up to pp_size micro-batches in flight), then complete the
        oldest batch in flight and report what it produced."""
        try:
            while len(self.in_flight) < self.parallel.pp_size and (batch := self.scheduler.schedule()):
                self._launch(batch)
            if not self.in_flight:
                return []
            self._continue_decoding()
            done = self._complete_oldest()
        except CommError as e:
            raise EngineDead(str(e)) from e
        except StepError as e:
            if not e.ranks_in_step:
                raise EngineDead(f"rank 0 failed a step, so the ranks are out of step: {e.__cause__}") from e
            self._retry_alone(e)
            return []
        pending = Counter()  # tokens of each request in batches still in flight
        for f in self.in_flight:
            pending.update({id(r): n for r, n in zip(f.batch.requests, f.batch.num_new_tokens)})
        for request in done.batch.requests:
            request.in_flight = id(request) in pending
            if not request.is_finished:
                self.blocks.cache_computed(request, request.num_computed_tokens - pending[id(request)])
        return [] if done.result is None else self._append_samples(done.batch, done.plan, done.result)

    def _retry_alone(self, error: StepError) -> None:
        """Recompute a failed step's requests later, each in a batch of its own; re-raise `error` when
        that cannot tell the one at fault from the others (one request, or some still in flight)."""
        requests = [r for r in error.requests if not r.is_finished]
        in_flight = {id(r) for f in self.in_flight for r in f.batch.requests}
        if len(requests) <= 1 or any(id(r) in in_flight for r in requests):
            raise error
        logger.warning("a step over %d requests failed; running each alone", len(requests), exc_info=error.__cause__)
        for request in requests:
            request.in_flight = False
            request.runs_alone = True
            self.scheduler.preempt(request)

    def _launch(self, batch: Batch) -> None:
        new = {r.request_id: r.params for r in batch.requests if r.request_id not in self._announced}
        self._announced.update(new)
        self._start(batch, StepPlan.from_batch(batch, new, self._released))

    def _continue_decoding(self) -> None:
        """With overlap_steps: the decode batch in flight gets its next step, fed with its samples on the
        device, before they are read."""
        last = self.in_flight[-1]
        if (not self.overlap_steps or len(self.in_flight) != 1 or last.pending is None
                or not self.scheduler.continue_decode(last.batch, self.max_model_tokens)):
            return
        batch = Batch(is_prefill=False, requests=list(last.batch.requests), num_new_tokens=[1] * len(last.batch.requests))
        self._start(batch, StepPlan.continuing(batch, self._released), last.pending)

    def _start(self, batch: Batch, plan: StepPlan, previous: PendingSamples | None = None) -> None:
        self._released = []
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.in_flight = True
            request.num_computed_tokens += n
        try:
            self.in_flight.append(InFlight(batch, plan, self._submit(plan, previous)))
        except CommError:
            raise
        except Exception as e:
            for request in batch.requests:
                request.in_flight = False
            raise StepError(batch.requests, isinstance(e, SamplingFailed) or self.parallel.world_size == 1) from e

    def _submit(self, plan: StepPlan, previous: PendingSamples | None = None) -> PendingSamples | None:
        self._last_plan_at = time.monotonic()
        return self.worker.submit(plan, previous)

    def keep_alive(self) -> None:
        """While idle, tell the other ranks the driver is alive, well within infer.comm_timeout_s."""
        interval = min(10.0, self.parallel.timeout_s / 4)
        if self.parallel.world_size > 1 and not self._closed and time.monotonic() - self._last_plan_at > interval:
            self._submit(StepPlan(PlanKind.HEARTBEAT))

    def close(self) -> None:
        """Release the other ranks (they return from follow_driver) and leave the process group."""
        if self._closed:
            return
        self._closed = True
        if self.parallel.world_size > 1:
            try:
                self._drain_in_flight()
                self._submit(StepPlan(PlanKind.SHUTDOWN))
                self.worker.close()
            except CommError as e:
                logger.warning("could not release the other ranks (they may have exited already): %s", e)

    def _complete_oldest(self) -> InFlight:
        """The oldest batch in flight, with its tokens (received from the sampling rank if need be)."""
        done = self.in_flight.popleft()
        try:
            if done.pending is not None:
                done.result = self.worker.runner.collect(done.pending)
            elif done.plan.sampling_rows:
                done.result = self.worker.mailbox.recv_object(self.parallel.sampler_rank)
                if isinstance(done.result, SamplingFailed):
                    raise done.result
        except SamplingFailed as e:
            raise StepError(done.batch.requests) from e
        return done

    def _drain_in_flight(self) -> None:
        """Take the tokens of micro-batches still in flight: the sampling rank waits to hand them over."""
        while self.in_flight:
            with contextlib.suppress(StepError):  # its requests end with the shutdown anyway
                self._complete_oldest()

    def _append_samples(self, batch: Batch, plan: StepPlan, result: StepResult) -> list[StepOutput]:
        outputs = []
        for i, row in enumerate(plan.sampling_rows):
            request = batch.requests[row]
            if request.is_finished:  # aborted while its micro-batch was in flight
                continue
            token_id = result.token_ids[i]
            output = StepOutput(request, [token_id])
            request.output_token_ids.append(token_id)
            if request.params.logprobs:
                top = list(zip(result.top_token_ids[i], result.top_logprobs[i]))[: request.params.top_logprobs] \
                    if result.top_token_ids is not None else []
                output.new_logprobs.append(TokenLogprob(token_id, result.logprobs[i], top))
                request.logprobs.extend(output.new_logprobs)
            reason = output.stop_reason = self._stop_reason(request, token_id)
            if request.detokenizer is not None:
                output.new_text = step_text(request.detokenizer, token_id, reason)
            if reason:
                self._finish(request, reason)
            outputs.append(output)
        return outputs

    def _stop_reason(self, request: Request, token_id: int) -> str | None:
        params = request.params
        if token_id in params.stop_token_ids or (params.stop_with_eos and token_id in self.eos_token_ids):
            return "stop"
        if len(request.output_token_ids) >= params.max_new_tokens or request.num_tokens >= self.max_model_tokens:
            return "length"
        return None

