"""The sampling rank's persistent batch state. Every request it has been told of holds a slot of device tables
of its settings, written once when it joins; a request with a penalty also holds a row of vocabulary-wide token
counts (grown on the device as its tokens are sampled) and prompt-token marks, one with a logit_bias a row of
biases. A step then only sends which slots its rows are, in one asynchronous copy, and gathers the rest on the
device: no step waits for the device, whatever the sampling settings."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from chitu.engine.sampling_params import SamplingParams
from chitu.ops.device_copy import to_device
from chitu.runner.sampler import SamplingBatch
from chitu.runner.step_plan import StepPlan

# Columns of the float settings table; the integer one holds top_k and the seed.
FLOAT_SETTINGS = ("temperature", "top_p", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty")


class RowPool:
    """Rows of device tables (one row count, any widths) handed out and taken back; grown by doubling."""

    def __init__(self, columns: list[tuple[int, torch.dtype]], device: torch.device):
        self.device = device
        self.tables: list[torch.Tensor] = [torch.zeros(0, width, dtype=dtype, device=device) for width, dtype in columns]
        self.free: list[int] = []

    def take(self) -> int:
        """A row, zeroed in every table (enqueued on the device)."""
        if not self.free:
            self._grow()
        row = self.free.pop()
        for table in self.tables:
            table[row].zero_()
        return row

    def give_back(self, row: int) -> None:
        self.free.append(row)

    def _grow(self) -> None:
        old = self.tables[0].shape[0]
        new = max(16, 2 * old)
        self.tables = [torch.cat([t, torch.zeros(new - old, t.shape[1], dtype=t.dtype, device=self.device)])
                       for t in self.tables]
        self.free.extend(range(new - 1, old - 1, -1))


@dataclass
class RequestRow:
    params: SamplingParams
    slot: int
    penalty_row: int = -1  # its row of the counts and prompt marks, if it has a penalty
    bias_row: int = -1     # its row of the biases, if it has a logit_bias

    @property
    def seeded(self) -> bool:
        return self.params.seed is not None and not self.params.is_greedy


class SamplingTable:
    def __init__(self, device: torch.device, vocab_size: int):
        self.device = device
        self.slots = RowPool([(len(FLOAT_SETTINGS), torch.float32), (2, torch.int64)], device)
        self.penalties = RowPool([(vocab_size, torch.int32), (vocab_size, torch.bool)], device)
        self.biases = RowPool([(vocab_size, torch.float32)], device)
        self.rows: dict[str, RequestRow] = {}

    def update(self, plan: StepPlan) -> None:
        """Forget the plan's released requests; give its new ones their rows and write their settings."""
        for request_id in plan.released:
            self._leave(request_id)
        joined = []
        for request_id, params in plan.new_requests.items():
            self._leave(request_id)  # a retried plan announces its requests again
            row = RequestRow(params, self.slots.take())
            if _penalized(params):
                row.penalty_row = self.penalties.take()
            if params.logit_bias:
                row.bias_row = self.biases.take()
            self.rows[request_id] = row
            joined.append((row, plan.prompt_token_ids.get(request_id, ())))
        if joined:
            self._write(joined)

    def _leave(self, request_id: str) -> None:
        row = self.rows.pop(request_id, None)
        if row is None:
            return
        self.slots.give_back(row.slot)
        if row.penalty_row >= 0:
            self.penalties.give_back(row.penalty_row)
        if row.bias_row >= 0:
            self.biases.give_back(row.bias_row)

    def _write(self, joined: list[tuple[RequestRow, list[int]]]) -> None:
        """The joined rows' settings, prompt marks and biases: a few copies and scatters for all of them."""
        floats, ints = self.slots.tables
        slots = to_device([row.slot for row, _ in joined], torch.int64, self.device)
        floats.index_copy_(0, slots, to_device([_float_settings(row.params) for row, _ in joined], torch.float32, self.device))
        ints.index_copy_(0, slots, to_device([[row.params.top_k, row.params.seed or 0] for row, _ in joined],
                                             torch.int64, self.device))
        marks = [(row.penalty_row, token_id) for row, prompt in joined if row.penalty_row >= 0 for token_id in prompt]
        if marks:
            self.penalties.tables[1].index_put_(tuple(to_device(marks, torch.int64, self.device).T),
                                                torch.ones((), dtype=torch.bool, device=self.device))
        biases = [(row.bias_row, token_id, bias) for row, _ in joined if row.bias_row >= 0
                  for token_id, bias in row.params.logit_bias.items()]
        if biases:
            rows, token_ids, values = zip(*biases)
            self.biases.tables[0].index_put_(tuple(to_device([rows, token_ids], torch.int64, self.device)),
                                             to_device(values, torch.float32, self.device))

    def batch(self, request_ids: list[str], positions: list[int]) -> SamplingBatch:
        """The step's rows (requests sampling the token at `positions` of their sequences) as a SamplingBatch."""
        rows = [self.rows[i] for i in request_ids]
        sampled = [r.params for r in rows if not r.params.is_greedy]
        penalized = [i for i, r in enumerate(rows) if r.penalty_row >= 0]
        biased = [i for i, r in enumerate(rows) if r.bias_row >= 0]
        seeded = [i for i, r in enumerate(rows) if r.seeded]
        batch = SamplingBatch(
            num_top_logprobs=max((r.params.top_logprobs for r in rows), default=0),
            need_logprobs=any(r.params.logprobs for r in rows), all_greedy=not sampled,
            needs_top_k_top_p=any(p.top_k > 0 or p.top_p < 1 for p in sampled),
            candidate_count=max(p.top_k for p in sampled) if sampled and all(p.top_k > 0 for p in sampled) else 0)
        if not (sampled or penalized or biased):
            return batch
        # Every index the step needs, in one copy: slots, penalized rows and their table rows, biased rows and
        # their table rows, seeded rows and their positions.
        parts = [[r.slot for r in rows], penalized, [rows[i].penalty_row for i in penalized], biased,
                 [rows[i].bias_row for i in biased], seeded, [positions[i] for i in seeded]]
        packed = to_device([x for part in parts for x in part], torch.int64, self.device)
        slots, penalized_t, penalty_rows, biased_t, bias_rows, seeded_t, seed_positions = packed.split(list(map(len, parts)))
        floats, ints = self.slots.tables
        settings = floats[slots]
        if sampled:
            batch.temperature, batch.top_p = settings[:, 0], settings[:, 1]
            batch.top_k = ints[slots, 0]
            batch.min_p = settings[:, 2] if any(p.min_p > 0 for p in sampled) else None
        if penalized:
            counts, marks = self.penalties.tables
            batch.penalized_rows, batch.penalty_table_rows = penalized_t, penalty_rows
            batch.token_counts, batch.prompt_mask = counts[penalty_rows], marks[penalty_rows]
            penalty_settings = settings[penalized_t]
            batch.frequency_penalty, batch.presence_penalty, batch.repetition_penalty = penalty_settings[:, 3:6].unbind(1)
        if biased:
            batch.biased_rows, batch.logit_bias = biased_t, self.biases.tables[0][bias_rows]
        if seeded:
            batch.seeded_rows, batch.seeds, batch.seed_positions = seeded_t, ints[slots[seeded_t], 1], seed_positions
        return batch

    def record(self, batch: SamplingBatch, token_ids: torch.Tensor) -> None:
        """Count the step's sampled tokens of the penalized rows, on the device (the next step reads them there,
        even when it was enqueued before these tokens reached the host)."""
        if batch.penalized_rows is not None:
            counts = self.penalties.tables[0]
            counts.index_put_((batch.penalty_table_rows, token_ids[batch.penalized_rows]),
                              torch.ones_like(batch.penalty_table_rows, dtype=counts.dtype), accumulate=True)


def _penalized(params: SamplingParams) -> bool:
    return params.frequency_penalty != 0 or params.presence_penalty != 0 or params.repetition_penalty != 1


def _float_settings(params: SamplingParams) -> list[float]:
    values = {name: getattr(params, name) for name in FLOAT_SETTINGS}
    values["temperature"] = 0.0 if params.is_greedy else params.temperature
    return [values[name] for name in FLOAT_SETTINGS]
