"""One self-contained HTML page for an explanation: inline CSS and JS, SVG drawn in the page, no fetches.

The explanation travels as JSON inside a ``<script type="application/json">`` element (every ``<``,
``>`` and ``&`` escaped, so no passage can close it) and the page's script builds the DOM from it with
``textContent`` only: passage text is never parsed as markup. A Content-Security-Policy admits only
the page's own script (by its hash) and forbids every fetch, so even markup that slipped in could
neither run nor call out.
"""

# The page's CSS and script are kept as written for a browser, in long lines.
# ruff: noqa: E501

from __future__ import annotations

import base64
import hashlib
import html
import json
from typing import Any

_CSS = r"""
:root { --fg:#1d1d1f; --muted:#6e6e73; --line:#d2d2d7; --accent:#e6550d; --cool:#3182bd; --bg:#fff; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
       background: var(--bg); margin: 0 auto; max-width: 1280px; padding: 16px 24px 64px; }
h1 { font-size: 20px; margin: 4px 0 8px; }
h2 { font-size: 16px; margin: 28px 0 6px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
.notice { background: #fff4e5; border-left: 4px solid var(--accent); padding: 8px 12px; margin: 8px 0; }
.query { font-size: 16px; margin: 8px 0; unicode-bidi: isolate; }
.muted, .hint { color: var(--muted); font-size: 12.5px; }
.cf { font-size: 10px; color: #a00; border: 1px dotted #a00; border-radius: 3px; padding: 0 2px; margin: 0 1px; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 3px 6px; text-align: right; white-space: nowrap; }
td.txt, th.txt { text-align: left; white-space: normal; }
th { background: #f5f5f7; }
#ranking th { cursor: pointer; user-select: none; position: sticky; top: 0; }
th[aria-sort="ascending"]::after { content: " \25B2"; font-size: 9px; }
th[aria-sort="descending"]::after { content: " \25BC"; font-size: 9px; }
td .pid { font-weight: 600; unicode-bidi: isolate; }
td .snip { color: var(--muted); unicode-bidi: isolate; }
tr.kept td:first-child { box-shadow: inset 3px 0 0 var(--accent); }
.up { color: #2a7d2a; } .down { color: #b3261e; }
.charts { display: flex; flex-wrap: wrap; gap: 16px; }
.chart { border: 1px solid var(--line); border-radius: 6px; padding: 6px; }
.chart h3 { font-size: 13px; margin: 0 0 4px; font-weight: 600; }
svg text { font: 11px system-ui, sans-serif; fill: #444; }
.toolbar { display: flex; gap: 12px; align-items: center; margin: 6px 0 10px; }
button { font: inherit; padding: 3px 10px; border: 1px solid var(--line); border-radius: 5px;
         background: #f5f5f7; cursor: pointer; }
button[aria-pressed="true"] { background: var(--fg); color: #fff; }
.legend { display: inline-flex; align-items: center; gap: 6px; font-size: 12px; color: var(--muted); }
.legend .bar { width: 140px; height: 10px; border: 1px solid var(--line); }
details.ph { border: 1px solid var(--line); border-radius: 6px; margin: 6px 0; padding: 4px 10px; }
details.ph > summary { cursor: pointer; }
.tokens { white-space: pre-wrap; line-height: 1.75; margin: 6px 0; unicode-bidi: isolate;
          font: 13px/1.75 ui-monospace, SFMono-Regular, Menlo, monospace; }
.tokens span.t { border-radius: 2px; }
.cut { display: inline-block; color: #fff; background: #b3261e; border-radius: 3px; padding: 0 5px;
       margin: 0 4px; font-size: 11px; }
.dropped { color: #aaa; }
.top { margin: 2px 0 6px; }
.chip { display: inline-block; border: 1px solid var(--line); border-radius: 10px; padding: 0 6px;
        margin: 1px 2px; font-size: 12px; unicode-bidi: isolate; white-space: pre; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 0; }
dl.facts dt { color: var(--muted); } dl.facts dd { margin: 0; }
pre { background: #f5f5f7; padding: 8px; overflow: auto; max-height: 360px; font-size: 12px; }
"""

_JS = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("explain-data").textContent);
  var SVGNS = "http://www.w3.org/2000/svg";
  // Invisible and direction-changing characters are shown as labelled marks, so hidden text is seen.
  var HIDDEN = /[\u00AD\u061C\u180E\u200B-\u200F\u202A-\u202E\u2060-\u2064\u2066-\u206F\uFEFF]/;

  function text(s) {
    var f = document.createDocumentFragment();
    s = s == null ? "" : String(s);
    var buf = "";
    for (var i = 0; i < s.length; i++) {
      var ch = s[i];
      if (HIDDEN.test(ch)) {
        if (buf) { f.appendChild(document.createTextNode(buf)); buf = ""; }
        var m = document.createElement("span");
        m.className = "cf";
        m.textContent = "U+" + ch.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0");
        f.appendChild(m);
      } else { buf += ch; }
    }
    if (buf) f.appendChild(document.createTextNode(buf));
    return f;
  }
  function el(tag, cls) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    for (var i = 2; i < arguments.length; i++) {
      var k = arguments[i];
      if (k == null) continue;
      e.appendChild(k instanceof Node ? k : document.createTextNode(String(k)));
    }
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(v, d) {
    if (v == null || !isFinite(v)) return "\u2013";
    var a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return v.toExponential(2);
    return v.toFixed(d == null ? 3 : d);
  }
  function quantile(vals, q) {
    if (!vals.length) return 1;
    var s = vals.slice().sort(function (a, b) { return a - b; });
    return s[Math.min(s.length - 1, Math.floor(q * (s.length - 1)))] || 1e-12;
  }

  var P = D.passages;
  var mode = "raw";

  // ---- header --------------------------------------------------------------------------------------
  var root = document.getElementById("app");
  root.appendChild(el("h1", null, "Why each passage landed where it did"));
  root.appendChild(el("p", "notice", D.notice));
  root.appendChild(el("div", "query", el("b", null, "Query: "), text(D.query)));
  var F = D.facts;
  root.appendChild(el("div", "muted",
    F.model + " \u00B7 " + F.dtype + " \u00B7 " + P.length + " passages in " + F.windows + " window(s), " +
    F.prompts.length + " prompt(s), " + F.prompt_tokens + " prompt tokens \u00B7 score: " + F.score_kind +
    ", calibrator " + F.calibrator + " \u00B7 rerank " + fmt(F.timings.rerank_seconds, 2) + " s"));

  // ---- 1. ranking table ----------------------------------------------------------------------------
  root.appendChild(el("h2", null, "1. Ranking"));
  root.appendChild(el("p", "hint",
    "Click a column to sort. Raw: attention the query paid to the passage. N/A: the attention a " +
    "content-free query pays it in the same slot. Calibrated: after the N/A correction and the bias curve " +
    "(mean over prompt orders). Fused: the weighted sum of the standardised signals (see Run facts); " +
    "the list is ordered by it. Slots: R = best-last prompt, F = first-stage-order prompt."));
  var cols = [
    ["rank", "Rank", function (p) { return p.rank; }, function (v) { return String(v); }],
    ["id", "Passage", function (p) { return p.id; }, null],
    ["first_stage_rank", "1st-stage rank", function (p) { return p.first_stage_rank; }, String],
    ["first_stage_score", "1st-stage score", function (p) { return p.first_stage_score; }, fmt],
    ["raw_score", "Raw attention", function (p) { return p.raw_score; }, fmt],
    ["na_score", "N/A", function (p) { return p.na_score; }, fmt],
    ["calibrated_score", "Calibrated", function (p) { return p.calibrated_score; }, fmt],
    ["score", "Fused", function (p) { return p.score; }, fmt],
    ["slots", "Slot(s)", function (p) { return p.readings[0].slot; }, null],
    ["kept", "Policy", function (p) { return p.kept ? (p.context_position == null ? 0 : p.context_position) : 1e9; }, null],
    ["rank_change", "\u0394 rank", function (p) { return p.rank_change; }, null]
  ];
  var table = el("table"); table.id = "ranking";
  var thead = el("thead"), hr = el("tr");
  cols.forEach(function (c) {
    var th = el("th", c[0] === "id" ? "txt" : null, c[1]);
    th.setAttribute("data-key", c[0]);
    th.addEventListener("click", function () { sortBy(c, th); });
    hr.appendChild(th);
  });
  thead.appendChild(hr); table.appendChild(thead);
  var tbody = el("tbody"); table.appendChild(tbody);
  var rows = P.map(function (p, i) {
    var tr = el("tr", p.kept ? "kept" : null);
    tr.setAttribute("data-id", String(i));
    cols.forEach(function (c) {
      var v = c[2](p), td;
      if (c[0] === "id") {
        var a = el("a", "pid", text(p.id)); a.href = "#p-" + i;
        var body = (p.title ? p.title + ": " : "") + p.text;
        td = el("td", "txt", a, " ", el("span", "snip", text(body.length > 90 ? body.slice(0, 90) + "\u2026" : body)));
      } else if (c[0] === "slots") {
        td = el("td", null, p.readings.map(function (r) {
          return (r.order === "reversed" ? "R" : "F") + ":" + r.slot;
        }).join(" "));
      } else if (c[0] === "kept") {
        td = el("td", null, p.kept ? "kept #" + (p.context_position + 1) : "pruned");
      } else if (c[0] === "rank_change") {
        var rc = p.rank_change;
        td = el("td", rc > 0 ? "up" : rc < 0 ? "down" : null, rc > 0 ? "\u25B2" + rc : rc < 0 ? "\u25BC" + (-rc) : "=");
      } else {
        td = el("td", null, c[3](v));
      }
      td.setAttribute("data-col", c[0]);
      tr.appendChild(td);
    });
    tbody.appendChild(tr);
    return { tr: tr, p: p };
  });
  root.appendChild(table);
  function sortBy(c, th) {
    var dir = th.getAttribute("aria-sort") === "descending" ? "ascending" : "descending";
    if (!th.hasAttribute("aria-sort") && (c[0] === "rank" || c[0] === "first_stage_rank" || c[0] === "kept" || c[0] === "id")) dir = "ascending";
    Array.prototype.forEach.call(thead.querySelectorAll("th"), function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", dir);
    var sign = dir === "ascending" ? 1 : -1;
    rows.slice().sort(function (a, b) {
      var x = c[2](a.p), y = c[2](b.p);
      if (x == null && y == null) return a.p.rank - b.p.rank;
      if (x == null) return 1;
      if (y == null) return -1;
      if (x < y) return -sign;
      if (x > y) return sign;
      return a.p.rank - b.p.rank;
    }).forEach(function (r) { tbody.appendChild(r.tr); });
  }

  // ---- 2. positional-bias strip --------------------------------------------------------------------
  root.appendChild(el("h2", null, "2. Positional bias"));
  root.appendChild(el("p", "hint",
    "The line is the model's fitted bias curve: what a passage scores at each prompt slot whatever it " +
    "says (slot 0 is the first, farthest from the query). Dots are this query's passages before the " +
    "curve's correction; a dot on the line got no more than its slot gives for free. Red: final top 3; " +
    "orange: kept by the policy."));
  var charts = el("div", "charts"); root.appendChild(charts);
  D.bias.forEach(function (b) {
    var W = 560, H = 230, L = 46, R = 10, T = 10, B = 34;
    var pts = b.points, ys = pts.map(function (p) { return p.uncorrected; });
    var band = [];
    for (var i = 0; i < b.mean.length; i++) {
      var sd = b.sd.length ? b.sd[i] : 0;
      band.push(b.mean[i] - sd, b.mean[i] + sd);
    }
    var all = ys.concat(band.length ? band : []);
    var lo = Math.min.apply(null, all), hi = Math.max.apply(null, all);
    if (hi - lo < 1e-9) { hi = lo + 1; }
    var pad = (hi - lo) * 0.06; lo -= pad; hi += pad;
    var n = Math.max(b.length, 2);
    function X(s) { return L + (W - L - R) * s / (n - 1); }
    function Y(v) { return T + (H - T - B) * (1 - (v - lo) / (hi - lo)); }
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H, role: "img" });
    s.setAttribute("class", "bias-strip");
    s.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#fafafa", stroke: "#ddd" }));
    for (var k = 0; k < n; k += Math.max(1, Math.round(n / 10))) {
      var t = svg("text", { x: X(k), y: H - B + 14, "text-anchor": "middle" }); t.textContent = String(k); s.appendChild(t);
    }
    var xl = svg("text", { x: (L + W) / 2, y: H - 4, "text-anchor": "middle" });
    xl.textContent = "prompt slot (" + (b.order === "reversed" ? "best first-stage passage last" : "first-stage order") + ")";
    s.appendChild(xl);
    [lo + pad, (lo + hi) / 2, hi - pad].forEach(function (v) {
      var t = svg("text", { x: L - 4, y: Y(v) + 4, "text-anchor": "end" }); t.textContent = fmt(v, 2); s.appendChild(t);
    });
    if (b.mean.length) {
      if (b.sd.length) {
        var up = "", dn = "";
        for (var j = 0; j < b.mean.length; j++) {
          up += (j ? " L" : "M") + X(j) + "," + Y(b.mean[j] + b.sd[j]);
          dn = " L" + X(j) + "," + Y(b.mean[j] - b.sd[j]) + dn;
        }
        s.appendChild(svg("path", { d: up + dn + " Z", fill: "#3182bd", "fill-opacity": 0.12, stroke: "none" }));
      }
      var d = "";
      for (var m = 0; m < b.mean.length; m++) d += (m ? " L" : "M") + X(m) + "," + Y(b.mean[m]);
      s.appendChild(svg("path", { d: d, fill: "none", stroke: "#3182bd", "stroke-width": 2 }));
    }
    var kept = {};
    P.forEach(function (p) { kept[p.id] = p.kept; });
    pts.slice().sort(function (a, b2) { return b2.rank - a.rank; }).forEach(function (p) {
      // A shorter window is corrected with the curve stretched over its slots: draw it the same way.
      var x = p.n > 1 ? p.slot * (n - 1) / (p.n - 1) : n - 1;
      var col = p.rank <= 3 ? "#d62728" : kept[p.id] ? "#ff9f1c" : "#8c8c8c";
      var c = svg("circle", { cx: X(x), cy: Y(p.uncorrected), r: p.rank <= 3 ? 5 : 3.5, fill: col, "fill-opacity": 0.85 });
      var tt = svg("title", {});
      tt.textContent = p.id + " \u00B7 rank " + p.rank + " \u00B7 window " + p.window + ", slot " + p.slot +
        " \u00B7 before the curve " + fmt(p.uncorrected) + " \u00B7 calibrated " + fmt(p.calibrated);
      c.appendChild(tt);
      s.appendChild(c);
    });
    var box = el("div", "chart", el("h3", null, "Prompt order: " + b.order + (b.mode === "none" ? " (no curve in this config)" : " \u00B7 curve mode " + b.mode)));
    box.appendChild(s);
    charts.appendChild(box);
  });

  // ---- 3. token heatmaps ---------------------------------------------------------------------------
  root.appendChild(el("h2", null, "3. Tokens the query attended to"));
  var allRaw = [], allCor = [];
  P.forEach(function (p) {
    p.tokens.raw.forEach(function (v) { allRaw.push(v); });
    p.tokens.corrected.forEach(function (v) { allCor.push(Math.abs(v)); });
  });
  var scaleRaw = quantile(allRaw, 0.99), scaleCor = quantile(allCor, 0.99);
  function colour(v) {
    if (mode === "raw") return "rgba(230,85,13," + Math.min(1, Math.max(0, v / scaleRaw)).toFixed(3) + ")";
    var a = Math.min(1, Math.abs(v) / scaleCor).toFixed(3);
    return v >= 0 ? "rgba(230,85,13," + a + ")" : "rgba(49,130,189," + a + ")";
  }
  var bar = el("span", "bar");
  var label = el("span", null); label.id = "mode-label";
  var btn = el("button", null, "show bias-corrected"); btn.id = "toggle-mode"; btn.type = "button";
  btn.setAttribute("aria-pressed", "false");
  var toolbar = el("div", "toolbar", btn, el("span", "legend", label, bar));
  root.appendChild(toolbar);
  root.appendChild(el("p", "hint",
    "Each token is shaded by the attention the query's tokens paid to it in the scored layers " +
    "(mean over prompt orders). Bias-corrected: minus the attention the content-free N/A query paid the " +
    "same token (orange: more than N/A, blue: less). Shades share one scale across passages."));
  function legend() {
    label.textContent = mode === "raw" ? "raw attention" : "bias-corrected (query \u2212 N/A)";
    bar.style.background = mode === "raw" ? "linear-gradient(90deg, rgba(230,85,13,0), rgba(230,85,13,1))" :
      "linear-gradient(90deg, rgba(49,130,189,1), rgba(49,130,189,0), rgba(230,85,13,0), rgba(230,85,13,1))";
    btn.textContent = mode === "raw" ? "show bias-corrected" : "show raw";
    btn.setAttribute("aria-pressed", mode === "raw" ? "false" : "true");
    document.body.setAttribute("data-mode", mode);
  }
  var rendered = [];
  function paint(box) {
    var p = P[+box.getAttribute("data-p")], vals = mode === "raw" ? p.tokens.raw : p.tokens.corrected;
    var spans = box.querySelectorAll("span.t");
    for (var i = 0; i < spans.length; i++) {
      spans[i].style.backgroundColor = colour(vals[i]);
      spans[i].title = "raw " + fmt(p.tokens.raw[i], 4) + " \u00B7 corrected " + fmt(p.tokens.corrected[i], 4);
    }
  }
  function renderTokens(det, i) {
    if (det.getAttribute("data-done")) return;
    det.setAttribute("data-done", "1");
    var p = P[i], box = el("div", "tokens");
    box.setAttribute("data-p", String(i));
    p.tokens.tokens.forEach(function (t) { box.appendChild(el("span", "t", text(t))); });
    if (p.tokens.truncated) {
      box.appendChild(el("span", "cut", "\u2702 cut here: " + p.tokens.dropped_tokens + " more tokens not read by the probe"));
      box.appendChild(el("span", "dropped", text(p.tokens.dropped_text)));
    }
    det.appendChild(box);
    rendered.push(box);
    paint(box);
  }
  var heat = el("div"); heat.id = "heatmaps"; root.appendChild(heat);
  P.forEach(function (p, i) {
    var det = el("details", "ph"); det.id = "p-" + i;
    var top = el("span", "muted", " top tokens: ");
    p.tokens.top.forEach(function (j) {
      var t = p.tokens.tokens[j].replace(/^\s+|\s+$/g, "");
      if (t) top.appendChild(el("span", "chip", text(t)));
    });
    det.appendChild(el("summary", null, el("b", null, "#" + p.rank + " "), text(p.id),
      el("span", "muted", " \u00B7 1st-stage #" + p.first_stage_rank + " \u00B7 " + (p.kept ? "kept" : "pruned") +
        (p.tokens.truncated ? " \u00B7 truncated" : "")), top));
    det.addEventListener("toggle", function () { if (det.open) renderTokens(det, i); });
    heat.appendChild(det);
    if (i < 5) { det.open = true; renderTokens(det, i); }
  });
  btn.addEventListener("click", function () {
    mode = mode === "raw" ? "corrected" : "raw";
    legend();
    rendered.forEach(paint);
  });
  legend();

  // ---- 4. layers -----------------------------------------------------------------------------------
  root.appendChild(el("h2", null, "4. Layers"));
  root.appendChild(el("p", "hint",
    "One row per passage (final rank order), one bar per probed layer. Bar height: the layer's share of " +
    "the query attention the passage received (for the pooled ratio score this is exactly the layer's " +
    "share of the score). Colour: " + D.layer_kind + " (orange above zero, blue below). A row carried " +
    "by one tall bar is a ranking carried by one layer."));
  (function () {
    var nl = D.layers.length, bw = 14, rh = 22, left = 150, top = 22;
    var W = left + nl * (bw + 3) + 20, H = top + P.length * rh + 6;
    var s = svg("svg", { width: W, height: H, viewBox: "0 0 " + W + " " + H });
    s.setAttribute("class", "layer-chart");
    var amax = 1e-12;
    P.forEach(function (p) { p.layer_scores.forEach(function (v) { amax = Math.max(amax, Math.abs(v)); }); });
    D.layers.forEach(function (l, j) {
      var t = svg("text", { x: left + j * (bw + 3) + bw / 2, y: 14, "text-anchor": "middle" });
      t.textContent = String(l); s.appendChild(t);
    });
    P.forEach(function (p, i) {
      var y0 = top + i * rh;
      var lab = svg("text", { x: left - 6, y: y0 + rh - 8, "text-anchor": "end" });
      var idt = p.id.length > 16 ? p.id.slice(0, 16) + "\u2026" : p.id;
      lab.textContent = "#" + p.rank + " " + idt; s.appendChild(lab);
      var smax = Math.max.apply(null, p.layer_share.concat([1e-12]));
      p.layer_share.forEach(function (v, j) {
        var h = Math.max(1, (rh - 6) * v / smax), sc = p.layer_scores[j], a = Math.min(1, Math.abs(sc) / amax);
        var r = svg("rect", { x: left + j * (bw + 3), y: y0 + rh - 4 - h, width: bw, height: h,
          fill: sc >= 0 ? "rgb(230,85,13)" : "rgb(49,130,189)", "fill-opacity": (0.25 + 0.75 * a).toFixed(3) });
        var tt = svg("title", {});
        tt.textContent = "layer " + D.layers[j] + ": share " + fmt(v, 3) + ", " + fmt(sc);
        r.appendChild(tt); s.appendChild(r);
      });
    });
    root.appendChild(el("div", "chart", s));
  })();

  // ---- counterfactual ------------------------------------------------------------------------------
  if (D.counterfactual) {
    var c = D.counterfactual;
    root.appendChild(el("h2", null, "Counterfactual: the top passage at the other end"));
    root.appendChild(el("p", null, "Passage ", el("b", null, text(c.id)), " moved from slot " + c.slot_before +
      " to slot " + c.slot_after + " of its " + c.order + " prompt: calibrated " + fmt(c.calibrated_before) +
      " \u2192 " + fmt(c.calibrated_after) + ", raw " + fmt(c.raw_before) + " \u2192 " + fmt(c.raw_after) +
      ", rank within its window " + c.window_rank_before + " \u2192 " + c.window_rank_after + "."));
  }

  // ---- 5. run facts --------------------------------------------------------------------------------
  root.appendChild(el("h2", null, "5. Run facts"));
  var dl = el("dl", "facts");
  function fact(k, v) { dl.appendChild(el("dt", null, k)); dl.appendChild(el("dd", null, text(v))); }
  fact("model", F.model); fact("dtype / device", F.dtype + " / " + F.device);
  fact("layers x heads", F.num_layers + " x " + F.num_heads + "; probe reads layers " + F.probe_layers.join("-"));
  fact("score", F.score_kind + " (" + F.aggregation + "), calibrator " + F.calibrator);
  fact("bias curve", F.curve ? F.curve.mode + ", fitted on lengths " + F.curve.lengths.join("/") +
    (F.curve.offsets ? " with per-slot offsets" : "") + (F.curve.fitted_on ? "; " + F.curve.fitted_on : "") : "none");
  fact("prompt order", F.prompt_order); fact("first stage", F.first_stage);
  fact("fused signals (weight)", Object.keys(F.weights).map(function (k) {
    return k + " " + fmt(F.weights[k], 3) + (F.signals[k] ? " [" + F.signals[k] + "]" : ""); }).join(", ") || "none");
  fact("windows / prompts", F.windows + " / " + F.prompts.length + " (" + F.prompt_tokens + " tokens)");
  fact("timings (s)", "rerank " + fmt(F.timings.rerank_seconds, 3) + ", explain " + fmt(F.timings.explain_seconds, 3) +
    (F.timings.counterfactual_seconds ? ", counterfactual " + fmt(F.timings.counterfactual_seconds, 3) : ""));
  fact("token rows kept", (F.token_rows_bytes / 1048576).toFixed(2) + " MiB (query and N/A rows, linear in tokens)");
  fact("prompt template", JSON.stringify(F.template));
  root.appendChild(dl);
  var pt = el("table"); pt.id = "prompts";
  pt.appendChild(el("tr", null, el("th", null, "window"), el("th", null, "order"), el("th", null, "tokens"),
    el("th", null, "prefix"), el("th", null, "query"), el("th", null, "passages"), el("th", null, "truncated")));
  F.prompts.forEach(function (p) {
    pt.appendChild(el("tr", null, el("td", null, p.window), el("td", null, p.order), el("td", null, p.tokens),
      el("td", null, p.prefix_tokens), el("td", null, p.query_tokens), el("td", null, p.passages), el("td", null, p.truncated)));
  });
  root.appendChild(pt);
  var cfgd = el("details", null, el("summary", null, "config"), el("pre", null, JSON.stringify(F.config, null, 2)));
  root.appendChild(cfgd);
  document.body.setAttribute("data-ready", "1");
})();
"""


def _embed_json(data: Any) -> str:
    # Inside <script> only "</script" or "<!--" could end the element early: with every <, > and &
    # escaped (valid JSON string escapes), no passage text can. U+2028/2029 are escaped for old parsers.
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    return (
        text.replace("&", "\\u0026")
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def render_html(data: dict[str, Any]) -> str:
    """The page for an explanation's JSON data (see :meth:`Explanation.to_html`)."""
    digest = base64.b64encode(hashlib.sha256(_JS.encode("utf-8")).digest()).decode("ascii")
    csp = (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
        f"script-src 'sha256-{digest}'; base-uri 'none'; form-action 'none'"
    )
    title = html.escape(f"attn-rerank explain: {data.get('query', '')}"[:200], quote=True)
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{csp}">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{title}</title>\n<style>{_CSS}</style>\n</head><body>\n"
        f"<noscript><p>{html.escape(data.get('notice', ''))}</p><p>This page draws its tables and charts with "
        "JavaScript; the same data is in the JSON below (and in the --json file).</p></noscript>\n"
        '<main id="app"></main>\n'
        f'<script type="application/json" id="explain-data">{_embed_json(data)}</script>\n'
        f"<script>{_JS}</script>\n</body></html>\n"
    )
