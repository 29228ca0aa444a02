"""Repetition penalties (which ship each prompt to the sampling rank), min_p and logit_bias under
tensor and pipeline parallelism: every layout must reproduce one process (dist_generate.py's
`--case=sampling`), as test_distributed.py checks for the default sampling settings."""
import pytest

from test_distributed import (SPLIT_DECODE, assert_same_generation, checkpoints, generate,  # noqa: F401 (a fixture)
                              model_args)

CASE = "--case=sampling"
LAYOUTS = [
    ("llama", 2, ["infer.pp_size=2", *SPLIT_DECODE]),
    ("llama", 2, ["infer.tp_size=2"]),
    ("qwen3", 2, ["infer.pp_size=2"]),
]


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory) -> dict[str, list[dict]]:
    tmp = tmp_path_factory.mktemp("reference")
    models = {model for model, _, _ in LAYOUTS}
    return {name: generate(tmp, 1, [CASE, *model_args(name, checkpoints[name])]) for name in models}


def test_the_penalties_change_the_tokens(checkpoints, reference, tmp_path):
    """The first prompt is greedy in both cases, with a repetition penalty only in this one."""
    plain = generate(tmp_path, 1, [f"models.ckpt_dir={checkpoints['llama']}"])
    assert reference["llama"][0]["tokens"] != plain[0]["tokens"]


@pytest.mark.parametrize("model,nproc,layout", LAYOUTS, ids=[f"{m}-{o[0]}" for m, _, o in LAYOUTS])
def test_parallel_layout_samples_like_one_process(model, nproc, layout, checkpoints, reference, tmp_path):
    out = generate(tmp_path, nproc, [CASE, *model_args(model, checkpoints[model]), *layout])
    assert_same_generation(out, reference[model])


@pytest.mark.parametrize("nproc,layout", [(1, []), (2, ["infer.pp_size=2", *SPLIT_DECODE]), (2, ["infer.tp_size=2"])],
                         ids=["one-process", "pp=2", "tp=2"])
def test_a_sampling_failure_costs_only_its_request(nproc, layout, checkpoints, tmp_path):
    """The sampling rank fails every step that samples for the first request (under pp=2 that rank is not
    rank 0 and reports the failure to it): that request fails alone, the others finish as they do without it."""
    model = model_args("llama", checkpoints["llama"])
    alone = generate(tmp_path, 1, model)
    out = generate(tmp_path, nproc, ["--case=sampling-fails", *model, *layout])
    assert [r["failed"] for r in out] == [True, False, False, False]
    assert_same_generation(out[1:], alone[1:])
