"""Capturing activations at hooks over a stream of token windows: the live source of activation rows.

``LiveActivations`` runs the model (stopped after the deepest hooked module) on batches of windows and yields
the rows of real text tokens at every hook. It is restartable at any batch, which is what makes training resume
exactly: skipped batches are tokenised but never run through the model. ``SharedPass`` hands one forward's rows
to several buffers (one per hook, or ``[input | target]`` pairs for transcoders).
"""

from __future__ import annotations

import atexit
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from itertools import islice
from typing import NamedTuple

import torch

from dictlearn.lm.models import HookPoint, LanguageModel, capture_at_hooks


class ActivationChunk(NamedTuple):
    """Rows of activations and the token each row was read at."""

    acts: torch.Tensor  # (N, D)
    token_ids: torch.Tensor  # (N,) int64


class Part(NamedTuple):
    """The part of a chunk stream one of ``count`` data-parallel ranks reads: chunks ``index``, ``index + count``,
    ``index + 2 * count``, ... (model batches of a live source, shards of a store), so the ranks read disjoint
    data and together all of it. The part's chunk ``i`` is the stream's chunk ``index + i * count``."""

    index: int = 0
    count: int = 1

    def chunk(self, i: int) -> int:
        return self.index + i * self.count


WHOLE = Part()


def batched(iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while batch := list(islice(iterator, size)):
        yield batch


# Producers of ``prefetched`` generators still running: stopped and joined at exit (``_stop_producers``).
_PRODUCERS: set[tuple[threading.Event, threading.Thread]] = set()


@atexit.register
def _stop_producers() -> None:
    """Stop every producer an abandoned generator left running (a run stopped mid-stream, a test that stops a
    trainer early) before the interpreter finalises: a daemon thread caught inside a torch call at shutdown is
    unwound through C++ frames and aborts the process ("terminate called without an active exception")."""
    for stop, _thread in list(_PRODUCERS):
        stop.set()
    for _stop, thread in list(_PRODUCERS):
        thread.join(timeout=10)


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Yield from ``items``, produced up to ``depth`` ahead in a background thread.

    Used to tokenise the next windows while the model runs on the current ones: the tokenizer and the
    forward both release the GIL, so on a GPU the harvest is no longer held up by tokenisation.
    An exception in the producer is raised here; closing this generator stops the producer, and so does the
    end of the process.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    done, stop = object(), threading.Event()
    failure: list[BaseException] = []

    def put(item) -> bool:
        """Wait for room unless the consumer has gone; False once it has."""
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as err:  # handed to the consumer, which raises it
            failure.append(err)
        put(done)

    def run() -> None:
        try:
            produce()
        finally:
            _PRODUCERS.discard(entry)

    producer = threading.Thread(target=run, daemon=True)
    entry = (stop, producer)
    _PRODUCERS.add(entry)
    producer.start()
    try:
        while (item := buffer.get()) is not done:
            yield item
        if failure:
            raise failure[0]
    finally:
        stop.set()


def special_token_ids(tokenizer) -> torch.Tensor:
    """Token ids that are not text (BOS, EOS, padding, other specials): left out of the buffer by default."""
    return torch.tensor(sorted(set(tokenizer.all_special_ids)), dtype=torch.long)


class LiveActivations:
    """Activation rows harvested on the fly from ``windows()`` at one or several hooks, all from one forward per
    model batch; each chunk (or chunk set, hook name -> chunk) is one model batch."""

    def __init__(
        self,
        lm: LanguageModel,
        hooks: HookPoint | Sequence[HookPoint],
        windows: Callable[[], Iterator[list[int]]],
        model_batch_size: int,
        exclude_special_tokens: bool = True,
    ):
        self.lm = lm
        self.hooks = [hooks] if isinstance(hooks, HookPoint) else list(hooks)
        self.windows = windows
        self.model_batch_size = model_batch_size
        self.excluded = special_token_ids(lm.tokenizer) if exclude_special_tokens else torch.empty(0, dtype=torch.long)

    def _batches(self) -> Iterator[torch.Tensor]:
        """The model batches of windows (B, T), tokenised and not run."""
        return (torch.tensor(batch, dtype=torch.long) for batch in batched(self.windows(), self.model_batch_size))

    def _kept(self, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, T) True at the text tokens: the positions that become rows."""
        return ~torch.isin(input_ids, self.excluded)

    def rows_per_batch(self) -> Iterator[int]:
        """How many rows each model batch gives, from tokenising alone (no forward)."""
        return (int(self._kept(input_ids).sum()) for input_ids in self._batches())

    def chunk_set_of(self, input_ids: torch.Tensor) -> dict[str, ActivationChunk]:
        """Run one batch of windows (B, T) and keep the rows of text tokens at every hook."""
        with torch.inference_mode():
            acts = capture_at_hooks(self.lm.model, self.hooks, input_ids.to(self.lm.device))
        keep_BT = self._kept(input_ids)
        token_ids = input_ids[keep_BT]
        return {
            hook.name: ActivationChunk(acts[hook.name][keep_BT.to(acts[hook.name].device)], token_ids)
            for hook in self.hooks
        }

    def chunk_sets_where(
        self, wanted: Callable[[int], bool], stop: int | None = None
    ) -> Iterator[tuple[int, dict[str, ActivationChunk]]]:
        """``(batch, chunk set)`` for every model batch ``wanted(batch)`` is True of, before batch ``stop`` (the
        others are tokenised but never run through the model)."""
        for index, input_ids in enumerate(prefetched(self._batches())):
            if stop is not None and index >= stop:
                return
            if wanted(index):
                yield index, self.chunk_set_of(input_ids)

    def iter_chunk_sets(self, start: int = 0, part: Part = WHOLE) -> Iterator[dict[str, ActivationChunk]]:
        """Yield a chunk per hook for every batch of ``part`` from its batch ``start`` on (earlier batches, and
        the other parts' batches, are tokenised but never run through the model)."""
        first = part.chunk(start)
        for _, chunk_set in self.chunk_sets_where(
            lambda index: index >= first and (index - part.index) % part.count == 0
        ):
            yield chunk_set

    def iter_chunks(self, start: int = 0) -> Iterator[ActivationChunk]:
        """The chunks of a one-hook source from batch ``start`` on."""
        if len(self.hooks) != 1:
            raise ValueError(f"iter_chunks reads one hook; this source has {len(self.hooks)}: use iter_chunk_sets")
        name = self.hooks[0].name
        return (chunk_set[name] for chunk_set in self.iter_chunk_sets(start))


def side_by_side(chunk_set: dict[str, ActivationChunk], names: Sequence[str]) -> ActivationChunk:
    """The rows of ``names`` concatenated along the width: ``[input | target]`` rows for a transcoder."""
    if len(names) == 1:
        return chunk_set[names[0]]
    return ActivationChunk(torch.cat([chunk_set[name].acts for name in names], dim=1), chunk_set[names[0]].token_ids)


class SharedPass:
    """One pass over ``chunk_sets`` read by several buffers: ``source(names)`` is the chunk source of one buffer.

    Each chunk set is computed once and kept until every reader has passed it, so buffers that read in step
    (the same size, batch size and seed: they refill at the same steps) hold one chunk set between them, and
    the model runs once per batch however many hooks and SAEs it feeds. A reader that asks for a chunk already
    dropped reopens the pass there (the source is restartable), which is how a resumed run starts."""

    def __init__(self, chunk_sets: Callable[[int], Iterator[dict[str, ActivationChunk]]]):
        self.chunk_sets = chunk_sets
        self.cache: dict[int, dict[str, ActivationChunk]] = {}
        self.positions: list[int] = []  # each reader's next chunk index
        self.end: int | None = None  # index one past the last chunk, once seen
        self._iterator: Iterator[dict[str, ActivationChunk]] | None = None
        self._next_index = 0

    def source(self, names: Sequence[str]) -> Callable[[int], Iterator[ActivationChunk]]:
        reader = len(self.positions)
        self.positions.append(0)
        names = list(names)

        def chunks(start: int) -> Iterator[ActivationChunk]:
            index = start
            while (chunk_set := self._chunk_set(index, reader)) is not None:
                yield side_by_side(chunk_set, names)
                index += 1

        return chunks

    def _chunk_set(self, index: int, reader: int) -> dict[str, ActivationChunk] | None:
        if index not in self.cache:
            if self._iterator is None or index < self._next_index:
                self._reopen(index)
            while self._next_index <= index and (self.end is None or self._next_index < self.end):
                chunk_set = next(self._iterator, None)
                if chunk_set is None:
                    self.end = self._next_index
                    break
                self.cache[self._next_index] = chunk_set
                self._next_index += 1
        chunk_set = self.cache.get(index)
        self.positions[reader] = index + 1
        oldest = min(self.positions)
        for stale in [key for key in self.cache if key < oldest]:
            del self.cache[stale]
        return chunk_set

    def _reopen(self, index: int) -> None:
        if self._iterator is not None:
            self._iterator.close()
        self._iterator, self._next_index, self.end = self.chunk_sets(index), index, None
        self.cache.clear()
