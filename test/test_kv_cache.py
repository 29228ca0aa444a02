"""The KV cache's bookkeeping with prefix caching (engine/kv_cache.py) under the scheduler: a randomized run of
arrivals with shared prefixes, aborts and preemptions in a tight cache, where every block's contents are modelled
(each step writes its tokens into their slots) and after every step each running request's computed tokens must
be what its blocks hold; reference counts exact, every block free at the end; the device block tables, fed only
the plans' new entries, hold every request's table. Then the real model: cached prefixes give the tokens of
prefilling everything."""
import random

import pytest
import torch

from chitu import LLM, SamplingParams
from chitu.engine.kv_cache import BlockManager
from chitu.engine.request import Request
from chitu.engine.scheduler import Scheduler
from chitu.runner.block_tables import BlockTables
from chitu.runner.step_plan import StepPlan

BLOCK = 4


def check_invariants(blocks: BlockManager, running: list[Request], contents: dict[int, list]) -> None:
    holders = {}
    for request in running:
        for block in request.block_table:
            holders[block] = holders.get(block, 0) + 1
        for position in range(request.num_computed_tokens):
            assert contents[request.block_table[position // BLOCK]][position % BLOCK] == \
                request.token_ids(position, position + 1)[0], "a request would read K/V of other tokens"
    assert all(blocks.ref_counts[b] == holders.get(b, 0) for b in range(blocks.num_blocks))
    free, evictable = set(blocks.free_blocks), set(blocks.evictable)
    assert len(free) == len(blocks.free_blocks) and not free & evictable and not (free | evictable) & set(holders)
    assert len(free) + len(evictable) + len(holders) == blocks.num_blocks
    assert evictable <= set(blocks.key_of) and not free & set(blocks.key_of)
    assert all(blocks.cached[key] == block for block, key in blocks.key_of.items())


@pytest.mark.parametrize("mixed_steps", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_random_arrivals_aborts_and_preemptions_keep_blocks_and_contents_exact(seed, mixed_steps):
    rng = random.Random(seed)
    blocks = BlockManager(num_blocks=12, block_size=BLOCK)
    scheduler = Scheduler(blocks, max_reqs=5, prefill_chunk_size=6, mixed_steps=mixed_steps)
    prefixes = [[rng.randrange(1, 50) for _ in range(rng.randrange(3, 14))] for _ in range(3)]
    contents = {b: [None] * BLOCK for b in range(blocks.num_blocks)}
    tables = BlockTables(5, 12, torch.device("cpu"))  # what a rank holds: only the plans' updates reach it
    live = []
    for step in range(5000):  # arrivals for 300 steps, then until all finish (a stall fails below)
        if step >= 300 and not scheduler.has_work():
            break
        if step < 300 and rng.random() < 0.3:
            prompt = rng.choice(prefixes)[: rng.randrange(1, 14)] + [rng.randrange(1, 50) for _ in range(rng.randrange(0, 5))]
            request = Request(f"r{step}", prompt or [1], SamplingParams(max_new_tokens=rng.randrange(1, 24)))
            scheduler.add(request)
            live.append(request)
        if live and rng.random() < 0.05:
            victim = rng.choice(live)
            scheduler.finish(victim, "abort")
            live.remove(victim)
        batch = scheduler.schedule()
        if batch is not None:
            plan = StepPlan.from_batch(batch, {}, [])
            tables.apply(plan.table_updates)
            for request, row in zip(batch.requests, tables.rows(plan.table_rows, 12).tolist()):
                assert row[: len(request.block_table)] == request.block_table
            assert len({r.table_row for r in scheduler.running}) == len(scheduler.running)
            sampled = [batch.samples(index) for index in range(len(batch.requests))]
            for request, n in zip(batch.requests, batch.num_new_tokens):
                for position in range(request.num_computed_tokens, request.num_computed_tokens + n):
                    block = request.block_table[position // BLOCK]
                    assert block not in blocks.key_of, "a write into a cached block"
                    contents[block][position % BLOCK] = request.token_ids(position, position + 1)[0]
                request.num_computed_tokens += n
                blocks.cache_computed(request, request.num_computed_tokens)
            for request, samples in zip(batch.requests, sampled):
                if samples:
                    request.output_token_ids.append(rng.randrange(1, 50))
                    if len(request.output_token_ids) == request.params.max_new_tokens:
                        scheduler.finish(request, "length")
                        live.remove(request)
        check_invariants(blocks, scheduler.running, contents)
    assert not live and not scheduler.has_work()
    assert blocks.num_free == blocks.num_blocks and not any(blocks.ref_counts)
    assert blocks.hit_tokens > 0 and scheduler.num_preemptions > 0


def test_a_prompt_reuses_every_whole_block_before_its_last_token():
    blocks = BlockManager(num_blocks=8, block_size=BLOCK)
    first = Request("a", list(range(1, 11)), SamplingParams())
    blocks.take_prefix(first, blocks.cached_prefix(first))
    blocks.grow(first, 10)
    first.num_computed_tokens = 10
    blocks.cache_computed(first, 10)  # blocks [1..4], [5..8] are full; [9, 10] is not
    assert blocks.cached_prefix(Request("b", list(range(1, 9)) + [99], SamplingParams())) == first.block_table[:2]
    assert blocks.cached_prefix(Request("c", list(range(1, 9)), SamplingParams())) == first.block_table[:1]
    assert blocks.cached_prefix(Request("d", [2] + list(range(2, 11)), SamplingParams())) == []
    blocks.release(first)
    assert blocks.num_free == 8 and len(blocks.evictable) == 2  # cached, free to take
    late = Request("e", list(range(1, 12)), SamplingParams())
    prefix = blocks.cached_prefix(late)
    assert blocks.can_admit(late, prefix, 11) and not blocks.can_admit(late, prefix, 8 * BLOCK + 1)
    blocks.take_prefix(late, prefix)
    assert late.num_computed_tokens == 8 and blocks.hit_tokens == 8 and blocks.query_tokens == 21


def test_without_prefix_caching_nothing_is_reused():
    blocks = BlockManager(num_blocks=4, block_size=BLOCK, prefix_caching=False)
    first = Request("a", list(range(1, 10)), SamplingParams())
    blocks.grow(first, 9)
    blocks.cache_computed(first, 9)
    assert blocks.cached_prefix(Request("b", list(range(1, 10)), SamplingParams())) == []


GREEDY = SamplingParams(max_new_tokens=8, temperature=0)
SYSTEM = ("You are a careful assistant. Answer in one short sentence, name your sources when you can, and never "
          "invent facts you are not sure about.")


def run(engine, prompts, every: int = 1):
    requests, step = [], 0
    while len(requests) < len(prompts) or engine.has_unfinished():
        if len(requests) < len(prompts) and step % every == 0:
            requests.append(engine.add_request(prompts[len(requests)], GREEDY))
        engine.step()
        step += 1
    return [r.output_token_ids for r in requests]


def test_cached_prefixes_give_the_tokens_of_computing_them(smollm2_path):
    """SmolLM2 in float32, blocks of 16: chat prompts sharing a long system message, staggered so that later ones
    find the earlier ones' blocks cached, against an engine without prefix caching."""
    args = ("dtype=float32", "infer.max_seq_len=160", "infer.max_reqs=4", "infer.block_size=16")
    cached, plain = LLM(*args).engine, LLM(*args, "infer.enable_prefix_caching=False").engine
    questions = ["What is rain?", "Name a planet.", "What is rain made of?", "Name a planet."]
    prompts = [cached.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": q}]) for q in questions]
    assert run(cached, prompts, every=3) == run(plain, prompts, every=3)
    shared = min(len(p) for p in prompts) // 16 * 16
    assert cached.blocks.hit_tokens >= 3 * shared > 0 and plain.blocks.hit_tokens == 0
    assert cached.blocks.num_free == cached.blocks.num_blocks
