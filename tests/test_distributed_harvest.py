"""A harvest split over ranks: the plan of shards matches what one process cuts, and 2 gloo processes (tiny
Llama, CPU, one thread each) write the one-process store file for file, each running the model only on the batches
of its own shards; a killed split harvest continues (with 2 processes or 1) without rewriting complete shards."""

from __future__ import annotations

import json

import pytest
import torch

from dictlearn.activations.harvest import ActivationChunk, LiveActivations
from dictlearn.activations.ranks import plan_harvest, write_stores_on_ranks
from dictlearn.activations.store import ActivationStore, StoreWriter, write_store, write_stores
from dictlearn.lm.models import hook_width, load_language_model, resolve_hooks
from dictlearn.lm.text import training_windows
from dictlearn.params import parse_params
from dictlearn.training.distributed import Distributed
from tests.test_distributed import WORLD, spawn, torchrun
from tests.test_scale import HOOKS, Killed
from tests.test_scripts import run, tiny_params

SHARD, TOKENS = 100, 950  # a short last shard of 50 rows


@pytest.mark.parametrize(
    ("rows_B", "max_tokens"),
    [([7, 0, 5, 9, 0, 3], 100), ([7, 0, 5, 9, 0, 3], 20), ([10, 10, 0], 100), ([10, 10, 0], 20), ([4, 6, 10], 15)],
)
def test_the_plan_cuts_the_shards_one_process_writes(tmp_path, rows_B, max_tokens):
    chunks = [ActivationChunk(torch.zeros(rows, 1), torch.zeros(rows, dtype=torch.long)) for rows in rows_B]
    writer = StoreWriter(tmp_path / "store", {"d_in": 1}, shard_tokens=10)
    meta = write_store(lambda start: iter(chunks[start:]), writer, max_tokens)
    assert plan_harvest(rows_B, max_tokens, 10).shards == meta["shards"]


def _live(params, lm, forwards: list, kill_after: int | None = None) -> LiveActivations:
    """A live source that records each forward's input ids (and raises ``Killed`` after ``kill_after``)."""
    live = LiveActivations(lm, resolve_hooks(lm.config, HOOKS), lambda: training_windows(params.data, lm.tokenizer), 4)
    run = live.chunk_set_of

    def counted(input_ids):
        if len(forwards) == kill_after:
            raise Killed
        forwards.append(input_ids)
        return run(input_ids)

    live.chunk_set_of = counted
    return live


def _on_ranks(distributed, params, lm, out, forwards, kill_after=None):
    live = _live(params, lm, forwards, kill_after)
    stores = {hook.name: (out / hook.name, {"d_in": hook_width(lm.config, hook)}) for hook in live.hooks}
    return write_stores_on_ranks(live, stores, SHARD, torch.float32, TOKENS, distributed, resume=True)


def _shard_times(out) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in (out / f"{HOOKS[0]}.partial").glob("shard_*")}


def _worker(distributed: Distributed, model, corpus, tmp_path) -> None:
    params = parse_params(tiny_params(model, corpus, tmp_path))
    lm = load_language_model(params.model)
    result = {"straight": [], "killed": [], "resumed": [], "for_one": []}
    _on_ranks(distributed, params, lm, tmp_path / "two", result["straight"])
    for name, kill_after in (("killed", 5), ("for_one", 3)):
        with pytest.raises(Killed):
            _on_ranks(distributed, params, lm, tmp_path / name, [], kill_after)
    distributed.wait_for_all()  # every rank's complete shards are on disk
    result["kept"] = _shard_times(tmp_path / "killed")
    result["done"] = _on_ranks(distributed, params, lm, tmp_path / "killed", result["resumed"])[1]
    torch.save(result, tmp_path / f"rank{distributed.rank}.pt")


def _batch_of(forwards, batches) -> list[int]:
    return [next(b for b, (ids, _) in enumerate(batches) if torch.equal(ids, input_ids)) for input_ids in forwards]


def _assert_same_store(a, b) -> None:
    for hook in HOOKS:
        one, two = ActivationStore(a / hook), ActivationStore(b / hook)
        assert (one.path / "meta.json").read_bytes() == (two.path / "meta.json").read_bytes()
        assert sorted(p.name for p in one.path.iterdir()) == sorted(p.name for p in two.path.iterdir())
        for shard in one.meta["shards"]:
            assert (one.path / shard["file"]).read_bytes() == (two.path / shard["file"]).read_bytes(), shard


@pytest.mark.slow
def test_two_ranks_harvest_the_one_process_store_and_continue_a_killed_harvest(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    spawn(_worker, model, corpus, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(WORLD)]
    torch.set_num_threads(1)
    params = parse_params(tiny_params(model, corpus, tmp_path))
    lm = load_language_model(params.model)
    # One process: every batch it runs, with its rows.
    batches = []
    live = LiveActivations(lm, resolve_hooks(lm.config, HOOKS), lambda: training_windows(params.data, lm.tokenizer), 4)
    run = live.chunk_set_of

    def recorded(input_ids):
        chunk_set = run(input_ids)
        batches.append((input_ids, len(chunk_set[HOOKS[0]].acts)))
        return chunk_set

    live.chunk_set_of = recorded
    writers = {
        hook.name: StoreWriter(tmp_path / "one" / hook.name, {"d_in": hook_width(lm.config, hook)}, SHARD)
        for hook in live.hooks
    }
    metas = write_stores(live.iter_chunk_sets, writers, TOKENS)
    assert metas[HOOKS[0]]["tokens"] == TOKENS and len(metas[HOOKS[0]]["shards"]) == 10
    # (1) The same files, meta.json included.
    _assert_same_store(tmp_path / "one", tmp_path / "two")
    # (2) Rank r ran the model once on each batch holding a row of shards r, r + 2, ... and on no other.
    offsets = [sum(rows for _, rows in batches[:b]) for b in range(len(batches) + 1)]
    for rank, result in enumerate(ranks):
        expected = [
            b for b in range(len(batches))
            if any((row // SHARD) % WORLD == rank for row in range(offsets[b], min(offsets[b + 1], TOKENS)))
        ]  # fmt: skip
        assert _batch_of(result["straight"], batches) == expected
    # (3) Killed after 5 forwards a rank and rerun: the same store, complete shards kept, only the rest run.
    _assert_same_store(tmp_path / "one", tmp_path / "killed")
    kept = ranks[0]["kept"]
    assert 2 <= len(kept) < 10 and ranks[0]["done"] == SHARD * len(kept)
    assert {name: (tmp_path / "killed" / HOOKS[0] / name).stat().st_mtime_ns for name in kept} == kept
    assert all(len(r["resumed"]) < len(r["straight"]) for r in ranks)
    # A killed 2-rank harvest continued by one process (a world of 1) keeps its shards too.
    before = _shard_times(tmp_path / "for_one")
    assert before
    forwards = []
    done = _on_ranks(Distributed(), params, lm, tmp_path / "for_one", forwards)[1]
    assert done == SHARD * len(before) and len(forwards) < len(batches)
    _assert_same_store(tmp_path / "one", tmp_path / "for_one")
    assert {name: (tmp_path / "for_one" / HOOKS[0] / name).stat().st_mtime_ns for name in before} == before
    assert json.loads((tmp_path / "for_one" / HOOKS[0] / "meta.json").read_text())["tokens"] == TOKENS


@pytest.mark.slow
def test_torchrun_harvests_the_script_store_of_one_process(tmp_path, tiny_checkpoint_with_text):
    model, corpus = tiny_checkpoint_with_text
    params = tiny_params(model, corpus, tmp_path)
    params["store"] = {"path": str(tmp_path / "one"), "tokens": 1000, "shard_tokens": 256}
    alone = run("get_activations.py", params, tmp_path)
    assert alone.returncode == 0, alone.stderr
    params["store"]["path"] = str(tmp_path / "two")
    done = torchrun(params, tmp_path, script="get_activations.py")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("activation store") == 1  # rank 0 alone prints the table
    meta = (tmp_path / "one" / "meta.json").read_bytes()
    assert meta == (tmp_path / "two" / "meta.json").read_bytes()
    for shard in json.loads(meta)["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "two" / shard["file"]).read_bytes()
    again = torchrun(params, tmp_path, script="get_activations.py")
    assert again.returncode == 0 and "is up to date (1,000 tokens)" in again.stdout
