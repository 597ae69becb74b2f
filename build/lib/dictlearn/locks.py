"""One writer per output: ``output_lock`` holds ``<output>.lock`` while a script writes a store, a run folder or a
feature database, and refuses a second script with one line naming the first one's process.

The lock is ``flock`` on the lock file, which the kernel releases when its holder exits however it exits, so the
lock file a killed process leaves behind (its pid no longer alive) is simply taken over. The file sits beside the
output, not inside it, because a store is replaced by renaming a whole folder.
"""

from __future__ import annotations

import fcntl
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dictlearn.errors import UserError
from dictlearn.files import make_folder, pid_alive


def lock_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".lock")


def _holder(lock: Path) -> tuple[int, str]:
    """The pid and script name written in a lock file (0 and '' when unreadable)."""
    try:
        pid, _, script = lock.read_text().partition(" ")
        return int(pid), script.strip()
    except (OSError, ValueError):
        return 0, ""


@contextmanager
def output_lock(path: str | Path, what: str) -> Iterator[Path]:
    """Hold ``<path>.lock`` for the ``with`` block; ``what`` names the output in the refusal
    ("activation store data/activations/m/h is in use by process 1234 (a running get_activations.py); ...")."""
    lock = lock_path(path)
    make_folder(lock.parent, f"the folder of {path}")
    while True:
        try:
            handle = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as err:
            raise UserError(f"{what} {path}: cannot create the lock file {lock} ({err.strerror or err})") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            pid, script = _holder(lock)
            running = f" (a running {script})" if script else ""
            holder = f"process {pid}{running}" if pid_alive(pid) else "another process"
            raise UserError(f"{what} {path} is in use by {holder}; wait for it or stop it") from None
        # The holder we waited on may have removed the file between our open and our flock: then we hold a lock
        # on a file nobody else sees, and must try again with the one now at the path.
        try:
            same = os.stat(lock).st_ino == os.fstat(handle).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(handle)
    try:
        os.ftruncate(handle, 0)
        os.write(handle, f"{os.getpid()} {Path(sys.argv[0]).name}\n".encode())
        yield lock
    finally:
        lock.unlink(missing_ok=True)
        os.close(handle)
