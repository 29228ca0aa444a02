"""Build the model for a checkpoint and fill it, one tensor at a time, straight on its device; or
build it as a preprocessed checkpoint's files were made and read this rank's file."""
from __future__ import annotations

import logging
import math
import os

import torch
from torch import nn
from tqdm import tqdm
from transformers import AutoConfig

from chitu.checkpoint import CheckpointError, CheckpointReader, open_checkpoint
from chitu.checkpoint.gguf import GGUFCheckpointReader
from chitu.checkpoint.preprocessed import LAYOUT_FILE, Layout, load_rank
from chitu.config.schema import ChituConfig, ConfigError
from chitu.distributed.parallel_state import parallel_state
from chitu.layers.loadable import LoadsWeights, ProcessesWeights
from chitu.layers.moe.sparse_moe import SparseMoE
from chitu.models.registry import architecture_of, build_model
from chitu.platform import memory_budget, resolve_dtype
from chitu.quant.config import UnsupportedQuantizationError

logger = logging.getLogger(__name__)


def load_configured_model(config: ChituConfig, device: torch.device, gguf_blocks_by_default: bool = True) -> nn.Module:
    """This rank's model as `config` asks: read from the checkpoint (quantized as it loads with
    quant_on_load=True), or from a preprocessed checkpoint — models.ckpt_dir with skip_preprocess=True,
    or quant_ckpt_dir. On the CPU a GGUF file keeps its blocks unless quant=none (or not gguf_blocks_by_default)."""
    dtype = resolve_dtype(config)
    if config.debug.skip_model_load:
        return random_model(config, device, dtype)
    if config.quant_ckpt_dir:
        return load_preprocessed_model(config.quant_ckpt_dir, config, device, dtype)
    checkpoint = config.models.checkpoint_path()
    if config.skip_preprocess:
        return load_preprocessed_model(checkpoint, config, device, dtype)
    if os.path.isfile(os.path.join(checkpoint, LAYOUT_FILE)):
        raise CheckpointError(f"{checkpoint} is a preprocessed checkpoint (it holds {LAYOUT_FILE}): "
                              f"read it with skip_preprocess=True")
    with open_checkpoint(checkpoint) as reader:
        # by default on the CPU only, until the CUDA kernels have been measured against dequantized bf16
        keeps_blocks = config.quant == "gguf" or (gguf_blocks_by_default and config.quant is None
                                                  and device.type == "cpu" and isinstance(reader, GGUFCheckpointReader))
        return load_model(reader, config.models.type, config.infer.max_seq_len, device, dtype, config.infer.mla_absorb,
                          config.infer.raise_lower_bit_float_to, config.quant if config.quant_on_load else None,
                          gguf_blocks=keeps_blocks, cpu_layer_num=config.cpu_layer_num or 0)


def random_model(config: ChituConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """debug.skip_model_load: the checkpoint's model with random weights (seeded by infer.seed), for runs without
    its weight files: a checkpoint directory needs only its config.json, a GGUF file is read for its metadata."""
    if config.quant not in (None, "none") or config.quant_ckpt_dir or config.skip_preprocess:
        raise ConfigError("debug.skip_model_load=True makes random weights in the compute dtype: drop quant, "
                          "quant_ckpt_dir and skip_preprocess")
    checkpoint = config.models.checkpoint_path()
    if os.path.isdir(checkpoint):
        hf_config = AutoConfig.from_pretrained(checkpoint)
    else:
        with open_checkpoint(checkpoint) as reader:
            hf_config = reader.hf_config()
    with torch.device(device):
        model = build_model(hf_config, config.models.type, config.infer.max_seq_len, dtype, config.infer.mla_absorb,
                            config.infer.raise_lower_bit_float_to)
    generator = torch.Generator(device).manual_seed(config.infer.seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.dim() > 1 and tensor.is_floating_point():  # matrices; norms keep their ones
                tensor.copy_(torch.empty(tensor.shape, device=device).normal_(0, 0.02, generator=generator))
    _after_loading(model)
    logger.info("debug.skip_model_load: random weights for %s (%s) on %s", checkpoint, dtype, device)
    return model.eval()


def load_preprocessed_model(directory: str, config: ChituConfig, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Build the model the files were made from, bring it to its loaded form (the after-loading steps
    over zeroed weights: folding and quantizing change which tensors a layer holds), then read them."""
    layout = Layout.read(directory)
    layout.check_run(Layout.of(config, dtype, None if config.quant == "none" else config.quant), directory)
    _check_quantized_device(layout.quant, device)
    with torch.device(device):
        model = build_model(AutoConfig.from_pretrained(directory), layout.model_type, config.infer.max_seq_len, dtype,
                            layout.mla_absorb, layout.raise_lower_bit_float_to, layout.quant)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.zero_()
    _after_loading(model)
    load_rank(model, directory, parallel_state().rank, device)
    logger.info("loaded rank %d of the preprocessed checkpoint %s", parallel_state().rank, directory)
    return model.eval()


def _check_host_experts_fit(model: nn.Module, reader: CheckpointReader, cpu_layer_num: int,
                            dtype: torch.dtype | None) -> None:
    """Refuse, before reading them, host-memory experts (cpu_layer_num) that the free host memory cannot hold. They
    take their stored bytes (GGUF blocks kept, dtype None) or their values in `dtype`."""
    blocks = [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE) and m.on_host]
    needed = 0
    for name, block in blocks:
        placement = block.experts.placement
        for expert in range(placement.experts.start, placement.experts.end):
            # this rank's share of each projection: its intermediate columns (gate/up rows, down columns)
            for projection, intermediate_dim in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
                tensor = f"{name}.experts.{expert}.{projection}.weight"
                shape = reader.shape(tensor)
                whole = reader.stored_bytes(tensor) if dtype is None else math.prod(shape) * dtype.itemsize
                needed += whole * placement.columns.length // shape[intermediate_dim]
    available = memory_budget(torch.device("cpu"), 1.0)
    if needed > available:
        raise ConfigError(f"cpu_layer_num={cpu_layer_num}: the routed experts of those MoE layers need "
                          f"{needed / 2**30:.1f} GiB of host memory, {available / 2**30:.1f} GiB is free; "
                          f"lower cpu_layer_num")
    if blocks:
        logger.info("cpu_layer_num=%d: %.2f GiB of routed experts in host memory", cpu_layer_num, needed / 2**30)


def _check_quantized_device(quant: str | None, device: torch.device) -> None:
    if quant and device.type not in ("cpu", "cuda"):
        raise UnsupportedQuantizationError(f"quant={quant} has kernels for CPUs and CUDA GPUs, not for "
                                           f"device={device.type}")


def _after_loading(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, ProcessesWeights):
            module.after_loading()


def load_model(reader: CheckpointReader, model_type: str, max_positions: int,
               device: torch.device, dtype: torch.dtype, mla_absorb: str = "none",
               raise_lower_bit_float_to: str = "float8_e4m3fn", quantize_on_load: str | None = None,
               gguf_blocks: bool = False, cpu_layer_num: int = 0) -> nn.Module:
    """gguf_blocks (quant=gguf): keep a GGUF file's blocks, multiplied where they are (quant/gguf_blocks.py);
    cpu_layer_num: the routed experts of the last that many MoE layers in host memory (layers/moe/host_experts.py)."""
    _check_quantized_device(quantize_on_load or ("gguf" if gguf_blocks else None), device)
    if gguf_blocks and not isinstance(reader, GGUFCheckpointReader):
        raise UnsupportedQuantizationError(f"quant=gguf keeps the blocks of a GGUF file, but {reader.path} is not one: "
                                           f"drop quant=gguf for it")
    config = reader.hf_config()
    with torch.device(device):
        model = build_model(config, model_type, max_positions, dtype, mla_absorb, raise_lower_bit_float_to,
                            quantize_on_load, gguf_blocks, cpu_layer_num)
    reader.use_renames(architecture_of(config)[1].hf_renames)
    _check_host_experts_fit(model, reader, cpu_layer_num, dtype if not gguf_blocks else None)
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, LoadsWeights)]
    for name, module in tqdm(modules, desc=f"Loading {reader.path}", unit="module", mininterval=1.0):
        module.load_weights(reader, name)
    _after_loading(model)
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("loaded %.1fM parameters as %s on %s", num_params / 1e6, dtype, device)
    return model.eval()
