"""A lone sequence's prefill step padded to a bucket (ops.attention_metadata.padded_prefill) gives the unpadded step's
logits and cache, on the CPU; on a GPU the prefill graphs (runner/prefill_graphs.py) replay it and equal eager."""
import pytest
import torch
import transformers

from chitu.layers.kv_cache_spec import kv_cache_layers
from chitu.models.registry import build_model
from chitu.ops.attention_metadata import AttentionMetadata, padded_prefill
from chitu.runner.block_tables import BlockTables
from chitu.runner.model_runner import ModelRunner

BLOCK_SIZE, NUM_BLOCKS = 4, 12
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=320, rms_norm_eps=1e-6)
MODELS = {
    "qwen3": ("hf-llama", transformers.Qwen3Config(**TINY)),
    "qwen3-moe": ("hf-qwen-3-moe", transformers.Qwen3MoeConfig(**TINY, num_experts=8, num_experts_per_tok=2,
                                                               moe_intermediate_size=32)),
}


def random_model(name: str) -> torch.nn.Module:
    model_type, config = MODELS[name]
    torch.manual_seed(0)
    model = build_model(config, model_type, 64, torch.float32)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    return model


def caches(model: torch.nn.Module) -> list[torch.Tensor]:
    return [page.clone() for layer in kv_cache_layers(model) for page in (layer.k_cache, layer.v_cache)]


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("num_new, bucket", [(5, 16), (16, 16), (1, 16), (9, 32)])
@torch.inference_mode()
def test_padded_prefill_step_gives_the_unpadded_logits_and_cache(name, num_new, bucket):
    model = random_model(name)
    runner = ModelRunner(model, torch.device("cpu"), BLOCK_SIZE)
    runner._allocate_pages(NUM_BLOCKS + 1)
    tables = BlockTables(2, 6, torch.device("cpu"), scratch_block=NUM_BLOCKS)
    tables.apply([(1, 0, [7, 2, 9, 4, 0, 11])])
    prompt = torch.randint(0, TINY["vocab_size"], (7 + num_new,), generator=torch.Generator().manual_seed(num_new))
    cached = AttentionMetadata.build([7], [7], tables.table[[1]], BLOCK_SIZE, "cpu")
    model(prompt[:7], cached)  # the prefix the cache holds
    before = caches(model)

    plain = AttentionMetadata.build([num_new], [len(prompt)], tables.table[[1]], BLOCK_SIZE, "cpu")
    expected_logits = model.compute_logits(model(prompt[7:], plain)[-1:])
    expected_cache = caches(model)
    for layer, (k, v) in zip(kv_cache_layers(model), zip(before[::2], before[1::2])):
        layer.k_cache.copy_(k)
        layer.v_cache.copy_(v)

    request = torch.tensor([num_new, len(prompt), 1])
    meta = padded_prefill(bucket, request, tables.table, tables.scratch_row, BLOCK_SIZE, torch.arange(bucket + 1))
    tokens = torch.cat([prompt[7:], torch.zeros(bucket - num_new, dtype=torch.int64)])
    logits = model.compute_logits(model(tokens, meta).index_select(0, request[:1] - 1))
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)
    for got, want in zip(caches(model), expected_cache):
        torch.testing.assert_close(got[:NUM_BLOCKS], want[:NUM_BLOCKS], rtol=1e-5, atol=1e-5)  # the scratch block aside


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name, dtype", [("qwen3", torch.bfloat16), ("qwen3", torch.float32), ("qwen3-moe", torch.float32)])
def test_prefix_cached_prompts_through_prefill_graphs_equal_eager(name, dtype):
    """Prompts sharing a 200-token prefix, one at a time: each one's uncached end is a prefill graph's replay."""
    from test_cuda_graph import TOLERANCES, assert_same_greedy, engine, generate
    from test_cuda_graph import random_model as random_gpu_model

    model = random_gpu_model(name, dtype)
    gen = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, 1024, (200,), generator=gen).tolist()
    prompts = [prefix + torch.randint(0, 1024, (n,), generator=gen).tolist() for n in (3, 40, 90)]
    graph_engine = engine(model, True, dtype)
    replays = []
    prefill_graphs = graph_engine.worker.runner.prefill_graphs
    run = prefill_graphs.run
    prefill_graphs.run = lambda token_ids, *args: replays.append(len(token_ids)) or run(token_ids, *args)
    graph_runs = [generate(graph_engine, [p])[0] for p in prompts]
    assert len(replays) >= len(prompts) - 1, replays  # the first prompt's 203 tokens may be one prefill too
    eager_engine = engine(model, False, dtype)
    for prompt, graph in zip(prompts, graph_runs, strict=True):
        assert_same_greedy(graph, generate(eager_engine, [prompt])[0], TOLERANCES[dtype])
