"""Build the model for a checkpoint and fill it, one tensor at a time, straight on its device."""
from __future__ import annotations

import logging

import torch
from torch import nn
from tqdm import tqdm

from chitu.checkpoint import CheckpointReader
from chitu.layers.loadable import LoadsWeights, ProcessesWeights
from chitu.models.registry import architecture_of, build_model
from chitu.quant.config import UnsupportedQuantizationError

logger = logging.getLogger(__name__)


def load_model(reader: CheckpointReader, model_type: str, max_positions: int,
               device: torch.device, dtype: torch.dtype, mla_absorb: str = "none",
               raise_lower_bit_float_to: str = "float8_e4m3fn", quantize_on_load: str | None = None) -> nn.Module:
    if quantize_on_load and device.type != "cpu":
        raise UnsupportedQuantizationError(f"quant={quantize_on_load} runs on the CPU only for now "
                                           f"(device={device.type}: its GPU kernels are not built yet)")
    config = reader.hf_config()
    with torch.device(device):
        model = build_model(config, model_type, max_positions, dtype, mla_absorb, raise_lower_bit_float_to,
                            quantize_on_load)
    reader.use_renames(architecture_of(config)[1].hf_renames)
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, LoadsWeights)]
    for name, module in tqdm(modules, desc=f"Loading {reader.path}", unit="module", mininterval=1.0):
        module.load_weights(reader, name)
    for module in model.modules():
        if isinstance(module, ProcessesWeights):
            module.after_loading()
    num_params = sum(p.numel() for p in model.parameters())
    logger.info("loaded %.1fM parameters as %s on %s", num_params / 1e6, dtype, device)
    return model.eval()
