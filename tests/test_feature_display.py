"""Showing feature records: the terminal report of one latent, search lines, contexts cut around their maximum, and
the HTML page with magnitude levels, DLA tokens and an explanation, opened in headless Chromium."""

from __future__ import annotations

import re
import subprocess

import pytest

from dictlearn.analysis.feature_records import context_record, context_view
from dictlearn.report.feature_display import latent_report, page_document, search_line, sparkline
from dictlearn.report.feature_page import render_page
from tests.test_feature_db import DICTIONARY, META, WINDOWS, sample_records
from tests.test_feature_page import CHROMIUM

EXPLAINED = {
    "explanation": "the surname Woodhouse",
    "explained_by": "m",
    "detection_accuracy": 0.9,
    "detection_contexts": 10,
}


def stored(latent: int, **fields) -> dict:
    """A record as the database returns it."""
    empty = dict.fromkeys(EXPLAINED)
    return {"dictionary": DICTIONARY, **sample_records()[latent], **empty, **fields}


def test_context_records_keep_positions_and_views_cut_around_the_maximum():
    record = context_record(4, 3.14159, [0.0, 1.5, 0.0, 3.14159, 0.2])
    assert record == {"window": 4, "activation": 3.1416, "max_position": 3, "acts": [[1, 1.5], [3, 3.142], [4, 0.2]]}
    window = ["<s>", " a", " b", " c", " d"]
    assert context_view(record, window, before=1, after=0) == {
        "activation": 3.1416,
        "max_position": 1,
        "tokens": [" b", " c"],
        "acts": [0.0, 3.142],
    }
    assert context_view(record, window, before=9, after=9)["tokens"] == window


def test_latent_report_prints_statistics_explanation_dla_and_contexts_by_level():
    report = latent_report(stored(0, **EXPLAINED), WINDOWS, META, before=1, after=1)
    assert report.splitlines() == [
        f"latent 0 of {DICTIONARY} (12 tokens scanned)",
        "  never fired in the tokens scanned",
        "  explanation: 'the surname Woodhouse' (detection accuracy 0.90 on 10 contexts, m)",
        "  promotes:   ' rich' 0.5",
        "  suppresses: ' Emma' -0.5",
        "top contexts",
        "        4   Miss [Woodhouse 4]",
        "        3   was [rich 3].",
        "at 0.5-1 of the max (2 to 4)",
        "        3   was [rich 3].",
    ]
    fired = latent_report(stored(1), WINDOWS, META, before=0, after=0).splitlines()
    assert fired[1:3] == ["  fires on 1% of tokens (10); max 4, mean 2.5", "  histogram 0 to 1.5:  █▃"]
    assert search_line(stored(1)) == "      1        1%  max 4       100%"
    assert search_line(stored(2, **EXPLAINED)).endswith(
        "'the surname Woodhouse' (detection accuracy 0.90 on 10 contexts, m)"
    )
    assert sparkline([0, 0, 4, 8, 1, 0]) == "  ▄█▁" and sparkline([0, 0]) == ""


@pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (make test installs it)"
)
def test_page_shows_levels_dla_tokens_and_the_explanation(tmp_path):
    records = [stored(0, **EXPLAINED), stored(1), stored(2)]
    document = page_document(
        {**META, "model": "tiny", "hook": "blocks.1.hook_resid_post", "top_n": 2}, records, WINDOWS, 2, 1
    )
    page = tmp_path / "features.html"
    page.write_text(render_page(document), encoding="utf-8")
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        f"{page.as_uri()}#0",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    detail = result.stdout.split('<section id="detail">')[1]
    text = re.sub(r"<[^>]+>", "", detail)
    assert "the surname Woodhouse (detection accuracy 0.90 on 10 contexts, m)" in text
    assert 'promotes" rich" 0.500' in text and 'suppresses" Emma" -0.500' in text
    assert "Top contexts" in text and "At 0.5–1 of the max (2.00 to 4.00)" in text
    assert "At 0.1–0.5" not in text  # an empty level is left out
    # The list's preview of an explained latent is its explanation; the search covers explanations too.
    assert '<span class="preview">the surname Woodhouse</span>' in result.stdout
