"""A request's state inside the engine: its tokens, its KV blocks, how far its prefill has gone."""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from chitu.engine.detokenizer import IncrementalDetokenizer
from chitu.engine.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    table_row: int = -1   # its row of the ranks' device block tables while it holds blocks (engine/kv_cache.py)
    blocks_sent: int = 0  # entries of block_table that plans have sent to that row
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_keys: list = field(default_factory=list)  # prefix caching: its full blocks' keys (engine/kv_cache.py)
    num_cached_blocks: int = 0  # of its block table, the first ones offered for reuse
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None  # "stop" (EOS), "length", "abort"
    logprobs: list[TokenLogprob] = field(default_factory=list)
    detokenizer: IncrementalDetokenizer | None = None
    in_flight: bool = False  # in a pipeline micro-batch whose tokens have not come back yet
    runs_alone: bool = False  # in a failed step with others: scheduled in batches of its own from then on
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = field(default_factory=lambda: next(_arrival_counter))
    first_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def last_token_id(self) -> int:
        """The newest known token: a decode step's input (a prompt token when chunked prefill left one)."""
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    def token_ids(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        prompt_len = len(self.prompt_token_ids)
        head = self.prompt_token_ids[start:min(end, prompt_len)]
        tail = self.output_token_ids[max(start - prompt_len, 0):max(end - prompt_len, 0)]
        return head + tail

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def schedule_key(self) -> tuple[int, int]:
        """Smaller runs first: higher priority, then earlier arrival."""
        return (-self.priority, self.arrival_order)
