"""The latents' HTML page: one self-contained file (data, styles and script inline, nothing fetched) that works
offline. A searchable, sortable list of latents; for the chosen one its frequency and max, a histogram of its
activations, and its top contexts with each token shaded by the latent's activation on it. When a latent's record
has them (analyze.py's), also its explanation and detection score, the tokens it promotes and suppresses (DLA),
and contexts sampled at magnitude levels of its max."""

from __future__ import annotations

import html
import json

_STYLE = """
* { box-sizing: border-box; }
body { margin: 0; height: 100vh; display: flex; flex-direction: column; overflow: hidden;
  font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d1d1f; background: #fafafa; }
header { padding: 10px 18px; background: #23303f; color: #fff; }
header h1 { margin: 0; font-size: 18px; font-weight: 600; }
header p { margin: 2px 0 0; color: #c8d3df; font-size: 13px; }
main { display: flex; flex: 1; min-height: 0; }
nav { width: 340px; flex: none; display: flex; flex-direction: column; border-right: 1px solid #ddd; background: #fff; }
.controls { padding: 10px; border-bottom: 1px solid #eee; display: grid; gap: 6px; }
.controls input[type=search] { width: 100%; padding: 6px 8px; font-size: 14px; border: 1px solid #bbb; border-radius: 4px; }
.controls label { font-size: 12px; color: #555; }
#count { font-size: 12px; color: #666; }
#latent-list { list-style: none; margin: 0; padding: 0; overflow-y: auto; flex: 1; }
#latent-list a { display: grid; grid-template-columns: 58px 1fr; padding: 5px 10px; color: inherit;
  text-decoration: none; border-bottom: 1px solid #f0f0f0; }
#latent-list a:hover { background: #f3f6fa; }
#latent-list a.selected { background: #ffe7cc; }
#latent-list a.dead { color: #999; }
.lid { font-weight: 600; font-variant-numeric: tabular-nums; }
.preview { overflow: hidden; white-space: nowrap; text-overflow: ellipsis; }
.lstats { grid-column: 2; font-size: 11px; color: #777; }
#detail { flex: 1; overflow-y: auto; padding: 16px 24px; }
#detail h2 { margin: 0 0 6px; font-size: 20px; }
.facts { display: flex; gap: 28px; margin: 0 0 12px; }
.facts div { display: flex; flex-direction: column; }
.facts dt { font-size: 11px; text-transform: uppercase; letter-spacing: .04em; color: #777; }
.facts dd { margin: 0; font-size: 16px; font-weight: 600; font-variant-numeric: tabular-nums; }
.hist { margin: 4px 0 14px; }
.hist text { font-size: 11px; fill: #555; }
.legend { font-size: 12px; color: #666; margin: 6px 0; display: flex; align-items: center; gap: 8px; }
.legend .ramp { width: 140px; height: 12px; border: 1px solid #ccc;
  background: linear-gradient(to right, rgba(255,122,0,0), rgba(255,122,0,1)); }
ol.contexts { list-style: none; padding: 0; margin: 0; }
ol.contexts li { display: flex; gap: 12px; align-items: baseline; padding: 7px 0; border-bottom: 1px solid #eee; }
.value { width: 58px; flex: none; text-align: right; font-variant-numeric: tabular-nums; color: #555; font-size: 12px; }
.ctx { display: flex; min-width: 0; font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace;
  font-size: 13px; line-height: 1.9; white-space: pre; }
/* Contexts line up on their largest token: the text before it is right-aligned and clipped on the left. */
.before { flex: 0 0 56ch; display: flex; justify-content: flex-end; overflow: hidden; }
.after { overflow: hidden; }
.tok { white-space: pre; border-radius: 2px; }
.tok.max { outline: 2px solid #b3400a; }
.empty { color: #888; }
h3 { margin: 18px 0 4px; font-size: 14px; font-weight: 600; color: #444; }
.explanation { margin: 0 0 10px; font-size: 15px; }
.explanation small { color: #666; }
.dla { margin: 0 0 10px; font-size: 12px; display: grid; grid-template-columns: 80px 1fr; gap: 2px 8px; }
.dla dt { color: #777; }
.dla dd { margin: 0; font-family: ui-monospace, "DejaVu Sans Mono", Menlo, monospace; white-space: pre-wrap; }
"""

_SCRIPT = r"""
const data = JSON.parse(document.getElementById('latent-data').textContent);
const latents = data.latents;
const byId = new Map(latents.map(l => [l.latent, l]));
for (const l of latents) {
  const firing = l.contexts.flatMap(c => c.tokens.filter((t, i) => c.acts[i] > 0));
  const promoted = l.dla ? l.dla.promoted.map(d => d.token) : [];
  l.search = [...firing, l.explanation || '', ...promoted].join('\u0001').toLowerCase();
  l.preview = l.explanation ||
    [...new Set(l.contexts.map(c => c.tokens[c.max_position].trim()))].slice(0, 5).join(' · ');
}
const $ = id => document.getElementById(id);
const pct = f => f === 0 ? '0%' : (100 * f < 0.01 ? (100 * f).toExponential(1) : (100 * f).toPrecision(3)) + '%';
const num = x => Number(x).toPrecision(3);
const sorters = {
  id: (a, b) => a.latent - b.latent,
  frequency: (a, b) => b.frequency - a.frequency || a.latent - b.latent,
  max: (a, b) => b.max_activation - a.max_activation || a.latent - b.latent,
};
let selected = null;

function visibleLatents() {
  const query = $('search').value.trim().toLowerCase();
  let shown = latents;
  if ($('hide-dead').checked) shown = shown.filter(l => l.contexts.length > 0);
  if (/^#\d+$/.test(query)) shown = shown.filter(l => l.latent === Number(query.slice(1)));
  else if (query) shown = shown.filter(l => l.search.includes(query));
  return [...shown].sort(sorters[$('sort').value]);
}

function renderList() {
  const shown = visibleLatents();
  $('count').textContent = `${shown.length.toLocaleString()} of ${latents.length.toLocaleString()} latents`;
  const list = $('latent-list');
  list.replaceChildren(...shown.map(l => {
    const item = document.createElement('li');
    const link = document.createElement('a');
    link.href = `#${l.latent}`;
    link.dataset.latent = l.latent;
    link.className = (l.latent === selected ? 'selected ' : '') + (l.contexts.length ? '' : 'dead');
    const id = document.createElement('span'); id.className = 'lid'; id.textContent = `#${l.latent}`;
    const preview = document.createElement('span'); preview.className = 'preview';
    preview.textContent = l.contexts.length ? l.preview : 'never fired';
    const stats = document.createElement('span'); stats.className = 'lstats';
    stats.textContent = `${pct(l.frequency)} of tokens · max ${num(l.max_activation)}`;
    link.append(id, preview, stats);
    item.append(link);
    return item;
  }));
  return shown;
}

function histogram(l) {
  const counts = l.histogram.counts;
  let used = counts.length;
  while (used > 1 && counts[used - 1] === 0) used--;
  const W = 520, H = 150, left = 46, bottom = 28, top = 8, right = 10;
  const peak = Math.max(1, ...counts);
  const bw = (W - left - right) / used;
  const ns = 'http://www.w3.org/2000/svg';
  const svg = document.createElementNS(ns, 'svg');
  svg.setAttribute('width', W); svg.setAttribute('height', H); svg.setAttribute('class', 'hist');
  const add = (tag, attrs, text) => {
    const el = document.createElementNS(ns, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
    if (text !== undefined) el.textContent = text;
    svg.append(el);
  };
  for (let i = 0; i < used; i++) {
    const h = (H - top - bottom) * counts[i] / peak;
    add('rect', {x: left + i * bw + 0.5, y: H - bottom - h, width: Math.max(bw - 1, 1), height: h, fill: '#f08a24'},);
  }
  add('line', {x1: left, y1: H - bottom, x2: W - right, y2: H - bottom, stroke: '#888'});
  add('line', {x1: left, y1: top, x2: left, y2: H - bottom, stroke: '#888'});
  add('text', {x: left, y: H - bottom + 14, 'text-anchor': 'middle'}, '0');
  add('text', {x: (left + W - right) / 2, y: H - bottom + 14, 'text-anchor': 'middle'}, num(used * l.histogram.bin_width / 2));
  add('text', {x: W - right, y: H - bottom + 14, 'text-anchor': 'end'}, num(used * l.histogram.bin_width));
  add('text', {x: (left + W - right) / 2, y: H - 2, 'text-anchor': 'middle'}, 'activation when firing (tokens per bar)');
  add('text', {x: left - 4, y: top + 8, 'text-anchor': 'end'}, peak.toLocaleString());
  add('text', {x: left - 4, y: H - bottom, 'text-anchor': 'end'}, '0');
  add('text', {x: 12, y: (H - bottom) / 2 + 10, transform: `rotate(-90 12 ${(H - bottom) / 2 + 10})`, 'text-anchor': 'middle'}, 'tokens');
  return svg;
}

function contextList(contexts, l) {
  const list = document.createElement('ol'); list.className = 'contexts';
  for (const c of contexts) {
    const item = document.createElement('li');
    const value = document.createElement('span'); value.className = 'value'; value.textContent = num(c.activation);
    const ctx = document.createElement('span'); ctx.className = 'ctx';
    const before = document.createElement('span'); before.className = 'before';
    const after = document.createElement('span'); after.className = 'after';
    c.tokens.forEach((t, i) => {
      const tok = document.createElement('span');
      tok.className = 'tok' + (i === c.max_position ? ' max' : '');
      tok.textContent = t;
      const a = c.acts[i];
      if (a > 0) tok.style.background = `rgba(255, 122, 0, ${Math.min(1, a / l.max_activation).toFixed(3)})`;
      tok.title = `activation ${a}`;
      (i < c.max_position ? before : after).append(tok);
    });
    ctx.append(before, after);
    item.append(value, ctx);
    list.append(item);
  }
  return list;
}

function renderAnalysis(l, detail) {
  if (l.explanation) {
    const p = document.createElement('p'); p.className = 'explanation';
    p.textContent = l.explanation;
    const score = document.createElement('small');
    score.textContent = l.detection_accuracy === null ? ` (${l.explained_by})` :
      ` (detection accuracy ${l.detection_accuracy.toFixed(2)} on ${l.detection_contexts} contexts, ${l.explained_by})`;
    p.append(score); detail.append(p);
  }
  if (l.dla) {
    const dla = document.createElement('dl'); dla.className = 'dla';
    for (const [name, entries] of [['promotes', l.dla.promoted], ['suppresses', l.dla.suppressed]]) {
      const dt = document.createElement('dt'); dt.textContent = name;
      const dd = document.createElement('dd');
      dd.textContent = entries.map(d => `${JSON.stringify(d.token)} ${num(d.logit)}`).join('   ');
      dla.append(dt, dd);
    }
    detail.append(dla);
  }
}

function renderDetail(l) {
  const detail = $('detail');
  detail.replaceChildren();
  const title = document.createElement('h2');
  title.textContent = `Latent ${l.latent}`;
  const facts = document.createElement('dl'); facts.className = 'facts';
  for (const [name, value] of [
    ['frequency', `${pct(l.frequency)} of tokens`],
    ['tokens fired on', l.fired_tokens.toLocaleString()],
    ['max activation', num(l.max_activation)],
    ...(l.mean_activation === undefined ? [] : [['mean activation', num(l.mean_activation)]]),
    ['contexts', l.contexts.length],
  ]) {
    const box = document.createElement('div');
    const dt = document.createElement('dt'); dt.textContent = name;
    const dd = document.createElement('dd'); dd.textContent = value;
    box.append(dt, dd); facts.append(box);
  }
  detail.append(title, facts);
  renderAnalysis(l, detail);
  if (!l.contexts.length) {
    const p = document.createElement('p'); p.className = 'empty';
    p.textContent = `Never fired in the ${data.tokens_scanned.toLocaleString()} tokens scanned.`;
    detail.append(p);
    return;
  }
  detail.append(histogram(l));
  const legend = document.createElement('div'); legend.className = 'legend';
  legend.innerHTML = '<span>shading: activation from 0</span><span class="ramp"></span><span></span>';
  legend.lastChild.textContent = `to ${num(l.max_activation)} (the latent's max); outlined: the context's largest`;
  detail.append(legend);
  if (l.levels) {
    const heading = document.createElement('h3'); heading.textContent = 'Top contexts';
    detail.append(heading);
  }
  detail.append(contextList(l.contexts, l));
  for (const level of [...(l.levels || [])].reverse()) {
    if (!level.contexts.length) continue;
    const heading = document.createElement('h3');
    heading.textContent = `At ${level.low}–${level.high} of the max ` +
      `(${num(level.low * l.max_activation)} to ${num(level.high * l.max_activation)})`;
    detail.append(heading, contextList(level.contexts, l));
  }
}

function select(id) {
  const l = byId.get(id);
  if (!l) return;
  selected = id;
  document.querySelectorAll('#latent-list a.selected').forEach(a => a.classList.remove('selected'));
  const link = document.querySelector(`#latent-list a[data-latent="${id}"]`);
  if (link) { link.classList.add('selected'); link.scrollIntoView({block: 'nearest'}); }
  renderDetail(l);
}

function fromHash() {
  const id = Number(location.hash.slice(1));
  return location.hash.length > 1 && byId.has(id) ? id : null;
}

for (const id of ['search', 'sort', 'hide-dead']) $(id).addEventListener('input', renderList);
window.addEventListener('hashchange', () => { const id = fromHash(); if (id !== null) select(id); });
const first = renderList();
const start = fromHash() ?? (first.length ? first[0].latent : null);
if (start !== null) select(start);
"""


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
