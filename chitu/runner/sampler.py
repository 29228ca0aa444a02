"""Turns each request's last-position logits into its next token, vectorised over a mixed batch."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class SamplingBatch:
    """One step's rows, gathered from the sampling table (runner/sampling_state.py); all on the logits' device.
    Tensors a batch does not need are None, so an all-greedy batch gathers nothing."""

    temperature: torch.Tensor | None = None   # [B] float32; 0 means greedy
    top_p: torch.Tensor | None = None         # [B] float32 in (0, 1]
    top_k: torch.Tensor | None = None         # [B] int64; -1 or 0 = disabled
    min_p: torch.Tensor | None = None         # [B] float32; 0 = disabled
    # Rows with a penalty: their batch index, their row of the table's counts, and the tensors gathered from it.
    penalized_rows: torch.Tensor | None = None      # [P] int64
    penalty_table_rows: torch.Tensor | None = None  # [P] int64
    token_counts: torch.Tensor | None = None        # [P, vocab] int32: how often each token was generated
    prompt_mask: torch.Tensor | None = None         # [P, vocab] bool: tokens of the prompt (repetition penalty rows)
    frequency_penalty: torch.Tensor | None = None   # [P] float32
    presence_penalty: torch.Tensor | None = None    # [P] float32
    repetition_penalty: torch.Tensor | None = None  # [P] float32; 1 = none
    biased_rows: torch.Tensor | None = None  # [N] int64: rows with a logit_bias
    logit_bias: torch.Tensor | None = None   # [N, vocab] float32
    seeded_rows: torch.Tensor | None = None  # [S] int64: sampled rows with a seed
    seeds: torch.Tensor | None = None        # [S] int64
    seed_positions: torch.Tensor | None = None  # [S] int64: the position in its sequence of the token each row samples
    num_top_logprobs: int = 0  # max over the batch of requested top_logprobs
    need_logprobs: bool = False
    # Host-side facts, so the hot path can skip work without reading the tensors back (a device sync).
    all_greedy: bool = True
    needs_top_k_top_p: bool = False
    candidate_count: int = 0  # the largest top_k when every sampled row has one, else 0 (the whole vocabulary)


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
            token_ids = torch.where(batch.temperature == 0, token_ids, _sample(logits, batch))
        if raw_logprobs is None:
            return SamplerOutput(token_ids, None, None, None)
        chosen = raw_logprobs.gather(1, token_ids[:, None]).squeeze(1)
        if batch.num_top_logprobs == 0:
            return SamplerOutput(token_ids, chosen, None, None)
        top_logprobs, top_ids = raw_logprobs.topk(batch.num_top_logprobs, dim=-1)
        return SamplerOutput(token_ids, chosen, top_ids, top_logprobs)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """In the penalized rows: the repetition penalty over the prompt's and the generated tokens (each distinct
    token once), then OpenAI's frequency and presence penalties over the generated ones; a new tensor."""
    if batch.penalized_rows is None:
        return logits
    rows = logits[batch.penalized_rows]
    counts = batch.token_counts.float()
    generated = batch.token_counts > 0
    penalty = batch.repetition_penalty[:, None]
    rows = torch.where(batch.prompt_mask | generated, torch.where(rows > 0, rows / penalty, rows * penalty), rows)
    rows = rows - batch.frequency_penalty[:, None] * counts - batch.presence_penalty[:, None] * generated.float()
    return logits.index_copy(0, batch.penalized_rows, rows)


def apply_logit_bias(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Each biased row's logit_bias added to its logits; a new tensor where any applies."""
    if batch.biased_rows is None:
        return logits
    return logits.index_add(0, batch.biased_rows, batch.logit_bias)


def _sample(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """A token per row drawn from softmax(logits / T) after min_p, top-k and top-p; greedy rows get junk."""
    temperature = torch.where(batch.temperature > 0, batch.temperature, 1.0)[:, None]
    if batch.min_p is None and batch.needs_top_k_top_p and 0 < batch.candidate_count < logits.shape[-1]:
        # A positive temperature keeps the order: the top candidates of the raw logits, then only they are scaled.
        values, ids = logits.topk(batch.candidate_count, dim=-1)
        return _pick(values / temperature, ids, batch)
    logits = logits / temperature
    if batch.min_p is not None:
        probs = logits.softmax(dim=-1)
        logits = logits.masked_fill(probs < batch.min_p[:, None] * probs.amax(dim=-1, keepdim=True), float("-inf"))
    if not batch.needs_top_k_top_p:
        return _exponential_race(logits.softmax(dim=-1), batch)
    # Only the best `candidate_count` tokens can survive top-k: a partial topk instead of a full sort.
    if 0 < batch.candidate_count < logits.shape[-1]:
        values, ids = logits.topk(batch.candidate_count, dim=-1)
    else:
        values, ids = logits.sort(dim=-1, descending=True)
    return _pick(values, ids, batch)


def _pick(values: torch.Tensor, ids: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """A token per row among its candidates (`values` sorted, most likely first, of tokens `ids`) after top-k/top-p."""
    values = values.masked_fill(_top_k_top_p_mask(values, batch), float("-inf"))
    choice = _exponential_race(values.softmax(dim=-1), batch, ids)
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


def _exponential_race(probs: torch.Tensor, batch: SamplingBatch, candidate_ids: torch.Tensor | None = None) -> torch.Tensor:
    """argmax(p / E) with E ~ Exp(1) picks index i with probability p_i, without multinomial's host sync.
    With `candidate_ids`, probs[:, i] belongs to token candidate_ids[:, i]."""
    noise = torch.empty_like(probs).exponential_()
    if batch.seeded_rows is not None:
        # A seeded row's noise for a token is a function of (seed, position, token id) alone, so its choice
        # depends neither on the rest of the batch nor on how many candidates the batch kept.
        if candidate_ids is None:
            token_ids = torch.arange(probs.shape[-1], device=probs.device).expand(len(batch.seeded_rows), -1)
        else:
            token_ids = candidate_ids[batch.seeded_rows]
        noise[batch.seeded_rows] = seeded_exponential(batch.seeds, batch.seed_positions, token_ids)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return (probs / noise).argmax(dim=-1)


_MASK32 = 0xFFFFFFFF


def _pcg_hash(x: torch.Tensor) -> torch.Tensor:
    """PCG's output permutation as a hash of 32-bit values held in int64 (Jarzynski & Olano, "Hash Functions
    for GPU Rendering", 2020): every product stays below 2^63, so CPU and GPU compute the same bits."""
    state = (x * 747796405 + 2891336453) & _MASK32
    word = (((state >> ((state >> 28) + 4)) ^ state) * 277803737) & _MASK32
    return (word >> 22) ^ word


def seeded_exponential(seeds: torch.Tensor, positions: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Exp(1) noise [S, C] counter-based on (seeds[s], positions[s], token_ids[s, c]): reproducible alone or in
    any batch, on any device (bit for bit up to the last ulp of log)."""
    key = _pcg_hash(_pcg_hash(seeds & _MASK32) ^ ((seeds >> 32) & _MASK32))
    key = _pcg_hash(key ^ (positions & _MASK32))
    bits = _pcg_hash(key[:, None] ^ token_ids)
    uniform = ((bits >> 9).float() + 0.5) * 2.0 ** -23  # in (0, 1): 23 bits and a half, exact in float32
    return -torch.log(uniform)
