"""Data-parallel training across processes (``torchrun``): the process group, and every collective the training
loop needs, in one object (``Distributed``) that is a no-op in one process.

Under ``torchrun --nproc_per_node N`` each of the N ranks trains the same SAE on its own ``1/N`` of every global
batch (``buffer.batch_size`` stays the global batch) and its own part of the data; gradients are averaged after
``backward`` (``average_``), the loss's batch statistics are reduced (``Ranks.sum``/``min``: FVU's and AuxK's
normalisers, the running thresholds), the dead-latent counters are combined, and anything a rank computes from
its own rows alone (initialisation, scheduled events) is broadcast from rank 0. Every rank then holds the same
weights and optimiser state after every step; rank 0 alone writes files. This is DistributedDataParallel's
recipe (all-reduce the mean gradient, PyTorch ``torch.nn.parallel.DistributedDataParallel``) written out for an
SAE, whose few parameters need one flat all-reduce a step and no bucketing.

Without ``WORLD_SIZE`` > 1 in the environment nothing is initialised and every method returns at once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from dictlearn.activations.harvest import Part
from dictlearn.errors import UserError
from dictlearn.sae.base import Ranks

T = TypeVar("T")

PATIENT_TIMEOUT = timedelta(days=7)


class Distributed(Ranks):
    """Rank ``rank`` of ``world_size`` processes; collectives run on ``device`` (the rank's GPU under NCCL, the
    CPU under gloo). ``Distributed()`` is one process: every method is then the identity or does nothing."""

    def __init__(self, rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu") -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = torch.device(device)
        self.patient = None

    @classmethod
    def from_env(cls, device: str = "auto") -> Distributed:
        """Join the process group ``torchrun`` describes (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``,
        ``MASTER_ADDR``/``PORT``) with NCCL when ``device`` ('auto' or a ``model.device``) means a GPU and there
        is one, else gloo; each GPU rank takes ``cuda:LOCAL_RANK``, so 'cuda' and 'auto' then mean the rank's own
        GPU. One process (no ``WORLD_SIZE`` > 1) initialises nothing."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size <= 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        on_gpu = device != "cpu" and torch.cuda.is_available()
        if on_gpu and device not in ("auto", "cuda"):
            raise UserError(
                f"model.device: {device!r} under torchrun; use 'auto' or 'cuda' (each rank takes cuda:LOCAL_RANK)"
            )
        if on_gpu:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if on_gpu else "gloo", rank=rank, world_size=world_size)
        distributed = cls(rank, world_size, torch.device("cuda", local_rank) if on_gpu else "cpu")
        # For ``wait_for_all``: a rank done with its runs may wait hours for the others, far past the default
        # collective timeout (10 to 30 minutes); a gloo group with a long one lets it.
        distributed.patient = dist.new_group(backend="gloo", timeout=PATIENT_TIMEOUT)
        return distributed

    @property
    def is_first(self) -> bool:
        """Rank 0: the one that writes files and prints."""
        return self.rank == 0

    @property
    def part(self) -> Part:
        """The part of the data this rank reads (``training_buffers``)."""
        return Part(self.rank, self.world_size)

    def close(self) -> None:
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # --- reductions (the ``Ranks`` a loss sees, and the trainer's own) ---

    def _reduced(self, tensor: Tensor, op) -> Tensor:
        if self.world_size == 1:
            return tensor
        reduced = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(reduced, op=op)
        return reduced.to(tensor.device)

    def sum(self, tensor: Tensor) -> Tensor:
        return self._reduced(tensor, dist.ReduceOp.SUM)

    def min(self, tensor: Tensor) -> Tensor:
        return self._reduced(tensor, dist.ReduceOp.MIN)

    def max(self, tensor: Tensor) -> Tensor:
        return self._reduced(tensor, dist.ReduceOp.MAX)

    @torch.no_grad()
    def average_(self, tensors: Iterable[Tensor]) -> None:
        """Replace each tensor by its mean over the ranks, in place, with one all-reduce of them all flattened
        (the gradients after ``backward``; the loss terms for the metrics). Every rank must pass tensors of the
        same shapes in the same order. Gloo and NCCL leave the same sum on every rank, so the results are
        bitwise equal across ranks."""
        if self.world_size == 1:
            return
        tensors = list(tensors)
        if not tensors:
            return
        flat = torch.cat([t.reshape(-1).to(self.device, tensors[0].dtype) for t in tensors])
        dist.all_reduce(flat)
        flat /= self.world_size
        for tensor, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
            tensor.copy_(part.view_as(tensor))

    def every_rank_has(self, batch: Tensor | None, rows: int) -> bool:
        """True when every rank holds a full batch of ``rows`` (one process: when ``batch`` is not None). The
        ranks' data parts end at different steps; training stops at the first rank's end, so every step's batch
        is the same size on every rank (a short last batch is dropped) and the mean gradients average exactly."""
        if self.world_size == 1:
            return batch is not None
        held = 0 if batch is None else len(batch)
        return int(self.min(torch.tensor([held], device=self.device))) >= rows

    def any(self, flag: bool) -> bool:
        """True when ``flag`` is True on some rank."""
        if self.world_size == 1:
            return flag
        return bool(self.max(torch.tensor([int(flag)], device=self.device)))

    # --- making ranks equal, and bringing their state together ---

    @torch.no_grad()
    def broadcast_(self, tensors: Iterable[Tensor]) -> None:
        """Overwrite each tensor with rank 0's, in place."""
        if self.world_size == 1:
            return
        for tensor in tensors:
            if tensor.device == self.device:
                dist.broadcast(tensor, src=0)
            else:
                staged = tensor.to(self.device)
                dist.broadcast(staged, src=0)
                tensor.copy_(staged)

    def broadcast_state_(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Give every rank rank 0's parameters, buffers and (with ``optimizer``) optimiser state: after a step only
        rank 0's data decided (initialisation from a sample, a resampling event)."""
        tensors = [*module.parameters(), *module.buffers()]
        if optimizer is not None:
            for parameter in module.parameters():
                state = optimizer.state.get(parameter, {})
                tensors += [state[key] for key in sorted(state) if isinstance(state[key], Tensor)]
        self.broadcast_(tensors)

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object), on every rank."""
        if self.world_size == 1:
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def gather(self, value: Any) -> list[Any] | None:
        """Every rank's ``value`` in rank order on rank 0 (None on the others): the buffers' states for a
        checkpoint."""
        if self.world_size == 1:
            return [value]
        gathered = [None] * self.world_size if self.is_first else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def on_first(self, action: Callable[[], T]) -> T:
        """``action()`` run on rank 0 alone (taking locks, claiming or clearing output folders) while the others
        wait; its result (picklable) is returned on every rank, and a ``UserError`` it raises is raised on every
        rank, so no rank is left waiting for one that has stopped."""
        result, error = None, None
        if self.is_first:
            try:
                result = action()
            except UserError as err:
                error = str(err)
        result, error = self.broadcast_object((result, error))
        if error is not None:
            raise UserError(error)
        return result

    def wait_for_all(self) -> None:
        """Wait until every rank gets here, however long the slowest takes (``train.distribute`` 'modules': the
        ranks train different runs, and rank 0's summary reads every run's results)."""
        if self.world_size > 1:
            dist.barrier(group=self.patient)
