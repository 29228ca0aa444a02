"""cpu_layer_num: the routed experts of the last N MoE layers in host memory (layers/moe/host_experts.py), on tiny
random MoE GGUF files (Qwen3-MoE, Mixtral, GLM-4.5, DeepSeek-V3; Q8_0 or F32 experts, kept in their blocks with
quant=gguf): on the CPU the placement path
gives exactly the logits of the experts placed as usual, for every N; on a GPU, the GPU holding everything else,
the logits of the model all on the GPU."""
import pytest
import torch

from chitu.checkpoint import open_checkpoint
from chitu.config.schema import ConfigError
from chitu.layers.moe.sparse_moe import SparseMoE
from chitu.models.loader import load_model
from test_gguf_moe import convert
from test_models import TINY, PagedRun, relative_error

# glm4-moe and deepseek-v3: shared experts beside the routed ones; deepseek-v3: MLA, as DeepSeek-R1's GGUF files
CASES = ["qwen3-moe", "mixtral-q8_0", "glm4-moe-q8_0", "deepseek-v3-q8_0"]


@pytest.fixture(scope="module", params=CASES)
def converted(request, tmp_path_factory):
    return convert(request.param, tmp_path_factory)


def load(converted, cpu_layer_num: int, device: str = "cpu", dtype: torch.dtype = torch.float32,
         max_positions: int = 256) -> torch.nn.Module:
    with open_checkpoint(converted.path) as reader:
        return load_model(reader, converted.model_type, max_positions, torch.device(device), dtype, gguf_blocks=True,
                          cpu_layer_num=cpu_layer_num)


def moe_blocks(model: torch.nn.Module) -> list[tuple[int, SparseMoE]]:
    return [(int(i), layer.mlp) for i, layer in model.model.layers.items() if isinstance(layer.mlp, SparseMoE)]


def logits_of_steps(model: torch.nn.Module, device: str = "cpu", steps: int = 4) -> list[torch.Tensor]:
    """A prefill of three sequences (5, 17, 11 tokens), then greedy decode steps: each step's logits."""
    run = PagedRun(model, 3, 48, device)
    gen = torch.Generator().manual_seed(3)
    new_tokens = {s: torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for s, n in enumerate((5, 17, 11))}
    out = []
    for _ in range(steps):
        out.append(run.step(new_tokens))
        new_tokens = {s: [int(out[-1][i].argmax())] for i, s in enumerate(new_tokens)}
    return out


def test_every_cpu_layer_num_gives_the_logits_of_the_usual_placement(converted):
    usual = logits_of_steps(load(converted, 0))
    num_moe = len(moe_blocks(load(converted, 0)))
    for n in range(1, num_moe + 1):
        model = load(converted, n)
        blocks = moe_blocks(model)
        on_host = [i for i, block in blocks if block.on_host]
        assert on_host == [i for i, _ in blocks][num_moe - n:]  # the last n MoE layers
        for step, (got, want) in enumerate(zip(logits_of_steps(model), usual, strict=True)):
            assert torch.equal(got, want), f"cpu_layer_num={n}, step {step}"


def test_more_cpu_layers_than_moe_layers_are_refused(converted):
    num_moe = len(moe_blocks(load(converted, 0)))
    with pytest.raises(ConfigError, match=rf"cpu_layer_num={num_moe + 1}, but .* has {num_moe} MoE layers"):
        load(converted, num_moe + 1)


def test_a_dense_model_has_no_experts_to_place(smollm2_path):
    from chitu.config import compose_config
    from chitu.models.loader import load_configured_model
    with pytest.raises(ConfigError, match="it is a dense model, with no experts to place on the CPU"):
        load_configured_model(compose_config(["+cpu_layer_num=1", "device=cpu"]), torch.device("cpu"))


def test_host_memory_too_small_for_the_experts_is_refused_before_loading(converted, monkeypatch):
    import chitu.models.loader as loader
    monkeypatch.setattr(loader, "memory_budget", lambda device, utilization: 1024)
    with pytest.raises(ConfigError, match=r"cpu_layer_num=1: the routed experts of those MoE layers need "
                                          r"[\d.]+ GiB of host memory, 0.0 GiB is free; lower cpu_layer_num"):
        load(converted, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_the_host_experts_give_the_logits_of_the_model_on_the_gpu(converted):
    on_gpu = logits_of_steps(load(converted, 0, "cuda"), "cuda")
    num_moe = len(moe_blocks(load(converted, 0)))
    hybrid = load(converted, num_moe, "cuda")
    assert all(p.device.type == "cpu" for _, block in moe_blocks(hybrid) for p in block.experts.parameters())
    assert all(p.device.type == "cuda" for name, p in hybrid.named_parameters() if ".experts." not in name)
    for step, (got, want) in enumerate(zip(logits_of_steps(hybrid, "cuda"), on_gpu, strict=True)):
        assert relative_error(got, want) < 1e-4, f"step {step}"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graphs_run_the_host_experts_as_host_function_nodes(converted):
    """Decode in CUDA graphs (the experts as host-function nodes) gives eager's tokens and logprobs."""
    from test_cuda_graph import assert_same_greedy, engine, generate
    num_moe = len(moe_blocks(load(converted, 0)))
    model = load(converted, num_moe, "cuda", max_positions=512)  # test_cuda_graph.engine's max_seq_len
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, TINY["vocab_size"], (n,), generator=gen).tolist() for n in (3, 40, 17)]
    graph_engine = engine(model, True, torch.float32)
    assert graph_engine.worker.runner.graphs is not None
    graph_runs = generate(graph_engine, prompts)
    eager_runs = generate(engine(model, False, torch.float32), prompts)
    for graph, eager in zip(graph_runs, eager_runs, strict=True):
        assert_same_greedy(graph, eager, 2e-3)
