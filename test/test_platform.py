"""Device, dtype, attention backend and CUDA-graph choices, and their errors."""
import pytest
import torch

from chitu.config import ConfigError, compose_config
from chitu.platform import memory_budget, resolve_attention_backend, resolve_cuda_graph, resolve_device, resolve_dtype

CPU = torch.device("cpu")


def test_defaults_on_cpu():
    config = compose_config(["device=cpu"])
    assert resolve_device(config) == CPU
    assert resolve_dtype(config) == torch.bfloat16
    assert resolve_dtype(compose_config(["dtype=float32"])) == torch.float32
    assert resolve_attention_backend(config, CPU) == "cpu"
    assert resolve_attention_backend(compose_config(["infer.attn_type=ref"]), CPU) == "ref"
    assert resolve_cuda_graph(config, CPU) is False


@pytest.mark.parametrize("attn_type, message", [
    ("flash_attn", "needs the optional dependency flash_attn: pip install --no-build-isolation '.[flash_attn]'"),
    ("flash_infer", "'.[flashinfer]'"),
    ("flash_mla", "'.[flash_mla]'"),
    ("npu", "Ascend"),
    ("triton", "needs a CUDA device"),
])
def test_unavailable_attention_backends_name_what_is_missing(attn_type, message):
    with pytest.raises(ConfigError, match=None) as error:
        resolve_attention_backend(compose_config([f"infer.attn_type={attn_type}"]), CPU)
    assert message in str(error.value)


def test_cuda_graphs_need_cuda():
    with pytest.raises(ConfigError, match="needs a CUDA device"):
        resolve_cuda_graph(compose_config(["infer.use_cuda_graph=True"]), CPU)


def test_cuda_graphs_off_for_models_that_cannot_be_captured():
    cuda = torch.device("cuda")
    assert resolve_cuda_graph(compose_config([]), cuda, capturable=True) is True
    assert resolve_cuda_graph(compose_config([]), cuda, capturable=False) is False
    with pytest.raises(ConfigError, match="MoE layers run the torch reference"):
        resolve_cuda_graph(compose_config(["infer.use_cuda_graph=True"]), cuda, capturable=False)


def test_platform_builds_are_named(monkeypatch):
    monkeypatch.setenv("CHITU_ASCEND_BUILD", "1")
    with pytest.raises(ConfigError, match="Ascend NPU support is not built"):
        resolve_device(compose_config())


def test_memory_budget_scales_with_utilization():
    assert 0 < memory_budget(CPU, 0.1) < memory_budget(CPU, 0.9)
