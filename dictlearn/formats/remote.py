"""Remote dictionaries: ``az://account/container/path`` (blobfile, as openai/sparse_autoencoder reads its
files), ``hf://owner/repo/path`` (huggingface_hub) and ``openai:<version>/<location>/<layer>`` (OpenAI's public
GPT-2 small dictionaries), fetched once into ``data/cache/dictionaries/`` and read from there after.

Before any download one short connection probe is made, so an offline machine gets one line at once instead of
minutes of retries.
"""

from __future__ import annotations

import re
import socket
from pathlib import Path
from urllib.parse import urlparse

from dictlearn.errors import UserError
from dictlearn.files import atomic_write
from dictlearn.lm.models import CACHE_DIR

REMOTE_CACHE = CACHE_DIR / "dictionaries"
PROBE_TIMEOUT_S = 3.0
# openai/sparse_autoencoder paths.py: v5 dictionaries of GPT-2 small.
OPENAI_ROOT = "az://openaipublic/sparse-autoencoder/gpt2-small"
_OPENAI_RE = re.compile(r"^openai:(v5_32k|v5_128k)/([a-z_]+)/(\d+)$")


def is_remote(spec: str) -> bool:
    return isinstance(spec, str) and (spec.startswith(("az://", "hf://", "openai:")))


def openai_url(spec: str) -> str:
    """``openai:v5_32k/resid_post_mlp/6`` -> ``az://openaipublic/.../resid_post_mlp_v5_32k/autoencoders/6.pt``."""
    from dictlearn.formats.openai import LOCATIONS

    match = _OPENAI_RE.match(spec)
    if match is None or match.group(2) not in LOCATIONS:
        raise UserError(
            f"{spec}: expected openai:<v5_32k|v5_128k>/<location>/<layer> with location one of {', '.join(LOCATIONS)}"
        )
    version, location, layer = match.groups()
    return f"{OPENAI_ROOT}/{location}_{version}/autoencoders/{layer}.pt"


def _unreachable(host: str, port: int = 443) -> str | None:
    """Why ``host`` cannot be reached (DNS or TCP), or None."""
    try:
        socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S).close()
    except OSError as err:
        return str(err) or type(err).__name__
    return None


def _offline(spec: str, host: str, reason: str) -> UserError:
    return UserError(f"{spec}: cannot download the dictionary: {host} cannot be reached ({reason[:100]}); no network?")


def fetch(spec: str) -> Path:
    """The local path of a remote dictionary (a file for az:// and openai:, a file or folder for hf://),
    downloading it on first use."""
    if spec.startswith("openai:"):
        return _fetch_az(openai_url(spec), spec)
    if spec.startswith("az://"):
        return _fetch_az(spec, spec)
    return _fetch_hf(spec)


def _fetch_az(url: str, spec: str) -> Path:
    parsed = urlparse(url)
    account, path = parsed.netloc, parsed.path.lstrip("/")
    if not account or not path:
        raise UserError(f"{spec}: expected az://<account>/<container>/<path>")
    local = REMOTE_CACHE / "az" / account / path
    if local.is_file():
        return local
    host = f"{account}.blob.core.windows.net"
    if reason := _unreachable(host):
        raise _offline(spec, host, reason)
    try:
        import blobfile
    except ImportError:
        raise UserError(f"{spec}: reading az:// paths needs blobfile; pip install blobfile") from None
    local.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(local, lambda tmp: blobfile.copy(url, str(tmp), overwrite=True))
    except Exception as err:  # blobfile raises its own errors for missing blobs and failed requests
        raise UserError(f"{spec}: download failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    return local


def _fetch_hf(spec: str) -> Path:
    parts = spec.removeprefix("hf://").strip("/").split("/")
    if len(parts) < 2 or not all(parts):
        raise UserError(f"{spec}: expected hf://<owner>/<repo>[/<path in the repo>]")
    repo_id, inner = "/".join(parts[:2]), "/".join(parts[2:])
    from huggingface_hub import constants, snapshot_download

    host = urlparse(constants.ENDPOINT).hostname or constants.ENDPOINT
    reason = _unreachable(host)
    options = {"local_files_only": True} if reason else {}
    try:
        root = snapshot_download(
            repo_id,
            allow_patterns=[inner, f"{inner}/*"] if inner else None,
            cache_dir=REMOTE_CACHE / "hf",
            **options,
        )
    except Exception as err:  # huggingface_hub's errors for missing repos, files and connections
        if reason:
            raise _offline(spec, host, reason) from None
        raise UserError(f"{spec}: download failed ({type(err).__name__}: {str(err).splitlines()[0][:120]})") from None
    local = Path(root) / inner
    if not local.exists():
        raise UserError(f"{spec}: the repository {repo_id} has no {inner}")
    return local
