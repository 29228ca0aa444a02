import dataclasses

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from chitu.engine.sampling_params import SamplingParams
from chitu.runner.sampler import Sampler, SamplingBatch, apply_logit_bias, apply_penalties, seeded_exponential
from chitu.runner.sampling_state import SamplingTable
from chitu.runner.step_plan import StepPlan

VOCAB = 32
CPU = torch.device("cpu")


def join(table: SamplingTable, params: list[SamplingParams], prompts: list[list[int]] | None = None,
         first_id: int = 0) -> list[str]:
    """Announce requests to the table as a step plan does; their ids."""
    ids = [str(first_id + i) for i in range(len(params))]
    prompts = prompts or [[] for _ in params]
    table.update(StepPlan(new_requests=dict(zip(ids, params)),
                          prompt_token_ids={i: t for i, p, t in zip(ids, params, prompts) if p.penalises_prompt}))
    return ids


def generate(table: SamplingTable, ids: list[str], outputs: list[list[int]]) -> None:
    """Record `outputs` as the requests' generated tokens, one step at a time, as the runner does."""
    for step in range(max(map(len, outputs), default=0)):
        rows = [i for i, out in enumerate(outputs) if len(out) > step]
        batch = table.batch([ids[i] for i in rows], [step] * len(rows))
        table.record(batch, torch.tensor([outputs[i][step] for i in rows]))


def make_batch(params: list[SamplingParams], output_tokens: list[list[int]] | None = None,
               prompts: list[list[int]] | None = None, vocab: int = VOCAB, position: int = 0) -> SamplingBatch:
    table = SamplingTable(CPU, vocab)
    ids = join(table, params, prompts)
    generate(table, ids, output_tokens or [[] for _ in params])
    return table.batch(ids, [position] * len(ids))


def sample(logits: torch.Tensor, params: list[SamplingParams], output_tokens=None, prompts=None, position: int = 0):
    return Sampler()(logits, make_batch(params, output_tokens, prompts, logits.shape[-1], position))


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def seeded(seed: int, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, seed=seed, **kwargs)


def test_greedy_is_argmax():
    logits = random_logits(8)
    out = sample(logits, [SamplingParams(temperature=0.0, top_p=0.9, top_k=50)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None and out.top_token_ids is None


def test_top_k_one_is_greedy_at_temperature_one():
    logits = random_logits(8)
    out = sample(logits, [SamplingParams(temperature=1.0, top_p=1.0, top_k=1)] * 8)
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_mixed_batch_keeps_greedy_rows_greedy():
    logits = random_logits(200)
    params = [SamplingParams(temperature=0.0 if i % 2 else 1.5, top_p=1.0, top_k=-1) for i in range(200)]
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
            params = [SamplingParams(temperature=0.7, top_p=0.8, top_k=5), SamplingParams(temperature=0.0, top_p=1.0, top_k=-1),
                      seeded(seed), seeded(100 + other_seed)]
            assert sample(logits, params).token_ids[2].item() == alone[seed]


def test_seeded_top_k_row_is_the_same_with_partial_topk_or_full_sort():
    logits = random_logits(2)
    for seed in range(10):
        top_k_row = SamplingParams(temperature=1.0, top_p=0.9, top_k=7, seed=seed)
        alone = sample(logits[:1], [top_k_row])  # candidates: a topk of 7
        with_unfiltered = sample(logits, [top_k_row, SamplingParams(temperature=1.0, top_p=0.5, top_k=-1)])
        assert make_batch([top_k_row]).candidate_count == 7
        assert alone.token_ids[0] == with_unfiltered.token_ids[0]  # the second row forces a full sort
        assert alone.token_ids[0] in logits[0].topk(7).indices


def test_seeded_rows_give_the_same_sequence_across_runs():
    logits = random_logits(1)

    def run() -> list[int]:
        return [sample(logits, [seeded(7)], position=position).token_ids.item() for position in range(50)]

    first, second = run(), run()
    assert first == second
    assert len(set(first)) > 1  # the noise moves on with the position


@pytest.mark.parametrize("vary", ["seed", "position"])
def test_seeded_draws_follow_the_distribution(vary):
    """Over 20000 seeds at one position, or one seed over 20000 positions, the counter-based noise picks each
    token as often as softmax says (the draws are fixed by their keys: this passes or fails the same way always)."""
    draws = 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    keys = torch.arange(draws) * 7919 - 10**12  # large, negative and spread seeds or positions
    other = torch.full((draws,), 12345)
    seeds, positions = (keys, other) if vary == "seed" else (other, keys.abs())
    noise = seeded_exponential(seeds, positions, torch.arange(6).expand(draws, 6))
    tokens = (logits.softmax(-1) / noise).argmax(-1)
    frequencies = torch.bincount(tokens, minlength=6).float() / draws
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.012, rtol=0)
    assert noise.min() > 0 and torch.isfinite(noise).all()
    torch.testing.assert_close(noise.mean(), torch.tensor(1.0), atol=0.01, rtol=0)  # Exp(1) has mean 1


def test_top_k_only_samples_among_the_top_k():
    logits = random_logits(1).expand(5000, VOCAB)
    tokens = sample(logits, [SamplingParams(temperature=2.0, top_p=1.0, top_k=3)] * 5000).token_ids
    top3 = set(logits[0].topk(3).indices.tolist())
    assert set(tokens.tolist()) == top3


def test_small_top_p_only_samples_the_top_token():
    logits = random_logits(1).expand(2000, VOCAB)
    tokens = sample(logits, [SamplingParams(temperature=1.0, top_p=1e-4, top_k=-1)] * 2000).token_ids
    assert set(tokens.tolist()) == {logits[0].argmax().item()}


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).log_softmax(-1).expand(4000, 5)
    probs = logits[0].exp()
    top_p = (probs[0] + probs[1] * 0.5).item()  # needs the top two tokens
    tokens = sample(logits, [SamplingParams(temperature=1.0, top_p=top_p, top_k=-1)] * 4000).token_ids
    assert set(tokens.tolist()) == {0, 1}


def test_frequencies_match_softmax():
    rows = 20000
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    tokens = sample(logits.expand(rows, -1), [SamplingParams(temperature=1.0, top_p=1.0, top_k=-1)] * rows).token_ids
    frequencies = torch.bincount(tokens, minlength=6).float() / rows
    torch.testing.assert_close(frequencies, logits[0].softmax(-1), atol=0.015, rtol=0)


def test_temperature_sharpens_the_distribution():
    rows = 20000
    logits = torch.tensor([[1.0, 0.0, -1.0]])
    tokens = sample(logits.expand(rows, -1), [SamplingParams(temperature=0.5, top_p=1.0, top_k=-1)] * rows).token_ids
    frequencies = torch.bincount(tokens, minlength=3).float() / rows
    torch.testing.assert_close(frequencies, (logits[0] / 0.5).softmax(-1), atol=0.015, rtol=0)


def test_logprobs_come_from_raw_logits():
    logits = random_logits(6)
    params = [SamplingParams(temperature=1.3, top_p=0.9, top_k=10, frequency_penalty=1.0, logprobs=True, top_logprobs=5)] * 6
    out = sample(logits, params, [[0, 1, 1]] * 6)
    raw = torch.log_softmax(logits, -1)
    assert torch.allclose(raw.exp().sum(-1), torch.ones(6))
    torch.testing.assert_close(out.logprobs, raw.gather(1, out.token_ids[:, None]).squeeze(1))
    assert out.top_logprobs.shape == (6, 5) and out.top_token_ids.shape == (6, 5)
    assert torch.all(out.top_logprobs[:, :-1] >= out.top_logprobs[:, 1:])
    assert torch.equal(out.top_token_ids[:, 0], logits.argmax(-1))
    torch.testing.assert_close(out.top_logprobs, raw.gather(1, out.top_token_ids))


def test_logprobs_without_top_alternatives():
    out = sample(random_logits(2), [SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, logprobs=True)] * 2)
    assert out.logprobs.shape == (2,) and out.top_token_ids is None


def test_apply_penalties_changes_only_the_generated_tokens():
    logits = torch.zeros(2, 6)
    params = [SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, frequency_penalty=0.5, presence_penalty=0.25),
              SamplingParams(temperature=0.0, top_p=1.0, top_k=-1)]
    batch = make_batch(params, [[2, 2, 2, 4], [1]], vocab=6)
    penalised = apply_penalties(logits, batch)
    expected = torch.zeros(2, 6)
    expected[0, 2] = -(0.5 * 3 + 0.25)
    expected[0, 4] = -(0.5 * 1 + 0.25)
    torch.testing.assert_close(penalised, expected)
    assert torch.equal(logits, torch.zeros(2, 6))  # the input is left alone


def test_batch_gathers_only_what_it_uses():
    sampled = make_batch([SamplingParams(temperature=1.0, top_p=1.0, top_k=-1)], [[1, 2, 3]])
    assert sampled.penalized_rows is None and sampled.frequency_penalty is None
    assert sampled.temperature is not None
    greedy = make_batch([SamplingParams(temperature=0.0, top_p=1.0, top_k=-1)], [[1, 2, 3]])
    assert greedy.all_greedy and greedy.temperature is None and greedy.top_k is None


def test_a_reused_row_starts_clean():
    """A request leaving gives its slot and penalty row back; the next one there has no counts, marks or bias."""
    table = SamplingTable(CPU, VOCAB)
    first = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.5, logit_bias={3: 5.0})
    ids = join(table, [first], [[1, 2]])
    generate(table, ids, [[4, 4]])
    table.update(StepPlan(released=ids))
    second = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, frequency_penalty=1.0, logit_bias={5: 1.0})
    ids = join(table, [second], first_id=1)
    batch = table.batch(ids, [0])
    assert batch.penalty_table_rows.tolist() == [0]  # the same rows again
    assert not batch.token_counts.any() and not batch.prompt_mask.any()
    assert torch.nonzero(batch.logit_bias[0]).flatten().tolist() == [5]


def test_tables_grow_keeping_every_row():
    """Past the first 16 slots the tables double; rows joined before keep their settings and counts."""
    table = SamplingTable(CPU, VOCAB)
    params = [SamplingParams(temperature=0.5 + i / 100, top_p=1.0, top_k=i + 2, frequency_penalty=1.0) for i in range(40)]
    ids = join(table, params)
    generate(table, ids, [[i % VOCAB] * (i % 3 + 1) for i in range(40)])
    batch = table.batch(ids, [0] * 40)
    torch.testing.assert_close(batch.temperature, torch.tensor([0.5 + i / 100 for i in range(40)]))
    assert batch.top_k.tolist() == list(range(2, 42))
    assert [int(batch.token_counts[i, i % VOCAB]) for i in range(40)] == [i % 3 + 1 for i in range(40)]
    assert int(batch.token_counts.sum()) == sum(i % 3 + 1 for i in range(40))


@pytest.mark.parametrize("field, flips", [("frequency_penalty", 1.0), ("presence_penalty", 2.0)])
def test_penalty_flips_the_greedy_choice(field, flips):
    logits = torch.tensor([[3.0, 2.5, 2.4]])
    greedy = dict(temperature=0.0, top_p=1.0, top_k=-1)
    assert sample(logits, [SamplingParams(**greedy, **{field: flips})], [[1]]).token_ids.item() == 0
    assert sample(logits, [SamplingParams(**greedy, **{field: flips})], [[0]]).token_ids.item() == 1
    # a negative penalty makes a generated token more likely instead
    assert sample(logits, [SamplingParams(**greedy, **{field: -flips})], [[2]]).token_ids.item() == 2


# --- min_p, repetition_penalty, logit_bias: against transformers' processors and plain-torch definitions.

def awkward_logits(rows: int, vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 4


def random_ids(count: int, vocab: int, seed: int) -> list[int]:
    """Token ids with repeats, as real prompts have them."""
    ids = torch.randint(0, vocab, (count,), generator=torch.Generator().manual_seed(seed)).tolist()
    return ids + ids[: count // 3]


def reference_adjusted(logits: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int]) -> torch.Tensor:
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


def reference_probs(adjusted: torch.Tensor, p: SamplingParams) -> torch.Tensor:
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
    """What a row seeded with `seed` must pick at position 0: the token maximising p / noise, with the seed's
    Exp(1) noise for every token of the vocabulary (a draw from `probs`, test_seeded_draws_follow_the_distribution)."""
    noise = seeded_exponential(torch.tensor([seed]), torch.tensor([0]), torch.arange(probs.shape[-1])[None])[0]
    return (probs / noise).argmax().item()


def mixed_rows(vocab: int) -> list[tuple[SamplingParams, int | None]]:
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
    return [(SamplingParams(**kw), seed) for kw, seed in rows]


def with_seed(p: SamplingParams, seed: int | None) -> SamplingParams:
    return dataclasses.replace(p, seed=seed)


@pytest.mark.parametrize("vocab", [1000, 50257])
def test_mixed_batch_matches_the_reference_of_every_row(vocab):
    rows = mixed_rows(vocab)
    logits = awkward_logits(len(rows), vocab)
    prompts = [random_ids(30 + i, vocab, seed=i) for i in range(len(rows))]
    outputs = [random_ids(i, vocab, seed=100 + i) for i in range(len(rows))]
    for trial in range(4):
        params = [with_seed(p, None if seed is None else seed + 1000 * trial) for p, seed in rows]
        batch = make_batch(params, outputs, prompts, vocab)
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
    prompts = [random_ids(20, vocab, seed=i) for i in range(len(rows))]
    outputs = [random_ids(4, vocab, seed=50 + i) for i in range(len(rows))]

    def draw(indices: list[int]) -> list[int]:
        params = [with_seed(*rows[i]) for i in indices]
        batch = make_batch(params, [outputs[i] for i in indices], [prompts[i] for i in indices], vocab)
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
    params = [SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=p) for p in penalties]
    batch = make_batch(params, outputs, prompts, vocab)
    penalised = apply_penalties(logits, batch)
    for i, penalty in enumerate(penalties):
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits[i:i + 1].clone())[0]
        assert torch.equal(penalised[i], expected), penalty
    seen = set(prompts[0] + outputs[0])
    changed = set(torch.nonzero(penalised[0] != logits[0]).flatten().tolist())
    assert changed == seen  # each seen token once, however often it occurs, and no other


def test_repetition_penalty_is_not_gathered_for_rows_without_it():
    params = [SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=1.5),
              SamplingParams(temperature=0.0, top_p=1.0, top_k=-1)]
    batch = make_batch(params, [[7], [8]], [[1, 2, 3], [4]], vocab=10)
    assert batch.penalized_rows.tolist() == [0]
    assert torch.nonzero(batch.prompt_mask[0]).flatten().tolist() == [1, 2, 3]
    logits = torch.zeros(2, 10) + torch.arange(10.0)
    assert torch.equal(apply_penalties(logits, batch)[1], logits[1])


def test_min_p_keeps_exactly_the_tokens_transformers_keeps():
    """After temperature: at T=1 the same min_p would keep a different set."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3)).expand(4000, -1)
    p = SamplingParams(temperature=0.8, top_p=1.0, top_k=-1, min_p=0.2)
    tokens = set(sample(logits, [p] * 4000).token_ids.tolist())
    kept = torch.nonzero(reference_probs(logits[0], p) > 0).flatten().tolist()
    at_t1 = torch.nonzero(reference_probs(logits[0], dataclasses.replace(p, temperature=1.0)) > 0).flatten().tolist()
    assert 5 < len(kept) < 30 and len(at_t1) != len(kept)  # a real cut, made after temperature
    assert tokens == set(kept)


def test_logit_bias_is_added_to_the_biased_tokens_only():
    vocab = 50257
    logits = awkward_logits(3, vocab, seed=4)
    biases = [{0: -100.0, 17: 3.5, vocab - 1: 100.0}, None, {17: -0.25}]
    params = [SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, logit_bias=b) for b in biases]
    batch = make_batch(params, vocab=vocab)
    assert batch.biased_rows.tolist() == [0, 2]  # a row of biases for the rows with a logit_bias only
    expected = logits.clone()
    for row, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            expected[row, token] += value
    assert torch.equal(apply_logit_bias(logits, batch), expected)


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_logit_bias_of_100_forces_the_token(temperature):
    logits = awkward_logits(4, 1000, seed=6)
    forced = [int(logits[i].argmin()) for i in range(4)]
    params = [with_seed(SamplingParams(temperature=temperature, top_p=1.0, top_k=-1, logit_bias={t: 100.0}), i)
              for i, t in enumerate(forced)]
    assert sample(logits, params).token_ids.tolist() == forced


def test_logit_bias_applies_after_the_penalties():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    p = SamplingParams(temperature=0.0, top_p=1.0, top_k=-1, repetition_penalty=2.0, logit_bias={0: 1.0})
    batch = make_batch([p], [[0]], [[0]], vocab=3)
    assert apply_logit_bias(apply_penalties(logits, batch), batch).tolist() == [[2.0, 1.0, 0.0]]  # 2/2 + 1


def test_all_greedy_batch_without_new_features_copies_nothing_extra():
    batch = make_batch([SamplingParams(temperature=0.0, top_p=0.9, top_k=50, min_p=0.5)], [[1, 2]])
    assert all(getattr(batch, f.name) is None for f in dataclasses.fields(batch) if f.type.startswith("torch.Tensor"))
    sampled = make_batch([SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, logit_bias={1: 1.0})], [[1, 2]])
    assert sampled.min_p is None and sampled.token_counts is None and sampled.logit_bias is not None
