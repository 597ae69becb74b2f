"""`make test-peers`: our exports of every peer fixture, loaded by each real peer library (not in CI).

    python tools/test_peers.py export OUT          # in our venv: OUT/<library>/<case>/ + OUT/<case>.safetensors
    python tools/test_peers.py check LIBRARY OUT   # in that library's venv: max |codes - ours| per case

Each export is our reading of the fixture, written by ``convert_dictionary``'s writer; the expected codes are our
SAE's on the fixture's ``x``. Targets that cannot hold a dictionary exactly refuse, and are skipped.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = next(
    p / "shared/fixtures/peer-formats" for p in REPO.parents if (p / "shared/fixtures/peer-formats").is_dir()
)
TARGETS = {"dictionary_learning": "dictionary_learning", "saelens": "saelens", "sparsify": "sparsify"}


def export(out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from safetensors.torch import load_file, save_file

    from dictlearn.errors import UserError
    from dictlearn.formats.convert import write_as
    from dictlearn.formats.detect import open_any
    from dictlearn.sae.base import codes_to_dense

    for reference in sorted(FIXTURES.glob("*/*/reference.safetensors")):
        case = reference.parent.relative_to(FIXTURES).as_posix().replace("/", "__")
        sae, info = open_any(reference.parent)
        x = load_file(reference)["x"]
        with torch.no_grad():
            save_file(
                {"x": x, "codes": codes_to_dense(sae.encode(x), sae.num_latents)}, str(out / f"{case}.safetensors")
            )
        for library in TARGETS:
            try:
                write_as(sae, info, library, out / library / case)
            except UserError as err:
                print(f"{case} -> {library}: skipped ({err})")


def library_codes(library: str, folder: Path, x: torch.Tensor) -> torch.Tensor:
    if library == "dictionary_learning":
        from dictionary_learning.utils import load_dictionary

        ae, _ = load_dictionary(str(folder), device="cpu")
        return ae.encode(x)
    if library == "saelens":
        from sae_lens import SAE

        return SAE.load_from_disk(str(folder), device="cpu").encode(x)
    from sparsify import SparseCoder

    (hookpoint,) = [p for p in folder.iterdir() if p.is_dir()]
    out = SparseCoder.load_from_disk(str(hookpoint), device="cpu").encode(x)
    return torch.zeros(x.shape[0], out.pre_acts.shape[1]).scatter(1, out.top_indices, out.top_acts)


def check(library: str, out: Path) -> int:
    from safetensors.torch import load_file

    worst, failed = 0.0, 0
    for folder in sorted((out / library).iterdir()):
        expected = load_file(out / f"{folder.name}.safetensors")
        with torch.no_grad():
            codes = library_codes(library, folder, expected["x"])
        difference = float((codes - expected["codes"]).abs().max())
        same_support = bool(torch.equal(codes != 0, expected["codes"] != 0))
        worst = max(worst, difference)
        failed += difference > 1e-5 or not same_support
        print(f"{library:20s} {folder.name:45s} max |codes diff| {difference:.2e} same support {same_support}")
    print(f"{library}: max code difference {worst:.2e} over {len(list((out / library).iterdir()))} exports")
    return 1 if failed else 0


if __name__ == "__main__":
    if sys.argv[1] == "export":
        Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
        export(Path(sys.argv[2]))
    else:
        sys.exit(check(sys.argv[2], Path(sys.argv[3])))
