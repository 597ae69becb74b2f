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
