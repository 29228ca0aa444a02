"""One rank's share of the engine: its model slice, KV cache and runner, and the loop by which
ranks other than the driver follow the driver's step plans.

Every rank runs the same program (SPMD, as torchrun starts it). The driver (rank 0) schedules and
hands each plan to its stage's tensor ranks (a broadcast) and to the next stage (point to point);
each stage passes plan and activations on to the next, and the sampling rank (tensor rank 0 of the
last stage) sends the sampled tokens back to the driver.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from chitu.config.schema import ChituConfig, ConfigError
from chitu.distributed.comm import Mailbox, all_reduce_min, broadcast_in_stage
from chitu.distributed.parallel_state import ParallelState, destroy_parallel, init_parallel
from chitu.engine.kv_cache import blocks_for
from chitu.layers.kv_cache_spec import kv_cache_layers
from chitu.models.loader import load_configured_model
from chitu.platform import memory_budget, resolve_attention_backend, resolve_cuda_graph, resolve_device
from chitu.runner.cuda_graph import capturable
from chitu.runner.model_runner import ModelRunner, PendingSamples, SamplingFailed
from chitu.runner.step_plan import PlanKind, StepPlan

logger = logging.getLogger(__name__)


class Worker:
    """Builds this rank's part of the model (or takes a ready `model`: random-weight benchmarks)."""

    def __init__(self, config: ChituConfig, model: nn.Module | None = None):
        self.config = config
        torch.manual_seed(config.infer.seed)
        self.device = resolve_device(config)
        self.parallel: ParallelState = init_parallel(config, self.device)
        attention_backend = resolve_attention_backend(config, self.device)
        self.model = model if model is not None else load_configured_model(config, self.device)
        for layer in kv_cache_layers(self.model):
            layer.backend = attention_backend
        infer = config.infer
        self.mailbox = Mailbox()
        self.runner = ModelRunner(self.model, self.device, infer.block_size, infer.max_reqs, infer.max_seq_len,
                                  resolve_cuda_graph(config, self.device, capturable(self.model)), self.mailbox)
        self.num_blocks = all_reduce_min(self._affordable_kv_blocks())
        if infer.num_blocks == -1:
            self._check_kv_capacity()
        self.runner.allocate_kv_cache(self.num_blocks)
        self.runner.warm_up()
        logger.info("KV cache: %d blocks of %d tokens; attention: %s; CUDA graphs: %s",
                    self.num_blocks, infer.block_size, attention_backend, self.runner.use_cuda_graph)

    def _affordable_kv_blocks(self) -> int:
        infer = self.config.infer
        wanted = blocks_for(infer.max_reqs * infer.max_seq_len, infer.block_size)
        if infer.num_blocks > 0:
            return infer.num_blocks
        budget = memory_budget(self.device, infer.memory_utilization)
        if self.device.type == "cuda":
            budget -= self.runner.profile_activation_bytes(min(infer.prefill_chunk_size or infer.max_seq_len, infer.max_seq_len))
        return min(wanted, max(budget, 0) // self.runner.kv_block_bytes())

    def _check_kv_capacity(self) -> None:
        infer = self.config.infer
        needed = blocks_for(infer.max_seq_len, infer.block_size)
        if self.num_blocks < needed:
            block_gib = self.runner.kv_block_bytes() / 2**30
            raise ConfigError(
                f"the KV cache for one request of infer.max_seq_len={infer.max_seq_len} tokens needs {needed} blocks "
                f"({needed * block_gib:.2f} GiB per rank) but only {self.num_blocks} fit in the memory left after "
                f"the weights (on the fullest rank): lower infer.max_seq_len or raise infer.memory_utilization")

    # The driver's side.

    def submit(self, plan: StepPlan, previous: PendingSamples | None = None) -> PendingSamples | None:
        """Start a plan on every rank; returns its samples when this rank takes them (pipeline size 1)."""
        broadcast_in_stage(plan)
        return self.execute(plan, previous)

    # Every rank.

    def execute(self, plan: StepPlan, previous: PendingSamples | None = None) -> PendingSamples | None:
        state = self.parallel
        if not state.is_last_stage:
            self.mailbox.send_object(plan, state.stage_peer(state.pp_rank + 1))
        if plan.kind is not PlanKind.STEP:
            return None
        if state.is_driver:
            return self.runner.execute(plan, previous)
        try:
            pending = self.runner.execute(plan, previous)
            if pending is not None:
                self.mailbox.send_object(self.runner.collect(pending), 0)
        except SamplingFailed as e:  # the driver fails this step's requests and goes on
            logger.error("rank %d: %s", state.rank, e, exc_info=e.__cause__)
            if plan.sampling_rows:
                self.mailbox.send_object(SamplingFailed(str(e)), 0)
        return None

    # The other ranks.

    def receive_plan(self) -> StepPlan:
        state = self.parallel
        if state.is_first_stage:
            return broadcast_in_stage(None)
        return self.mailbox.recv_object(state.stage_peer(state.pp_rank - 1))

    def follow_driver(self) -> None:
        """Run the driver's plans until it shuts down (ranks other than 0)."""
        logger.info("rank %d: following the driver's step plans", self.parallel.rank)
        while True:
            plan = self.receive_plan()
            self.execute(plan)
            if plan.kind is PlanKind.SHUTDOWN:
                break
        self.close()

    def close(self) -> None:
        self.mailbox.flush()
        destroy_parallel()
