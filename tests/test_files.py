"""Reading files we did not write: a missing, foreign, truncated or malicious file is one line naming it and what
was expected. Writing: a killed writer's temporary files are cleaned by the next write, and an output folder that
cannot be made is refused before any work."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from dictlearn.errors import UserError
from dictlearn.files import (
    check_output_folder,
    make_folder,
    read_json,
    read_safetensors,
    read_torch,
    write_json,
)


def one_line(caught: pytest.ExceptionInfo) -> str:
    message = str(caught.value)
    assert "\n" not in message
    return message


class Payload:
    """An arbitrary Python object: unpickling one could run code, so weights-only loading refuses it."""


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_read_json_names_the_file_and_what_was_expected(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": 1}')
    assert read_json(path, "dictionary config") == {"a": 1}
    cases = {
        "[1, 2]": r"config.json: dictionary config should be a JSON object, found a JSON array$",
        '{"a": ': r"config.json: dictionary config is not valid JSON at line 1, column 7: Expecting value$",
        "null": r"should be a JSON object, found a JSON null$",
    }
    for text, pattern in cases.items():
        path.write_text(text)
        with pytest.raises(UserError, match=pattern) as caught:
            read_json(path, "dictionary config")
        one_line(caught)
    assert read_json(path, "anything", expect=None) is None
    path.write_bytes(b'{"caf\xe9": 1}')
    with pytest.raises(UserError, match=r"config.json: dictionary config is not UTF-8 text$"):
        read_json(path, "dictionary config")
    with pytest.raises(UserError, match=r"nothing.json: dictionary config not found$"):
        read_json(tmp_path / "nothing.json", "dictionary config")
    with pytest.raises(UserError, match=r": expected dictionary config, found a folder$"):
        read_json(tmp_path, "dictionary config")


def test_read_torch_refuses_corrupt_files_and_pickled_objects_in_one_line(tmp_path):
    good = tmp_path / "ae.pt"
    torch.save({"W_dec": torch.ones(2, 3)}, good)
    assert torch.equal(read_torch(good, "dictionary weights")["W_dec"], torch.ones(2, 3))
    data = good.read_bytes()
    broken = {"truncated.pt": data[: len(data) // 2], "garbage.pt": b"hello world", "empty.pt": b""}
    for name, content in broken.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(UserError, match=rf"{name}: dictionary weights is not a PyTorch file \(corrupt or trunc"):
            read_torch(tmp_path / name, "dictionary weights")

    torch.save({"W_dec": Payload()}, tmp_path / "object.pt")
    with pytest.raises(UserError) as caught:
        read_torch(tmp_path / "object.pt", "dictionary weights")
    assert one_line(caught).endswith(
        "object.pt: dictionary weights holds Python objects other than tensors; refused, since loading them could "
        "run code from the file"
    )
    torch.save(collections.OrderedDict(a=torch.zeros(1)), tmp_path / "plain.pt")  # plain containers are fine
    assert list(read_torch(tmp_path / "plain.pt", "weights")) == ["a"]


def test_read_safetensors_refuses_truncated_and_garbage_shards_in_one_line(tmp_path):
    shard = tmp_path / "shard_00000.safetensors"
    save_file({"acts": torch.ones(10, 4), "token_ids": torch.arange(10)}, shard)
    assert read_safetensors(shard, "shard", keys=("acts", "token_ids"))["acts"].shape == (10, 4)
    with pytest.raises(
        UserError, match=r"shard_00000.safetensors: shard has no tensor labels \(holds acts, token_ids\)$"
    ):
        read_safetensors(shard, "shard", keys=("acts", "labels"))
    data = shard.read_bytes()
    for content, reason in [(data[:-20], "incomplete metadata"), (b"\xff" * 8 + b"junk", "header too large")]:
        shard.write_bytes(content)
        with pytest.raises(UserError) as caught:
            read_safetensors(shard, "activation store shard")
        assert reason in one_line(caught)
        assert "shard_00000.safetensors: activation store shard is not a readable safetensors file" in str(caught.value)


def test_a_killed_writers_temporary_files_are_removed_by_the_next_write(tmp_path):
    target = tmp_path / "eval.json"
    stale = tmp_path / f".eval.json.{dead_pid()}.abc123.tmp"
    live = tmp_path / f".eval.json.{os.getppid()}.def456.tmp"  # a writer still running: left alone
    other = tmp_path / f".other.json.{dead_pid()}.abc123.tmp"  # another file's: not ours to judge
    for path in (stale, live, other):
        path.write_text("half")
    write_json(target, {"fvu": 0.1})
    assert not stale.exists() and live.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])


def test_an_output_folder_that_cannot_be_made_is_refused(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=r"^train.output_dir: .*/file is a file; name a folder$"):
        check_output_folder(tmp_path / "file", "train.output_dir")
    with pytest.raises(UserError, match=r"^store.path: .*/file/store cannot be made: .*/file is a file; name a fold"):
        make_folder(tmp_path / "file" / "store", "store.path")
    check_output_folder(tmp_path / "new" / "deeper", "train.output_dir")
    assert make_folder(tmp_path / "new" / "deeper", "x").is_dir()
