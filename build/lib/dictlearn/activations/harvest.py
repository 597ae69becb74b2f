"""Capturing activations at a hook over a stream of token windows: the live source of activation rows.

``LiveActivations`` runs the model (stopped after the hooked module) on batches of windows and yields the
rows of real text tokens. It is restartable at any batch, which is what makes training resume exactly:
skipped batches are tokenised but never run through the model.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from itertools import islice
from typing import NamedTuple

import torch

from dictlearn.lm.models import HookPoint, LanguageModel, capture_activations


class ActivationChunk(NamedTuple):
    """Rows of activations and the token each row was read at."""

    acts: torch.Tensor  # (N, D)
    token_ids: torch.Tensor  # (N,) int64


def batched(iterable, size: int) -> Iterator[list]:
    iterator = iter(iterable)
    while batch := list(islice(iterator, size)):
        yield batch


def prefetched(items: Iterator, depth: int = 2) -> Iterator:
    """Yield from ``items``, produced up to ``depth`` ahead in a background thread.

    Used to tokenise the next windows while the model runs on the current ones: the tokenizer and the
    forward both release the GIL, so on a GPU the harvest is no longer held up by tokenisation.
    An exception in the producer is raised here; closing this generator stops the producer.
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

    producer = threading.Thread(target=produce, daemon=True)
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
    """Activation rows harvested on the fly from ``windows()``; each chunk is one model batch."""

    def __init__(
        self,
        lm: LanguageModel,
        hook: HookPoint,
        windows: Callable[[], Iterator[list[int]]],
        model_batch_size: int,
        exclude_special_tokens: bool = True,
    ):
        self.lm = lm
        self.hook = hook
        self.windows = windows
        self.model_batch_size = model_batch_size
        self.excluded = special_token_ids(lm.tokenizer) if exclude_special_tokens else torch.empty(0, dtype=torch.long)

    def chunk_of(self, input_ids: torch.Tensor) -> ActivationChunk:
        """Run one batch of windows (B, T) and keep the rows of text tokens."""
        with torch.inference_mode():
            acts_BTD = capture_activations(self.lm.model, self.hook, input_ids.to(self.lm.device))
        keep_BT = ~torch.isin(input_ids, self.excluded)
        return ActivationChunk(acts_BTD[keep_BT.to(acts_BTD.device)], input_ids[keep_BT])

    def iter_chunks(self, start: int = 0) -> Iterator[ActivationChunk]:
        """Yield chunks from batch ``start`` on (earlier batches are skipped without a forward)."""
        batches = (torch.tensor(batch, dtype=torch.long) for batch in batched(self.windows(), self.model_batch_size))
        for index, input_ids in enumerate(prefetched(batches)):
            if index >= start:
                yield self.chunk_of(input_ids)
