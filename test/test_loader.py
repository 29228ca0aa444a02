"""debug.skip_model_load: the model a checkpoint describes, with random weights, built from its config alone."""
import pytest
import torch
import transformers

from chitu.config import compose_config
from chitu.config.schema import ConfigError
from chitu.engine.engine import LLMEngine
from chitu.engine.sampling_params import SamplingParams
from chitu.models.loader import load_configured_model

TINY = transformers.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                num_key_value_heads=2, head_dim=16, vocab_size=300, architectures=["Qwen3ForCausalLM"])


def config_dir(tmp_path):
    TINY.save_pretrained(tmp_path)  # config.json only: no weights, no tokenizer
    return tmp_path


def skip_load_config(checkpoint, *overrides: str):
    return compose_config(["models=Qwen3-8B", f"models.ckpt_dir={checkpoint}", "debug.skip_model_load=True",
                           "dtype=float32", "device=cpu", "infer.max_seq_len=64", *overrides])


def test_a_config_json_alone_serves_random_weights(tmp_path):
    config = skip_load_config(config_dir(tmp_path), "infer.max_reqs=2")
    engine = LLMEngine(config, load_tokenizer=False)
    request = engine.add_request(list(range(10)), SamplingParams(max_new_tokens=5, temperature=0, stop_with_eos=False))
    while engine.has_unfinished():
        engine.step()
    assert len(request.output_token_ids) == 5 and all(0 <= t < TINY.vocab_size for t in request.output_token_ids)
    matrices = [p for p in engine.worker.model.parameters() if p.dim() > 1]
    assert all(abs(p.std().item() - 0.02) < 0.004 for p in matrices)  # random normal(0, 0.02), none left zero


def test_the_same_seed_gives_the_same_weights(tmp_path):
    checkpoint = config_dir(tmp_path)
    weights = [load_configured_model(skip_load_config(checkpoint, f"infer.seed={seed}"), torch.device("cpu")).state_dict()
               for seed in (0, 0, 1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not torch.equal(weights[0]["lm_head.weight"], weights[2]["lm_head.weight"])


def test_a_gguf_file_gives_its_shapes(smollm2_path):
    real = load_configured_model(compose_config(["dtype=float32", "device=cpu", "quant=none"]), torch.device("cpu"))
    random = load_configured_model(compose_config(["dtype=float32", "device=cpu", "debug.skip_model_load=True"]),
                                   torch.device("cpu"))
    shapes = {k: v.shape for k, v in real.state_dict().items()}
    assert {k: v.shape for k, v in random.state_dict().items()} == shapes
    assert not torch.equal(real.state_dict()["model.embed_tokens.weight"], random.state_dict()["model.embed_tokens.weight"])


def test_quantized_random_weights_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="debug.skip_model_load=True makes random weights"):
        load_configured_model(skip_load_config(config_dir(tmp_path), "quant=w8a16", "quant_on_load=True"), torch.device("cpu"))


def test_forced_moe_balance_is_refused_by_name():
    with pytest.raises(ConfigError, match="debug.force_moe_balance"):
        compose_config(["debug.force_moe_balance=True"])
