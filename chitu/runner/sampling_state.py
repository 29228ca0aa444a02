"""What the sampling rank remembers of each request between steps: its sampling settings, its seeded
generator, the tokens it has sampled (for the penalties) and, with a repetition penalty, its prompt."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from chitu.engine.sampling_params import SamplingParams
from chitu.runner.sampler import RowParams
from chitu.runner.step_plan import StepPlan


@dataclass
class RequestSampling:
    params: RowParams
    output_token_ids: list[int] = field(default_factory=list)
    prompt_token_ids: torch.Tensor | None = None  # distinct ids, on the device; only with a repetition penalty


class SamplingStates:
    def __init__(self, device: torch.device):
        self.device = device
        self.requests: dict[str, RequestSampling] = {}

    def update(self, plan: StepPlan) -> None:
        for request_id in plan.released:
            self.requests.pop(request_id, None)
        for request_id, p in plan.new_requests.items():
            prompt = plan.prompt_token_ids.get(request_id)
            self.requests[request_id] = RequestSampling(
                self._row_params(p),
                prompt_token_ids=None if prompt is None else torch.tensor(prompt, device=self.device).unique())

    def _row_params(self, p: SamplingParams) -> RowParams:
        generator = torch.Generator(self.device).manual_seed(p.seed) if p.seed is not None else None
        return RowParams(temperature=0.0 if p.is_greedy else p.temperature, top_p=p.top_p, top_k=p.top_k,
                         min_p=p.min_p, frequency_penalty=p.frequency_penalty, presence_penalty=p.presence_penalty,
                         repetition_penalty=p.repetition_penalty, logit_bias=p.logit_bias, generator=generator,
                         top_logprobs=p.top_logprobs, logprobs=p.logprobs)

    def rows(self, request_ids: list[str]) -> tuple[list[RowParams], list[list[int]], list[torch.Tensor | None]]:
        """Each request's settings, generated tokens and prompt tokens: SamplingBatch.build's arguments."""
        states = [self.requests[i] for i in request_ids]
        return [s.params for s in states], [s.output_token_ids for s in states], [s.prompt_token_ids for s in states]

    def record(self, request_ids: list[str], token_ids: list[int]) -> None:
        for request_id, token_id in zip(request_ids, token_ids):
            self.requests[request_id].output_token_ids.append(token_id)
