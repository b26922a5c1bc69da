// qed-report, part 1 of 4: the page's data and small helpers. No network, no library but the inlined KaTeX: SVG by
// hand, text always inserted as text (never as HTML), so a proof or a judge reply cannot inject markup.
// The data sits in three JSON elements read one by one: a page whose rollouts cannot be read still draws its curves.
"use strict";
const PAGE_ERRORS = [];
function readJson(id, fallback) {
  try { return JSON.parse(document.getElementById(id).textContent); } catch (err) {
    PAGE_ERRORS.push(`the page's ${id} element could not be read (${err.message}); what it held is not shown`);
    return fallback;
  }
}
const DATA = readJson("qed-data", {title: "qed-report", generated: "", warnings: [], runs: []});
const METRICS = readJson("qed-metrics", []), ROLLOUTS = readJson("qed-rollouts", []);
DATA.runs.forEach((run, i) => { run.metrics = METRICS[i] || {}; run.rollouts = ROLLOUTS[i] || []; });

const RUN_COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];
const SCORE_COLORS = ["#b91c1c", "#dc2626", "#ea580c", "#f59e0b", "#eab308", "#84cc16", "#22c55e", "#15803d", "#9ca3af"];
const DASHES = ["", "6 4", "2 3", "10 3 2 3"];
const SVG_NS = "http://www.w3.org/2000/svg";

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "" :
  (Math.abs(v) >= 1000 ? v.toFixed(0) : Number(Number(v).toPrecision(d)).toString());
const runColor = (i) => RUN_COLORS[i % RUN_COLORS.length];
const trainRuns = () => DATA.runs.map((r, i) => [r, i]).filter(([r]) => r.kind === "train");

// ---- math: $...$, $$...$$, \(...\), \[...\] rendered by KaTeX into `node`; the rest stays text ----------------------
const MATH = /\$\$([\s\S]+?)\$\$|\\\[([\s\S]+?)\\\]|\\\(([\s\S]+?)\\\)|\$([^$\n]+?)\$/g;
const mathOn = () => typeof katex !== "undefined" && document.getElementById("math-toggle").checked;
function fillText(node, text, math = mathOn()) {
  node.replaceChildren();
  if (!math) { node.textContent = text; return node; }
  let at = 0;
  for (const m of text.matchAll(MATH)) {
    if (m.index > at) node.append(text.slice(at, m.index));
    const span = el("span", {class: "math", title: m[0]}), display = m[1] !== undefined || m[2] !== undefined;
    try { katex.render(m[1] ?? m[2] ?? m[3] ?? m[4], span, {throwOnError: false, displayMode: display, trust: false, maxExpand: 200}); }
    catch (err) { span.textContent = m[0]; }
    node.append(span); at = m.index + m[0].length;
  }
  if (at < text.length) node.append(text.slice(at));
  return node;
}
