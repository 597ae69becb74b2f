"""The sharded on-disk activation store: safetensors shards plus ``meta.json``, written atomically.

A store is a folder of ``shard_00000.safetensors`` files, each holding ``acts`` (N, D) and ``token_ids`` (N,),
and a ``meta.json`` (model, hook, d_in, dtype, tokens, context size, shards). The writer works in
``<folder>.partial`` and renames it when done, so a store that exists is always complete.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dictlearn.errors import UserError
from dictlearn.harvest import ActivationChunk

META = "meta.json"


class StoreWriter:
    """Append chunks; shards are cut at ``shard_tokens`` rows; ``finish`` writes meta and publishes."""

    def __init__(self, path: str | Path, meta: dict, shard_tokens: int, dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        shutil.rmtree(self.partial, ignore_errors=True)
        self.partial.mkdir(parents=True)
        self.meta = dict(meta)
        self.shard_tokens = shard_tokens
        self.dtype = dtype
        self.pending: list[ActivationChunk] = []
        self.pending_rows = 0
        self.shards: list[dict] = []
        self.tokens = 0
        self.bytes = 0

    def add(self, chunk: ActivationChunk) -> None:
        self.pending.append(ActivationChunk(chunk.acts.to("cpu", self.dtype), chunk.token_ids.cpu()))
        self.pending_rows += len(chunk.acts)
        while self.pending_rows >= self.shard_tokens:
            self._write_shard(self.shard_tokens)

    def _write_shard(self, rows: int) -> None:
        acts = torch.cat([c.acts for c in self.pending])
        token_ids = torch.cat([c.token_ids for c in self.pending])
        rest = ActivationChunk(acts[rows:], token_ids[rows:])
        self.pending = [rest] if len(rest.acts) else []
        self.pending_rows = len(rest.acts)
        name = f"shard_{len(self.shards):05d}.safetensors"
        save_file({"acts": acts[:rows].contiguous(), "token_ids": token_ids[:rows].contiguous()}, self.partial / name)
        self.shards.append({"file": name, "rows": rows})
        self.tokens += rows
        self.bytes += (self.partial / name).stat().st_size

    def finish(self) -> dict:
        if self.pending_rows:
            self._write_shard(self.pending_rows)
        meta = {**self.meta, "dtype": str(self.dtype).removeprefix("torch."), "tokens": self.tokens}
        meta["shards"] = self.shards
        (self.partial / META).write_text(json.dumps(meta, indent=2))
        if self.path.exists():
            shutil.rmtree(self.path)
        self.partial.rename(self.path)
        return meta

    def abort(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)


class ActivationStore:
    """Read a store written by ``StoreWriter``: its meta and its shards as chunks."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise UserError(f"no activation store at {self.path} (no {META}); run get_activations.py first")
        self.meta = json.loads(meta_path.read_text())
        missing = [s["file"] for s in self.meta["shards"] if not (self.path / s["file"]).is_file()]
        if missing:
            raise UserError(f"activation store {self.path} is incomplete: missing {', '.join(missing[:3])}")

    @property
    def d_in(self) -> int:
        return int(self.meta["d_in"])

    def __len__(self) -> int:
        return int(self.meta["tokens"])

    def iter_chunks(self, start: int = 0) -> Iterator[ActivationChunk]:
        """Shards from number ``start`` on, one chunk each."""
        for shard in self.meta["shards"][start:]:
            tensors = load_file(self.path / shard["file"])
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
