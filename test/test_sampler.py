import pytest
import torch

from chitu.runner.sampler import RowParams, Sampler, SamplingBatch, apply_penalties

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
