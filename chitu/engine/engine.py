"""The engine: admits requests, runs scheduler → runner → sampler steps, reports what each step made."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field

import torch
from torch import nn

from chitu.checkpoint import open_checkpoint
from chitu.config.schema import ChituConfig, ConfigError
from chitu.engine.detokenizer import IncrementalDetokenizer
from chitu.engine.kv_cache import BlockManager, blocks_for
from chitu.engine.request import Request, TokenLogprob
from chitu.engine.sampling_params import SamplingParams
from chitu.engine.scheduler import Batch, Scheduler
from chitu.models.loader import load_model
from chitu.platform import (memory_budget, resolve_attention_backend, resolve_cuda_graph, resolve_device,
                            resolve_dtype)
from chitu.runner.model_runner import ModelRunner
from chitu.runner.sampler import SamplerOutput
from chitu.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


class RequestRejected(ValueError):
    """A request the engine cannot serve as asked (too long for infer.max_seq_len, …)."""


class StepError(RuntimeError):
    """A step failed; `requests` are the ones it ran, whose state can no longer be trusted."""

    def __init__(self, requests: list[Request]):
        super().__init__(f"an engine step over {len(requests)} request(s) failed")
        self.requests = requests


@dataclass
class StepOutput:
    request: Request
    new_token_ids: list[int] = field(default_factory=list)
    new_text: str = ""
    new_logprobs: list[TokenLogprob] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.request.is_finished


class LLMEngine:
    """Loads the configured checkpoint and tokenizer, or takes a ready `model` (random-weight benchmarks);
    without a tokenizer, prompts must be token ids and outputs carry no text."""

    def __init__(self, config: ChituConfig, model: nn.Module | None = None, tokenizer: Tokenizer | None = None):
        self.config = config
        torch.manual_seed(config.infer.seed)
        self.device = resolve_device(config)
        attention_backend = resolve_attention_backend(config, self.device)
        if model is None:
            tokenizer = Tokenizer(config.models.tokenizer_location())
            model = self._load_model()
        self.tokenizer = tokenizer
        self.eos_token_ids = tokenizer.eos_token_ids if tokenizer else frozenset()
        self.model_config = model.config
        for attention in model.attention_layers():
            attention.backend = attention_backend
        infer = config.infer
        self.runner = ModelRunner(model, self.device, infer.block_size, infer.max_reqs, infer.max_seq_len,
                                  resolve_cuda_graph(config, self.device))
        num_blocks = self._num_kv_blocks()
        self.runner.allocate_kv_cache(num_blocks)
        self.blocks = BlockManager(num_blocks, infer.block_size)
        self.scheduler = Scheduler(self.blocks, infer.max_reqs, infer.prefill_chunk_size)
        self.requests: dict[str, Request] = {}
        logger.info("KV cache: %d blocks of %d tokens; attention: %s; CUDA graphs: %s",
                    num_blocks, infer.block_size, attention_backend, self.runner.use_cuda_graph)

    def _load_model(self) -> nn.Module:
        config = self.config
        reader = open_checkpoint(config.models.checkpoint_path())
        try:
            return load_model(reader, config.models.type, config.infer.max_seq_len, self.device, resolve_dtype(config))
        finally:
            reader.close()

    def _num_kv_blocks(self) -> int:
        infer = self.config.infer
        if infer.num_blocks > 0:
            return infer.num_blocks
        budget = memory_budget(self.device, infer.memory_utilization)
        if self.device.type == "cuda":
            budget -= self.runner.profile_activation_bytes(min(infer.prefill_chunk_size or infer.max_seq_len, infer.max_seq_len))
        affordable = max(budget, 0) // self.runner.kv_block_bytes()
        needed = blocks_for(infer.max_seq_len, infer.block_size)
        if affordable < needed:
            raise ConfigError(
                f"the KV cache for one request of infer.max_seq_len={infer.max_seq_len} tokens needs {needed} blocks "
                f"({needed * self.runner.kv_block_bytes() / 2**30:.2f} GiB) but only {affordable} fit in the memory "
                f"left after the weights: lower infer.max_seq_len or raise infer.memory_utilization")
        return min(blocks_for(infer.max_reqs * infer.max_seq_len, infer.block_size), affordable)

    @property
    def max_model_tokens(self) -> int:
        """The most tokens (prompt + output) one request may hold."""
        return min(self.config.infer.max_seq_len, self.blocks.num_blocks * self.blocks.block_size)

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0) -> Request:
        token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._check_length(len(token_ids), params.max_new_tokens)
        request = Request(request_id or uuid.uuid4().hex, token_ids, params, priority)
        if self.tokenizer is not None:
            request.detokenizer = IncrementalDetokenizer(self.tokenizer.hf, token_ids)
        if params.seed is not None:
            request.generator = torch.Generator(self.device).manual_seed(params.seed)
        self.requests[request.request_id] = request
        self.scheduler.add(request)
        return request

    def _check_length(self, prompt_len: int, max_new_tokens: int) -> None:
        if prompt_len == 0:
            raise RequestRejected("the prompt is empty")
        if prompt_len + max_new_tokens > self.max_model_tokens:
            raise RequestRejected(
                f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
                f"exceeds the limit of {self.max_model_tokens} tokens (infer.max_seq_len={self.config.infer.max_seq_len})"
            )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def abort(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None and not request.is_finished:
            self.scheduler.finish(request, "abort")

    def step(self) -> list[StepOutput]:
        batch = self.scheduler.schedule()
        if batch is None:
            return []
        try:
            sampled_rows, samples = self.runner.run(batch)
            for request, n in zip(batch.requests, batch.num_new_tokens):
                request.num_computed_tokens += n
            return [] if samples is None else self._append_samples(batch, sampled_rows, samples)
        except Exception as e:
            raise StepError(batch.requests) from e

    def _append_samples(self, batch: Batch, rows: list[int], samples: SamplerOutput) -> list[StepOutput]:
        token_ids = samples.token_ids.tolist()
        logprobs = _logprob_lists(samples)
        outputs = []
        for i, row in enumerate(rows):
            request = batch.requests[row]
            output = StepOutput(request, [token_ids[i]])
            request.output_token_ids.append(token_ids[i])
            if request.params.logprobs:
                chosen, top_ids, top_values = logprobs[0][i], logprobs[1][i], logprobs[2][i]
                top = list(zip(top_ids, top_values))[: request.params.top_logprobs]
                output.new_logprobs.append(TokenLogprob(token_ids[i], chosen, top))
                request.logprobs.extend(output.new_logprobs)
            detokenizer = request.detokenizer
            output.new_text = detokenizer.add(token_ids[i]) if detokenizer else ""
            reason = self._stop_reason(request, token_ids[i])
            if reason:
                output.new_text += detokenizer.flush() if detokenizer else ""
                self.scheduler.finish(request, reason)
                self.requests.pop(request.request_id, None)
            outputs.append(output)
        return outputs

    def _stop_reason(self, request: Request, token_id: int) -> str | None:
        if request.params.stop_with_eos and token_id in self.eos_token_ids:
            return "stop"
        if len(request.output_token_ids) >= request.params.max_new_tokens or request.num_tokens >= self.max_model_tokens:
            return "length"
        return None


def _logprob_lists(samples: SamplerOutput) -> tuple[list, list, list]:
    if samples.logprobs is None:
        return [], [], []
    top_ids = samples.top_token_ids.tolist() if samples.top_token_ids is not None else [[]] * len(samples.logprobs)
    top_values = samples.top_logprobs.tolist() if samples.top_logprobs is not None else [[]] * len(samples.logprobs)
    return samples.logprobs.tolist(), top_ids, top_values
