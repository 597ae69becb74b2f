"""The shuffled activation buffer: a fixed block of rows, refilled from a chunk source as it is read.

Like dictionary_learning's ``ActivationBuffer``, rows are served in random order and the buffer refills
once ``refill_fraction`` of it has been read, so batches mix many contexts while memory stays fixed at
``size`` rows (plus one source chunk), whatever the corpus length. Each row a source yields is served
exactly once; the state (contents, order, generator, source position) can be saved and restored, so a
resumed training run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from dictlearn.activations.harvest import ActivationChunk

ChunkSource = Callable[[int], Iterator[ActivationChunk]]  # start chunk -> chunks from there on


class ShuffledBuffer:
    def __init__(
        self,
        source: ChunkSource,
        d_in: int,
        size: int,
        batch_size: int,
        refill_fraction: float = 0.5,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        self.source = source
        self.size = size
        self.batch_size = batch_size
        self.refill_fraction = refill_fraction
        self.device = torch.device(device)
        self.storage_ND = torch.empty(size, d_in, dtype=dtype, device=self.device)
        self.unread = torch.empty(0, dtype=torch.long)  # shuffled slot indices still to serve
        self.free = torch.arange(size)  # slots whose row was served (or never filled)
        self.leftover: torch.Tensor | None = None  # rows of the last chunk that did not fit
        self.chunks_consumed = 0
        self.exhausted = False
        self.generator = torch.Generator().manual_seed(seed)
        self._chunks: Iterator[ActivationChunk] | None = None

    def _next_rows(self) -> torch.Tensor | None:
        if self.leftover is not None:
            rows, self.leftover = self.leftover, None
            return rows
        if self._chunks is None:
            self._chunks = self.source(self.chunks_consumed)
        chunk = next(self._chunks, None)
        if chunk is None:
            self.exhausted = True
            return None
        self.chunks_consumed += 1
        return chunk.acts

    def refill(self) -> None:
        """Write new rows into the free slots, then reshuffle everything unread."""
        filled = 0
        while filled < len(self.free) and not self.exhausted:
            rows = self._next_rows()
            if rows is None:
                break
            take = min(len(rows), len(self.free) - filled)
            slots = self.free[filled : filled + take]
            self.storage_ND[slots.to(self.device)] = rows[:take].to(self.device, self.storage_ND.dtype)
            if take < len(rows):
                self.leftover = rows[take:]
            filled += take
        new_slots, self.free = self.free[:filled], self.free[filled:]
        pool = torch.cat([self.unread, new_slots])
        self.unread = pool[torch.randperm(len(pool), generator=self.generator)]

    def next_batch(self) -> torch.Tensor | None:
        """The next batch of rows (B, D); the last one may be short; ``None`` once every row was served."""
        if not self.exhausted and len(self.unread) <= self.size * (1 - self.refill_fraction):
            self.refill()
        if len(self.unread) == 0:
            return None
        slots, self.unread = self.unread[: self.batch_size], self.unread[self.batch_size :]
        self.free = torch.cat([self.free, slots])
        return self.storage_ND[slots.to(self.device)]

    def peek(self, rows: int) -> torch.Tensor:
        """Up to ``rows`` unread rows, left unread (for initialisation from a data sample)."""
        if len(self.unread) == 0:
            self.refill()
        return self.storage_ND[self.unread[:rows].to(self.device)]

    def __iter__(self) -> Iterator[torch.Tensor]:
        while (batch := self.next_batch()) is not None:
            yield batch

    def state_dict(self) -> dict:
        return {
            "storage": self.storage_ND.cpu().clone(),
            "unread": self.unread.clone(),
            "free": self.free.clone(),
            "leftover": None if self.leftover is None else self.leftover.cpu().clone(),
            "chunks_consumed": self.chunks_consumed,
            "exhausted": self.exhausted,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.storage_ND.copy_(state["storage"])
        self.unread, self.free, self.leftover = state["unread"], state["free"], state["leftover"]
        self.chunks_consumed, self.exhausted = state["chunks_consumed"], state["exhausted"]
        self.generator.set_state(state["generator"])
        self._chunks = None  # reopen the source at chunks_consumed on the next read
