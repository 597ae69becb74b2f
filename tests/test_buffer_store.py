"""The shuffled buffer and the sharded store."""

from __future__ import annotations

import pytest
import torch

from dictlearn.activations.buffer import ShuffledBuffer
from dictlearn.activations.harvest import ActivationChunk
from dictlearn.activations.store import ActivationStore, StoreWriter, write_store
from dictlearn.errors import UserError

D = 4


def numbered_chunks(total: int, chunk_rows: int):
    """A chunk source whose rows carry their own index in column 0, restartable at any chunk."""

    def source(start: int):
        for first in range(start * chunk_rows, total, chunk_rows):
            index = torch.arange(first, min(first + chunk_rows, total))
            yield ActivationChunk(index[:, None].float().expand(-1, D).clone(), index)

    return source


def test_every_row_served_once_shuffled_within_the_memory_bound():
    buffer = ShuffledBuffer(numbered_chunks(1000, 37), d_in=D, size=128, batch_size=50, refill_fraction=0.5)
    served = [batch[:, 0].long() for batch in buffer]
    rows = torch.cat(served)
    assert sorted(rows.tolist()) == list(range(1000))
    assert rows.tolist() != list(range(1000))
    assert buffer.storage_ND.shape == (128, D)  # fixed block, whatever the corpus length
    assert all(len(b) == 50 for b in served[:-1]) and 0 < len(served[-1]) <= 50
    # Rows come from across the buffer, not in source order: the first batch already mixes chunks.
    assert served[0].max() - served[0].min() > 37


def test_buffer_state_round_trip_gives_the_same_batches():
    def make():
        return ShuffledBuffer(numbered_chunks(500, 23), d_in=D, size=64, batch_size=16, seed=3)

    straight = [b.clone() for b in make()]
    first = make()
    taken = [first.next_batch().clone() for _ in range(7)]
    state = first.state_dict()
    resumed = make()
    resumed.load_state_dict(state)
    rest = [b.clone() for b in resumed]
    assert len(taken) + len(rest) == len(straight)
    for a, b in zip(taken + rest, straight):
        torch.testing.assert_close(a, b)


def test_store_round_trip(tmp_path):
    chunks = list(numbered_chunks(250, 40)(0))
    writer = StoreWriter(tmp_path / "store", {"model": "tiny", "hook": "h", "d_in": D}, shard_tokens=64)
    meta = write_store(lambda start: iter(chunks[start:]), writer, max_tokens=230)
    store = ActivationStore(tmp_path / "store")
    assert meta["tokens"] == len(store) == 230 and store.d_in == D
    assert [s["rows"] for s in meta["shards"]] == [64, 64, 64, 38]
    back = list(store.iter_chunks())
    torch.testing.assert_close(torch.cat([c.acts for c in back]), torch.cat([c.acts for c in chunks])[:230])
    assert torch.equal(torch.cat([c.token_ids for c in back]), torch.arange(230))
    assert not (tmp_path / "store.partial").exists()
    assert [len(c.acts) for c in store.iter_chunks(start=3)] == [38]


def test_failed_write_leaves_no_store_and_keeps_complete_shards_for_the_rerun(tmp_path):
    def broken(start):
        yield from numbered_chunks(100, 40)(start)
        raise RuntimeError("source died")

    writer = StoreWriter(tmp_path / "store", {"d_in": D}, shard_tokens=32)
    with pytest.raises(RuntimeError):
        write_store(broken, writer, max_tokens=1000)
    assert not (tmp_path / "store").exists()
    # Three complete shards of 32 rows; the 4 rows past them are not in a shard and are harvested again.
    kept = sorted(p.name for p in (tmp_path / "store.partial").iterdir())
    assert kept == ["progress.json", "shard_00000.safetensors", "shard_00001.safetensors", "shard_00002.safetensors"]
    resumed = StoreWriter(tmp_path / "store", {"d_in": D}, shard_tokens=32, resume=True)
    assert resumed.tokens == 96 and resumed.position == {"batch": 2, "row": 16}
    other = StoreWriter(tmp_path / "store", {"d_in": D + 1}, shard_tokens=32, resume=True)
    assert other.tokens == 0 and list((tmp_path / "store.partial").iterdir()) == []


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no activation store at .*run get_activations.py first"):
        ActivationStore(tmp_path / "nowhere")


def test_prefetched_keeps_order_raises_and_stops():
    from dictlearn.activations.harvest import prefetched

    assert list(prefetched(iter(range(100)), depth=3)) == list(range(100))

    def failing():
        yield 1
        raise UserError("bad line 2")

    with pytest.raises(UserError, match="bad line 2"):
        list(prefetched(failing()))
    produced = []

    def endless():
        for i in range(10**9):
            produced.append(i)
            yield i

    stream = prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()
    import time

    time.sleep(0.3)
    count = len(produced)
    time.sleep(0.3)
    assert count == len(produced) and count <= 5  # the producer stopped, a few items ahead at most


def written_store(tmp_path, total: int = 100, shard_tokens: int = 32):
    writer = StoreWriter(tmp_path / "store", {"d_in": D}, shard_tokens=shard_tokens)
    write_store(numbered_chunks(total, 40), writer, max_tokens=total)
    return tmp_path / "store"


def test_broken_store_metadata_is_one_line(tmp_path):
    store = written_store(tmp_path)
    meta = store / "meta.json"
    for text, pattern in [
        ("{not json", r"meta.json: activation store metadata is not valid JSON at line 1, column 2"),
        ("[]", r"meta.json: activation store metadata should be a JSON object, found a JSON array$"),
        ('{"d_in": 4}', r"meta.json: activation store metadata has no list of shards; run get_activations.py --over"),
    ]:
        meta.write_text(text)
        with pytest.raises(UserError, match=pattern):
            ActivationStore(store)


def test_a_shard_missing_or_truncated_is_one_line_naming_it(tmp_path):
    store_folder = written_store(tmp_path)
    store = ActivationStore(store_folder)
    shard = store_folder / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-20])  # a copy cut short
    chunks = store.iter_chunks()
    assert len(next(chunks).acts) == 32
    with pytest.raises(UserError) as caught:
        next(chunks)
    assert "\n" not in str(caught.value)
    assert str(caught.value).startswith(
        f"{shard}: activation store shard is not a readable safetensors file (incomplete metadata"
    )
    shard.unlink()
    with pytest.raises(
        UserError, match=r"store is incomplete: missing shard_00001.safetensors; run get_activations.py"
    ):
        ActivationStore(store_folder)


def test_a_killed_runs_partial_folder_is_replaced(tmp_path):
    partial = tmp_path / "store.partial"
    partial.mkdir()
    (partial / "shard_00000.safetensors").write_bytes(b"half a shard")
    (partial / "junk").mkdir()
    store = ActivationStore(written_store(tmp_path))
    assert not partial.exists() and len(store) == 100


def test_a_store_path_that_cannot_be_made_is_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^activation store: .*file/store.partial cannot be made: .*/file is a file"):
        StoreWriter(tmp_path / "file" / "store", {"d_in": D}, shard_tokens=8)
