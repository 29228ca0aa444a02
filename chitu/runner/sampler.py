"""Turns each request's last-position logits into its next token, vectorised over a mixed batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RowParams:
    """One request's sampling settings, as the runner hands them to SamplingBatch.build."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    generator: torch.Generator | None = None
    top_logprobs: int = 0
    logprobs: bool = False

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0 or self.top_k == 1

    @property
    def counts_tokens(self) -> bool:
        return self.frequency_penalty != 0 or self.presence_penalty != 0

    @property
    def repeats(self) -> bool:
        return self.repetition_penalty != 1

    @property
    def filters(self) -> bool:
        return self.top_k > 0 or self.top_p < 1


@dataclass
class SamplingBatch:
    """One row per request in the step; all tensors on the logits' device."""

    # Tensors the batch does not need are None: no copies to the device for an all-greedy batch.
    temperature: torch.Tensor | None        # [B] float32; 0 means greedy
    top_p: torch.Tensor | None              # [B] float32 in (0, 1]
    top_k: torch.Tensor | None              # [B] int64; -1 or 0 = disabled
    min_p: torch.Tensor | None              # [B] float32; 0 = disabled
    frequency_penalty: torch.Tensor | None  # [B] float32
    presence_penalty: torch.Tensor | None   # [B] float32
    repetition_penalty: torch.Tensor | None  # [B] float32; 1 = disabled
    output_tokens: torch.Tensor | None      # [B, L] int64, generated tokens padded with -1
    prompt_tokens: torch.Tensor | None      # [B, P] int64, the prompt's ids in rows with a repetition penalty, else -1
    logit_bias_index: torch.Tensor | None   # [2, N] int64: (row, token id) of each bias
    logit_bias: torch.Tensor | None         # [N] float32
    generators: list[torch.Generator | None]
    num_top_logprobs: int            # max over the batch of requested top_logprobs
    need_logprobs: bool
    # Host-side facts, so the hot path can skip work without reading the tensors back (a device sync).
    all_greedy: bool = False
    needs_top_k_top_p: bool = True
    candidate_count: int = 0  # the largest top_k when every sampled row has one, else 0 (the whole vocabulary)

    @classmethod
    def build(cls, params: list[RowParams], output_tokens: list[list[int]], device: torch.device | str,
              prompt_tokens: list[torch.Tensor | None] | None = None) -> SamplingBatch:
        """Batch the rows' settings, copying to the device only what the batch uses. `prompt_tokens` are
        needed only for rows with a repetition penalty (None elsewhere); 1-D, ideally on the device already."""
        sampled = [p for p in params if not p.is_greedy]
        counted = any(p.counts_tokens for p in params)
        repeated = any(p.repeats for p in params)

        def tensor(field: str, dtype: torch.dtype, needed: bool) -> torch.Tensor | None:
            return torch.tensor([getattr(p, field) for p in params], dtype=dtype, device=device) if needed else None

        bias_index, bias = _logit_bias(params, device)
        return cls(
            temperature=tensor("temperature", torch.float32, bool(sampled)),
            top_p=tensor("top_p", torch.float32, bool(sampled)),
            top_k=tensor("top_k", torch.int64, bool(sampled)),
            min_p=tensor("min_p", torch.float32, any(p.min_p > 0 for p in sampled)),
            frequency_penalty=tensor("frequency_penalty", torch.float32, counted),
            presence_penalty=tensor("presence_penalty", torch.float32, counted),
            repetition_penalty=tensor("repetition_penalty", torch.float32, repeated),
            output_tokens=_pad(output_tokens).to(device) if counted or repeated else None,
            prompt_tokens=_pad_prompts(params, prompt_tokens, device) if repeated else None,
            logit_bias_index=bias_index,
            logit_bias=bias,
            generators=[p.generator for p in params],
            num_top_logprobs=max((p.top_logprobs for p in params), default=0),
            need_logprobs=any(p.logprobs or p.top_logprobs for p in params),
            all_greedy=not sampled,
            needs_top_k_top_p=any(p.filters for p in sampled),
            candidate_count=max(p.top_k for p in sampled) if sampled and all(p.top_k > 0 for p in sampled) else 0,
        )


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor             # [B] int64
    logprobs: torch.Tensor | None       # [B] float32 logprob of the chosen token
    top_token_ids: torch.Tensor | None  # [B, num_top_logprobs], most likely first
    top_logprobs: torch.Tensor | None   # [B, num_top_logprobs]


class Sampler(nn.Module):
    def forward(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()
        # Logprobs describe the model's own distribution: raw logits, before penalties and temperature.
        raw_logprobs = torch.log_softmax(logits, dim=-1) if batch.need_logprobs else None
        logits = apply_logit_bias(apply_penalties(logits, batch), batch)
        token_ids = logits.argmax(dim=-1)
        if not batch.all_greedy:
            is_greedy = (batch.temperature == 0) | (batch.top_k == 1)
            token_ids = torch.where(is_greedy, token_ids, _sample(logits, batch))
        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        if batch.num_top_logprobs == 0:
            return SamplerOutput(token_ids, chosen, None, None)
        top_logprobs, top_ids = raw_logprobs.topk(batch.num_top_logprobs, dim=-1)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """The repetition penalty over each row's prompt and generated tokens (each distinct token once), then
    OpenAI's frequency and presence penalties over its generated tokens; a new tensor where any applies."""
    vocab_size = logits.shape[-1]
    if batch.repetition_penalty is not None:
        seen = _token_counts(torch.cat([batch.prompt_tokens, batch.output_tokens], dim=1), vocab_size) > 0
        penalty = batch.repetition_penalty[:, None]
        logits = torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    if batch.frequency_penalty is None or batch.output_tokens.shape[1] == 0:
        return logits
    counts = _token_counts(batch.output_tokens, vocab_size)
    return (logits - batch.frequency_penalty[:, None] * counts
            - batch.presence_penalty[:, None] * (counts > 0).to(logits.dtype))


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Each row's logit_bias added to its tokens' logits; a new tensor where any applies."""
    if batch.logit_bias is None:
        return logits
    return logits.index_put(tuple(batch.logit_bias_index), batch.logit_bias, accumulate=True)


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, vocab] float32: how often each token occurs in each row of `token_ids` (-1 is padding)."""
    # The padding is counted in a spare column past the vocabulary, then dropped.
    token_ids = token_ids.masked_fill(token_ids < 0, vocab_size)
    counts = torch.zeros(token_ids.shape[0], vocab_size + 1, dtype=torch.float32, device=token_ids.device)
    counts.scatter_add_(1, token_ids, torch.ones_like(token_ids, dtype=torch.float32))
    return counts[:, :vocab_size]


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """A token per row drawn from softmax(logits / T) after min_p, top-k and top-p; greedy rows get junk."""
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)
    logits = logits / temperature[:, None]
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if not batch.needs_top_k_top_p:
        return _exponential_race(logits.softmax(dim=-1), batch.generators)
    # Only the best `candidate_count` tokens can survive top-k: a partial topk instead of a full sort.
    vocab_size = logits.shape[-1]
    if 0 < batch.candidate_count < vocab_size:
        values, ids = logits.topk(batch.candidate_count, dim=-1)
    else:
        values, ids = logits.sort(dim=-1, descending=True)
    values = values.masked_fill(_top_k_top_p_mask(values, batch), float("-inf"))
    choice = _exponential_race(values.softmax(dim=-1), batch.generators, ids, vocab_size)
    return ids.gather(1, choice[:, None]).squeeze(1)


def _top_k_top_p_mask(sorted_logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """True where a candidate (sorted, most likely first) falls outside the row's top k, or outside its
    nucleus of mass top_p."""
    width = sorted_logits.shape[-1]
    top_k = torch.where(batch.top_k > 0, batch.top_k, width)
    ranks = torch.arange(width, device=sorted_logits.device)
    mask = ranks[None, :] >= top_k[:, None]
    # Top-p works on the distribution renormalised over the top k, and keeps a token while the mass
    # ranked above it is still short of top_p, so the most likely token always stays.
    sorted_probs = sorted_logits.masked_fill(mask, float("-inf")).softmax(dim=-1)
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    # top_p == 1 must keep everything, even where rounding pushes the cumulative sum to 1 early.
    return mask | ((mass_above >= batch.top_p[:, None]) & (batch.top_p[:, None] < 1))


def _exponential_race(probs: torch.Tensor, generators: list[torch.Generator | None],
                      candidate_ids: torch.Tensor | None = None, vocab_size: int = 0) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) picks index i with probability p_i, without multinomial's host sync.
    With `candidate_ids`, probs[:, i] belongs to token candidate_ids[:, i]."""
    noise = torch.empty_like(probs).exponential_()
    # Seeded rows draw noise for the whole vocabulary from their own generator and pick their tokens'
    # entries, so their choices depend neither on the rest of the batch nor on how many candidates it kept.
    for row, generator in enumerate(generators):
        if generator is not None:
            row_noise = torch.empty(vocab_size or probs.shape[-1], device=probs.device).exponential_(generator=generator)
            noise[row] = row_noise if candidate_ids is None else row_noise[candidate_ids[row]]
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


def _pad(rows: list[list[int]]) -> torch.Tensor:
    width = max(map(len, rows), default=0)
    padded = [row + [-1] * (width - len(row)) for row in rows]
    return torch.tensor(padded, dtype=torch.int64).view(len(rows), width)


def _pad_prompts(params: list[RowParams], prompt_tokens: list[torch.Tensor | None] | None,
                 device: torch.device | str) -> torch.Tensor:
    empty = torch.empty(0, dtype=torch.int64, device=device)
    rows = [t.to(device) if p.repeats else empty for p, t in zip(params, prompt_tokens, strict=True)]
    return nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)


def _logit_bias(params: list[RowParams], device: torch.device | str) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The (row, token id) index and the values of every row's logit_bias, or None where no row has one."""
    entries = [(row, token_id, bias) for row, p in enumerate(params) for token_id, bias in (p.logit_bias or {}).items()]
    if not entries:
        return None, None
    rows, token_ids, biases = zip(*entries)
    return (torch.tensor([rows, token_ids], dtype=torch.int64, device=device),
            torch.tensor(biases, dtype=torch.float32, device=device))
