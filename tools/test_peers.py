"""`make test-peers`: our exports of every peer fixture, loaded by each real peer library (not in CI).

    python tools/test_peers.py export OUT          # in our venv: OUT/<library>/<case>/, OUT/<case>.safetensors
    python tools/test_peers.py check LIBRARY OUT   # in that library's venv: a table of differences per case

Each export is our reading of the fixture, written by ``convert_dictionary``'s writer; the expected codes and
x_hat are our SAE's on the fixture's ``x``. A target that cannot hold a dictionary exactly refuses in one line;
the refusal is recorded in OUT/skipped.json and shown in the check's table. ``check`` exits 1 when an export
does not load, when a library's active latents differ from ours, or when a difference exceeds ``RTOL`` times
the largest magnitude of that tensor.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = next(
    p / "shared/fixtures/peer-formats" for p in REPO.parents if (p / "shared/fixtures/peer-formats").is_dir()
)
TARGETS = ("dictionary_learning", "saelens", "sparsify")
SKIPPED_FILE = "skipped.json"
# float32 carries ~1.2e-7 relative; a D=16 dot product summed in another order (sparsify's embedding_bag
# decoder, a transposed matmul) moves the result by a few 1e-7 of the largest term. Any convention our writer
# got wrong (a bias not folded, decoder norms 0.5-1.5 applied or not) moves it by 1e-2 or more.
RTOL = 1e-4


def export(out: Path) -> None:
    sys.path.insert(0, str(REPO))
    from safetensors.torch import load_file, save_file

    from dictlearn.errors import UserError
    from dictlearn.formats.convert import write_as
    from dictlearn.formats.detect import open_any
    from dictlearn.sae.base import codes_to_dense

    skipped: dict[str, dict[str, str]] = {library: {} for library in TARGETS}
    for reference in sorted(FIXTURES.glob("*/*/reference.safetensors")):
        case = reference.parent.relative_to(FIXTURES).as_posix().replace("/", "__")
        sae, info = open_any(reference.parent)
        x = load_file(reference)["x"]
        with torch.no_grad():
            ours = sae(x)
        codes = codes_to_dense(ours.codes, sae.num_latents)
        save_file({"x": x, "codes": codes, "x_hat": ours.x_hat.contiguous()}, str(out / f"{case}.safetensors"))
        for library in TARGETS:
            try:
                write_as(sae, info, library, out / library / case)
            except UserError as err:
                skipped[library][case] = str(err)
                print(f"{case} -> {library}: skipped ({err})")
    (out / SKIPPED_FILE).write_text(json.dumps(skipped, indent=1))


def library_outputs(library: str, folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(dense codes, x_hat) of the export in ``folder``, loaded and run by ``library`` itself."""
    if library == "dictionary_learning":
        from dictionary_learning.utils import load_dictionary

        ae, _ = load_dictionary(str(folder), device="cpu")
        codes = ae.encode(x)
        return codes, ae.decode(codes)
    if library == "saelens":
        from sae_lens import SAE

        sae = SAE.load_from_disk(str(folder), device="cpu")
        codes = sae.encode(x)
        return codes, sae.decode(codes)
    from sparsify import SparseCoder

    (hookpoint,) = [p for p in folder.iterdir() if p.is_dir()]
    sae = SparseCoder.load_from_disk(str(hookpoint), device="cpu")
    out = sae.encode(x)
    codes = torch.zeros(x.shape[0], out.pre_acts.shape[1]).scatter(1, out.top_indices, out.top_acts)
    return codes, sae(x).sae_out  # sae_out adds the skip connection, as our x_hat does


def _difference(found: torch.Tensor, expected: torch.Tensor) -> tuple[float, bool]:
    """(max |found - expected|, whether it is within RTOL of expected's largest magnitude)."""
    if found.shape != expected.shape:
        return float("inf"), False
    difference = float((found - expected).abs().max())
    return difference, difference <= RTOL * float(expected.abs().max())


def check(library: str, out: Path) -> int:
    from safetensors.torch import load_file

    skipped = json.loads((out / SKIPPED_FILE).read_text())[library]
    folders = sorted((out / library).iterdir()) if (out / library).is_dir() else []
    worst_codes = worst_x_hat = 0.0
    failed = []
    print(f"{library}: {'case':42s} {'max |codes - ours|':>19s} {'max |x_hat - ours|':>19s}  active set")
    for folder in folders:
        expected = load_file(out / f"{folder.name}.safetensors")
        try:
            with torch.no_grad():
                codes, x_hat = library_outputs(library, folder, expected["x"])
        except Exception as err:  # noqa: BLE001 - any loader error is a failed export, reported in one line
            failed.append(folder.name)
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            print(f"  {folder.name:42s} FAILED to load: {type(err).__name__}: {message}")
            continue
        codes_difference, codes_ok = _difference(codes, expected["codes"])
        x_hat_difference, x_hat_ok = _difference(x_hat, expected["x_hat"])
        same_support = codes.shape == expected["codes"].shape and torch.equal(codes != 0, expected["codes"] != 0)
        worst_codes, worst_x_hat = max(worst_codes, codes_difference), max(worst_x_hat, x_hat_difference)
        ok = codes_ok and x_hat_ok and same_support
        if not ok:
            failed.append(folder.name)
        print(
            f"  {folder.name:42s} {codes_difference:19.2e} {x_hat_difference:19.2e}  "
            f"{'same' if same_support else 'DIFFERENT'}{'' if ok else '  FAILED'}"
        )
    for case, reason in sorted(skipped.items()):
        print(f"  {case:42s} skipped: {reason}")
    verdict = f"FAILED ({', '.join(failed)})" if failed or not folders else "ok"
    print(
        f"{library}: max code difference {worst_codes:.2e}, max x_hat difference {worst_x_hat:.2e} over "
        f"{len(folders)} exports ({len(skipped)} skipped; tolerance {RTOL:g} x the largest magnitude): {verdict}"
    )
    return 1 if failed or not folders else 0


if __name__ == "__main__":
    if sys.argv[1] == "export":
        Path(sys.argv[2]).mkdir(parents=True, exist_ok=True)
        export(Path(sys.argv[2]))
    else:
        sys.exit(check(sys.argv[2], Path(sys.argv[3])))
