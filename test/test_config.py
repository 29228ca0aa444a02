"""The Hydra configuration: defaults, overrides, model fragments, and precise errors for bad input."""
import subprocess
import sys

import pytest

from chitu.config import ConfigError, compose_config
from chitu.config.key_help import KEY_HELP
from chitu.config.loader import CONFIG_DIR
from chitu.config.schema import config_keys

SPEC_KEYS = [
    "models.ckpt_dir", "models.tokenizer_path", "infer.tp_size", "infer.pp_size", "infer.cache_type",
    "infer.attn_type", "infer.mla_absorb", "infer.max_reqs", "infer.max_seq_len", "infer.use_cuda_graph",
    "infer.raise_lower_bit_float_to", "infer.op_impl", "request.max_new_tokens", "request.prompt_tokens_len",
    "serve.port", "serve.api_keys", "quant", "quant_on_load", "quant_ckpt_dir", "skip_preprocess",
    "scheduler.pp_config.prefill_num_tasks_divided_by_pp", "scheduler.pp_config.prefill_num_tasks",
    "scheduler.pp_config.enforce_decode_num_tasks_max", "scheduler.pp_config.decode_num_tasks",
]


def get(config, dotted):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def test_defaults_hold_every_manual_key():
    config = compose_config()
    for key in SPEC_KEYS:
        get(config, key)  # raises AttributeError when a key is missing
    assert config.models.name == "SmolLM2-135M-Instruct"
    assert config.infer.cache_type == "paged"
    assert config.scheduler.pp_config.prefill_num_tasks_divided_by_pp is True
    assert config.scheduler.pp_config.prefill_num_tasks == 8
    assert config.scheduler.pp_config.enforce_decode_num_tasks_max is True
    assert config.scheduler.pp_config.decode_num_tasks == 8
    assert config.request.max_new_tokens == 128


def test_overrides_and_model_selection():
    config = compose_config(["infer.max_reqs=3", "request.max_new_tokens=7", "models=Qwen3-8B",
                             "models.ckpt_dir=/tmp", "serve.api_keys=[{key: k1, priority: 5}]"])
    assert config.infer.max_reqs == 3 and config.request.max_new_tokens == 7
    assert config.models.name == "Qwen3-8B" and config.models.ckpt_dir == "/tmp"
    assert config.serve.api_keys[0].key == "k1" and config.serve.api_keys[0].priority == 5


def test_cpu_layer_num_is_taken_as_the_manual_adds_it_and_as_a_plain_key():
    assert compose_config(["+cpu_layer_num=58"]).cpu_layer_num == 58
    assert compose_config(["cpu_layer_num=3"]).cpu_layer_num == 3
    assert compose_config([]).cpu_layer_num is None


def test_every_model_fragment_composes():
    names = sorted(p.stem for p in (CONFIG_DIR / "models").glob("*.yaml"))
    assert len(names) >= 7
    for name in names:
        assert compose_config([f"models={name}"]).models.name == name


@pytest.mark.parametrize("override, message", [
    ("+infer.no_such_key=1", "unknown config key 'infer.no_such_key'"),
    ("+bogus=1", "unknown config key 'bogus'"),
    ("infer.max_reqs=many", "infer.max_reqs"),
    ("infer.max_reqs=0", "infer.max_reqs=0 must be a positive integer"),
    ("infer.attn_type=fast", "infer.attn_type=fast is not one of"),
    ("infer.kv_watermark=1.5", "infer.kv_watermark=1.5 must be in [0, 1)"),
    ("infer.cache_type=skew", "infer.cache_type=skew"),
    ("serve.port=80", "serve.port=80"),
    ("+cpu_layer_num=-1", "cpu_layer_num=-1 must be null or >= 0"),
    ("dtype=float8", "dtype=float8 is not one of"),
    ("quant=w8a16", "quant=w8a16 needs int8 weights: quantize the checkpoint as it loads (quant_on_load=True)"),
    ("quant_on_load=True", "quant_on_load=True needs a method that quantizes while loading: quant=w8a16 or"),
    ("quant=simple_w8a8", "quant=simple_w8a8 needs int8 weights"),
    ("quant=int4", "quant=int4 is not one of"),
    ("quant=w8a16 quant_on_load=True skip_preprocess=True", "preprocessed already (quantized when it was saved)"),
    ("skip_preprocess=True quant_ckpt_dir=/", "give one of them"),
    ("quant_ckpt_dir=/no/such/dir", "quant_ckpt_dir=/no/such/dir: no such directory"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=None) as error:
        compose_config(override.split())
    assert message in str(error.value)


@pytest.mark.parametrize("given", ["deepseek-r1", "DEEPSEEK-R1", "DeepSeek-R1"])
def test_model_names_match_whatever_their_case(given):
    config = compose_config([f"models={given}", "infer.mla_absorb=absorb-without-precomp",
                             "infer.raise_lower_bit_float_to=bfloat16"])
    assert (config.models.name, config.models.type) == ("DeepSeek-R1", "deepseek-v3")


def test_unknown_model_and_missing_override_target():
    with pytest.raises(ConfigError, match="models/NoSuchModel"):
        compose_config(["models=NoSuchModel"])
    with pytest.raises(ConfigError, match="infer.nothing"):
        compose_config(["infer.nothing=1"])


def test_checkpoint_resolution():
    with pytest.raises(ConfigError, match="models.ckpt_dir is not set for model Qwen3-8B"):
        compose_config(["models=Qwen3-8B"]).models.checkpoint_path()
    with pytest.raises(ConfigError, match="no such file or directory"):
        compose_config(["models.ckpt_dir=/no/such/dir"]).models.checkpoint_path()


def test_default_checkpoint_is_the_packaged_gguf(smollm2_path):
    assert compose_config().models.checkpoint_path() == smollm2_path


def test_config_name_selects_another_file(tmp_path, monkeypatch):
    (tmp_path / "mine.yaml").write_text("defaults:\n  - serve_config\n  - _self_\ninfer:\n  max_reqs: 2\n")
    monkeypatch.setenv("CONFIG_PATH", str(tmp_path))
    monkeypatch.setenv("CONFIG_NAME", "mine.yaml")
    config = compose_config(["models=Qwen3-8B"])
    assert config.infer.max_reqs == 2 and config.models.name == "Qwen3-8B"
    monkeypatch.setenv("CONFIG_NAME", "missing.yaml")
    with pytest.raises(ConfigError, match="no file missing.yaml"):
        compose_config()


@pytest.mark.parametrize("override, suggestion", [
    ("infer.max_req=4", "infer.max_reqs"),
    ("+infer.max_req=4", "infer.max_reqs"),
    ("max_reqs=4", "infer.max_reqs"),
    ("serve.prot=9000", "serve.port"),
    ("+cpu_layers_num=2", "cpu_layer_num"),
    ("infer.use_cudagraph=False", "infer.use_cuda_graph"),
    ("scheduler.pp_config.prefill_num_task=2", "scheduler.pp_config.prefill_num_tasks"),
])
def test_a_mistyped_key_gets_the_keys_it_may_mean(override, suggestion):
    key = override.lstrip("+").partition("=")[0]
    with pytest.raises(ConfigError) as error:
        compose_config([override])
    assert str(error.value) == f"unknown config key '{key}' (did you mean {suggestion}?)"


def test_a_key_like_none_gets_no_suggestion():
    with pytest.raises(ConfigError) as error:
        compose_config(["infer.zzzz=1"])
    assert str(error.value) == "unknown config key 'infer.zzzz'"


def test_the_command_line_suggests_the_key_and_not_hydras_append_hint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "chitu", "infer.max_req=4"], capture_output=True, text=True,
                            cwd=tmp_path, timeout=300)
    assert result.returncode == 1
    assert "unknown config key 'infer.max_req' (did you mean infer.max_reqs?)" in result.stderr
    assert "+infer.max_req" not in result.stderr + result.stdout


def test_every_schema_key_has_a_meaning_for_help():
    assert list(KEY_HELP) == config_keys()


def test_help_lists_each_key_with_its_default_and_meaning(tmp_path):
    result = subprocess.run([sys.executable, "-m", "chitu", "models=qwen3-8b", "infer.max_reqs=3", "--help"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "usage: python -m chitu [key=value ...]"
    config = compose_config(["models=Qwen3-8B", "infer.max_reqs=3"])
    for key, meaning in KEY_HELP.items():
        index = next(i for i, line in enumerate(lines) if line.startswith(f"  {key} = "))
        assert lines[index + 1] == f"      {meaning}"
    assert "  models.name = Qwen3-8B" in lines and "  infer.max_reqs = 3" in lines
    assert f"  infer.max_seq_len = {config.infer.max_seq_len}" in lines and "  models.ckpt_dir = null" in lines
