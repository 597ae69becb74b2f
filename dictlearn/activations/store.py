"""The sharded on-disk activation store: safetensors shards plus ``meta.json``, resumable after a kill.

A store is a folder of ``shard_00000.safetensors`` files, each holding ``acts`` (N, D) and ``token_ids`` (N,),
and a ``meta.json`` (model, hook, d_in, dtype, tokens, context size, shards). The writer works in
``<folder>.partial`` and renames it when done, so a store that exists is always complete. Each shard records
where in the text it ends (model batch and row), and ``progress.json`` in the partial folder lists the shards
on disk, so a harvest killed at any moment continues from its last complete shard and ends with the same files
as one never stopped. Several hooks harvested in one pass write one store each, in step.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from dictlearn.activations.harvest import WHOLE, ActivationChunk, Part
from dictlearn.errors import UserError
from dictlearn.files import atomic_write, make_folder, read_json, read_safetensors, write_json

META = "meta.json"
PROGRESS = "progress.json"
PROGRESS_FILES = "progress*.json"  # one process's, and each rank's in a harvest split over ranks
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


def shard_file(index: int) -> str:
    """The file name of a store's shard ``index``."""
    return f"shard_{index:05d}.safetensors"


def progress_header(meta: dict, shard_tokens: int, dtype: torch.dtype) -> dict:
    """What a partial folder's progress records must match for its shards to be continued."""
    return {"meta": meta, "shard_tokens": shard_tokens, "dtype": str(dtype)}


def partial_folder(path: Path) -> Path:
    """Where a store is written before it is published."""
    return path.with_name(path.name + ".partial")


def store_folder(params, model_short_name: str, hook_name: str) -> Path:
    """``store.path`` with the model and hook filled in: a folder per hook."""
    return Path(params.store.path.format(model=model_short_name, hook=hook_name))


class StoreWriter:
    """Append chunks; shards are cut at ``shard_tokens`` rows; ``finish`` writes meta and publishes.

    Rows are copied into one of two preallocated shard blocks; a full block is written by a background thread
    while the other fills, so disk writes overlap the model's forward. Memory is two shards, whatever the
    token count. With ``resume``, a killed writer's partial folder with the same meta, shard size and dtype is
    continued from its last complete shard (``position`` says where in the text); otherwise it is replaced."""

    def __init__(
        self,
        path: str | Path,
        meta: dict,
        shard_tokens: int,
        dtype: torch.dtype = torch.float32,
        *,
        resume: bool = False,
    ):
        self.path = Path(path)
        self.partial = partial_folder(self.path)
        self.progress_path = self.partial / PROGRESS
        self.meta = dict(meta)
        self.dtype = dtype
        self.shard_tokens = shard_tokens
        self.shards: list[dict] = []
        self._open(resume)
        self.tokens = sum(shard["rows"] for shard in self.shards)
        self.blocks = [
            (torch.empty(shard_tokens, int(meta["d_in"]), dtype=dtype), torch.empty(shard_tokens, dtype=torch.long))
            for _ in range(2)
        ]
        self.shard_acts, self.shard_token_ids = self.blocks[0]
        self.pending_rows = 0
        self._writer = ThreadPoolExecutor(max_workers=1)
        self._writing: Future | None = None

    def _open(self, resume: bool) -> None:
        # The caller holds the store's output_lock, so a partial folder here is a killed run's, not a live one's.
        if not (resume and self._resume()):
            remove_partial(self.partial)
            make_folder(self.partial, "activation store")

    def _progress_header(self) -> dict:
        return progress_header(self.meta, self.shard_tokens, self.dtype)

    def _resume(self) -> bool:
        """Take over a killed writer's complete shards; False when there is nothing fit to continue."""
        progress_path = self.progress_path
        if not progress_path.is_file() or self.partial.is_symlink():
            return False
        try:
            progress = read_json(progress_path, "harvest progress")
        except UserError:
            return False
        shards = progress.get("shards") if isinstance(progress, dict) else None
        header = {key: progress.get(key) for key in self._progress_header()} if isinstance(progress, dict) else {}
        if header != self._progress_header() or not isinstance(shards, list):
            return False
        if not all(isinstance(s, dict) and (self.partial / str(s.get("file"))).is_file() for s in shards):
            return False
        self.shards = shards
        self.truncate(len(shards))
        return True

    @property
    def position(self) -> dict:
        """Where the text continues: ``{"batch": b, "row": r}`` is row r of model batch b."""
        return dict(self.shards[-1]["end"]) if self.shards else {"batch": 0, "row": 0}

    def truncate(self, num_shards: int) -> None:
        """Keep the first ``num_shards`` shards (those of a store harvested in step with this one) and remove
        every other file a killed writer left (a shard past them, temporary files)."""
        self.shards = self.shards[:num_shards]
        self.tokens = sum(shard["rows"] for shard in self.shards)
        remove_all_but(self.partial, {shard["file"] for shard in self.shards} | {PROGRESS})
        write_json(self.progress_path, {**self._progress_header(), "shards": self.shards})

    def add(self, chunk: ActivationChunk, batch: int, first_row: int = 0) -> None:
        """Append ``chunk``: the rows of model batch ``batch`` from row ``first_row`` on (for the position a
        shard ends at)."""
        done = 0
        while done < len(chunk.acts):
            take = min(len(chunk.acts) - done, len(self.shard_acts) - self.pending_rows)
            rows = slice(self.pending_rows, self.pending_rows + take)
            self.shard_acts[rows] = chunk.acts[done : done + take]
            self.shard_token_ids[rows] = chunk.token_ids[done : done + take]
            self.pending_rows += take
            done += take
            if self.pending_rows == len(self.shard_acts):
                self._write_shard({"batch": batch, "row": first_row + done})

    def _wait_for_writer(self) -> None:
        if self._writing is not None:
            self._writing.result()  # re-raises a failed write here
            self._writing = None

    def _write_shard(self, end: dict) -> None:
        rows = self.pending_rows
        name = self._next_file()
        tensors = {"acts": self.shard_acts[:rows], "token_ids": self.shard_token_ids[:rows]}
        self._wait_for_writer()  # the other block must be on disk before it is refilled
        self.shards.append({"file": name, "rows": rows, "end": end})
        progress = {**self._progress_header(), "shards": list(self.shards)}
        self._writing = self._writer.submit(self._save, tensors, name, progress)
        self.tokens += rows
        self.pending_rows = 0
        self.blocks.reverse()
        self.shard_acts, self.shard_token_ids = self.blocks[0]

    def _save(self, tensors: dict, name: str, progress: dict) -> None:
        """The shard (whole or not at all), then the progress that lists it: a kill in between loses one shard."""
        atomic_write(self.partial / name, lambda temp: save_file(tensors, str(temp)))
        write_json(self.progress_path, progress)

    def _next_file(self) -> str:
        return shard_file(len(self.shards))

    def flush(self, end: dict) -> None:
        """Write the last, short shard (ending at ``end``) and wait until every shard is on disk."""
        if self.pending_rows:
            self._write_shard(end)
        self._wait_for_writer()
        self._writer.shutdown()

    def finish(self, end: dict) -> dict:
        """Write the last, short shard (ending at ``end``), meta.json, and publish the store."""
        self.flush(end)
        return publish(self.path, self.meta, self.dtype, self.shards)

    def close(self) -> None:
        """Stop after a failure: the shard being written is finished (or lost whole), the rows not yet in a
        shard are dropped, and the partial folder stays for the next run to continue."""
        try:
            self._wait_for_writer()
        finally:
            self._writer.shutdown(wait=True, cancel_futures=True)


def publish(path: Path, meta: dict, dtype: torch.dtype, shards: list[dict]) -> dict:
    """Write meta.json (``meta`` with the dtype, token count and ``shards``) into the partial folder of the store
    at ``path``, drop its progress records, and rename it to ``path``; return the meta."""
    partial = partial_folder(path)
    meta = {**meta, "dtype": str(dtype).removeprefix("torch."), "tokens": sum(shard["rows"] for shard in shards)}
    meta["shards"] = shards
    write_json(partial / META, meta)
    for record in partial.glob(PROGRESS_FILES):
        record.unlink()
    if path.exists():
        shutil.rmtree(path)
    partial.rename(path)
    return meta


def remove_all_but(folder: Path, keep: set[str]) -> None:
    """Remove every file and folder in ``folder`` not named in ``keep``."""
    for path in folder.iterdir():
        if path.name not in keep:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()


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

    def iter_chunks(self, start: int = 0, part: Part = WHOLE) -> Iterator[ActivationChunk]:
        """The shards of ``part`` from its shard ``start`` on, one chunk each (the other parts' are not read)."""
        for shard in self.meta["shards"][part.chunk(start) :: part.count]:
            tensors = read_safetensors(self.path / shard["file"], "activation store shard", ("acts", "token_ids"))
            yield ActivationChunk(tensors["acts"], tensors["token_ids"].long())


def add_rows(
    writers: dict[str, StoreWriter], chunk_set: dict[str, ActivationChunk], batch: int, first_row: int, end: int
) -> None:
    """Give each hook's writer rows ``first_row:end`` of its chunk of model batch ``batch``."""
    for name, writer in writers.items():
        chunk = chunk_set[name]
        writer.add(ActivationChunk(chunk.acts[first_row:end], chunk.token_ids[first_row:end]), batch, first_row)


def write_stores(
    chunk_sets: Callable[[int], Iterator[dict[str, ActivationChunk]]],
    writers: dict[str, StoreWriter],
    max_tokens: int,
    on_rows: Callable[[int], None] = lambda rows: None,
) -> dict[str, dict]:
    """Write one store per hook from ``chunk_sets(start_batch)`` (hook name -> chunk, every hook the same rows)
    until ``max_tokens`` rows each (or the text ends); publish them and return their metas.

    Writers that continue a killed harvest start from the last shard every one of them holds (a kill can land
    between two hooks' shards), and the text from there; batches before it are not run through the model. A
    failure keeps every complete shard for the next run."""
    done = min(len(writer.shards) for writer in writers.values())
    for writer in writers.values():
        writer.truncate(done)
    first = next(iter(writers.values()))
    position, tokens = first.position, first.tokens
    on_rows(tokens)
    batch, end = position["batch"], position["row"]
    try:
        for batch, chunk_set in enumerate(chunk_sets(position["batch"]), start=position["batch"]):
            first_row = position["row"] if batch == position["batch"] else 0
            end = first_row + max(0, min(max_tokens - tokens, len(next(iter(chunk_set.values())).acts) - first_row))
            add_rows(writers, chunk_set, batch, first_row, end)
            tokens += end - first_row
            on_rows(end - first_row)
            if tokens >= max_tokens:
                break
        end_position = {"batch": batch, "row": end} if tokens else {"batch": 0, "row": 0}
        return {name: writer.finish(end_position) for name, writer in writers.items()}
    except BaseException:
        for writer in writers.values():
            writer.close()
        raise


def write_store(
    chunks: Callable[[int], Iterator[ActivationChunk]],
    writer: StoreWriter,
    max_tokens: int,
    on_rows: Callable[[int], None] = lambda rows: None,
) -> dict:
    """``write_stores`` for one store: ``chunks(start_batch)`` yields its chunks."""
    metas = write_stores(lambda start: ({"": chunk} for chunk in chunks(start)), {"": writer}, max_tokens, on_rows)
    return metas[""]
