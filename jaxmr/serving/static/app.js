// jaxmr search UI: plain JavaScript, no external files (it must work offline).
// The query lives in the URL (?q=...&similar=ID&view=grid|graph|tsne), so a search can be shared.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { q: "", similar: null, view: "grid", image: null, imageName: "" };
const COLOURS = ["#2f6fde", "#e0562b", "#2ba36b", "#9b4fd1", "#d1a12b", "#1fa2b8", "#d14f8a", "#6b7385"];
const SVG = "http://www.w3.org/2000/svg";

function readUrl() {
  const p = new URLSearchParams(location.search);
  state.q = p.get("q") || "";
  state.similar = p.get("similar") ? Number(p.get("similar")) : null;
  state.view = ["grid", "graph", "tsne"].includes(p.get("view")) ? p.get("view") : "grid";
}

function writeUrl(push = true) {
  const p = new URLSearchParams();
  if (state.q) p.set("q", state.q);
  if (state.similar !== null) p.set("similar", state.similar);
  if (state.view !== "grid") p.set("view", state.view);
  const url = p.toString() ? `?${p}` : location.pathname;
  if (push) history.pushState(null, "", url); else history.replaceState(null, "", url);
}

function status(text) { $("status").textContent = text; }

async function api(path, options = {}) {
  const response = await fetch(path, options);
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.detail || `${response.status} ${response.statusText}`);
  return body;
}

function card(result, rank) {
  const el = document.createElement("div");
  el.className = "card";
  el.dataset.id = result.image_id ?? result.id;
  const caption = result.text || (result.captions && result.captions[0]) || "";
  el.innerHTML = `<img loading="lazy" alt=""><span class="rank"></span><span class="score"></span>
    <div class="meta"><div class="caption"></div></div>`;
  el.querySelector("img").src = result.thumbnail + (rank <= 5 ? "?size=256" : "");
  el.querySelector("img").alt = caption;
  el.querySelector(".rank").textContent = `#${rank}`;
  el.querySelector(".score").textContent = result.score.toFixed(3);
  el.querySelector(".caption").textContent = caption;
  el.title = `id ${el.dataset.id} · score ${result.score.toFixed(4)}\n${caption}`;
  el.addEventListener("click", () => findSimilar(Number(el.dataset.id)));
  return el;
}

function showResults(body, label) {
  const top = $("top"), more = $("more");
  top.replaceChildren(); more.replaceChildren();
  body.results.forEach((r, i) => (i < 5 ? top : more).appendChild(card(r, i + 1)));
  const t = body.timing_ms;
  status(body.results.length ? `${label}: ${body.results.length} results in ${t.total.toFixed(1)} ms ` +
    `(encode ${t.encode.toFixed(1)}, search ${t.search.toFixed(1)})` : `${label}: no results`);
}

async function imageAsBase64(id) {
  const blob = await (await fetch(`/api/images/${id}`)).blob();
  return new Promise((resolve) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.readAsDataURL(blob);
  });
}

async function run() {
  $("query").value = state.q;
  setView(state.view);
  showExample();
  try {
    if (state.view === "tsne") return await drawProjection();
    if (state.view === "graph") {
      if (!state.q) return status("type a query to see its results as a graph");
      return await drawGraph();
    }
    if (state.image || (state.similar !== null && state.q)) {  // an example image, maybe modified by text
      const image = state.image || await imageAsBase64(state.similar);
      const body = { image, k: 55 };
      if (state.q) body.text = state.q;
      const label = state.q ? `image + “${state.q}”` : "similar to your image";
      return showResults(await api("/api/search", { method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify(body) }), label);
    }
    if (state.similar !== null) return showResults(await api(`/api/similar/${state.similar}?k=55`), `similar to #${state.similar}`);
    if (state.q) {
      return showResults(await api("/api/search", { method: "POST", headers: { "content-type": "application/json" },
        body: JSON.stringify({ text: state.q, k: 55 }) }), `“${state.q}”`);
    }
    $("top").replaceChildren(); $("more").replaceChildren();
    status("type a query, upload an image, or open the map to browse");
  } catch (e) {
    status(`error: ${e.message}`);
  }
}

function findSimilar(id) {
  state.similar = id; state.image = null; state.q = ""; state.view = "grid";
  writeUrl(); run();
}

function showExample() {
  const bar = $("example-bar");
  if (state.image) { $("example-thumb").src = state.image; $("example-label").textContent = `${state.imageName}: type text to modify it`; }
  else if (state.similar !== null) { $("example-thumb").src = `/api/thumbnails/${state.similar}`; $("example-label").textContent = `image #${state.similar}: type text to modify it`; }
  bar.hidden = !(state.image || state.similar !== null);
}

function setView(view) {
  state.view = view;
  for (const b of document.querySelectorAll("#views button")) b.classList.toggle("active", b.dataset.view === view);
  $("grid-view").hidden = view !== "grid";
  $("graph-view").hidden = view !== "graph";
  $("tsne-view").hidden = view !== "tsne";
}

function svgEl(name, attrs, parent) {
  const el = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  if (parent) parent.appendChild(el);
  return el;
}

async function drawGraph() {
  const g = await api(`/api/graph?q=${encodeURIComponent(state.q)}&k=50`);
  const svg = $("graph");
  svg.replaceChildren();
  const W = 1000, H = 640, n = g.nodes.length;
  const index = new Map(g.nodes.map((node, i) => [node.id, i]));
  // Fruchterman-Reingold: every pair repels, similar results attract, each cluster around its own centre.
  const centres = Array.from({ length: g.clusters }, (_, c) => ({
    x: W / 2 + (g.clusters > 1 ? 170 * Math.cos(2 * Math.PI * c / g.clusters) : 0),
    y: H / 2 + (g.clusters > 1 ? 110 * Math.sin(2 * Math.PI * c / g.clusters) : 0),
  }));
  const pos = g.nodes.map((node, i) => ({
    x: centres[node.cluster].x + 60 * Math.cos(i * 2.4), y: centres[node.cluster].y + 60 * Math.sin(i * 2.4),
  }));
  const k = 0.42 * Math.sqrt((W * H) / Math.max(n, 1));
  const ws = g.edges.map((e) => e.weight), wlo = Math.min(...ws), whi = Math.max(...ws);
  const strength = (w) => 0.1 + 0.4 * (w - wlo) / (whi - wlo || 1);  // relative: scores crowd near the top
  for (let step = 0, steps = 250; step < steps; step++) {
    const disp = pos.map(() => ({ x: 0, y: 0 }));
    for (let i = 0; i < n; i++) for (let j = i + 1; j < n; j++) {
      const dx = pos[i].x - pos[j].x, dy = pos[i].y - pos[j].y, d = Math.hypot(dx, dy) + 0.01, f = (k * k) / d;
      disp[i].x += (dx / d) * f; disp[i].y += (dy / d) * f; disp[j].x -= (dx / d) * f; disp[j].y -= (dy / d) * f;
    }
    for (const e of g.edges) {
      const a = index.get(e.source), b = index.get(e.target);
      const dx = pos[a].x - pos[b].x, dy = pos[a].y - pos[b].y, d = Math.hypot(dx, dy) + 0.01;
      const f = ((d * d) / k) * strength(e.weight);
      disp[a].x -= (dx / d) * f; disp[a].y -= (dy / d) * f; disp[b].x += (dx / d) * f; disp[b].y += (dy / d) * f;
    }
    const t = 40 * (1 - step / steps) + 1;
    g.nodes.forEach((node, i) => {
      const c = centres[node.cluster];
      disp[i].x += (c.x - pos[i].x) * 0.5; disp[i].y += (c.y - pos[i].y) * 0.5;
      const d = Math.hypot(disp[i].x, disp[i].y) + 0.01;
      pos[i].x = Math.min(W - 30, Math.max(30, pos[i].x + (disp[i].x / d) * Math.min(d, t)));
      pos[i].y = Math.min(H - 30, Math.max(30, pos[i].y + (disp[i].y / d) * Math.min(d, t)));
    });
  }
  const weights = g.edges.map((e) => e.weight), lo = Math.min(...weights), hi = Math.max(...weights);
  for (const e of g.edges) {
    const a = pos[index.get(e.source)], b = pos[index.get(e.target)], t = (e.weight - lo) / (hi - lo || 1);
    svgEl("line", { x1: a.x, y1: a.y, x2: b.x, y2: b.y, stroke: `hsl(${220 - 200 * t}, 70%, 50%)`,
      "stroke-width": 0.5 + 4 * t, "stroke-opacity": 0.3 + 0.6 * t }, svg);
  }
  g.nodes.forEach((node, i) => {
    const group = svgEl("g", { class: "node", "data-id": node.id, cursor: "pointer" }, svg);
    svgEl("rect", { x: pos[i].x - 24, y: pos[i].y - 24, width: 48, height: 48, rx: 6, fill: COLOURS[node.cluster % 8] }, group);
    svgEl("image", { href: node.thumbnail, x: pos[i].x - 21, y: pos[i].y - 21, width: 42, height: 42 }, group);
    svgEl("title", {}, group).textContent = `#${i + 1} score ${node.score.toFixed(3)} · cluster ${node.cluster}\n${(node.captions || [""])[0]}`;
    group.addEventListener("click", () => findSimilar(node.id));
  });
  status(`“${state.q}”: top ${n} in ${g.clusters} clusters; edge colour and width by similarity`);
}

// The map: every sampled image as a thumbnail at its t-SNE position, framed in its k-means group's colour, with a
// legend naming each group by its most typical caption words. Scroll zooms (around the pointer), dragging pans,
// a double click resets; hovering a thumbnail shows it large, clicking finds similar images; clicking a legend
// entry shows only that group (again: all).
const MAP = { W: 1000, H: 640, S: 24 };

function mapViewBox(svg, box) {
  svg.dataset.box = box.map((v) => v.toFixed(1)).join(" ");
  svg.setAttribute("viewBox", svg.dataset.box);
}

function enableZoomAndPan(svg) {
  const home = [0, 0, MAP.W, MAP.H];
  let box = home.slice(), drag = null;
  mapViewBox(svg, box);
  const toMap = (ev) => {
    const r = svg.getBoundingClientRect();
    return [box[0] + ((ev.clientX - r.left) / r.width) * box[2], box[1] + ((ev.clientY - r.top) / r.height) * box[3]];
  };
  svg.onwheel = (ev) => {
    ev.preventDefault();
    const [mx, my] = toMap(ev), f = Math.exp(Math.sign(ev.deltaY) * 0.18);
    const w = Math.min(MAP.W, Math.max(MAP.W / 12, box[2] * f)), h = (w * MAP.H) / MAP.W, t = w / box[2];
    box = [mx - (mx - box[0]) * t, my - (my - box[1]) * t, w, h];
    mapViewBox(svg, box);
  };
  svg.onpointerdown = (ev) => { drag = { x: ev.clientX, y: ev.clientY, box: box.slice(), moved: false }; };
  svg.onpointermove = (ev) => {
    if (!drag) return;
    const r = svg.getBoundingClientRect(), dx = ev.clientX - drag.x, dy = ev.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) > 3) drag.moved = true;
    box = [drag.box[0] - (dx / r.width) * box[2], drag.box[1] - (dy / r.height) * box[3], box[2], box[3]];
    mapViewBox(svg, box);
  };
  svg.onpointerup = () => { svg.dataset.dragged = drag && drag.moved ? "1" : ""; drag = null; };
  svg.ondblclick = () => { box = home.slice(); mapViewBox(svg, box); };
}

function showCluster(svg, legend, cluster) {
  const only = svg.dataset.only === String(cluster) ? "" : String(cluster);
  svg.dataset.only = only;
  for (const g of svg.querySelectorAll("g.point")) g.classList.toggle("dim", only !== "" && g.dataset.cluster !== only);
  for (const item of legend.children) item.classList.toggle("off", only !== "" && item.dataset.cluster !== only);
}

async function drawProjection() {
  status("computing the map (a t-SNE, once per index version)…");
  const p = await api("/api/projection?n=600");
  const svg = $("tsne"), hover = $("hover"), legend = $("legend");
  svg.replaceChildren(); legend.replaceChildren(); svg.dataset.only = ""; svg.dataset.loaded = 0;
  enableZoomAndPan(svg);
  const words = new Map(p.clusters.map((c) => [c.cluster, c.words.join(", ") || `group ${c.cluster + 1}`]));
  const s = MAP.S;
  for (const point of p.points) {
    const x = MAP.W / 2 + (MAP.W / 2 - 2 * s) * point.x, y = MAP.H / 2 + (MAP.H / 2 - 2 * s) * point.y;
    const colour = COLOURS[point.cluster % COLOURS.length];
    const g = svgEl("g", { class: "point", "data-id": point.id, "data-cluster": point.cluster, cursor: "pointer" }, svg);
    svgEl("rect", { x: x - s / 2 - 2, y: y - s / 2 - 2, width: s + 4, height: s + 4, rx: 3, fill: colour }, g);
    const img = svgEl("image", { href: `${point.thumbnail}?size=64`, x: x - s / 2, y: y - s / 2, width: s, height: s,
      preserveAspectRatio: "xMidYMid slice" }, g);
    const done = () => { svg.dataset.loaded = Number(svg.dataset.loaded) + 1; };
    img.addEventListener("load", done); img.addEventListener("error", done);
    svgEl("title", {}, g).textContent = `${words.get(point.cluster)}\n${(point.captions || [""])[0]}`;
    g.addEventListener("mouseenter", (ev) => {
      hover.src = `${point.thumbnail}?size=256`; hover.hidden = false; hover.style.borderColor = colour;
      hover.style.left = `${ev.clientX + 14}px`; hover.style.top = `${ev.clientY + 14}px`;
    });
    g.addEventListener("mouseleave", () => { hover.hidden = true; });
    g.addEventListener("click", () => { if (!svg.dataset.dragged) findSimilar(point.id); });
  }
  for (const c of p.clusters) {
    const item = document.createElement("button");
    item.className = "legend-item"; item.dataset.cluster = c.cluster;
    item.innerHTML = `<span class="swatch"></span><span class="words"></span><span class="size"></span>`;
    item.querySelector(".swatch").style.background = COLOURS[c.cluster % COLOURS.length];
    item.querySelector(".words").textContent = words.get(c.cluster);
    item.querySelector(".size").textContent = c.size;
    item.addEventListener("click", () => showCluster(svg, legend, c.cluster));
    legend.appendChild(item);
  }
  const how = p.method === "tsne" ? "t-SNE" : "PCA";
  status(`${p.points.length} images, ${how}, ${p.clusters.length} k-means groups; scroll to zoom, drag to pan, ` +
    "hover to enlarge, click to find similar");
}

$("search-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  state.q = $("query").value.trim();
  if (!state.image && state.similar === null && !state.q) return status("type something to search for");
  if (state.view === "tsne") state.view = "grid";
  writeUrl(); run();
});
$("image-input").addEventListener("change", () => {
  const file = $("image-input").files[0];
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => { state.image = reader.result; state.imageName = file.name; state.similar = null; state.view = "grid"; writeUrl(); run(); };
  reader.readAsDataURL(file);
});
$("example-clear").addEventListener("click", () => { state.image = null; state.similar = null; writeUrl(); run(); });
for (const b of document.querySelectorAll("#views button")) {
  b.addEventListener("click", () => { setView(b.dataset.view); writeUrl(); run(); });
}
window.addEventListener("popstate", () => { readUrl(); state.image = null; run(); });

(async function start() {
  readUrl();
  for (let attempt = 0; attempt < 120; attempt++) {  // the server may still be warming up
    try {
      const info = await api("/api/info");
      $("info").textContent = `${info.images.toLocaleString()} images, ${info.captions.toLocaleString()} captions · ` +
        `model ${info.model.fingerprint} (step ${info.model.step}) · index v${info.version} · jaxmr ${info.jaxmr_version}`;
      return run();
    } catch (e) {
      status(`waiting for the server: ${e.message}`);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }
})();
