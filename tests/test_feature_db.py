"""The feature database, SQLite and MongoDB alike: records round-trip, re-running an analysis updates and never
duplicates, an explanation survives a re-analysis, dictionaries stay apart, and search finds explanations, top
tokens and promoted tokens (and nothing else)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest
import torch

from dictlearn.analysis.feature_db import (
    MongoStore,
    SQLiteStore,
    dictionary_fingerprint,
    dictionary_name,
    open_feature_store,
    stored_analysis,
)
from dictlearn.errors import UserError
from dictlearn.params import AnalysisParams

MONGOD = shutil.which("mongod")
# Debian (bookworm) has no mongodb-server package and MongoDB's own builds are not on PyPI or npm (the packages
# there download it at run time), so a machine set up from the registries alone has no mongod.
NO_MONGOD = "needs a mongod binary on PATH; none can be installed from Debian's packages, PyPI or npm"

DICTIONARY = "tiny/blocks.1.hook_resid_post/8_k2"


def context(window: int, activation: float, position: int) -> dict:
    return {"window": window, "activation": activation, "max_position": position, "acts": [[position, activation]]}


def sample_records(scale: float = 1.0) -> list[dict]:
    def record(latent: int, top_token: str, promoted: str) -> dict:
        return {
            "latent": latent,
            "fired_tokens": 10 * latent,
            "frequency": 0.01 * latent * scale,
            "max_activation": 4.0 * scale,
            "mean_activation": 2.5,
            "histogram": {"bin_width": 0.5, "counts": [0, 3, 1]},
            "top_contexts": [context(0, 4.0, 2), context(1, 3.0, 2)],
            "levels": [
                {"low": 0.1, "high": 0.5, "contexts": []},
                {"low": 0.5, "high": 1.0, "contexts": [context(1, 3.0, 2)]},
            ],
            "quiet_windows": [2],
            "top_tokens": [top_token],
            "dla": {"promoted": [{"token": promoted, "logit": 0.5}], "suppressed": [{"token": " Emma", "logit": -0.5}]},
        }

    return [record(0, "Woodhouse", " rich"), record(1, "100%", " clever"), record(2, "Miss", " handsome")]


WINDOWS = {0: ["<s>", " Miss", " Woodhouse"], 1: ["<s>", " was", " rich", "."], 2: ["<s>", " a", " b"]}
META = {"dictionary": DICTIONARY, "num_latents": 3, "tokens_scanned": 12}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def mongo_uri(tmp_path):
    """A mongod of our own on the loopback interface, with its data in tmp_path; stopped after the test."""
    if MONGOD is None:
        pytest.skip(NO_MONGOD)
    port = free_port()
    (tmp_path / "mongo").mkdir()
    command = [MONGOD, "--dbpath", str(tmp_path / "mongo"), "--bind_ip", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    break
            time.sleep(0.2)
        yield f"mongodb://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture(params=["sqlite", "mongo"])
def store(request, tmp_path):
    if request.param == "sqlite":
        opened = SQLiteStore(tmp_path / "features.sqlite")
    else:
        opened = MongoStore(request.getfixturevalue("mongo_uri"), "dictlearn_test")
    yield opened
    opened.close()


EXPLANATION = {
    "explanation": "the surname Woodhouse",
    "explained_by": "m",
    "detection_accuracy": 0.9,
    "detection_contexts": 10,
}


def test_records_round_trip_and_a_rerun_updates_without_duplicating(store):
    store.write_analysis(DICTIONARY, META, sample_records(), WINDOWS)
    assert store.meta(DICTIONARY) == META
    read = store.latents(DICTIONARY)
    empty = {"explanation": None, "explained_by": None, "detection_accuracy": None, "detection_contexts": None}
    assert read == [{"dictionary": DICTIONARY, **r, **empty} for r in sample_records()]
    assert store.windows(DICTIONARY) == WINDOWS and store.windows(DICTIONARY, {1}) == {1: WINDOWS[1]}
    assert [r["latent"] for r in store.latents(DICTIONARY, [2, 0])] == [0, 2]

    store.set_explanation(DICTIONARY, 0, EXPLANATION)
    store.write_analysis(DICTIONARY, {**META, "tokens_scanned": 24}, sample_records(scale=2.0), {0: WINDOWS[0]})
    again = store.latents(DICTIONARY)
    assert len(again) == 3 and [r["max_activation"] for r in again] == [8.0, 8.0, 8.0]
    assert {k: again[0][k] for k in EXPLANATION} == EXPLANATION  # a re-analysis keeps the explanation
    assert store.meta(DICTIONARY)["tokens_scanned"] == 24 and store.windows(DICTIONARY) == {0: WINDOWS[0]}

    other = "tiny/blocks.2.hook_resid_post/8_k2"
    store.write_analysis(other, {**META, "dictionary": other}, sample_records()[:1], WINDOWS)
    assert len(store.latents(DICTIONARY)) == 3 and len(store.latents(other)) == 1
    assert store.latents(other)[0]["explanation"] is None


def test_search_finds_explanations_top_tokens_and_promoted_tokens_only(store):
    store.write_analysis(DICTIONARY, META, sample_records(), WINDOWS)
    store.set_explanation(DICTIONARY, 2, {**EXPLANATION, "explanation": "titles before a surname"})

    def found(text):
        return [r["latent"] for r in store.search(DICTIONARY, text, limit=10)]

    assert found("SURNAME") == [2]  # the explanation, in any case
    assert found("woodhouse") == [0]  # a top token
    assert found("clever") == [1]  # a promoted token
    assert found("Emma") == []  # suppressed tokens are not searched
    assert found("token") == [] and found("logit") == []  # nor the records' own keys
    assert found("100%") == [1] and found("%") == [1] and found("_") == []  # wildcards are literal
    assert found("") == [0, 1, 2] and len(store.search(DICTIONARY, "", limit=2)) == 2


def test_missing_and_broken_databases_are_refused(tmp_path):
    settings = AnalysisParams(dictionary=str(tmp_path / "dicts" / "m" / "h" / "run"))
    with pytest.raises(UserError, match=r"no feature database at .*features.sqlite; run `analyze.py run` first"):
        open_feature_store(settings, create=False)
    assert not (tmp_path / "dicts").exists()
    broken = tmp_path / "broken.sqlite"
    broken.write_text("not a database, just text that is long enough to be read as a header\n" * 20)
    with pytest.raises(UserError, match=r"analysis.database: .*broken.sqlite is not a feature database"):
        open_feature_store(settings.model_copy(update={"database": str(broken)}), create=False)
    assert dictionary_name(tmp_path / "dicts" / "m" / "h" / "run") == "m/h/run"


def test_an_unreachable_mongodb_is_one_clear_error():
    with pytest.raises(UserError, match=r"analysis.mongo_uri: cannot reach MongoDB at mongodb://127.0.0.1:\d+ \("):
        MongoStore(f"mongodb://127.0.0.1:{free_port()}", "dictlearn", timeout_s=0.3)


def save_weights(folder, seed: int):
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    state = {"encoder.weight": torch.randn(8, 4, generator=generator), "k": torch.tensor(2)}
    torch.save(state, folder / "ae.pt")
    return state


def test_the_fingerprint_follows_the_weights_not_the_path(tmp_path):
    state = save_weights(tmp_path / "a" / "m" / "h" / "run", seed=0)
    save_weights(tmp_path / "b" / "m" / "h" / "run", seed=1)  # alike path, other weights
    shutil.copytree(tmp_path / "a", tmp_path / "renamed")
    a, b = (dictionary_fingerprint(tmp_path / x / "m" / "h" / "run") for x in "ab")
    assert a.startswith("sha256:") and len(a) == 7 + 64
    assert a != b and dictionary_name(tmp_path / "a" / "m" / "h" / "run") == dictionary_name(tmp_path / "b/m/h/run")
    assert dictionary_fingerprint(tmp_path / "renamed" / "m" / "h" / "run") == a
    assert dictionary_fingerprint(dict(reversed(state.items()))) == a  # the state dict itself, any key order
    assert dictionary_fingerprint({**state, "k": torch.tensor(3)}) != a
    assert dictionary_fingerprint({**state, "k": torch.tensor(2.0)}) != a  # dtype counts


def test_a_retrain_into_the_same_folder_drops_the_old_analysis_and_explanations(tmp_path):
    folder = tmp_path / "m" / "h" / "run"
    old = dictionary_fingerprint(save_weights(folder, seed=0))
    store = SQLiteStore(tmp_path / "features.sqlite")
    store.write_analysis(old, {**META, "folder": str(folder)}, sample_records(), WINDOWS)
    store.set_explanation(old, 0, EXPLANATION)
    copy = tmp_path / "copy"
    other = dictionary_fingerprint(save_weights(copy, seed=2))
    store.write_analysis(other, {**META, "folder": str(copy)}, sample_records(), WINDOWS)

    new = dictionary_fingerprint(save_weights(tmp_path / "retrained", seed=1))
    with pytest.raises(UserError, match=rf"holds no analysis of the dictionary now in {folder} \(weights sha256:"):
        stored_analysis(store, new, folder)
    store.write_analysis(new, {**META, "folder": str(folder)}, sample_records()[:1], WINDOWS)
    assert store.meta(old) is None and store.latents(old) == [] and store.windows(old) == {}
    assert [r["explanation"] for r in store.latents(new)] == [None]
    assert len(store.latents(other)) == 3  # another folder's analysis stays
    store.close()
