"""The offline API: `LLM(*overrides).generate(prompts, params)` on the same engine the service uses."""
from __future__ import annotations

import atexit
from dataclasses import dataclass
from typing import Any, Sequence

from chitu.config import ChituConfig, compose_config
from chitu.engine.engine import LLMEngine, RequestRejected
from chitu.engine.request import Request, TokenLogprob
from chitu.engine.sampling_params import SamplingParams

Prompt = str | list[int]


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob]
    finish_reason: str


class LLM:
    """LLM("models.ckpt_dir=/path", "infer.max_reqs=16") — Hydra overrides, as on the command line.

    Under torchrun with tensor/pipeline parallelism only rank 0 gets past the constructor: the other
    ranks compute its steps and exit when it calls `close()` (or exits).
    """

    def __init__(self, *overrides: str, config: ChituConfig | None = None):
        self.config = config or compose_config(overrides)
        self.engine = LLMEngine(self.config)
        if not self.engine.is_driver:
            self.engine.follow_driver()
            raise SystemExit(0)
        atexit.register(self.close)

    def close(self) -> None:
        """Release the other ranks; the LLM cannot generate afterwards."""
        self.engine.close()

    def default_params(self) -> SamplingParams:
        return SamplingParams(max_new_tokens=self.config.request.max_new_tokens)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[CompletionOutput]:
        """Complete each prompt (text or token ids); results in the order of `prompts`. A request the
        engine cannot serve (too long; a token id outside the vocabulary in `logit_bias` or
        `stop_token_ids`) raises RequestRejected; where one field is at fault, an InvalidRequestField
        naming it in `param`."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        requests: list[Request] = []
        try:
            for prompt, prompt_params in zip(prompts, self._params_for(prompts, params)):
                requests.append(self.engine.add_request(prompt, prompt_params))
        except RequestRejected:
            for request in requests:  # all or nothing: the accepted ones must not linger in the engine
                self.engine.abort(request.request_id)
            raise
        return self._run(requests)

    def chat(self, conversations: list[dict[str, Any]] | Sequence[list[dict[str, Any]]],
             params: SamplingParams | Sequence[SamplingParams] | None = None,
             chat_template_kwargs: dict[str, Any] | None = None) -> list[CompletionOutput]:
        """Answer each conversation (a list of {"role", "content"} messages) through the chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.engine.tokenizer.apply_chat_template(c, **(chat_template_kwargs or {})) for c in conversations]
        return self.generate(prompts, params)

    def _params_for(self, prompts: Sequence[Prompt], params) -> list[SamplingParams]:
        if params is None:
            params = self.default_params()
        if isinstance(params, SamplingParams):
            return [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} SamplingParams")
        return list(params)

    def _run(self, requests: list[Request]) -> list[CompletionOutput]:
        while self.engine.has_unfinished():
            self.engine.step()
        return [
            CompletionOutput(r.request_id, r.prompt_token_ids, r.detokenizer.text, r.output_token_ids,
                             r.logprobs, r.finish_reason)
            for r in requests
        ]
