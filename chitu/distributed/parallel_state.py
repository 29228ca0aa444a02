"""Which rank this process is, and the process groups of tensor and pipeline parallelism.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; plain `python` is a world of
one. Ranks are laid out stage-major: global rank = pp_rank * tp_size + tp_rank, so a tensor-parallel
group is tp_size consecutive ranks (one node's GPUs when tp_size <= gpus per node) and pipeline
stages follow one another across nodes.

Two timeouts: joining the world and creating the groups (gloo connects every pair of ranks, slow on a
loaded machine) waits up to infer.dist_init_timeout_s; once the groups exist, their collectives wait
up to infer.comm_timeout_s for another rank (comm.py bounds point-to-point waits with it too).
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from chitu.config.schema import ChituConfig, ConfigError
from chitu.platform import configure_cpu

logger = logging.getLogger(__name__)


@dataclass
class ParallelState:
    tp_size: int = 1
    pp_size: int = 1
    rank: int = 0
    ep_size: int = 1  # expert groups among a stage's tensor ranks (expert_placement.py)
    pp_layer_partition: list[int] | None = None
    timeout_s: float = 300.0       # infer.comm_timeout_s: waits for another rank while serving
    init_timeout_s: float = 900.0  # infer.dist_init_timeout_s: waits for ranks that are still starting
    # Groups exist only when world_size > 1. `cpu_group` (gloo) carries step plans and sampled tokens;
    # `tp_group` and the world (NCCL on CUDA, gloo on CPU) carry tensors.
    tp_group: dist.ProcessGroup | None = field(default=None, repr=False)
    tp_cpu_group: dist.ProcessGroup | None = field(default=None, repr=False)
    cpu_group: dist.ProcessGroup | None = field(default=None, repr=False)

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def moe_tp_size(self) -> int:
        """Ranks that split each expert's columns: a stage's tensor ranks per expert group."""
        return self.tp_size // self.ep_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def is_driver(self) -> bool:
        """Rank 0 schedules, tokenizes and serves; every other rank follows its step plans."""
        return self.rank == 0

    @property
    def sampler_rank(self) -> int:
        """The rank that samples: tensor rank 0 of the last stage."""
        return (self.pp_size - 1) * self.tp_size

    @property
    def is_sampler(self) -> bool:
        return self.rank == self.sampler_rank

    def stage_peer(self, pp_rank: int) -> int:
        """The rank with this rank's tensor-parallel index in stage `pp_rank`."""
        return pp_rank * self.tp_size + self.tp_rank

    @property
    def tp_ranks(self) -> list[int]:
        first = self.pp_rank * self.tp_size
        return list(range(first, first + self.tp_size))


_state = ParallelState()


def parallel_state() -> ParallelState:
    return _state


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_world_size(config: ChituConfig) -> None:
    """tp_size x pp_size must be the number of processes, and ep_size must divide tp_size; checked before
    any weight is read."""
    infer, world = config.infer, world_size_from_env()
    if infer.tp_size % infer.ep_size:
        raise ConfigError(
            f"infer.ep_size={infer.ep_size} must divide infer.tp_size={infer.tp_size}: experts are spread over the "
            f"tensor ranks of one pipeline stage (world size {world} = tp_size x pp_size)")
    if infer.tp_size * infer.pp_size != world:
        raise ConfigError(
            f"infer.tp_size={infer.tp_size} x infer.pp_size={infer.pp_size} = {infer.tp_size * infer.pp_size} "
            f"but {world} process(es) were started: launch with torchrun --nnodes N --nproc_per_node G "
            f"so that N x G = {infer.tp_size * infer.pp_size}")


def init_parallel(config: ChituConfig, device: torch.device) -> ParallelState:
    """Bind this process's CPUs and set its threads, join the torchrun world (a no-op for a world of one) and build the groups."""
    global _state
    check_world_size(config)
    configure_cpu(config, device)
    infer = config.infer
    state = ParallelState(infer.tp_size, infer.pp_size, int(os.environ.get("RANK", "0")), infer.ep_size,
                          infer.pp_layer_partition, infer.comm_timeout_s, infer.dist_init_timeout_s)
    if device.type == "cuda":
        torch.cuda.set_device(device)  # CUDA graphs and NCCL work on the current device
    if state.world_size > 1:
        _build_groups(state, device)
    _state = state
    return state


def _build_groups(state: ParallelState, device: torch.device) -> None:
    timeout = timedelta(seconds=state.init_timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timeout, device_id=device if device.type == "cuda" else None)
    state.cpu_group = dist.new_group(backend="gloo", timeout=timeout) if backend == "nccl" else dist.group.WORLD
    # new_group is collective: every rank creates every stage's group, in the same order.
    for pp_rank in range(state.pp_size):
        ranks = list(range(pp_rank * state.tp_size, (pp_rank + 1) * state.tp_size))
        group = dist.new_group(ranks, timeout=timeout)
        cpu_group = dist.new_group(ranks, backend="gloo", timeout=timeout) if backend == "nccl" else group
        if pp_rank == state.pp_rank:
            state.tp_group, state.tp_cpu_group = group, cpu_group
    # From now on, waits are for ranks that are up: comm_timeout_s (sets gloo's collectives and NCCL's watchdog).
    for group in {dist.group.WORLD, state.cpu_group, state.tp_group, state.tp_cpu_group}:
        group.set_timeout(timedelta(seconds=state.timeout_s))
    logger.info("rank %d of %d: tensor rank %d of %d, pipeline stage %d of %d (%s)", state.rank, state.world_size,
                state.tp_rank, state.tp_size, state.pp_rank, state.pp_size, backend)


def destroy_parallel() -> None:
    global _state
    if dist.is_initialized():
        dist.destroy_process_group()
    _state = ParallelState()
