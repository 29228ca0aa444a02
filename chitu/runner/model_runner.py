"""Runs this rank's part of a step plan: builds the tensors, runs its model stage over the paged KV
cache (taking and passing activations between pipeline stages) and, on the sampling rank, samples."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, fields

import torch
from torch import nn

from chitu.distributed.comm import Mailbox
from chitu.distributed.parallel_state import parallel_state
from chitu.engine.kv_cache import blocks_for
from chitu.layers.kv_cache_spec import kv_cache_layers
from chitu.ops.attention_metadata import AttentionMetadata
from chitu.runner.block_tables import BlockTables
from chitu.runner.cuda_graph import DecodeGraphs
from chitu.runner.prefill_graphs import PrefillGraphs
from chitu.ops.device_copy import to_device
from chitu.runner.sampler import Sampler, SamplerOutput
from chitu.runner.sampling_state import SamplingTable
from chitu.runner.step_plan import StepPlan, StepResult


class ModelRunner:
    def __init__(self, model: nn.Module, device: torch.device, block_size: int, max_batch: int = 0,
                 max_seq_len: int = 0, use_cuda_graph: bool = False, mailbox: Mailbox | None = None):
        self.model = model
        self.device = device
        self.block_size = block_size
        self.parallel = parallel_state()
        self.mailbox = mailbox or Mailbox()
        self.max_batch, self.max_seq_len = max_batch, max_seq_len
        self.use_cuda_graph = use_cuda_graph
        self.sampler = Sampler()
        self.sampling = SamplingTable(device, model.config.vocab_size)
        self.graphs: DecodeGraphs | None = None
        self.prefill_graphs: PrefillGraphs | None = None
        self.block_tables: BlockTables | None = None
        self.cache_layers = kv_cache_layers(model)

    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes across this rank's caching layers, as their specs declare."""
        return sum(layer.kv_cache_spec().page_bytes(self.block_size) for layer in self.cache_layers)

    def _allocate_pages(self, num_blocks: int) -> None:
        for layer in self.cache_layers:
            layer.bind_kv_cache(layer.kv_cache_spec().allocate(num_blocks, self.block_size, self.device))

    def allocate_kv_cache(self, num_blocks: int) -> None:
        """Blocks 0..num_blocks-1 belong to the block manager; with CUDA graphs one more is the padding rows' scratch.
        The block tables get a row for each of max_batch requests holding blocks at once."""
        self._allocate_pages(num_blocks + (1 if self.use_cuda_graph else 0))
        self.block_tables = BlockTables(self.max_batch, blocks_for(self.max_seq_len, self.block_size), self.device,
                                        scratch_block=num_blocks if self.use_cuda_graph else None)
        if self.use_cuda_graph:
            self.graphs = DecodeGraphs(self.model, self.max_batch, self.block_tables, self.block_size, self.device)
            self.prefill_graphs = PrefillGraphs(self.model, self.max_seq_len, self.block_tables, self.block_size,
                                                self.device, pool=self.graphs.pool)

    @torch.inference_mode()
    def execute(self, plan: StepPlan, previous: PendingSamples | None = None) -> PendingSamples | None:
        """Enqueue this rank's part of the plan; the sampling rank returns the samples, on their way to
        the host. A plan whose input tokens are `previous`'s samples can start before those are read.
        Sampling comes after every collective of the step, so that a failure there (SamplingFailed)
        leaves the ranks in step."""
        token_ids = previous.on_device.token_ids if plan.tokens_from_previous else plan.token_ids
        try:
            self.block_tables.apply(plan.table_updates)
            if self.graphs is not None and not plan.is_prefill and self.graphs.bucket_for(len(plan.request_ids)):
                logits = self.graphs.run(token_ids, [n - 1 for n in plan.context_lens], plan.table_rows)
            elif self._takes_prefill_graph(plan):
                logits = self.prefill_graphs.run(token_ids, plan.context_lens[0], plan.table_rows[0])
            else:
                logits = self._run_eager(plan, token_ids)
        finally:  # the plan's new requests are the sampler's even when the step fails: they are retried
            if self.parallel.is_sampler:
                self._sampling_step(self.sampling.update, plan)
        if not self.parallel.is_sampler or not plan.sampling_rows:
            return None
        return self._sampling_step(self._sample, plan, logits)

    def _takes_prefill_graph(self, plan: StepPlan) -> bool:
        """A lone request's prefill step of few enough tokens for a prefill graph."""
        return (self.prefill_graphs is not None and plan.is_prefill and len(plan.request_ids) == 1
                and not plan.tokens_from_previous and self.prefill_graphs.bucket_for(plan.num_tokens) is not None)

    def _sample(self, plan: StepPlan, logits: torch.Tensor) -> PendingSamples:
        rows = plan.sampling_rows
        # Each row samples the token at position context_len (the one after those in the cache).
        batch = self.sampling.batch([plan.request_ids[i] for i in rows], [plan.context_lens[i] for i in rows])
        samples = self.sampler(logits, batch)
        self.sampling.record(batch, samples.token_ids)
        return PendingSamples.start_copy(samples)

    @staticmethod
    def _sampling_step(fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            raise SamplingFailed(f"sampling failed: {e}") from e

    def collect(self, pending: PendingSamples) -> StepResult:
        """Wait for a plan's samples to reach the host."""
        return pending.wait()

    def _run_eager(self, plan: StepPlan, token_ids: list[int] | torch.Tensor) -> torch.Tensor | None:
        """Logits of the sampling rows on the last stage; elsewhere None, the activations sent on."""
        state = self.parallel
        meta = self._metadata(plan)
        if not isinstance(token_ids, torch.Tensor):
            token_ids = to_device(token_ids, torch.int64, self.device)
        intermediate = None
        if not state.is_first_stage:
            intermediate = tuple(self.mailbox.recv_tensors(self.model.intermediate_spec(plan.num_tokens),
                                                           state.stage_peer(state.pp_rank - 1), self.device))
        out = self.model(token_ids, meta, intermediate)
        if not state.is_last_stage:
            self.mailbox.send_tensors(list(out), state.stage_peer(state.pp_rank + 1))
            return None
        if not plan.sampling_rows:  # a prefill chunk that ends no prompt: no logits on any rank
            return None
        last_rows = list(itertools.accumulate(plan.num_new_tokens))
        return self.model.compute_logits(out[to_device([last_rows[i] - 1 for i in plan.sampling_rows], torch.int64, self.device)])

    def _metadata(self, plan: StepPlan) -> AttentionMetadata:
        tables = self.block_tables.rows(plan.table_rows, blocks_for(max(plan.context_lens), self.block_size))
        return AttentionMetadata.build(plan.num_new_tokens, plan.context_lens, tables, self.block_size, self.device)

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One placeholder decode-sized step where no CUDA graph was captured, so that what a first request
        would otherwise wait for happens at startup: building the CPU kernels the model uses (tens of
        seconds on a fresh machine), compiling the Triton ones."""
        if self.graphs is None:
            self._placeholder_forward(1)

    def _placeholder_forward(self, num_tokens: int) -> None:
        """A prefill of `num_tokens` zero tokens into the first KV blocks (a request overwrites what it
        later reads), with stand-in activations on later pipeline stages: each stage runs on its own."""
        blocks = -(-num_tokens // self.block_size)
        meta = AttentionMetadata.build([num_tokens], [num_tokens], [list(range(blocks))], self.block_size, self.device)
        tokens = torch.zeros(num_tokens, dtype=torch.int64, device=self.device)
        intermediate = None
        if not self.parallel.is_first_stage:  # only their size matters here
            intermediate = tuple(torch.zeros(shape, dtype=dtype, device=self.device)
                                 for shape, dtype in self.model.intermediate_spec(num_tokens))
        out = self.model(tokens, meta, intermediate)
        if self.parallel.is_last_stage:
            self.model.compute_logits(out[-1:])

    @torch.inference_mode()
    def profile_activation_bytes(self, num_tokens: int) -> int:
        """Peak memory a prefill of `num_tokens` tokens needs beyond the weights (CUDA only)."""
        self._allocate_pages(-(-num_tokens // self.block_size))
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        self._placeholder_forward(num_tokens)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - before
        for layer in self.cache_layers:
            layer.bind_kv_cache(None)
        torch.cuda.empty_cache()
        return peak


class SamplingFailed(RuntimeError):
    """Sampling failed after the step's forward pass had completed on every rank: the ranks are still
    in step, and only the requests of this step are in doubt."""


@dataclass
class PendingSamples:
    """A step's samples: on the device (a next step may read its input tokens there) and being copied
    to the host, where they are ready once `copied` has completed."""

    on_device: SamplerOutput
    on_host: SamplerOutput
    copied: torch.cuda.Event | None

    @classmethod
    def start_copy(cls, samples: SamplerOutput) -> PendingSamples:
        if samples.token_ids.device.type != "cuda":
            return cls(samples, samples, None)
        on_device = (getattr(samples, f.name) for f in fields(samples))
        host = SamplerOutput(*(None if t is None else t.to("cpu", non_blocking=True) for t in on_device))
        copied = torch.cuda.Event()
        copied.record()
        return cls(samples, host, copied)

    def wait(self) -> StepResult:
        if self.copied is not None:
            self.copied.synchronize()

        def lists(t: torch.Tensor | None) -> list | None:
            return None if t is None else t.tolist()

        host = self.on_host
        return StepResult(host.token_ids.tolist(), lists(host.logprobs), lists(host.top_token_ids),
                          lists(host.top_logprobs))
