"""Which device Chitu runs on and in which dtype; a clear error for platforms not built here."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from chitu.config.schema import ChituConfig, ConfigError

logger = logging.getLogger(__name__)

SYSFS_CPUS = Path("/sys/devices/system/cpu")
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


def physical_cores(cpus: set[int]) -> int:
    """How many physical cores `cpus` (logical CPU numbers) span: hyper-threads of one core count once.
    Without readable topology, every logical CPU counts as a core."""
    cores = set()
    for cpu in cpus:
        topology = SYSFS_CPUS / f"cpu{cpu}" / "topology"
        try:
            cores.add(((topology / "physical_package_id").read_text().strip(), (topology / "core_id").read_text().strip()))
        except OSError:
            return len(cpus)
    return len(cores)


def configure_cpu_threads(config: ChituConfig, device: torch.device) -> None:
    """On CPU, set torch's threads to infer.num_threads, or by default to the physical cores this process
    may run on shared among the ranks of this node (torchrun's LOCAL_WORLD_SIZE), at least 1."""
    if device.type != "cpu":
        return
    threads = config.infer.num_threads
    if threads is not None:
        reason = "infer.num_threads"
    else:
        cores, local_ranks = physical_cores(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        threads = max(1, cores // local_ranks)
        reason = f"{cores} physical core(s) available / {local_ranks} local rank(s); infer.num_threads to change"
    torch.set_num_threads(threads)
    logger.info("CPU threads: %d (%s)", threads, reason)


def memory_budget(device: torch.device, utilization: float) -> int:
    """Bytes still allowed on `device`: on CUDA `utilization` of the card minus what is in use,
    on CPU `utilization` of the memory available now."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total * utilization) - (total - free)
    return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * utilization)


def resolve_cuda_graph(config: ChituConfig, device: torch.device, capturable: bool = True) -> bool:
    """`capturable`: whether the model's decode step can be captured (runner/cuda_graph.py)."""
    setting = config.infer.use_cuda_graph
    if setting is True and device.type != "cuda":
        raise ConfigError("infer.use_cuda_graph=True needs a CUDA device")
    if setting is True and config.infer.pp_size > 1:
        raise ConfigError("infer.use_cuda_graph=True is not supported with infer.pp_size > 1 yet: use auto or False")
    if setting is True and not capturable:
        raise ConfigError("infer.use_cuda_graph=True: this model's MoE layers run the torch reference or hold their "
                          "experts on the host (cpu_layer_num), which waits for the host every step and cannot be "
                          "captured yet: use auto or False")
    return device.type == "cuda" and config.infer.pp_size == 1 and capturable if setting == "auto" else setting


def resolve_attention_backend(config: ChituConfig, device: torch.device) -> str:
    """'triton', 'cpu' (C++ decode attention, the reference for prefill) or 'ref' (plain torch); other
    backends name their missing pip extra."""
    attn_type = config.infer.attn_type
    if attn_type in OPTIONAL_BACKENDS:
        package, extra = OPTIONAL_BACKENDS[attn_type]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"infer.attn_type={attn_type} needs the optional dependency {package}: "
                              f"pip install --no-build-isolation '.[{extra}]'")
        raise ConfigError(f"infer.attn_type={attn_type}: this backend is not built into this Chitu yet")
    if attn_type == "npu":
        raise ConfigError("infer.attn_type=npu needs an Ascend build (CHITU_ASCEND_BUILD=1), not built here")
    if attn_type == "triton" and device.type != "cuda":
        raise ConfigError("infer.attn_type=triton needs a CUDA device; use auto or ref on CPU")
    if attn_type == "cpu" and device.type != "cpu":
        raise ConfigError("infer.attn_type=cpu runs on the CPU (device=cpu); use auto or triton on CUDA")
    if attn_type == "auto":
        return "triton" if device.type == "cuda" else "cpu"
    return attn_type


OPTIONAL_BACKENDS = {"flash_attn": ("flash_attn", "flash_attn"), "flash_infer": ("flashinfer", "flashinfer"),
                     "flash_mla": ("flash_mla", "flash_mla")}
