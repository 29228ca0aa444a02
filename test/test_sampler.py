import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from chitu.runner.sampler import RowParams, Sampler, SamplingBatch, apply_logit_bias, apply_penalties

VOCAB = 32


def make_batch(params: list[RowParams], output_tokens: list[list[int]] | None = None) -> SamplingBatch:
    return SamplingBatch.build(params, output_tokens or [[] for _ in params], "cpu")


def sample(logits: torch.Tensor, params: list[RowParams], output_tokens=None):
    return Sampler()(logits, make_batch(params, output_tokens))


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def seeded(seed: int, **kwargs) -> RowParams:
    return RowParams(temperature=1.0, top_p=1.0, top_k=-1, generator=torch.Generator().manual_seed(seed), **kwargs)


def test_greedy_is_argmax():
    logits = random_logits(8)
    out = sample(logits, [RowParams(temperature=0.0, top_p=0.9, top_k=50)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_token_ids is None


def test_top_k_one_is_greedy_at_temperature_one():
    logits = random_logits(8)
    out = sample(logits, [RowParams(temperature=1.0, top_p=1.0, top_k=1)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = random_logits(200)
    params = [RowParams(temperature=0.0 if i % 2 else 1.5, top_p=1.0, top_k=-1) for i in range(200)]
    tokens = sample(logits, params).token_ids
    assert torch.equal(tokens[1::2], logits[1::2].argmax(-1))
    assert not torch.equal(tokens[0::2], logits[0::2].argmax(-1))


def test_seeded_row_repeats_whatever_the_batch():
    row = random_logits(1)
    alone = [sample(row, [seeded(seed)]).token_ids.item() for seed in range(10)]
    assert len(set(alone)) > 1  # the seed matters, so agreement below is not a coincidence
    for other_seed in range(3):
        others = random_logits(3, seed=other_seed + 1)
        logits = torch.cat([others[:2], row, others[2:]])
        for seed in range(10):
            params = [RowParams(temperature=0.7, top_p=0.8, top_k=5), RowParams(temperature=0.0, top_p=1.0, top_k=-1),
                      seeded(seed), seeded(100 + other_seed)]
            assert sample(logits, params).token_ids[2].item() == alone[seed]


def test_seeded_top_k_row_is_the_same_with_partial_topk_or_full_sort():
    logits = random_logits(2)
    for seed in range(10):
        top_k_row = dict(temperature=1.0, top_p=0.9, top_k=7, generator=torch.Generator().manual_seed(seed))
        alone = sample(logits[:1], [RowParams(**top_k_row)])  # candidates: a topk of 7
        top_k_row["generator"] = torch.Generator().manual_seed(seed)
        with_unfiltered = sample(logits, [RowParams(**top_k_row), RowParams(temperature=1.0, top_p=0.5, top_k=-1)])
        assert make_batch([RowParams(**top_k_row)]).candidate_count == 7
        assert alone.token_ids[0] == with_unfiltered.token_ids[0]  # the second row forces a full sort
        assert alone.token_ids[0] in logits[0].topk(7).indices


def test_seeded_rows_give_the_same_sequence_across_runs():
    logits = random_logits(1)

    def run() -> list[int]:
        params = [seeded(7)]
        batch = make_batch(params)
        return [Sampler()(logits, batch).token_ids.item() for _ in range(50)]

    first, second = run(), run()
    assert first == second
    assert len(set(first)) > 1  # the generator advances between steps


def test_top_k_only_samples_among_the_top_k():
    logits = random_logits(1).expand(5000, VOCAB)
    tokens = sample(logits, [RowParams(temperature=2.0, top_p=1.0, top_k=3)] * 5000).token_ids
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(tokens.tolist()) == top3


def test_small_top_p_only_samples_the_top_token():
    logits = random_logits(1).expand(2000, VOCAB)
    tokens = sample(logits, [RowParams(temperature=1.0, top_p=1e-4, top_k=-1)] * 2000).token_ids
    assert set(tokens.tolist()) == {logits[0].argmax().item()}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1).expand(4000, 5)
    probs = logits[0].exp()
    top_p = (probs[0] + probs[1] * 0.5).item()  # needs the top two tokens
    tokens = sample(logits, [RowParams(temperature=1.0, top_p=top_p, top_k=-1)] * 4000).token_ids
    assert set(tokens.tolist()) == {0, 1}


def test_frequencies_match_softmax():
    rows = 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    tokens = sample(logits.expand(rows, -1), [RowParams(temperature=1.0, top_p=1.0, top_k=-1)] * rows).token_ids
    frequencies = torch.bincount(tokens, minlength=6).float() / rows
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.015, rtol=0)


def test_temperature_sharpens_the_distribution():
    rows = 20000
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    tokens = sample(logits.expand(rows, -1), [RowParams(temperature=0.5, top_p=1.0, top_k=-1)] * rows).token_ids
    frequencies = torch.bincount(tokens, minlength=3).float() / rows
    torch.testing.assert_close(frequencies, (logits[0] / 0.5).softmax(-1), atol=0.015, rtol=0)


def test_logprobs_come_from_raw_logits():
    logits = random_logits(6)
    params = [RowParams(temperature=1.3, top_p=0.9, top_k=10, frequency_penalty=1.0, logprobs=True, top_logprobs=5)] * 6
    out = sample(logits, params, [[0, 1, 1]] * 6)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(raw.exp().sum(-1), torch.ones(6))
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (6, 5) and out.top_token_ids.shape == (6, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.equal(out.top_token_ids[:, 0], logits.argmax(-1))
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))


def test_logprobs_without_top_alternatives():
    out = sample(random_logits(2), [RowParams(temperature=0.0, top_p=1.0, top_k=-1, logprobs=True)] * 2)
    assert out.logprobs.shape == (2,) and out.top_token_ids is None


def test_apply_penalties_changes_only_the_generated_tokens():
    logits = torch.zeros(2, 6)
    params = [RowParams(temperature=0.0, top_p=1.0, top_k=-1, frequency_penalty=0.5, presence_penalty=0.25),
              RowParams(temperature=0.0, top_p=1.0, top_k=-1)]
    batch = make_batch(params, [[2, 2, 2, 4], [1]])
    penalised = apply_penalties(logits, batch)
    expected = torch.zeros(2, 6)
    expected[0, 2] = -(0.5 * 3 + 0.25)
    expected[0, 4] = -(0.5 * 1 + 0.25)
    torch.testing.assert_close(penalised, expected)
    assert torch.equal(logits, torch.zeros(2, 6))  # the input is left alone


def test_batch_copies_only_what_it_uses():
    sampled = make_batch([RowParams(temperature=1.0, top_p=1.0, top_k=-1)], [[1, 2, 3]])
    assert sampled.output_tokens is None and sampled.frequency_penalty is None
    assert sampled.temperature is not None
    greedy = make_batch([RowParams(temperature=0.0, top_p=1.0, top_k=-1)], [[1, 2, 3]])
    assert greedy.all_greedy and greedy.temperature is None and greedy.top_k is None


@pytest.mark.parametrize("field, flips", [("frequency_penalty", 1.0), ("presence_penalty", 2.0)])
def test_penalty_flips_the_greedy_choice(field, flips):
    logits = torch.tensor([[3.0, 2.5, 2.4]])
    greedy = dict(temperature=0.0, top_p=1.0, top_k=-1)
    assert sample(logits, [RowParams(**greedy, **{field: flips})], [[1]]).token_ids.item() == 0
    assert sample(logits, [RowParams(**greedy, **{field: flips})], [[0]]).token_ids.item() == 1
    # a negative penalty makes a generated token more likely instead
    assert sample(logits, [RowParams(**greedy, **{field: -flips})], [[2]]).token_ids.item() == 2


# --- min_p, repetition_penalty, logit_bias: against transformers' processors and plain-torch definitions.

def awkward_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


def random_ids(count: int, vocab: int, seed: int) -> list[int]:
    """Token ids with repeats, as real prompts have them."""
    ids = torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids + ids[: count // 3]


def reference_adjusted(logits: torch.Tensor, p: RowParams, prompt: list[int], output: list[int]) -> torch.Tensor:
    """One row's logits after the penalties and logit_bias, from their definitions (HF's repetition penalty)."""
    row = logits.clone()
    if p.repetition_penalty != 1:
        ids = torch.tensor([prompt + output])
        row = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, row[None])[0]
    for token in set(output):
        row[token] -= p.frequency_penalty * output.count(token) + p.presence_penalty
    for token, bias in (p.logit_bias or {}).items():
        row[token] += bias
    return row


def reference_probs(adjusted: torch.Tensor, p: RowParams) -> torch.Tensor:
    """The distribution a sampled row draws from, in vLLM's order: temperature, min_p, top-k, top-p."""
    scores = TemperatureLogitsWarper(p.temperature)(None, adjusted[None])
    if p.min_p > 0:
        scores = MinPLogitsWarper(p.min_p)(None, scores)
    if 0 < p.top_k < adjusted.shape[-1]:
        scores = TopKLogitsWarper(p.top_k)(None, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(None, scores)
    return scores[0].softmax(-1)


def seeded_draw(probs: torch.Tensor, seed: int) -> int:
    """What a row seeded with `seed` must pick on its first step: its generator's Exp(1) noise over the
    whole vocabulary, and the token maximising p / noise (a draw from `probs`)."""
    noise = torch.empty(probs.shape[-1]).exponential_(generator=torch.Generator().manual_seed(seed))
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax().item()


def mixed_rows(vocab: int) -> list[tuple[RowParams, int | None]]:
    """(settings, seed) per row: every feature, alone and combined, greedy and sampled."""
    bias = {3: 2.5, vocab - 1: 8.0, vocab // 2: -100.0}
    rows = [
        (dict(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.7), None),
        (dict(temperature=0.8, top_p=1.0, top_k=-1, min_p=0.1), 11),
        (dict(temperature=1.3, top_p=1.0, top_k=20, min_p=0.05, logit_bias=bias), 12),
        (dict(temperature=0.0, top_p=1.0, top_k=-1, frequency_penalty=0.7, logit_bias=bias), None),
        (dict(temperature=1.0, top_p=0.9, top_k=-1, repetition_penalty=0.6, presence_penalty=0.5), 13),
        (dict(temperature=1.0, top_p=0.95, top_k=2**63 - 1, min_p=0.02, repetition_penalty=1.2), 14),
        (dict(temperature=1.1, top_p=1.0, top_k=-1), 15),
        (dict(temperature=0.9, top_p=0.8, top_k=40, min_p=0.3), None),  # unseeded: only its support is known
    ]
    return [(RowParams(**kw), seed) for kw, seed in rows]


def with_generator(p: RowParams, seed: int | None) -> RowParams:
    return dataclasses.replace(p, generator=None if seed is None else torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_mixed_batch_matches_the_reference_of_every_row(vocab):
    rows = mixed_rows(vocab)
    logits = awkward_logits(len(rows), vocab)
    prompts = [random_ids(30 + i, vocab, seed=i) for i in range(len(rows))]
    outputs = [random_ids(i, vocab, seed=100 + i) for i in range(len(rows))]
    for trial in range(4):
        params = [with_generator(p, None if seed is None else seed + 1000 * trial) for p, seed in rows]
        batch = SamplingBatch.build(params, outputs, "cpu", [torch.tensor(ids) for ids in prompts])
        tokens = Sampler()(logits, batch).token_ids.tolist()
        for i, ((p, seed), token) in enumerate(zip(rows, tokens)):
            adjusted = reference_adjusted(logits[i], p, prompts[i], outputs[i])
            if p.is_greedy:
                assert token == adjusted.argmax().item(), i
                continue
            probs = reference_probs(adjusted, p)
            assert probs[token] > 0, i
            if seed is not None:
                assert token == seeded_draw(probs, seed + 1000 * trial), i


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_seeded_rows_with_the_new_features_do_not_depend_on_the_batch(vocab):
    rows = mixed_rows(vocab)
    logits = awkward_logits(len(rows), vocab, seed=5)
    prompts = [torch.tensor(random_ids(20, vocab, seed=i)) for i in range(len(rows))]
    outputs = [random_ids(4, vocab, seed=50 + i) for i in range(len(rows))]

    def draw(indices: list[int]) -> list[int]:
        params = [with_generator(*rows[i]) for i in indices]
        batch = SamplingBatch.build(params, [outputs[i] for i in indices], "cpu", [prompts[i] for i in indices])
        return Sampler()(logits[indices], batch).token_ids.tolist()

    seeded = [i for i, (_, seed) in enumerate(rows) if seed is not None]
    alone = [draw([i])[0] for i in seeded]
    everything = draw(list(range(len(rows))))
    assert [everything[i] for i in seeded] == alone
    assert [draw(seeded[::-1])[::-1]] == [alone]


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_repetition_penalty_matches_transformers(vocab):
    penalties = [1.3, 0.5, 2.0, 1.0, 0.01]
    logits = awkward_logits(len(penalties), vocab, seed=1)
    prompts = [random_ids(60, vocab, seed=i) for i in range(len(penalties))]
    outputs = [random_ids(3 * i, vocab, seed=10 + i) for i in range(len(penalties))]
    params = [RowParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=p) for p in penalties]
    batch = SamplingBatch.build(params, outputs, "cpu", [torch.tensor(ids) for ids in prompts])
    penalised = apply_penalties(logits, batch)
    for i, penalty in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i:i + 1].clone())[0]
        assert torch.equal(penalised[i], expected), penalty
    seen = set(prompts[0] + outputs[0])
    changed = set(torch.nonzero(penalised[0] != logits[0]).flatten().tolist())
    assert changed == seen  # each seen token once, however often it occurs, and no other


def test_repetition_penalty_is_not_shipped_or_copied_for_rows_without_it():
    params = [RowParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.5),
              RowParams(temperature=0.0, top_p=1.0, top_k=-1)]
    batch = SamplingBatch.build(params, [[7], [8]], "cpu", [torch.tensor([1, 2, 3]), None])
    assert batch.prompt_tokens.tolist() == [[1, 2, 3], [-1, -1, -1]]
    logits = torch.zeros(2, 10) + torch.arange(10.0)
    assert torch.equal(apply_penalties(logits, batch)[1], logits[1])


def test_min_p_keeps_exactly_the_tokens_transformers_keeps():
    """After temperature: at T=1 the same min_p would keep a different set."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3)).expand(4000, -1)
    p = RowParams(temperature=0.8, top_p=1.0, top_k=-1, min_p=0.2)
    tokens = set(sample(logits, [p] * 4000).token_ids.tolist())
    kept = torch.nonzero(reference_probs(logits[0], p) > 0).flatten().tolist()
    at_t1 = torch.nonzero(reference_probs(logits[0], dataclasses.replace(p, temperature=1.0)) > 0).flatten().tolist()
    assert 5 < len(kept) < 30 and len(at_t1) != len(kept)  # a real cut, made after temperature
    assert tokens == set(kept)


def test_logit_bias_is_added_to_the_biased_tokens_only():
    vocab = 50257
    logits = awkward_logits(3, vocab, seed=4)
    biases = [{0: -100.0, 17: 3.5, vocab - 1: 100.0}, None, {17: -0.25}]
    params = [RowParams(temperature=0.0, top_p=1.0, top_k=-1, logit_bias=b) for b in biases]
    batch = make_batch(params)
    assert batch.logit_bias_index.shape == (2, 4)  # sparse: one entry per bias, nothing per vocabulary token
    expected = logits.clone()
    for row, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            expected[row, token] += value
    assert torch.equal(apply_logit_bias(logits, batch), expected)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_of_100_forces_the_token(temperature):
    logits = awkward_logits(4, 1000, seed=6)
    forced = [int(logits[i].argmin()) for i in range(4)]
    params = [with_generator(RowParams(temperature=temperature, top_p=1.0, top_k=-1, logit_bias={t: 100.0}), i)
              for i, t in enumerate(forced)]
    assert sample(logits, params).token_ids.tolist() == forced


def test_logit_bias_applies_after_the_penalties():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = RowParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=2.0, logit_bias={0: 1.0})
    batch = SamplingBatch.build([p], [[0]], "cpu", [torch.tensor([0])])
    assert apply_logit_bias(apply_penalties(logits, batch), batch).tolist() == [[2.0, 1.0, 0.0]]  # 2/2 + 1


def test_all_greedy_batch_without_new_features_copies_nothing_extra():
    batch = make_batch([RowParams(temperature=0.0, top_p=0.9, top_k=50, min_p=0.5)], [[1, 2]])
    assert all(getattr(batch, f) is None for f in ("temperature", "top_p", "top_k", "min_p", "frequency_penalty",
                                                   "presence_penalty", "repetition_penalty", "output_tokens",
                                                   "prompt_tokens", "logit_bias_index", "logit_bias"))
    sampled = make_batch([RowParams(temperature=1.0, top_p=1.0, top_k=-1, logit_bias={1: 1.0})], [[1, 2]])
    assert sampled.min_p is None and sampled.output_tokens is None and sampled.logit_bias is not None
