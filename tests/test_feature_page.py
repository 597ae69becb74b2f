"""The latents' HTML page, opened in headless Chromium (Debian's package; `make test` installs it): a screenshot
shows the latent list and a shaded context, and the rendered DOM holds the latent ids and the token text."""

from __future__ import annotations

import json
import re
import struct
import subprocess
from pathlib import Path

import pytest
import torch

from dictlearn.analysis.top_contexts import TopContexts, latent_records
from dictlearn.report.feature_page import render_page

CHROMIUM = Path("/usr/bin/chromium")
WORDS = [
    "<s>",
    " Miss",
    " Woodhouse",
    " was",
    " handsome",
    ",",
    " clever",
    " and",
    " rich",
    " </script><b>not bold</b>",
]


def sample_document() -> dict:
    """Three latents over two windows: 0 fires on ' Woodhouse', 1 on ' rich' and ' clever', 2 never; one token
    holds markup that must stay text."""
    ids_BS = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8], [0, 2, 3, 6, 7, 8, 9, 1, 2]])
    acts_BSK = torch.zeros(2, 9, 1)
    indices_BSK = torch.zeros(2, 9, 1, dtype=torch.long)
    for b, s, latent, act in [(0, 2, 0, 6.5), (1, 1, 0, 3.0), (1, 8, 0, 5.0), (0, 8, 1, 4.0), (0, 6, 1, 1.0)]:
        acts_BSK[b, s, 0], indices_BSK[b, s, 0] = act, latent
    top = TopContexts(3, 4, before=5, after=2, histogram_bins=8)
    top.update(ids_BS, acts_BSK, indices_BSK, ids_BS != 0)
    return {
        "dictionary": "dictionaries/test/blocks.1.hook_resid_post/run",
        "model": "tiny",
        "hook": "blocks.1.hook_resid_post",
        "num_latents": 3,
        "k": 1,
        "tokens_scanned": top.tokens_seen,
        "top_n": 4,
        "context_before": 5,
        "context_after": 2,
        "latents": latent_records(top, lambda ids: {i: WORDS[i] for i in ids}),
    }


def test_page_is_self_contained_and_escapes_token_text():
    page = render_page(sample_document())
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page), "the page must not fetch anything"
    assert page.count("</script>") == 2  # the data's own '</script>' token is escaped
    data = page.split('<script id="latent-data" type="application/json">')[1].split("</script>")[0]
    assert json.loads(data)["latents"][1]["contexts"][0]["tokens"][-1] == " rich"


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def headless_chromium(url: str, profile: Path, screenshot: Path | None = None) -> str:
    """The DOM of ``url`` after its scripts ran (and a 1100 x 640 screenshot when asked)."""
    command = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--window-size=1100,640",
        *([f"--screenshot={screenshot}"] if screenshot else []),
        "--dump-dom",
        url,
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium (make test installs it)"
)


@needs_chromium
def test_page_in_headless_chromium_shows_the_list_and_a_shaded_context(tmp_path):
    page = tmp_path / "latents.html"
    page.write_text(render_page(sample_document()), encoding="utf-8")
    screenshot = tmp_path / "latents.png"
    dom = headless_chromium(f"{page.as_uri()}#0", tmp_path / "profile", screenshot)

    # The list holds the latents that fired (latent 2 never did, and is hidden by default).
    assert re.findall(r'data-latent="(\d+)"', dom) == ["0", "1"]
    assert "2 of 3 latents" in dom
    # Latent 0 is shown: its histogram, its contexts' token text, each firing token shaded by activation / max,
    # the context's largest outlined; markup inside a token stays text.
    detail = dom.split('<section id="detail">')[1]
    assert "Latent 0" in detail and "<svg" in detail
    spans = re.findall(r'<span class="tok( max)?"([^>]*)>([^<]*)</span>', detail)
    texts = [text for _, _, text in spans]
    assert texts[:5] == ["&lt;s&gt;", " Miss", " Woodhouse", " was", " handsome"]
    assert " &lt;/script&gt;&lt;b&gt;not bold&lt;/b&gt;" in texts and "<b>not bold</b>" not in dom
    # The browser writes an opaque colour as rgb(...) and rounds alpha to two places.
    shading = [re.search(r"rgba?\(255, 122, 0(?:, ([0-9.]+))?\)", attrs) for _, attrs, _ in spans]
    shaded = [(text, float(m.group(1) or 1), bool(largest)) for (largest, _, text), m in zip(spans, shading) if m]
    assert shaded == [(" Woodhouse", 1.0, True), (" Woodhouse", pytest.approx(5 / 6.5, abs=0.01), True)]

    width, height = png_size(screenshot)
    assert (width, height) == (1100, 640) and screenshot.stat().st_size > 20_000


@needs_chromium
def test_searching_token_text_filters_the_list(tmp_path):
    # Typing into the search box, as a script at the end of the page.
    typing = "<script>const box = document.getElementById('search'); box.value = 'RICH';"
    typing += " box.dispatchEvent(new Event('input'));</script>"
    page = tmp_path / "latents.html"
    page.write_text(render_page(sample_document()).replace("</body>", typing + "</body>"), encoding="utf-8")
    dom = headless_chromium(page.as_uri(), tmp_path / "profile")
    assert re.findall(r'data-latent="(\d+)"', dom) == ["1"] and "1 of 3 latents" in dom
