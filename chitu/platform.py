"""Which device Chitu runs on and in which dtype; a clear error for platforms not built here."""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import torch

from chitu.build_switches import platform_switches_on
from chitu.config.schema import ChituConfig, ConfigError

logger = logging.getLogger(__name__)

SYSFS_CPUS = Path("/sys/devices/system/cpu")
SYSFS_NODES = Path("/sys/devices/system/node")


def check_platform_builds() -> None:
    for variable, platform in platform_switches_on():
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


def parse_cpulist(text: str) -> set[int]:
    """The CPUs of a sysfs cpulist ("0-3,8,10-11"; empty for none)."""
    cpus = set()
    for part in filter(None, text.strip().split(",")):
        first, _, last = part.partition("-")
        cpus.update(range(int(first), int(last or first) + 1))
    return cpus


def numa_nodes(root: Path = SYSFS_NODES) -> list[set[int]]:
    """The CPUs of each NUMA node that has any, in node order; [] without readable topology."""
    nodes = sorted((p for p in root.glob("node[0-9]*") if p.name[4:].isdigit()), key=lambda p: int(p.name[4:]))
    try:
        cpus = [parse_cpulist((node / "cpulist").read_text()) for node in nodes]
    except OSError:
        return []
    return [c for c in cpus if c]


def numa_binding(local_rank: int, local_ranks: int, nodes: list[set[int]], allowed: set[int]) -> tuple[set[int], int]:
    """(CPUs, local ranks sharing them) for infer.bind_process_to_cpu=numa: local rank r takes node r mod the
    nodes, as far as this process may run there (all it may, if none of that node)."""
    node = local_rank % len(nodes)
    sharing = local_ranks // len(nodes) + (node < local_ranks % len(nodes))
    cpus = nodes[node] & allowed
    return (cpus, sharing) if cpus else (allowed, local_ranks)


def configure_cpu(config: ChituConfig, device: torch.device) -> None:
    """Bind this process to CPUs as infer.bind_process_to_cpu says; then, where the CPU computes (device=cpu, or
    experts in host memory with cpu_layer_num), set torch's threads to infer.num_threads, or by default to the
    physical cores (logical CPUs with infer.bind_thread_to_cpu=logical_core) it may run on, shared among the ranks
    of this node that share them (torchrun's LOCAL_RANK / LOCAL_WORLD_SIZE), at least 1."""
    local_rank, local_ranks = int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    nodes = numa_nodes()
    binding = config.infer.bind_process_to_cpu
    if binding == "numa" or (binding == "auto" and len(nodes) > 1 and local_ranks > 1):
        if not nodes:
            raise ConfigError("infer.bind_process_to_cpu=numa, but this machine shows no NUMA topology "
                              f"({SYSFS_NODES}): use auto or none")
        cpus, local_ranks = numa_binding(local_rank, local_ranks, nodes, os.sched_getaffinity(0))
        os.sched_setaffinity(0, cpus)  # memory is then allocated on that node as it is first touched
        logger.info("bound to %d CPUs (NUMA node %d of %d)", len(cpus), local_rank % len(nodes), len(nodes))
    if device.type != "cpu" and not config.cpu_layer_num:
        return
    threads = config.infer.num_threads
    if threads is not None:
        reason = "infer.num_threads"
    else:
        allowed = os.sched_getaffinity(0)
        logical = config.infer.bind_thread_to_cpu == "logical_core"
        cores = len(allowed) if logical else physical_cores(allowed)
        threads = max(1, cores // local_ranks)
        reason = (f"{cores} {'logical CPU' if logical else 'physical core'}(s) available / {local_ranks} local "
                  f"rank(s); infer.num_threads to change")
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
        raise ConfigError("infer.use_cuda_graph=True: this model's MoE layers run the torch reference, which waits "
                          "for the host every step and cannot be captured: use auto or False")
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
