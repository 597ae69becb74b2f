"""analyze.py end to end on a tiny checkpoint and a dictionary made for it: run fills the SQLite database (again
without duplicating), show and search print from it, explain stores explanations and scores from a loopback
chat server, and bad inputs are one line and exit code 2."""

from __future__ import annotations

import json
import sqlite3

import pytest

from dictlearn.errors import UserError
from dictlearn.params import parse_params
from tests.chat_server import ChatServer, reader_of
from tests.test_feature_db import free_port
from tests.test_params import assert_one_line_error
from tests.test_read_scripts import HOOK, tiny_dictionary  # noqa: F401 (a fixture)
from tests.test_scripts import run


def analysis_params(model, corpus, dictionary, **auto_interp) -> dict:
    return {
        "model": {"name": str(model), "device": "cpu"},
        "data": {"source": "files", "path": str(corpus), "context_size": 16},
        "analysis": {
            "dictionary": str(dictionary),
            "tokens": 900,
            "top_n": 3,
            "per_level": 2,
            "quiet_windows": 3,
            "batch_size": 4,
            "context_before": 4,
            "context_after": 1,
            "dla_tokens": 3,
            "auto_interp": {"latents": "frequent:2", "requests_per_second": 100, "backoff_s": 0, **auto_interp},
        },
    }


@pytest.fixture(scope="module")
def analysed(tiny_checkpoint_with_text, tiny_dictionary, tmp_path_factory):  # noqa: F811
    """The tiny dictionary analysed once by `analyze.py` (no subcommand: run is the default)."""
    model, corpus = tiny_checkpoint_with_text
    folder = tmp_path_factory.mktemp("analyse")
    params = analysis_params(model, corpus, tiny_dictionary)
    result = run("analyze.py", params, folder)
    assert result.returncode == 0, result.stderr
    return params, tiny_dictionary, result


def rows(database) -> list[tuple]:
    with sqlite3.connect(database) as connection:
        return connection.execute("SELECT latent, explanation, detection_accuracy FROM latents").fetchall()


def test_run_fills_the_database_and_a_rerun_does_not_duplicate(analysed, tmp_path):
    params, dictionary, first = analysed
    database = dictionary / "analysis" / "features.sqlite"
    assert "wrote 128 latent records to" in first.stdout and "tokens/s" in first.stdout
    assert sorted(latent for latent, _, _ in rows(database)) == list(range(128))
    folder = dictionary / "analysis"
    assert json.loads((folder / "params.json").read_text())["hook"] == HOOK
    page = (folder / "features.html").read_text()
    assert '"levels":[' in page and '"promoted":[' in page

    again = run("analyze.py", params, tmp_path, "run", "--tokens", "600")
    assert again.returncode == 0, again.stderr
    assert len(rows(database)) == 128
    with sqlite3.connect(database) as connection:
        [(meta,)] = connection.execute("SELECT meta FROM analyses").fetchall()
    assert 600 <= json.loads(meta)["tokens_scanned"] < 900


def test_show_and_search_print_from_the_database(analysed, tmp_path):
    params, dictionary, _ = analysed
    with sqlite3.connect(dictionary / "analysis" / "features.sqlite") as connection:
        [(latent, top_tokens)] = connection.execute(
            "SELECT latent, top_tokens FROM latents ORDER BY fired_tokens DESC LIMIT 1"
        ).fetchall()
    shown = run("analyze.py", params, tmp_path, "show", "--latent", str(latent))
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"latent {latent} of model/{HOOK}/128_k4 (")
    assert lines[1].startswith("  fires on ") and "max" in lines[1] and "mean" in lines[1]
    assert lines[3].startswith("  promotes: ") and lines[4].startswith("  suppresses: ")
    assert lines[5] == "top contexts" and "[" in lines[6]
    assert any(line.startswith("at 0.7-1 of the max (") for line in lines)

    word = json.loads(top_tokens)[0]
    found = run("analyze.py", params, tmp_path, "search", word)
    assert found.returncode == 0, found.stderr
    assert any(line.split()[0] == str(latent) for line in found.stdout.splitlines()[:-1])
    assert found.stdout.splitlines()[-1].endswith(f"match {word!r}") or "showing the first" in found.stdout

    missing = run("analyze.py", params, tmp_path, "show", "--latent", "128")
    assert_one_line_error(missing, r"--latent: latent 128 does not exist; this dictionary has latents 0\.\.127")
    elsewhere = run("analyze.py", params, tmp_path, "show", "--latent", "1", "--dictionary", str(tmp_path / "none"))
    assert_one_line_error(elsewhere, r"no feature database at .*none/analysis/features.sqlite; run `analyze.py run`")


def test_explain_stores_explanations_and_scores_and_fails_clearly_when_the_server_is_down(
    analysed, tmp_path, monkeypatch
):
    params, dictionary, _ = analysed
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-written-anywhere")
    with ChatServer(reader_of("<bos>", "the start of a text"), max_requests=4) as server:
        served = analysis_params(*(params[k][p] for k, p in [("model", "name"), ("data", "path")]), dictionary)
        served["analysis"]["auto_interp"]["base_url"] = server.base_url
        explained = run("analyze.py", served, tmp_path, "explain")
    assert explained.returncode == 0, explained.stderr
    assert len(server.requests) == 4  # two latents, an explanation and a detection each
    stored = [row for row in rows(dictionary / "analysis" / "features.sqlite") if row[1] is not None]
    assert len(stored) == 2 and all(text == "the start of a text" and 0 <= score <= 1 for _, text, score in stored)
    assert explained.stdout.count("'the start of a text' (detection accuracy") == 2
    assert "the start of a text" in (dictionary / "analysis" / "features.html").read_text()
    assert "the start of a text" in run("analyze.py", params, tmp_path, "search", "START OF").stdout
    assert all(headers["Authorization"] == "Bearer sk-never-written-anywhere" for _, headers, _ in server.requests)
    for written in [*(dictionary / "analysis").iterdir(), tmp_path / "params.json"]:
        assert b"sk-never-written-anywhere" not in written.read_bytes(), written

    down = analysis_params(params["model"]["name"], params["data"]["path"], dictionary)
    down["analysis"]["auto_interp"].update(base_url=f"http://127.0.0.1:{free_port()}/v1", retries=1)
    refused = run("analyze.py", down, tmp_path, "explain", "--latents", "3")
    assert_one_line_error(
        refused, r"analysis.auto_interp.base_url: no answer from http://127.0.0.1:\d+/v1/chat/completions after 2 tries"
    )
    unknown = run("analyze.py", down, tmp_path, "explain", "--latents", "3,500")
    assert_one_line_error(
        unknown, r"analysis.auto_interp.latents: latent 500 does not exist; this dictionary has latents 0\.\.127"
    )


@pytest.mark.parametrize(
    "analysis, message",
    [
        ({"levels": [0.5, 0.2]}, "params: analysis.levels: expected increasing fractions in (0, 1] such as"),
        ({"levels": [0.1, 1.5]}, "found [0.1, 1.5]"),
        ({"auto_interp": {"base_urll": "x"}}, "unknown key 'analysis.auto_interp.base_urll'; did you mean 'base_url'?"),
        (
            {"auto_interp": {"base_url": "localhost:8000"}},
            "analysis.auto_interp.base_url: expected an http:// or https:// URL",
        ),
        ({"auto_interp": {"latents": "most:3"}}, "analysis.auto_interp.latents: expected 'first:N', 'frequent:N'"),
        (
            {"auto_interp": {"requests_per_second": 0}},
            "analysis.auto_interp.requests_per_second: input should be greater than 0",
        ),
        ({"per_levels": 3}, "unknown key 'analysis.per_levels'; did you mean 'per_level'?"),
    ],
)
def test_bad_analysis_params_are_one_line(analysis, message):
    with pytest.raises(UserError) as caught:
        parse_params({"analysis": analysis})
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_copied_dictionary_reads_its_own_analysis_and_a_busy_database_is_refused(analysed, tmp_path):
    import os
    import shutil

    from dictlearn.locks import output_lock

    params, dictionary, _ = analysed
    copy = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(dictionary, copy)
    shown = run("analyze.py", params, tmp_path, "show", "--latent", "0", "--dictionary", str(copy))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"latent 0 of model/{HOOK}/128_k4 (")  # named where it was analysed

    database = dictionary / "analysis" / "features.sqlite"
    with output_lock(database, "feature database"):
        busy = run("analyze.py", params, tmp_path, "explain")
    assert_one_line_error(busy, rf"^error: feature database {database} is in use by process {os.getpid()} \(a ")
    assert_one_line_error(
        run("analyze.py", params, tmp_path, "search", "x", "--limit", "-1"),
        r"^error: argument --limit: expected a positive integer, found '-1' \(see analyze.py search --help\)$",
    )
