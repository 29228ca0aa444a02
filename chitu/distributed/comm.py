"""What ranks send each other: tensor-parallel reductions, and point-to-point messages between
pipeline stages (pickled objects over gloo, activations over the device group).

Every wait for a rank that is serving is bounded by infer.comm_timeout_s (the groups' timeout, and
explicitly for point-to-point messages over gloo, which keep the timeout they were created with);
a failed or timed-out exchange raises CommError naming the peer, and the caller shuts the rank down.
Start-up exchanges (all_reduce_min) wait for slower ranks up to infer.dist_init_timeout_s.
"""
from __future__ import annotations

import contextlib
import pickle
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from chitu.distributed.parallel_state import parallel_state


# torch 2.13 renamed all_gather_into_tensor (same arguments); older releases only have the old name.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class CommError(RuntimeError):
    """Another rank cannot be reached: it failed, was killed, or did not answer within the timeout."""


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum `x` over the tensor-parallel group, in place."""
    state = parallel_state()
    if state.tp_size > 1:
        dist.all_reduce(x, group=state.tp_group)
    return x


def tp_all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate each tensor rank's `x` [rows, cols] along the last dimension: [rows, tp_size * cols]."""
    state = parallel_state()
    if state.tp_size == 1:
        return x
    rows, cols = x.shape
    gathered = torch.empty((state.tp_size * rows, cols), dtype=x.dtype, device=x.device)
    _all_gather_single(gathered, x.contiguous(), group=state.tp_group)
    return gathered.view(state.tp_size, rows, cols).permute(1, 0, 2).reshape(rows, state.tp_size * cols)


class Mailbox:
    """Point-to-point messages of this rank. Sends do not block: each is kept until it has completed."""

    def __init__(self) -> None:
        self._pending: list[tuple[dist.Work, torch.Tensor, int]] = []  # (work, its tensor, destination)

    def send_object(self, obj: Any, dst: int) -> None:
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64)
        group = parallel_state().cpu_group
        self._isend([size, payload], dst, group)

    def recv_object(self, src: int) -> Any:
        group = parallel_state().cpu_group
        size = torch.empty(1, dtype=torch.int64)
        self._recv(size, src, group)
        payload = torch.empty(int(size), dtype=torch.uint8)
        self._recv(payload, src, group)
        return pickle.loads(payload.numpy().tobytes())

    def send_tensors(self, tensors: list[torch.Tensor], dst: int) -> None:
        self._isend([t.contiguous() for t in tensors], dst, None)

    def recv_tensors(self, like: list[tuple[tuple[int, ...], torch.dtype]], src: int,
                     device: torch.device) -> list[torch.Tensor]:
        tensors = [torch.empty(shape, dtype=dtype, device=device) for shape, dtype in like]
        for t in tensors:
            self._recv(t, src, None)
        return tensors

    def flush(self) -> None:
        """Wait for every send to complete."""
        pending, self._pending = self._pending, []
        for work, tensor, dst in pending:
            try:
                _wait(work, tensor)
            except RuntimeError as e:
                raise _error("sending to", dst, e) from e

    def _isend(self, tensors: list[torch.Tensor], dst: int, group: dist.ProcessGroup | None) -> None:
        self._pending = [p for p in self._pending if not p[0].is_completed()]
        for t in tensors:
            try:
                self._pending.append((dist.isend(t, dst, group=group), t, dst))
            except RuntimeError as e:
                raise _error("sending to", dst, e) from e

    def _recv(self, tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None) -> None:
        try:
            _wait(dist.irecv(tensor, src, group=group), tensor)
        except RuntimeError as e:
            raise _error("receiving from", src, e) from e


def _wait(work: dist.Work, tensor: torch.Tensor) -> None:
    """Wait for a point-to-point exchange. Over gloo (CPU tensors) it is bounded here: gloo's send and recv
    keep the timeout their group was created with (infer.dist_init_timeout_s). NCCL's watchdog bounds the
    others, and waiting on them only orders the current stream."""
    if tensor.device.type == "cpu":
        work.wait(timedelta(seconds=parallel_state().timeout_s))
    else:
        work.wait()


def broadcast_in_stage(obj: Any) -> Any:
    """Hand `obj` from the stage's tensor rank 0 to the other tensor ranks of the stage."""
    state = parallel_state()
    if state.tp_size == 1:
        return obj
    holder = [obj]
    src = state.tp_ranks[0]
    try:
        dist.broadcast_object_list(holder, src=src, group=state.tp_cpu_group)
    except RuntimeError as e:
        if state.rank == src:
            others = ", ".join(map(str, state.tp_ranks[1:]))
            raise CommError(f"rank {src}: sending a step plan to ranks {others} failed (one may have exited or hung "
                            f"past infer.comm_timeout_s={state.timeout_s:g}): {e}") from e
        raise _error("receiving a step plan from", src, e) from e
    return holder[0]


def all_reduce_min(value: int) -> int:
    """The smallest `value` over all ranks, at start-up (e.g. the KV blocks every rank can hold, once each
    has loaded its weights): slower ranks are waited for up to infer.dist_init_timeout_s."""
    state = parallel_state()
    if state.world_size == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    with _timeout(state.cpu_group, state.init_timeout_s):
        try:
            dist.all_reduce(t, op=dist.ReduceOp.MIN, group=state.cpu_group)
        except RuntimeError as e:
            raise CommError(f"rank {state.rank}: the ranks did not all finish starting within "
                            f"infer.dist_init_timeout_s={state.init_timeout_s:g} (one may have failed): {e}") from e
    return int(t)


@contextlib.contextmanager
def _timeout(group: dist.ProcessGroup, seconds: float) -> Iterator[None]:
    """Collectives on `group` wait up to `seconds` meanwhile, then infer.comm_timeout_s again."""
    group.set_timeout(timedelta(seconds=seconds))
    try:
        yield
    finally:
        group.set_timeout(timedelta(seconds=parallel_state().timeout_s))


def _error(action: str, peer: int, cause: Exception) -> CommError:
    state = parallel_state()
    return CommError(f"rank {state.rank}: {action} rank {peer} failed (rank {peer} may have exited or hung "
                     f"past infer.comm_timeout_s={state.timeout_s:g}): {cause}")
