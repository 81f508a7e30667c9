"""``clipheads atlas``: one self-contained HTML page to browse a model's heads (no server; opens from ``file://``).

The page holds a layer x head grid coloured by a measure the user picks (scan effect, CCS, cue share, TextSpan
variance: whichever were given), a search box over head names, texts and labels, and for the selected head its
TextSpan texts, concept label and CCS, the images that score highest along its main direction, and heat maps on a
few images: its spatial decomposition (:func:`clipheads.explain.spatial.spatial_decomposition`) projected on its
first TextSpan text (else on its main direction), and the class token's attention row
(:func:`clipheads.explain.spatial.attention_maps`). Every picture is a small embedded JPEG ``data:`` URI, so the
page is one file whose size grows with ``heads x (top + 2 x maps)`` thumbnails (about 2-4 KB each).

A head's *main direction* is the top right singular vector of its uncentred contributions over the images (as
TextSpan's projector), oriented so that the images' mean score along it is positive; an image's score is its
contribution's component along it.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clipheads.errors import ClipHeadsError
from clipheads.explain.concepts import CCSResult
from clipheads.explain.decomposition import decompose_batches
from clipheads.explain.spatial import attention_maps, spatial_decomposition
from clipheads.explain.textspan import TextSpanResult
from clipheads.files import write_bytes_atomic
from clipheads.heads import head_label
from clipheads.models import CLIPBackend
from clipheads.report.overlays import thumbnail_data_uri

FORMAT = "clipheads.Atlas/1"


def heat_overlay(image: Image.Image, values: torch.Tensor, side: int, signed: bool) -> Image.Image:
    """``values`` ``[g, g]`` as colours over ``image`` (``side`` pixels square): ``RdBu_r`` centred on 0 if
    ``signed`` (red: towards the text), else ``inferno`` from 0 to the map's maximum."""
    from matplotlib import colormaps

    array = values.detach().float().cpu().numpy()
    if signed:
        bound = float(np.abs(array).max()) or 1.0
        rgba = colormaps["RdBu_r"]((array / bound + 1) / 2)
    else:
        rgba = colormaps["inferno"](array / (float(array.max()) or 1.0))
    heat = Image.fromarray((rgba[..., :3] * 255).astype(np.uint8)).resize((side, side), Image.NEAREST)
    return Image.blend(image.convert("RGB").resize((side, side), Image.BILINEAR), heat, 0.55)


@dataclass
class AtlasInputs:
    """What the atlas shows besides the model and images (all optional)."""

    descriptions: TextSpanResult | None = None
    ccs: CCSResult | None = None
    measures: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> [n_layers, n_heads]
    measure_notes: dict[str, str] = field(default_factory=dict)  # name -> how to read it


@torch.inference_mode()
def build_atlas(backend: CLIPBackend, images: Sequence[Image.Image], names: Sequence[str], inputs: AtlasInputs,
                layers: Sequence[int] | None = None, top: int = 6, maps: int = 3, thumb: int = 72,
                batch_size: int = 32) -> dict:
    """The atlas data (a JSON-able dict) for ``images`` (PIL, with their ``names``).

    Args:
        backend: an unablated model whose image tower pools its class token or with an attention-pooling head
            (SigLIP).
        images: at least 2 images; ``maps`` of them (the first) get heat maps for every head.
        inputs: TextSpan descriptions, CCS and per-head measures (``[n_layers, n_heads]``).
        layers: layers whose heads are shown (default: all).
        top: images shown per head (highest score along its main direction). thumb: thumbnail side in pixels.

    Raises:
        ClipHeadsError: fewer than 2 images, a measure of the wrong shape.
    """
    if len(images) < 2:
        raise ClipHeadsError(f"the atlas needs at least 2 images; got {len(images)}")
    shape = (backend.n_layers, backend.n_heads)
    for name, values in inputs.measures.items():
        if tuple(values.shape) != shape:
            raise ClipHeadsError(f"measure {name!r} has shape {tuple(values.shape)}, the model {shape}")
    chosen = list(range(backend.n_layers)) if layers is None else sorted(set(layers))
    pixels = backend.as_pixels(list(images))
    decomposition = decompose_batches(backend, pixels.split(batch_size), layers=chosen)
    n_maps = min(maps, len(images))
    heads = [(layer, h) for layer in chosen for h in range(backend.n_heads)]
    spatial = spatial_decomposition(backend, pixels[:n_maps], heads) if n_maps else None
    attention = attention_maps(backend, pixels[:n_maps], chosen) if n_maps else None
    texts = {d.label: d for d in inputs.descriptions.heads} if inputs.descriptions else {}
    concepts = {c.head_label: c for c in inputs.ccs.heads} if inputs.ccs else {}
    first_texts = sorted({d.texts[0] for d in texts.values() if d.texts})
    text_features = dict(zip(first_texts, backend.encode_text(first_texts, normalize=True).float().cpu(),
                             strict=True)) if first_texts else {}

    thumbs = [thumbnail_data_uri(im, thumb) for im in images]
    out_heads = []
    for k, (layer, h) in enumerate(heads):
        label = head_label(layer, h)
        contributions = decomposition.heads[:, decomposition.layers.index(layer), h].double()  # [N, D]
        direction = torch.linalg.svd(contributions, full_matrices=False).Vh[0]
        scores = contributions @ direction
        if scores.mean() < 0:
            direction, scores = -direction, -scores
        order = torch.argsort(scores, descending=True, stable=True)[:top].tolist()
        entry: dict = {"head": label, "layer": layer, "index": h,
                       "top": [{"image": i, "score": round(float(scores[i]), 5)} for i in order],
                       "measures": {name: _finite(values[layer, h]) for name, values in inputs.measures.items()}}
        description = texts.get(label)
        if description is not None:
            entry["texts"] = [{"text": t, "explained": round(float(e), 4)}
                              for t, e in zip(description.texts, description.explained, strict=True)]
            entry["variance"] = description.variance
        concept = concepts.get(label)
        if concept is not None:
            entry["label"] = concept.label
            entry["ccs"] = concept.ccs
        if spatial is not None:
            if description is not None and description.texts:
                along, along_what = text_features[description.texts[0]], f"text '{description.texts[0]}'"
            else:
                along, along_what = direction.float(), "its main direction"
            values = spatial.grid(spatial.project(along))[:, k]  # [n_maps, g, g]
            cls_rows = attention.cls_row(layer, h)
            entry["maps_along"] = along_what
            side = thumb + 24
            entry["spatial"] = [thumbnail_data_uri(heat_overlay(images[i], values[i], side, True), side)
                                for i in range(n_maps)]
            entry["attention"] = [thumbnail_data_uri(heat_overlay(images[i], cls_rows[i], side, False), side)
                                  for i in range(n_maps)]
        out_heads.append(entry)
    return {"format": FORMAT, "model": backend.name, "n_layers": backend.n_layers, "n_heads": backend.n_heads,
            "layers": chosen, "images": [{"name": str(n), "thumb": t} for n, t in zip(names, thumbs, strict=True)],
            "map_images": list(range(n_maps)), "measures": {name: inputs.measure_notes.get(name, "")
                                                            for name in inputs.measures},
            "heads": out_heads, "convention": decomposition.convention,
            "descriptions": bool(texts), "ccs_k": inputs.ccs.k if inputs.ccs else None}


def _finite(value) -> float | None:
    value = float(value)
    return round(value, 6) if np.isfinite(value) else None


def render_html(data: dict) -> str:
    """The atlas page: the data embedded as JSON, the viewer in plain JavaScript and CSS (no network access)."""
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(f"clipheads atlas: {data['model']}")
    return _PAGE.replace("__TITLE__", title).replace("__DATA__", payload)


def write_atlas(path: str | os.PathLike, data: dict) -> Path:
    """Write the page atomically; returns its path."""
    write_bytes_atomic(path, render_html(data).encode("utf-8"))
    return Path(path)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:0;display:flex;min-height:100vh;color:#222}
#side{padding:12px;border-right:1px solid #ddd;min-width:280px}
#main{padding:12px;flex:1;overflow:auto}
table.grid{border-collapse:collapse}
table.grid td,table.grid th{padding:0;text-align:center;font-size:11px}
table.grid button{width:30px;height:26px;border:1px solid #fff;font-size:10px;cursor:pointer;color:#000}
table.grid button.sel{outline:3px solid #06c;outline-offset:-2px}
table.grid button.dim{opacity:.2}
button:focus-visible,input:focus-visible,select:focus-visible{outline:3px solid #f90}
.thumbs{display:flex;flex-wrap:wrap;gap:6px}
.thumbs figure{margin:0;font-size:11px;text-align:center}
.texts li{margin:2px 0}
.muted{color:#666;font-size:12px}
h2{margin:4px 0 8px}
</style></head>
<body>
<nav id="side" aria-label="heads">
<h1 style="font-size:16px;margin:0 0 8px">__TITLE__</h1>
<label>Colour by <select id="measure" aria-label="measure"></select></label>
<p class="muted" id="measure-note"></p>
<label>Search <input id="search" type="search" placeholder="L3.H7, a text or a label" aria-label="search heads"></label>
<p class="muted" id="count"></p>
<table class="grid" id="grid" role="grid"></table>
<p class="muted">Arrow keys move, Enter opens, / searches. Colour: low (blue) to high (red); grey: no value.</p>
</nav>
<main id="main" aria-live="polite"><p>Select a head.</p></main>
<script type="application/json" id="atlas-data">__DATA__</script>
<script>
"use strict";
const data = JSON.parse(document.getElementById("atlas-data").textContent);
const byLabel = new Map(data.heads.map(h => [h.head, h]));
const measures = Object.keys(data.measures);
if (data.descriptions) measures.push("TextSpan variance");
const sel = document.getElementById("measure");
for (const m of measures) { const o = document.createElement("option"); o.value = o.textContent = m; sel.append(o); }
if (!measures.length) sel.disabled = true;
let current = null;
function value(h, m) { return m === "TextSpan variance" ? (h.variance ?? null) : (h.measures[m] ?? null); }
function colour(v, lo, hi) {
  if (v === null || !isFinite(v)) return "#ccc";
  const t = hi > lo ? (v - lo) / (hi - lo) : 0.5;
  const r = Math.round(40 + 215 * t), b = Math.round(255 - 215 * t);
  return `rgb(${r},${Math.round(120 + 60 * (1 - Math.abs(2 * t - 1)))},${b})`;
}
function esc(s) { const d = document.createElement("div"); d.textContent = s; return d.innerHTML; }
function drawGrid() {
  const m = sel.value, grid = document.getElementById("grid");
  const vals = data.heads.map(h => value(h, m)).filter(v => v !== null && isFinite(v));
  const lo = Math.min(...vals), hi = Math.max(...vals);
  document.getElementById("measure-note").textContent = data.measures[m] || "";
  let rows = "<tr><th></th>" + Array.from({length: data.n_heads}, (_, i) => `<th>H${i}</th>`).join("") + "</tr>";
  for (const layer of data.layers) {
    rows += `<tr><th>L${layer}</th>`;
    for (let i = 0; i < data.n_heads; i++) {
      const h = byLabel.get(`L${layer}.H${i}`), v = value(h, m);
      const tip = `${h.head}${v === null ? "" : " " + m + " " + v.toPrecision(3)}${h.label ? " - " + h.label : ""}`;
      rows += `<td><button data-head="${h.head}" title="${esc(tip)}" aria-label="${esc(tip)}" ` +
              `style="background:${colour(v, lo, hi)}" tabindex="-1">${i}</button></td>`;
    }
    rows += "</tr>";
  }
  grid.innerHTML = rows;
  grid.querySelectorAll("button").forEach(b => b.addEventListener("click", () => show(b.dataset.head)));
  filter(); mark();
}
function mark() {
  document.querySelectorAll("#grid button").forEach(b => {
    const on = b.dataset.head === current; b.classList.toggle("sel", on); b.tabIndex = on ? 0 : -1;
  });
  if (!current) { const first = document.querySelector("#grid button"); if (first) first.tabIndex = 0; }
}
function filter() {
  const q = document.getElementById("search").value.trim().toLowerCase();
  let n = 0;
  document.querySelectorAll("#grid button").forEach(b => {
    const h = byLabel.get(b.dataset.head);
    const hay = [h.head, h.label || "", ...(h.texts || []).map(t => t.text)].join(" ").toLowerCase();
    const hit = !q || hay.includes(q); b.classList.toggle("dim", !hit); if (hit) n++;
  });
  document.getElementById("count").textContent = `${n} of ${data.heads.length} heads`;
}
function figures(list, caption) {
  return `<div class="thumbs">${list.map((src, i) => `<figure><img src="${src}" alt="${esc(caption(i))}">` +
         `<figcaption>${esc(data.images[data.map_images[i]].name)}</figcaption></figure>`).join("")}</div>`;
}
function show(label) {
  const h = byLabel.get(label); if (!h) return;
  current = label; mark(); history.replaceState(null, "", "#" + label);
  let out = `<h2 id="head-title">${h.head}</h2>`;
  const ms = measures.map(m => [m, value(h, m)]).filter(([, v]) => v !== null);
  if (ms.length) out += `<p>${ms.map(([m, v]) => `${esc(m)}: <b>${v.toPrecision(4)}</b>`).join(" &middot; ")}</p>`;
  if (h.label !== undefined)
    out += `<p>Concept: <b class="label">${esc(h.label)}</b> &middot; CCS ${h.ccs} of ${data.ccs_k}</p>`;
  if (h.texts) out += `<h3>TextSpan texts</h3><ol class="texts">${h.texts.map(t =>
      `<li>${esc(t.text)} <span class="muted">(${(100 * t.explained).toFixed(1)}% of the variance)</span></li>`
    ).join("")}</ol>`;
  else out += `<p class="muted">No TextSpan descriptions given (clipheads describe, then --descriptions).</p>`;
  out += `<h3>Images highest along its main direction</h3><div class="thumbs">${h.top.map(t =>
      `<figure><img src="${data.images[t.image].thumb}" alt="${esc(data.images[t.image].name)}">` +
      `<figcaption>${esc(data.images[t.image].name)}<br>${t.score.toPrecision(3)}</figcaption></figure>`).join("")}</div>`;
  if (h.spatial) {
    out += `<h3>Spatial decomposition along ${esc(h.maps_along)}</h3>` +
           `<p class="muted">Each patch's part of the head's direct contribution (${data.convention} convention); ` +
           `red pushes the embedding towards it, blue away.</p>` + `<div class="spatial">` +
           figures(h.spatial, i => `spatial map of ${h.head} on image ${i}`) + `</div>`;
    out += `<h3>Class-token attention</h3><div class="attention">` +
           figures(h.attention, i => `attention of ${h.head} on image ${i}`) + `</div>`;
  }
  document.getElementById("main").innerHTML = out;
}
document.getElementById("grid").addEventListener("keydown", e => {
  const b = e.target.closest("button"); if (!b) return;
  const [l, i] = b.dataset.head.slice(1).split(".H").map(Number), li = data.layers.indexOf(l);
  const moves = {ArrowLeft: [0, -1], ArrowRight: [0, 1], ArrowUp: [-1, 0], ArrowDown: [1, 0]};
  if (e.key === "Enter" || e.key === " ") { show(b.dataset.head); e.preventDefault(); return; }
  if (!moves[e.key]) return;
  e.preventDefault();
  const nl = data.layers[Math.min(data.layers.length - 1, Math.max(0, li + moves[e.key][0]))];
  const ni = Math.min(data.n_heads - 1, Math.max(0, i + moves[e.key][1]));
  const next = document.querySelector(`#grid button[data-head="L${nl}.H${ni}"]`);
  if (next) { current = next.dataset.head; mark(); next.focus(); }
});
document.addEventListener("keydown", e => {
  if (e.key === "/" && document.activeElement.id !== "search") {
    e.preventDefault(); document.getElementById("search").focus();
  }
});
document.getElementById("search").addEventListener("input", filter);
document.getElementById("search").addEventListener("keydown", e => {
  if (e.key !== "Enter") return;
  const hit = document.querySelector("#grid button:not(.dim)"); if (hit) { show(hit.dataset.head); hit.focus(); }
});
sel.addEventListener("change", drawGrid);
drawGrid();
function fromHash() { const label = decodeURIComponent(location.hash.slice(1)); if (byLabel.has(label)) show(label); }
window.addEventListener("hashchange", fromHash);
fromHash();
</script></body></html>
"""
