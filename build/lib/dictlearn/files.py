"""Files: atomic writes, so a reader (or a resumed run) never sees a half-written file, and reads of files we did
not just write, so a missing, truncated or foreign file is one line naming it and what was expected.

Every output is written to ``.<name>.<pid>.<random>.tmp`` in its folder, then renamed into place. A process killed
mid-write leaves its temporary file behind; the next write of the same file removes the ones whose process is gone
(the pid in the name says whose it is, so a write in progress elsewhere is never touched).
"""

from __future__ import annotations

import glob
import json
import os
import pickle
import re
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch

from dictlearn.errors import UserError

JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number", bool: "boolean"}


def pid_alive(pid: int) -> bool:
    """True when a process with this id exists (it may belong to another user)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temps(path: Path) -> None:
    """Remove ``path``'s temporary files left by killed writers (their pid is no longer alive)."""
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(\d+)\.[^.]+\.tmp$")
    for sibling in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        match = pattern.match(sibling.name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            sibling.unlink(missing_ok=True)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> None:
    """Call ``write(temp_path)``, then rename the temporary file onto ``path``."""
    path = Path(path)
    make_folder(path.parent, f"the folder of {path}")
    remove_stale_temps(path)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(temp))
        # mkstemp makes the file owner-only; give it the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp, 0o666 & ~umask)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data) -> None:
    atomic_write(path, lambda temp: temp.write_text(json.dumps(data, indent=2) + "\n"))


def torch_save(path: str | Path, obj) -> None:
    atomic_write(path, lambda temp: torch.save(obj, temp))


def check_output_folder(path: str | Path, what: str) -> None:
    """Refuse, before any work starts, an output folder that cannot be made or written: the path itself or one
    of its parents is a file, or the nearest existing folder is not writable."""
    path = Path(path)
    for existing in (path, *path.parents):
        if not existing.exists():
            continue
        if not existing.is_dir():
            where = "is a file" if existing == path else f"cannot be made: {existing} is a file"
            raise UserError(f"{what}: {path} {where}; name a folder")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise UserError(f"{what}: cannot write in {existing} (permission denied)")
        return


def make_folder(path: str | Path, what: str) -> Path:
    """``mkdir -p`` that fails with one line naming ``what`` (a parent that is a file, no permission)."""
    path = Path(path)
    check_output_folder(path, what)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"{what}: cannot create {path} ({err.strerror or err})") from None
    return path


def _unreadable(path: Path, what: str, err: OSError) -> UserError:
    if isinstance(err, FileNotFoundError):
        return UserError(f"{path}: {what} not found")
    if isinstance(err, IsADirectoryError):
        return UserError(f"{path}: expected {what}, found a folder")
    return UserError(f"{path}: cannot read {what} ({err.strerror or err})")


def read_json(path: str | Path, what: str, expect: type | None = dict):
    """The JSON in ``path``, which must be a ``expect`` at the top level (a config.json that is a list is refused);
    ``expect=None`` takes any JSON value."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise _unreadable(path, what, err) from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: {what} is not UTF-8 text") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise UserError(
            f"{path}: {what} is not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if expect is not None and not isinstance(data, expect):
        found = JSON_TYPE_NAMES.get(type(data), "null")
        raise UserError(f"{path}: {what} should be a JSON {JSON_TYPE_NAMES[expect]}, found a JSON {found}")
    return data


def read_torch(path: str | Path, what: str, map_location: torch.device | str = "cpu"):
    """``torch.load`` with ``weights_only=True``: tensors and plain containers only, since unpickling anything
    else could run code from the file. A corrupt file, or one holding other Python objects, is one line."""
    path = Path(path)
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except OSError as err:
        raise _unreadable(path, what, err) from None
    except pickle.UnpicklingError as err:
        # A torch.save archive is a zip; garbage also fails in the weights-only unpickler, so ask the container.
        if "weights only" in str(err).lower() and zipfile.is_zipfile(path):
            raise UserError(
                f"{path}: {what} holds Python objects other than tensors; refused, since loading them could run "
                "code from the file"
            ) from None
        raise UserError(f"{path}: {what} is not a PyTorch file (corrupt or truncated)") from None
    except MemoryError:
        raise
    except Exception:  # torch reports a broken archive as RuntimeError, KeyError, EOFError...
        raise UserError(f"{path}: {what} is not a PyTorch file (corrupt or truncated)") from None


def read_safetensors(path: str | Path, what: str, keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors, which must include ``keys``; a truncated file or a garbage header is one
    line naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    try:
        tensors = load_file(path)
    except OSError as err:
        raise _unreadable(path, what, err) from None
    except SafetensorError as err:
        reason = str(err).removeprefix("Error while deserializing header: ")
        raise UserError(f"{path}: {what} is not a readable safetensors file ({reason}); it may be truncated") from None
    missing = [key for key in keys if key not in tensors]
    if missing:
        raise UserError(
            f"{path}: {what} has no tensor {', '.join(missing)} (holds {', '.join(sorted(tensors)) or 'none'})"
        )
    return tensors
