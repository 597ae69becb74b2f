"""Fetch Jane Austen's six novels from Debian's r-cran-janeaustenr into ``<out>/<name>.txt``.

Usage: ``.venv/bin/python tools/fetch_austen.py [--out data/austen]``. Each file holds one paragraph per
line with a blank line between paragraphs. Does nothing when all six files are already there.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from dictlearn.errors import UserError, run_script  # noqa: E402
from tools.rdata import read_lazyload_db, text_lines  # noqa: E402

PACKAGE = "r-cran-janeaustenr"
RDB_IN_DEB = "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey", "persuasion")


def reflow(lines: list[str]) -> list[str]:
    """Join the printed lines of each paragraph (runs of non-empty lines) into one line."""
    paragraphs, current = [], ""
    for line in lines:
        line = line.strip()
        if not line:
            if current:
                paragraphs.append(current)
            current = ""
        elif not current:
            current = line
        # The texts break lines only at spaces, except after a "--" dash, which is written unspaced.
        elif current.endswith("--"):
            current += line
        else:
            current += " " + line
    if current:
        paragraphs.append(current)
    return paragraphs


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    except FileNotFoundError as err:
        raise UserError(f"{cmd[0]} not found: this script needs Debian's apt and dpkg") from err


def last_line(proc: subprocess.CompletedProcess) -> str:
    lines = (proc.stderr or proc.stdout).strip().splitlines()
    return lines[-1] if lines else f"exit code {proc.returncode}"


def download_deb(workdir: Path) -> Path:
    """``apt-get download`` the package; on a fresh machine the apt lists are empty, so update once."""
    proc = run(["apt-get", "download", PACKAGE], workdir)
    if proc.returncode != 0:
        update = run(["apt-get", "update"], workdir)
        if update.returncode != 0:
            raise UserError(f"apt-get update failed: {last_line(update)}")
        proc = run(["apt-get", "download", PACKAGE], workdir)
        if proc.returncode != 0:
            raise UserError(f"apt-get download {PACKAGE} failed: {last_line(proc)}")
    debs = sorted(workdir.glob(f"{PACKAGE}_*.deb"))
    if not debs:
        raise UserError(f"apt-get download {PACKAGE} reported success but left no .deb in {workdir}")
    return debs[-1]


def write_atomic(path: Path, text: str) -> None:
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".tmp", delete=False) as f:
        f.write(text)
    # NamedTemporaryFile creates files private (0600); the corpus is ordinary shared data.
    os.chmod(f.name, 0o644)
    os.replace(f.name, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "austen", help="output folder")
    args = parser.parse_args()
    targets = {name: args.out / f"{name}.txt" for name in NOVELS}
    if all(path.is_file() and path.stat().st_size > 0 for path in targets.values()):
        print(f"all six novels already in {args.out}")
        return
    try:
        args.out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UserError(f"cannot create output folder {args.out}: {err.strerror}") from err

    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        deb = download_deb(workdir)
        proc = run(["dpkg-deb", "-x", str(deb), str(workdir / "root")], workdir)
        if proc.returncode != 0:
            raise UserError(f"dpkg-deb -x {deb.name} failed: {last_line(proc)}")
        rdb = workdir / "root" / RDB_IN_DEB
        if not rdb.is_file():
            raise UserError(f"{deb.name} has no {RDB_IN_DEB}")
        try:
            db = read_lazyload_db(rdb)
            missing = [name for name in NOVELS if name not in db]
            if missing:
                raise UserError(f"{RDB_IN_DEB} lacks {', '.join(missing)}; it holds {', '.join(sorted(db))}")
            texts = {name: reflow(text_lines(db[name])) for name in NOVELS}
        except ValueError as err:
            raise UserError(f"cannot read {RDB_IN_DEB}: {err}") from err

    total_chars = total_paragraphs = 0
    for name, paragraphs in texts.items():
        text = "\n\n".join(paragraphs) + "\n"
        write_atomic(targets[name], text)
        total_chars += len(text)
        total_paragraphs += len(paragraphs)
        print(f"{name:17s} {len(text):>9,d} chars {len(paragraphs):>6,d} paragraphs -> {targets[name]}")
    print(f"{'total':17s} {total_chars:>9,d} chars {total_paragraphs:>6,d} paragraphs")


def main_or_error() -> None:
    """Disk and permission problems are the user's to fix too: report them in one line, not a traceback."""
    try:
        main()
    except OSError as err:
        raise UserError(str(err)) from err


if __name__ == "__main__":
    run_script(main_or_error)
