"""The sharded on-disk activation store: safetensors shards plus ``meta.json``, written atomically.

A store is a folder of ``shard_00000.safetensors`` files, each holding ``acts`` (N, D) and ``token_ids`` (N,),
and a ``meta.json`` (model, hook, d_in, dtype, tokens, context size, shards). The writer works in
``<folder>.partial`` and renames it when done, so a store that exists is always complete.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from dictlearn.activations.harvest import ActivationChunk
from dictlearn.errors import UserError
from dictlearn.files import make_folder, read_json, read_safetensors, write_json

META = "meta.json"
REHARVEST = "run get_activations.py --overwrite to harvest it again"


def harvest_identity(params, hook_name: str, d_in: int) -> dict:
    """What makes two stores interchangeable: model, hook, width, text, and which positions are kept."""
    return {
        "model": params.model.name,
        "dtype": params.store.dtype,
        "hook": hook_name,
        "d_in": d_in,
        "data": params.data.model_dump(mode="json"),
        "exclude_special_tokens": params.buffer.exclude_special_tokens,
    }


class StoreWriter:
    """Append chunks; shards are cut at ``shard_tokens`` rows; ``finish`` writes meta and publishes.

    Rows are copied into one of two preallocated shard blocks; a full block is written by a background thread
    while the other fills, so disk writes overlap the model's forward. Memory is two shards, whatever the
    token count."""

    def __init__(self, path: str | Path, meta: dict, shard_tokens: int, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        # A partial folder here is a killed run's; the caller holds the store's output_lock, so no live writer's.
        remove_partial(self.partial)
        make_folder(self.partial, "activation store")
        self.meta = dict(meta)
        self.dtype = dtype
        self.blocks = [
            (torch.empty(shard_tokens, int(meta["d_in"]), dtype=dtype), torch.empty(shard_tokens, dtype=torch.long))
            for _ in range(2)
        ]
        self.shard_acts, self.shard_token_ids = self.blocks[0]
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.tokens = 0
        self.bytes = 0
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._writing: Future | None = None

    def add(self, chunk: ActivationChunk) -> None:
        done = 0
        while done < len(chunk.acts):
            take = min(len(chunk.acts) - done, len(self.shard_acts) - self.pending_rows)
            rows = slice(self.pending_rows, self.pending_rows + take)
            self.shard_acts[rows] = chunk.acts[done : done + take]
            self.shard_token_ids[rows] = chunk.token_ids[done : done + take]
            self.pending_rows += take
            done += take
            if self.pending_rows == len(self.shard_acts):
                self._write_shard()

    def _wait_for_writer(self) -> None:
        if self._writing is not None:
            self._writing.result()  # re-raises a failed write here
            self._writing = None

    def _write_shard(self) -> None:
        rows = self.pending_rows
        name = f"shard_{len(self.shards):05d}.safetensors"
        tensors = {"acts": self.shard_acts[:rows], "token_ids": self.shard_token_ids[:rows]}
        self._wait_for_writer()  # the other block must be on disk before it is refilled
        self._writing = self._writer.submit(save_file, tensors, str(self.partial / name))
        self.shards.append({"file": name, "rows": rows})
        self.tokens += rows
        self.pending_rows = 0
        self.blocks.reverse()
        self.shard_acts, self.shard_token_ids = self.blocks[0]

    def finish(self) -> dict:
        if self.pending_rows:
            self._write_shard()
        self._wait_for_writer()
        self._writer.shutdown()
        self.bytes = sum((self.partial / shard["file"]).stat().st_size for shard in self.shards)
        meta = {**self.meta, "dtype": str(self.dtype).removeprefix("torch."), "tokens": self.tokens}
        meta["shards"] = self.shards
        write_json(self.partial / META, meta)
        if self.path.exists():
            shutil.rmtree(self.path)
        self.partial.rename(self.path)
        return meta

    def abort(self) -> None:
        self._writer.shutdown(wait=True, cancel_futures=True)
        remove_partial(self.partial)


def remove_partial(partial: Path) -> None:
    if partial.is_dir() and not partial.is_symlink():
        shutil.rmtree(partial)
    elif partial.is_symlink() or partial.exists():
        partial.unlink()


class ActivationStore:
    """Read a store written by ``StoreWriter``: its meta and its shards as chunks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise UserError(f"no activation store at {self.path} (no {META}); run get_activations.py first")
        self.meta = read_json(meta_path, "activation store metadata")
        shards = self.meta.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, dict) and "file" in s for s in shards):
            raise UserError(f"{meta_path}: activation store metadata has no list of shards; {REHARVEST}")
        missing = [s["file"] for s in shards if not (self.path / s["file"]).is_file()]
        if missing:
            raise UserError(
                f"activation store {self.path} is incomplete: missing {', '.join(missing[:3])}; {REHARVEST}"
            )

    @property
    def d_in(self) -> int:
        return int(self.meta["d_in"])

    def __len__(self) -> int:
        return int(self.meta["tokens"])

    def holds(self, identity: dict, tokens: int) -> bool:
        """True when this store was harvested the way ``identity`` says, with at least ``tokens`` rows."""
        return self.meta.get("identity") == identity and len(self) >= tokens

    def iter_chunks(self, start: int = 0) -> Iterator[ActivationChunk]:
        """Shards from number ``start`` on, one chunk each."""
        for shard in self.meta["shards"][start:]:
            tensors = read_safetensors(self.path / shard["file"], "activation store shard", ("acts", "token_ids"))
            yield ActivationChunk(tensors["acts"], tensors["token_ids"].long())


def write_store(
    chunks: Iterator[ActivationChunk], writer: StoreWriter, max_tokens: int, on_rows=lambda rows: None
) -> dict:
    """Write chunks until ``max_tokens`` rows (or the source ends); publish the store and return its meta.

    Any failure leaves no store behind (the partial folder is removed)."""
    try:
        for chunk in chunks:
            room = max_tokens - writer.tokens - writer.pending_rows
            chunk = ActivationChunk(chunk.acts[:room], chunk.token_ids[:room])
            writer.add(chunk)
            on_rows(len(chunk.acts))
            if writer.tokens + writer.pending_rows >= max_tokens:
                break
        return writer.finish()
    except BaseException:
        writer.abort()
        raise
