"""get_sparse_rep.py and interpretation.py end to end on a tiny checkpoint and a dictionary made for it, and
every bad input they refuse, as one line and exit code 2."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from dictlearn.sae.topk import TopKSAE
from tests.conftest import write_dictionary
from tests.test_params import assert_one_line_error
from tests.test_scripts import run
from tests.test_sentences import BAD_CSVS

HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def tiny_dictionary(tiny_checkpoint_with_text, tmp_path_factory):
    """A (random) dictionary for the tiny checkpoint's hook, in the folder layout training writes."""
    model, _ = tiny_checkpoint_with_text
    folder = tmp_path_factory.mktemp("dictionary") / "model" / HOOK / "128_k4"
    folder.mkdir(parents=True)
    write_dictionary(folder, TopKSAE(32, 128, 4, seed=0), str(model), HOOK, dict_size=128, k=4)
    return folder


def read_params(model, corpus, dictionary, tmp_path) -> dict:
    """No hook: the scripts take it from the dictionary's config."""
    return {
        "model": {"name": str(model), "device": "cpu"},
        "data": {"source": "files", "path": str(corpus), "context_size": 16},
        "sentences": {"dictionary": str(dictionary), "csv": str(tmp_path / "sentences.csv"), "batch_size": 4},
        "interpretation": {
            "dictionary": str(dictionary),
            "tokens": 600,
            "top_n": 3,
            "batch_size": 4,
            "latents": "first:3",
            "output_dir": str(tmp_path / "interpretation"),
        },
    }


SENTENCES = (
    "group,sentence\n"
    "a,she was very good .\n"
    "a,she was very little .\n"
    "a,\n"
    "b,what could they know .\n"
    "b," + "the time of all that he would know when there was no more to think of it and so much more ." + "\n"
)


@pytest.fixture
def setup(tmp_path, tiny_checkpoint_with_text, tiny_dictionary):
    model, corpus = tiny_checkpoint_with_text
    (tmp_path / "sentences.csv").write_text(SENTENCES)
    return read_params(model, corpus, tiny_dictionary, tmp_path), tiny_dictionary


def test_get_sparse_rep_prints_tables_and_writes_csvs_and_plots(tmp_path, setup):
    params, dictionary = setup
    result = run("get_sparse_rep.py", params, tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "note: skipped 1 empty or non-text cell(s) in column 'sentence' (CSV rows 4)" in out
    assert "note: 1 sentence(s) longer than data.context_size=16 tokens were truncated to it" in out
    for title in ("original activations at the hook", "sparse codes", "summary over 4 sentences", "latents shared"):
        assert title in out
    folder = dictionary / "sentences" / "sentences"
    for name in ("codes.csv", "summary.csv", "groups.csv", "values.png", "heatmap.png", "params.json"):
        assert (folder / name).is_file(), name
    codes = pd.read_csv(folder / "codes.csv")
    assert codes["sentence"].tolist()[:2] == ["she was very good .", "she was very little ."]
    assert codes["tokens"].tolist() == [5, 5, 5, 15] and (codes["sparse_l0"] <= 4).all()
    assert json.loads((folder / "params.json").read_text())["hook"] == HOOK

    per_token = run("get_sparse_rep.py", params, tmp_path, "--per-token")
    assert per_token.returncode == 0, per_token.stderr
    tokens = pd.read_csv(dictionary / "sentences" / "sentences_per_token" / "codes.csv")
    assert len(tokens) == 5 + 5 + 5 + 15 and "summary over 30 tokens" in per_token.stdout
    assert tokens["token"].str.strip().tolist()[:5] == ["she", "was", "very", "good", "."]


def test_interpretation_prints_marked_texts_and_writes_json_and_html(tmp_path, setup):
    params, _ = setup
    result = run("interpretation.py", params, tmp_path, "--latents", "strongest:2")
    assert result.returncode == 0, result.stderr
    blocks = [b for b in result.stdout.split("\n\n") if b.startswith("latent ")]
    assert len(blocks) == 2 and all("[" in b and "]" in b for b in blocks)
    assert "\x1b[" not in result.stdout  # not a terminal: no colour codes
    folder = tmp_path / "interpretation"
    document = json.loads((folder / "latents.json").read_text())
    assert document["hook"] == HOOK and document["num_latents"] == 128 and document["top_n"] == 3
    assert 600 <= document["tokens_scanned"] < 600 + 15 * 4
    strongest = max(document["latents"], key=lambda r: r["max_activation"])
    assert blocks[0].startswith(f"latent {strongest['latent']}: ")
    assert all(len(r["contexts"]) <= 3 for r in document["latents"])
    page = (folder / "latents.html").read_text()
    assert page.startswith("<!doctype html>") and '<script id="latent-data"' in page


# The script's one line for a few of the bad CSVs (test_sentences.py checks every message).
@pytest.mark.parametrize(("content", "pattern"), [BAD_CSVS[0], BAD_CSVS[1], BAD_CSVS[4]])
def test_get_sparse_rep_refuses_a_bad_csv_in_one_line(tmp_path, setup, content, pattern):
    params, _ = setup
    path = tmp_path / "missing.csv"
    if content is not None:
        path = tmp_path / "s.csv"
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_one_line_error(run("get_sparse_rep.py", params, tmp_path, "--csv", str(path)), pattern)


def test_get_sparse_rep_names_a_missing_column(tmp_path, setup):
    params, _ = setup
    result = run("get_sparse_rep.py", params, tmp_path, "--column", "text")
    assert_one_line_error(result, r"sentences.csv: no column 'text' \(columns: group, sentence\); pass --column NAME")


@pytest.mark.parametrize(
    ("script", "extra", "pattern"),
    [
        ("interpretation.py", ["--dictionary", "nowhere"], r"no dictionary at nowhere: ae.pt is missing"),
        ("get_sparse_rep.py", ["--dictionary", "nowhere"], r"no dictionary at nowhere: ae.pt is missing"),
        ("interpretation.py", ["--latents", "top:5"], r"interpretation.latents: expected 'first:N', 'frequent:N'"),
        (
            "interpretation.py",
            ["--latents", "5,128"],
            r"latent 128 does not exist; this dictionary has latents 0\.\.127",
        ),
        (
            "interpretation.py",
            ["--tokens", "0"],
            r"^error: argument --tokens: expected a positive integer, found '0' \(see interpretation.py --help\)$",
        ),
    ],
)
def test_bad_arguments_are_refused_in_one_line(tmp_path, setup, script, extra, pattern):
    params, _ = setup
    assert_one_line_error(run(script, params, tmp_path, *extra), pattern)


@pytest.mark.parametrize("script", ["interpretation.py", "get_sparse_rep.py"])
def test_a_dictionary_at_another_hook_than_the_params_is_used_and_said(tmp_path, setup, script):
    params, dictionary = setup
    result = run(script, {**params, "hook": "blocks.2.hook_resid_post"}, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == (
        f"note: {dictionary} was trained on hook blocks.1.hook_resid_post (params: blocks.2.hook_resid_post); "
        "using the dictionary's"
    )


def test_interpretation_refuses_a_corpus_shorter_than_one_window(tmp_path, setup):
    params, _ = setup
    (tmp_path / "short.txt").write_text("the time .")
    params = {**params, "data": {**params["data"], "path": str(tmp_path / "short.txt")}}
    result = run("interpretation.py", params, tmp_path)
    assert_one_line_error(result, r"data.path: the corpus holds no complete window of data.context_size=16 tokens")
