"""Which device Chitu runs on and in which dtype; a clear error for platforms not built here."""
from __future__ import annotations

import os

import torch

from chitu.config.schema import ChituConfig, ConfigError

PLATFORM_BUILDS = {"CHITU_ASCEND_BUILD": "Ascend NPU", "CHITU_HYGON_BUILD": "Hygon DCU", "CHITU_MUXI_BUILD": "MetaX (Muxi) GPU"}


def check_platform_builds() -> None:
    for variable, platform in PLATFORM_BUILDS.items():
        if os.environ.get(variable, "0") not in ("", "0"):
            raise ConfigError(f"{variable} is set, but {platform} support is not built into this Chitu")


def resolve_device(config: ChituConfig) -> torch.device:
    check_platform_builds()
    if config.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is visible to torch")
    if config.device == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_dtype(config: ChituConfig) -> torch.dtype:
    return getattr(torch, config.dtype or config.float_16bit_variant)


def available_memory(device: torch.device) -> int:
    """Bytes that could still be allocated on `device`."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
