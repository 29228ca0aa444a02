"""The scheduler's pipeline micro-batches: sizes as the manual defines scheduler.pp_config, requests
in flight skipped (never preempted), and micro-batches that together cover every request."""
import pytest

from chitu.config import compose_config
from chitu.engine.kv_cache import BlockManager
from chitu.engine.request import Request
from chitu.engine.sampling_params import SamplingParams
from chitu.engine.scheduler import Batch, Scheduler, micro_batch_limits


@pytest.mark.parametrize("overrides,limits", [
    ([], (8, 8)),  # pp_size 1: the knobs do not apply
    (["infer.pp_size=2"], (4, 8)),
    (["infer.pp_size=3", "infer.max_reqs=10"], (4, 10)),
    (["infer.pp_size=2", "scheduler.pp_config.prefill_num_tasks_divided_by_pp=False",
      "scheduler.pp_config.prefill_num_tasks=3"], (3, 8)),
    (["infer.pp_size=2", "scheduler.pp_config.enforce_decode_num_tasks_max=False",
      "scheduler.pp_config.decode_num_tasks=4"], (4, 4)),
])
def test_micro_batch_limits_follow_the_manual(overrides, limits):
    assert micro_batch_limits(compose_config(overrides)) == limits


def launch(batch: Batch) -> None:
    """What the engine does when it sends a micro-batch down the pipeline."""
    for request, n in zip(batch.requests, batch.num_new_tokens):
        request.in_flight = True
        request.num_computed_tokens += n


def complete(batch: Batch, token: int = 1) -> None:
    """What the engine does when the micro-batch's tokens come back."""
    for request in batch.requests:
        request.in_flight = False
        if request.num_computed_tokens == request.num_tokens:  # reached its last token: sampled one more
            request.output_token_ids.append(token)


def make_scheduler(num_blocks: int = 64, prefill: int = 2, decode: int = 2) -> tuple[Scheduler, list[Request]]:
    scheduler = Scheduler(BlockManager(num_blocks, 4), max_reqs=4, prefill_chunk_size=None,
                          max_prefill_batch=prefill, max_decode_batch=decode)
    requests = [Request(f"r{i}", list(range(1, 6)), SamplingParams(max_new_tokens=8)) for i in range(4)]
    for request in requests:
        scheduler.add(request)
    return scheduler, requests


def test_micro_batches_in_flight_are_disjoint_and_cover_all_requests():
    scheduler, requests = make_scheduler()
    first = scheduler.schedule()
    launch(first)
    second = scheduler.schedule()
    launch(second)
    assert first.is_prefill and second.is_prefill
    assert [r.request_id for r in first.requests] == ["r0", "r1"]
    assert [r.request_id for r in second.requests] == ["r2", "r3"]
    assert scheduler.schedule() is None  # everything is in flight
    complete(first)
    decode = scheduler.schedule()
    assert not decode.is_prefill and [r.request_id for r in decode.requests] == ["r0", "r1"]


def test_requests_in_flight_are_never_preempted():
    # 4 tokens per block: each 5-token prompt takes 2 blocks, its 9th token a third
    scheduler, requests = make_scheduler(num_blocks=6, prefill=1, decode=1)
    batches = []
    for _ in range(3):  # three single-request prefills fill the cache
        batches.append(scheduler.schedule())
        launch(batches[-1])
    assert [b.requests for b in batches] == [[r] for r in requests[:3]]
    assert scheduler.schedule() is None  # no blocks left and nothing may be preempted
    complete(batches[0])
    complete(batches[1])
    requests[0].output_token_ids += [1, 1, 1]  # r0 has decoded past its second block's edge
    requests[0].num_computed_tokens = 8
    decode = scheduler.schedule()
    assert decode.requests == [requests[0]] and requests[2].in_flight and requests[2].block_table
    assert scheduler.num_preemptions == 1  # r1 made room; r2, in flight, kept its blocks


def test_mixed_steps_keep_decoding_while_a_long_prompt_prefills():
    """A stream decoding while a 40-token prompt arrives under a budget of 8 tokens a step: every step gives
    the stream its token and the prompt a chunk of the other 7 until it is prefilled."""
    scheduler = Scheduler(BlockManager(64, 4), max_reqs=4, prefill_chunk_size=8, mixed_steps=True)
    stream = Request("stream", [1, 2, 3], SamplingParams(max_new_tokens=50))
    scheduler.add(stream)
    batch = scheduler.schedule()
    launch(batch)
    complete(batch)
    prompt = Request("prompt", list(range(1, 41)), SamplingParams(max_new_tokens=4))
    scheduler.add(prompt)
    steps = 0
    while not prompt.output_token_ids:
        batch = scheduler.schedule()
        assert batch.is_prefill and batch.requests == [stream, prompt] and batch.num_new_tokens[0] == 1
        assert sum(batch.num_new_tokens) <= 8
        launch(batch)
        complete(batch)
        steps += 1
    assert steps == 6 and len(stream.output_token_ids) == 1 + steps  # 40 tokens, 7 a step
    batch = scheduler.schedule()
    assert not batch.is_prefill and batch.requests == [stream, prompt]


def test_admission_beside_running_requests_keeps_the_watermark_free():
    """10 blocks of 4, a watermark of 2: beside a running request (3 blocks) a prompt needing 6 waits, one
    needing 5 leaves the 2 free and is admitted; alone, a prompt needing all 10 blocks is admitted."""
    scheduler = Scheduler(BlockManager(10, 4), max_reqs=4, prefill_chunk_size=None, mixed_steps=True,
                          watermark_blocks=2)
    running = Request("running", list(range(1, 12)), SamplingParams(max_new_tokens=4))
    scheduler.add(running)
    batch = scheduler.schedule()
    launch(batch)
    complete(batch)
    big, fitting = (Request(name, list(range(1, 1 + 4 * blocks)), SamplingParams(max_new_tokens=1))
                    for name, blocks in (("big", 6), ("fitting", 5)))
    scheduler.add(big)
    assert scheduler.schedule().requests == [running]  # its decode token only
    scheduler.finish(big, "abort")
    scheduler.add(fitting)
    assert scheduler.schedule().requests == [running, fitting] and scheduler.blocks.num_free == 2
    alone = Scheduler(BlockManager(10, 4), max_reqs=4, prefill_chunk_size=None, watermark_blocks=2)
    whole = Request("whole", list(range(1, 40)), SamplingParams(max_new_tokens=1))
    alone.add(whole)
    assert alone.schedule().requests == [whole] and alone.blocks.num_free == 0
