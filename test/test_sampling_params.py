"""SamplingParams admission checks, and how the sampling settings reach the sampling rank."""
import math
import pickle

import pytest
import torch

from chitu.engine.request import Request
from chitu.engine.sampling_params import InvalidSamplingParam, SamplingParams
from chitu.engine.scheduler import Batch
from chitu.runner.sampler import Sampler
from chitu.runner.sampling_state import SamplingTable
from chitu.runner.step_plan import StepPlan

BAD = [
    ("max_new_tokens", 0, r"max_new_tokens must be in \[1, .*got 0"),
    ("max_new_tokens", 2.0, r"max_new_tokens must be an integer, got 2.0"),
    ("temperature", -0.1, r"temperature must be in \[0, 2\], got -0.1"),
    ("temperature", 2.5, r"temperature must be in \[0, 2\], got 2.5"),
    ("temperature", math.nan, r"temperature must be in \[0, 2\], got nan"),
    ("temperature", math.inf, r"temperature must be in \[0, 2\], got inf"),
    ("temperature", True, r"temperature must be a number, got True"),
    ("temperature", "0.5", r"temperature must be a number, got '0.5'"),
    ("top_p", 0.0, r"top_p must be in \(0, 1\], got 0.0"),
    ("top_p", 1.5, r"top_p must be in \(0, 1\], got 1.5"),
    ("top_p", math.nan, r"top_p must be in \(0, 1\], got nan"),
    ("top_k", -2, r"top_k must be in \[-1, 9223372036854775807\], got -2"),
    ("top_k", 2**63, r"top_k must be in \[-1, 9223372036854775807\], got 9223372036854775808"),
    ("top_k", 5.0, r"top_k must be an integer, got 5.0"),
    ("top_k", True, r"top_k must be an integer, got True"),
    ("min_p", -0.01, r"min_p must be in \[0, 1\], got -0.01"),
    ("min_p", 1.01, r"min_p must be in \[0, 1\], got 1.01"),
    ("frequency_penalty", 2.1, r"frequency_penalty must be in \[-2, 2\], got 2.1"),
    ("frequency_penalty", -math.inf, r"frequency_penalty must be in \[-2, 2\], got -inf"),
    ("presence_penalty", -2.5, r"presence_penalty must be in \[-2, 2\], got -2.5"),
    ("presence_penalty", math.nan, r"presence_penalty must be in \[-2, 2\], got nan"),
    ("repetition_penalty", 0.0, r"repetition_penalty must be in \(0, 2\], got 0.0"),
    ("repetition_penalty", 2.01, r"repetition_penalty must be in \(0, 2\], got 2.01"),
    ("repetition_penalty", math.nan, r"repetition_penalty must be in \(0, 2\], got nan"),
    ("seed", 2**63, r"seed must be in \[-9223372036854775808, 9223372036854775807\], got 9223372036854775808"),
    ("seed", -2**63 - 1, r"seed must be in .*got -9223372036854775809"),
    ("seed", 1.0, r"seed must be an integer, got 1.0"),
    ("top_logprobs", 21, r"top_logprobs must be in \[0, 20\], got 21"),
    ("logprobs", 1, r"logprobs must be true or false, got 1"),
    ("stop_with_eos", None, r"stop_with_eos must be true or false, got None"),
    ("logit_bias", {5: 100.5}, r"logit_bias\[5\] must be in \[-100, 100\], got 100.5"),
    ("logit_bias", {5: math.nan}, r"logit_bias\[5\] must be in \[-100, 100\], got nan"),
    ("logit_bias", {"5": 1.0}, r"logit_bias key '5' must be an integer"),
    ("logit_bias", {-1: 1.0}, r"logit_bias key -1 must be in \[0, "),
    ("logit_bias", {i: 1.0 for i in range(301)}, r"logit_bias has 301 entries, more than the limit of 300"),
    ("logit_bias", [(1, 2.0)], r"logit_bias must be a dict of token id -> bias, got list"),
    ("stop_token_ids", list(range(65)), r"stop_token_ids has 65 entries, more than the limit of 64"),
    ("stop_token_ids", [3, 2.0], r"stop_token_ids entry 2.0 must be an integer"),
    ("stop_token_ids", [-4], r"stop_token_ids entry -4 must be in \[0, "),
    ("stop_token_ids", 7, r"stop_token_ids must be a list of token ids, got int"),
]


@pytest.mark.parametrize("field, value, message", BAD, ids=[f"{f}={str(v)[:12]}" for f, v, _ in BAD])
def test_a_bad_field_is_rejected_by_name(field, value, message):
    with pytest.raises(InvalidSamplingParam, match=message) as error:
        SamplingParams(**{field: value})
    assert error.value.param == field


def test_top_logprobs_need_logprobs():
    with pytest.raises(InvalidSamplingParam, match="top_logprobs requires logprobs"):
        SamplingParams(top_logprobs=3)


GOOD = [dict(temperature=0), dict(temperature=2), dict(top_p=1), dict(top_k=0), dict(top_k=-1), dict(top_k=2**63 - 1),
        dict(min_p=1.0), dict(repetition_penalty=2), dict(repetition_penalty=1e-3), dict(seed=-2**63),
        dict(seed=2**63 - 1), dict(seed=-1), dict(frequency_penalty=-2, presence_penalty=2),
        dict(logit_bias={0: -100, 7: 100.0}), dict(logit_bias={}), dict(stop_token_ids=list(range(64))),
        dict(logprobs=True, top_logprobs=20)]


@pytest.mark.parametrize("fields", GOOD, ids=[str(g)[:40] for g in GOOD])
def test_limits_are_inclusive_and_extremes_sample(fields):
    """Whatever passes validation samples without error (on a vocabulary smaller than top_k)."""
    params = SamplingParams(**fields)
    table = SamplingTable(torch.device("cpu"), 200)
    table.update(StepPlan(new_requests={"r": params}, prompt_token_ids={"r": [1, 2, 3]}))
    for position in range(3):
        batch = table.batch(["r"], [position])
        token = Sampler()(torch.randn(1, 200), batch).token_ids
        table.record(batch, token)
        assert 0 <= token.item() < 200


@pytest.mark.parametrize("seed", [-1, -2**63, -12345])
def test_negative_seeds_are_reproducible(seed):
    def draws() -> list[int]:
        table = SamplingTable(torch.device("cpu"), 1000)
        table.update(StepPlan(new_requests={"r": SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, seed=seed)}))
        logits = torch.zeros(1, 1000)
        return [Sampler()(logits, table.batch(["r"], [position])).token_ids.item() for position in range(20)]

    first = draws()
    assert first == draws() and len(set(first)) > 1


def test_plans_ship_prompts_only_for_requests_with_a_repetition_penalty():
    requests = [Request("rep", [5, 6, 5, 9], SamplingParams(repetition_penalty=1.3)),
                Request("freq", [1, 2, 3], SamplingParams(frequency_penalty=1.0)),
                Request("old", [4, 4], SamplingParams(repetition_penalty=1.3))]
    batch = Batch(is_prefill=True, requests=requests, num_new_tokens=[4, 3, 2])
    new = {r.request_id: r.params for r in requests[:2]}  # "old" was announced in an earlier plan
    plan = pickle.loads(pickle.dumps(StepPlan.from_batch(batch, new, [])))  # as it reaches the sampling rank
    assert plan.prompt_token_ids == {"rep": [5, 6, 5, 9]}
    table = SamplingTable(torch.device("cpu"), 10)
    table.update(plan)
    batch = table.batch(["rep", "freq"], [4, 3])
    assert batch.penalized_rows.tolist() == [0, 1]
    assert batch.prompt_mask.tolist() == [[i in (5, 6, 9) for i in range(10)], [False] * 10]
