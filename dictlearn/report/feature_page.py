"""The latents' HTML page: one self-contained file (data, styles and script inline, nothing fetched) that works
offline. A searchable, sortable list of latents; for the chosen one its frequency and max, a histogram of its
activations, and its top contexts with each token shaded by the latent's activation on it. When a latent's record
has them (analyze.py's), also its explanation and detection score, the tokens it promotes and suppresses (DLA),
and contexts sampled at magnitude levels of its max."""

from __future__ import annotations

import html
import json
from importlib.resources import files

# The page's style and script are package files (dictlearn/report/page.css, page.js), inlined into each page.
_STYLE = files("dictlearn.report").joinpath("page.css").read_text(encoding="utf-8")
_SCRIPT = files("dictlearn.report").joinpath("page.js").read_text(encoding="utf-8")


def _script_json(data) -> str:
    """JSON safe inside a <script> element: every '<' escaped, so no '</script>' or '<!--' can occur."""
    return json.dumps(data, separators=(",", ":"), ensure_ascii=False).replace("<", "\\u003c")


def render_page(data: dict) -> str:
    """The page for ``data``: interpretation.py's JSON document (``meta`` fields plus ``latents``)."""
    title = f"Latents of {data['dictionary']}"
    subtitle = (
        f"{data['model']} · {data['hook']} · {data['num_latents']:,} latents · "
        f"{data['tokens_scanned']:,} tokens scanned · top {data['top_n']} contexts per latent"
    )
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head>
<body>
<header><h1>{html.escape(title)}</h1><p>{html.escape(subtitle)}</p></header>
<main>
<nav>
  <div class="controls">
    <input id="search" type="search" placeholder="Search token text, or #id" autocomplete="off">
    <label>Sort by <select id="sort"><option value="id">latent id</option><option value="frequency">frequency</option>
      <option value="max">max activation</option></select></label>
    <label><input id="hide-dead" type="checkbox" checked> hide latents that never fired</label>
    <div id="count"></div>
  </div>
  <ol id="latent-list"></ol>
</nav>
<section id="detail"></section>
</main>
<script id="latent-data" type="application/json">{_script_json(data)}</script>
<script>{_SCRIPT}</script>
</body>
</html>
"""
