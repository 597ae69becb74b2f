"""One writer per output: a second holder is refused with the first one's pid, a killed holder's lock is taken
over, and the lock file goes when the holder is done."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from dictlearn.errors import UserError
from dictlearn.locks import lock_path, output_lock
from tests.test_files import dead_pid

REPO = Path(__file__).resolve().parents[1]

HOLDER = """
import sys, time
from dictlearn.locks import output_lock
with output_lock(sys.argv[1], "activation store"):
    print("held", flush=True)
    sys.stdin.readline()
"""


def test_a_second_holder_is_refused_with_the_first_ones_pid(tmp_path):
    store = tmp_path / "store"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(store)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(UserError) as caught, output_lock(store, "activation store"):
            pass
        assert str(caught.value) == (
            f"activation store {store} is in use by process {holder.pid} (a running -c); wait for it or stop it"
        )
    finally:
        holder.communicate("done\n", timeout=30)
    assert not lock_path(store).exists()
    with output_lock(store, "activation store") as lock:  # free again once the holder is done
        assert lock.read_text() == f"{os.getpid()} {Path(sys.argv[0]).name}\n"


def test_a_lock_left_by_a_killed_process_is_taken_over(tmp_path):
    store = tmp_path / "store"
    lock_path(store).write_text(f"{dead_pid()} get_activations.py\n")
    with output_lock(store, "activation store") as lock:
        assert lock.read_text().split()[0] == str(os.getpid())
    assert not lock.exists()


def test_a_lock_beside_a_file_is_refused_in_one_line(tmp_path):
    (tmp_path / "file").write_text("x")
    refused = r"^the folder of .*file/store: .*/file is a file; name a folder$"
    with pytest.raises(UserError, match=refused), output_lock(tmp_path / "file" / "store", "activation store"):
        pass
