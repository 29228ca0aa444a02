"""The ranks' persistent block tables (runner/block_tables.py) and the plans that feed them only new entries."""
import pickle

import pytest
import torch

from chitu.engine.kv_cache import BlockManager
from chitu.engine.request import Request
from chitu.engine.sampling_params import SamplingParams
from chitu.engine.scheduler import Batch
from chitu.runner.block_tables import BlockTables
from chitu.runner.step_plan import StepPlan

CPU = torch.device("cpu")


def test_updates_write_their_entries_and_rows_gather_them():
    tables = BlockTables(3, 6, CPU)
    tables.apply([(2, 0, [7, 8]), (0, 0, [1])])
    tables.apply([(2, 2, [9]), (0, 1, [4, 5, 6])])
    assert tables.rows([2, 0], 4).tolist() == [[7, 8, 9, 0], [1, 4, 5, 6]]
    assert tables.rows([1], 6).tolist() == [[0] * 6]


def test_the_scratch_row_holds_the_scratch_block_and_takes_no_updates():
    tables = BlockTables(2, 4, CPU, scratch_block=11)
    assert tables.scratch_row == 2 and tables.table[2].tolist() == [11] * 4
    with pytest.raises(ValueError, match=r"outside the 3 x 4 tables"):
        tables.apply([(2, 0, [1])])
    with pytest.raises(ValueError, match=r"\(0, 3, 2 blocks\) is outside"):
        tables.apply([(0, 3, [1, 2])])


def decode_plan(requests: list[Request], blocks: BlockManager) -> StepPlan:
    for r in requests:
        r.output_token_ids.append(1)
        blocks.grow(r, r.num_tokens)
    plan = StepPlan.from_batch(Batch(False, requests, [1] * len(requests)), {}, [])
    for r in requests:
        r.num_computed_tokens += 1
    return plan


def test_a_decode_plan_carries_a_row_only_when_it_gains_a_block():
    blocks = BlockManager(num_blocks=64, block_size=4)
    requests = [Request(f"r{i}", list(range(5 + i)), SamplingParams()) for i in range(3)]
    for r in requests:
        blocks.take_prefix(r, [])
        blocks.grow(r, r.num_tokens)
    first = StepPlan.from_batch(Batch(True, requests, [r.num_tokens for r in requests]), {}, [])
    assert first.table_updates == [(r.table_row, 0, r.block_table) for r in requests]
    for r in requests:
        r.num_computed_tokens = r.num_tokens
    sizes, updates = [], []
    for _ in range(8):
        plan = decode_plan(requests, blocks)
        updates.append([(row, start) for row, start, _ in plan.table_updates])
        sizes.append(len(pickle.dumps(plan)))
    # 5, 6, 7 prompt tokens: a new block at the 4th, 3rd and 2nd decode token, then every 4
    assert updates == [[], [(2, 2)], [(1, 2)], [(0, 2)], [], [(2, 3)], [(1, 3)], [(0, 3)]]
    assert max(sizes) - min(sizes) < 64  # no block table travels whole


def test_a_released_request_resends_its_whole_table_from_a_free_row():
    blocks = BlockManager(num_blocks=16, block_size=4)
    a, b = (Request(name, list(range(9)), SamplingParams()) for name in "ab")
    for r in (a, b):
        blocks.take_prefix(r, [])
        blocks.grow(r, 9)
        StepPlan.from_batch(Batch(True, [r], [9]), {}, [])
    assert (a.table_row, b.table_row, a.blocks_sent) == (0, 1, 3)
    blocks.release(a)  # preempted
    assert (a.table_row, a.blocks_sent) == (-1, 0)
    blocks.take_prefix(a, [])
    blocks.grow(a, 9)
    plan = StepPlan.from_batch(Batch(True, [a], [9]), {}, [])
    assert plan.table_rows == [0] and plan.table_updates == [(0, 0, a.block_table)]
