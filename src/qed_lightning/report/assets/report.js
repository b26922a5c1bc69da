// qed-report: draws the curves and the rollout browser from the JSON embedded in the page. No network, no library:
// SVG by hand, text always inserted as text (never as HTML), so a proof or a judge reply cannot inject markup.
"use strict";
const DATA = JSON.parse(document.getElementById("qed-data").textContent);
const RUN_COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#db2777", "#0891b2", "#4b5563"];
const SCORE_COLORS = ["#b91c1c", "#dc2626", "#ea580c", "#f59e0b", "#eab308", "#84cc16", "#22c55e", "#15803d"];
const DASHES = ["", "6 4", "2 3", "10 3 2 3"];
const SVG_NS = "http://www.w3.org/2000/svg";
const MAX_ROWS = 500;

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}
function svg(tag, attrs = {}) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}
const fmt = (v, d = 3) => (v === null || v === undefined || Number.isNaN(v)) ? "" :
  (Math.abs(v) >= 1000 ? v.toFixed(0) : Number(v.toPrecision(d)).toString());
const runColor = (i) => RUN_COLORS[i % RUN_COLORS.length];
const trainRuns = () => DATA.runs.map((r, i) => [r, i]).filter(([r]) => r.kind === "train");

function niceTicks(lo, hi, n = 5) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// ---- line chart: series = [{label, color, dash, points: [[x, y]], band: [[x, lo, hi]]}] --------------------------
function lineChart(title, series, note) {
  const W = 460, H = 250, L = 52, R = 12, T = 12, B = 34;
  const all = series.flatMap((s) => s.points.concat((s.band || []).flatMap(([x, lo, hi]) => [[x, lo], [x, hi]])));
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const yt = niceTicks(y0, y1); y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]);
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => H - B - (y - y0) / ((y1 - y0) || 1) * (H - T - B);
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "aria-label": title});
  for (const t of yt) {
    root.append(svg("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    root.append(Object.assign(svg("text", {x: L - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end"}), {textContent: fmt(t)}));
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => t >= x0 && t <= x1)) {
    root.append(Object.assign(svg("text", {x: sx(t), y: H - B + 16, class: "tick", "text-anchor": "middle"}), {textContent: fmt(t)}));
  }
  root.append(Object.assign(svg("text", {x: (L + W - R) / 2, y: H - 4, class: "axis", "text-anchor": "middle"}), {textContent: "step"}));
  for (const s of series) {
    if (s.band && s.band.length > 1) {
      const up = s.band.map(([x, , hi]) => `${sx(x)},${sy(hi)}`), down = s.band.slice().reverse().map(([x, lo]) => `${sx(x)},${sy(lo)}`);
      root.append(svg("polygon", {points: up.concat(down).join(" "), fill: s.color, class: "band"}));
    }
    const d = s.points.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
    root.append(svg("path", {d, stroke: s.color, "stroke-dasharray": s.dash || "", class: "line", "data-label": s.label}));
    if (s.points.length <= 80) for (const [x, y] of s.points) {
      const dot = svg("circle", {cx: sx(x), cy: sy(y), r: 2.6, fill: s.color, class: "dot"});
      dot.append(Object.assign(svg("title"), {textContent: `${s.label}\nstep ${x}: ${fmt(y, 4)}`}));
      root.append(dot);
    }
  }
  const legend = el("div", {class: "legend"}, ...series.map((s) => el("span", {class: "key"},
    el("i", {style: `border-top: 3px ${s.dash ? "dashed" : "solid"} ${s.color}`}), s.label)));
  return el("div", {class: "card"}, el("h3", {text: title}), root, legend, note ? el("p", {class: "note", text: note}) : null);
}

// ---- stacked bars: the judge's score distribution per step of one run ---------------------------------------------
function scoreBars(run) {
  const keys = [...Array(8).keys()].map((k) => `judge/score_${k}`).filter((k) => run.metrics[k]);
  if (!keys.length) return null;
  const steps = [...new Set(keys.flatMap((k) => run.metrics[k].map((p) => p[0])))].sort((a, b) => a - b);
  const W = 460, H = 250, L = 40, R = 12, T = 12, B = 34, bw = (W - L - R) / steps.length;
  const root = svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart scores", role: "img"});
  const sy = (v) => H - B - v * (H - T - B);
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    root.append(svg("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    root.append(Object.assign(svg("text", {x: L - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end"}), {textContent: `${t * 100}%`}));
  }
  steps.forEach((step, i) => {
    let base = 0;
    for (let k = 0; k < 8; k++) {
      const hit = (run.metrics[`judge/score_${k}`] || []).find((p) => p[0] === step), v = hit ? hit[1] : 0;
      if (v <= 0) continue;
      const rect = svg("rect", {x: L + i * bw + bw * 0.1, width: bw * 0.8, y: sy(base + v), height: sy(base) - sy(base + v), fill: SCORE_COLORS[k]});
      rect.append(Object.assign(svg("title"), {textContent: `step ${step}: score ${k} for ${(v * 100).toFixed(0)}%`}));
      root.append(rect); base += v;
    }
    if (steps.length <= 30 || i % Math.ceil(steps.length / 15) === 0)
      root.append(Object.assign(svg("text", {x: L + (i + 0.5) * bw, y: H - B + 16, class: "tick", "text-anchor": "middle"}), {textContent: step}));
  });
  const legend = el("div", {class: "legend"}, ...SCORE_COLORS.map((c, k) => el("span", {class: "key"}, el("i", {style: `border-top: 8px solid ${c}`}), `${k}`)));
  return el("div", {class: "card"}, el("h3", {text: `Judge score distribution per step: ${run.name}`}), root, legend);
}

// ---- the curves section -------------------------------------------------------------------------------------------
const CHARTS = [
  {title: "Reward (mean, band = std)", lines: [{key: "rollout/reward_mean", band: "rollout/reward_std", label: "train"}, {key: "val/reward_mean", label: "val"}]},
  {title: "Loss", lines: [{key: "train/loss"}]},
  {title: "Response length (tokens)", lines: [{key: "rollout/response_len_mean", label: "mean"}, {key: "rollout/response_len_max", label: "max"}]},
  {title: "Truncated share", lines: [{key: "rollout/truncated_frac", label: "train"}, {key: "val/truncated_frac", label: "val"}]},
  {title: "Entropy", lines: [{key: "train/entropy"}]},
  {title: "Gradient norm", lines: [{key: "train/grad_norm"}]},
  {title: "Tokens / s", lines: [{key: "train/tokens_per_sec"}]},
  {title: "Phase time (s)", lines: [{key: "time/generate_s", label: "generate"}, {key: "time/grade_s", label: "grade"}, {key: "time/train_s", label: "train"}, {key: "time/rc_loop_s", label: "rc loop"}]},
];

function seriesOf(spec) {
  const out = [];
  for (const [run, i] of trainRuns()) spec.lines.forEach((line, j) => {
    const pts = run.metrics[line.key];
    if (!pts || !pts.length) return;
    const std = line.band && run.metrics[line.band];
    const band = std ? pts.map(([x, y]) => { const s = std.find((p) => p[0] === x); return s ? [x, y - s[1], y + s[1]] : null; }).filter(Boolean) : null;
    const label = [trainRuns().length > 1 ? run.name : null, line.label || (spec.lines.length > 1 ? line.key : null)].filter(Boolean).join(" · ") || line.key;
    out.push({label, color: runColor(i), dash: DASHES[j % DASHES.length], points: pts, band});
  });
  return out;
}

function renderCurves() {
  const host = document.getElementById("curves");
  const runs = trainRuns();
  if (!runs.length) { host.append(el("p", {class: "empty", text: "No training run was given (only evaluation folders)."})); return; }
  const grid = el("div", {class: "grid"});
  for (const spec of CHARTS) { const s = seriesOf(spec); if (s.length) grid.append(lineChart(spec.title, s)); }
  for (const [run] of runs) { const bars = scoreBars(run); if (bars) grid.append(bars); }
  const keys = [...new Set(runs.flatMap(([r]) => Object.keys(r.metrics)))].sort();
  const pick = el("select", {id: "metric-pick", "aria-label": "metric"}, ...keys.map((k) => el("option", {value: k, text: k})));
  const slot = el("div", {class: "explorer"});
  const draw = () => { slot.replaceChildren(lineChart(pick.value, seriesOf({lines: [{key: pick.value}]}))); };
  pick.addEventListener("change", draw);
  host.append(grid, el("h2", {text: "Any metric"}), el("div", {class: "filters"}, pick), slot);
  if (keys.length) { pick.value = keys.includes("val/reward_mean") ? "val/reward_mean" : keys[0]; draw(); }
}

// ---- the rollout browser ------------------------------------------------------------------------------------------
const ROWS = DATA.runs.flatMap((run, r) => (run.rollouts || []).map((rec, i) => ({...rec, _run: r, _id: `${r}-${i}`})));
const FILTERS = {run: "", step: "", problem: "", score: "", status: "", text: ""};
const keyOf = (rec) => ({run: String(rec._run), step: rec.step === null ? "eval" : String(rec.step), problem: String(rec.problem_id),
  score: rec.score === null || rec.score === undefined ? "none" : String(rec.score), status: String(rec.status)});

function option(value, text) { return el("option", {value, text}); }
function filterSelect(name, label, values, describe = (v) => v) {
  const s = el("select", {id: `filter-${name}`, "aria-label": label}, option("", `${label}: all`), ...values.map((v) => option(v, describe(v))));
  s.addEventListener("change", () => { FILTERS[name] = s.value; renderTable(); });
  return s;
}
const uniq = (f) => [...new Set(ROWS.map((r) => keyOf(r)[f]))].sort((a, b) => (Number(a) - Number(b)) || a.localeCompare(b));

function renderBrowser() {
  const host = document.getElementById("rollouts");
  if (!ROWS.length) { host.append(el("p", {class: "empty", text: "No rollout records: RL runs write them to <run>/rollouts (model.rollout_log), evaluations to samples.jsonl."})); return; }
  const text = el("input", {id: "filter-text", type: "search", placeholder: "search proof, reply, problem"});
  text.addEventListener("input", () => { FILTERS.text = text.value.toLowerCase(); renderTable(); });
  host.append(el("div", {class: "filters"},
    filterSelect("run", "run", uniq("run"), (v) => DATA.runs[Number(v)].name), filterSelect("step", "step", uniq("step")),
    filterSelect("problem", "problem", uniq("problem")), filterSelect("score", "score", uniq("score")),
    filterSelect("status", "status", uniq("status")), text),
  el("p", {id: "row-count", class: "note"}),
  el("div", {class: "browser"}, el("div", {class: "table-wrap"}, el("table", {id: "rollout-table"})), el("div", {id: "detail", class: "detail"},
    el("p", {class: "empty", text: "Select a rollout to read its proof, rubric and judge reply."}))));
  renderTable();
}

function matches(rec) {
  const k = keyOf(rec);
  for (const f of ["run", "step", "problem", "score", "status"]) if (FILTERS[f] && k[f] !== FILTERS[f]) return false;
  if (!FILTERS.text) return true;
  return [rec.completion, rec.judge_reply, rec.problem, rec.prompt].some((t) => t && t.toLowerCase().includes(FILTERS.text));
}

function renderTable() {
  const shown = ROWS.filter(matches);
  document.getElementById("row-count").textContent = `${shown.length} of ${ROWS.length} rollouts` + (shown.length > MAX_ROWS ? ` (first ${MAX_ROWS} listed)` : "");
  const head = el("tr", {}, ...["run", "step", "problem", "#", "score", "reward", "advantage", "status", "tokens", "finish"].map((h) => el("th", {text: h})));
  const rows = shown.slice(0, MAX_ROWS).map((rec) => {
    const k = keyOf(rec);
    const tr = el("tr", {class: `rollout status-${rec.status}`, "data-score": k.score, "data-step": k.step, "data-id": rec._id},
      el("td", {text: DATA.runs[rec._run].name}), el("td", {text: k.step}), el("td", {text: k.problem}),
      el("td", {text: rec.sample ?? ""}), el("td", {class: "score", text: k.score}), el("td", {text: fmt(rec.reward)}),
      el("td", {text: rec.advantage === undefined ? "" : fmt(rec.advantage)}), el("td", {text: rec.status}),
      el("td", {text: rec.completion_tokens ?? ""}), el("td", {text: rec.finish_reason || ""}));
    tr.addEventListener("click", () => { document.querySelectorAll("tr.selected").forEach((t) => t.classList.remove("selected")); tr.classList.add("selected"); showDetail(rec); });
    return tr;
  });
  document.getElementById("rollout-table").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

function textBlock(title, body, {open = true, mono = true, cls = ""} = {}) {
  const pre = el("pre", {class: `${mono ? "mono" : "prose"} ${cls}`, text: body || "(empty)"});
  return el("details", open ? {open: ""} : {}, el("summary", {text: `${title}${body ? ` (${body.length.toLocaleString()} characters)` : ""}`}), pre);
}

function showDetail(rec) {
  const completion = rec.completion || "", cut = completion.lastIndexOf("</think>");
  const thinking = cut >= 0 ? completion.slice(0, cut + 8) : (rec.proof ? "" : completion);
  const proof = rec.proof ?? (cut >= 0 ? completion.slice(cut + 8).trim() : "");
  const facts = [["run", DATA.runs[rec._run].name], ["step", rec.step ?? "eval"], ["problem", rec.problem_id], ["source", rec.source],
    ["score", rec.score ?? "none"], ["reward", fmt(rec.reward)], ["advantage", fmt(rec.advantage)], ["status", rec.status],
    ["finish", rec.finish_reason], ["tokens", rec.completion_tokens], ["policy version", rec.policy_version], ["cycle", rec.cycle],
    ["scaffold", rec.scaffold], ["judge cache", rec.judge_cached ? "hit" : null]].filter(([, v]) => v !== undefined && v !== null && v !== "");
  const left = el("div", {class: "col"},
    textBlock(rec.proof === null && cut < 0 ? "Proof (not graded: no </think>)" : "Proof (the text the judge graded)", proof, {cls: "proof"}),
    textBlock("Thinking", thinking, {open: false}), textBlock("Prompt", rec.prompt, {open: false}),
    rec.state ? textBlock("RC state summary", rec.state, {open: false, mono: false}) : null);
  const right = el("div", {class: "col"},
    textBlock("Rubric", rec.rubric || (rec.step === null ? "(evaluation samples do not record the grading guidelines)" : ""), {mono: false, cls: "rubric"}),
    textBlock("Judge reply", rec.judge_reply, {cls: "reply"}), rec.problem ? textBlock("Problem", rec.problem, {open: false, mono: false}) : null);
  document.getElementById("detail").replaceChildren(
    el("div", {class: "facts"}, ...facts.map(([k, v]) => el("span", {}, el("b", {text: `${k} `}), String(v)))),
    el("div", {class: "pair"}, left, right));
}

// ---- evaluations, configs, header -----------------------------------------------------------------------------------
function table(headers, rows) {
  return el("table", {class: "summary"}, el("thead", {}, el("tr", {}, ...headers.map((h) => el("th", {text: h})))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {text: c}))))));
}
const pct = (v) => v === undefined ? "" : (100 * v).toFixed(1);
function renderEvals() {
  const host = document.getElementById("evals"), runs = DATA.runs.filter((r) => r.kind === "eval");
  if (!runs.length) { host.append(el("p", {class: "empty", text: "No qed-eval folder was given."})); return; }
  for (const run of runs) {
    const scaffolds = (run.summary && run.summary.scaffolds) || {}, rows = [];
    for (const [name, entry] of Object.entries(scaffolds)) {
      const m = entry.overall;
      rows.push([name, "overall", m.n, fmt(m.score_pct), fmt(m.std_pct), fmt(m.best_of_n_pct), pct(m.failure_rate), pct(m.truncation_rate), fmt(m.tokens_mean)]);
      for (const [field, groups] of Object.entries(entry)) if (field.startsWith("by_")) for (const [g, gm] of Object.entries(groups))
        rows.push(["", `${field.slice(3)}: ${g}`, gm.n, fmt(gm.score_pct), fmt(gm.std_pct), fmt(gm.best_of_n_pct), pct(gm.failure_rate), pct(gm.truncation_rate), fmt(gm.tokens_mean)]);
    }
    const hist = Object.entries(scaffolds).map(([name, e], i) => ({label: name, color: runColor(i),
      points: Object.entries(e.histogram || {}).map(([k, v], j) => [j, v])}));
    const perProblem = table(["scaffold", "problem", "samples", "mean score / 7"], (run.per_problem || []).map((p) => [p.scaffold, p.problem_id, p.n, fmt(p.mean_score)]));
    host.append(el("section", {class: "card wide eval"}, el("h3", {text: `${run.name}: ${run.summary.benchmark || "evaluation"} (${run.summary.model || run.path})`}),
      table(["scaffold", "group", "samples", "score %", "std %", "best-of-n %", "judge fail %", "truncated %", "tokens"], rows),
      hist.length ? lineChart("Samples per score (x = score 0..7, 8 = judge failure)", hist) : null,
      el("details", {}, el("summary", {text: "Per-problem scores"}), perProblem)));
  }
}

function renderHeader() {
  document.getElementById("title").textContent = DATA.title;
  document.getElementById("generated").textContent = `generated ${DATA.generated} by qed-report`;
  const list = document.getElementById("run-list");
  DATA.runs.forEach((run, i) => {
    const reward = run.metrics["rollout/reward_mean"], loss = run.metrics["train/loss"];
    const last = reward ? `reward ${fmt(reward[0][1])} → ${fmt(reward[reward.length - 1][1])} over ${reward.length} steps` :
      loss ? `loss ${fmt(loss[0][1])} → ${fmt(loss[loss.length - 1][1])} over ${loss.length} steps` :
      run.summary && run.summary.scaffolds ? Object.entries(run.summary.scaffolds).map(([k, e]) => `${k}: ${fmt(e.overall.score_pct)}%`).join(", ") : "";
    list.append(el("li", {}, el("i", {class: "swatch", style: `background:${runColor(i)}`}), el("b", {text: run.name}),
      ` (${run.kind}) ${last}`, el("code", {text: run.path})));
    if (run.config) document.getElementById("configs").append(el("details", {}, el("summary", {text: `${run.name}: config.yaml`}), el("pre", {class: "mono", text: run.config})));
  });
}

renderHeader(); renderCurves(); renderBrowser(); renderEvals();
document.body.dataset.ready = "1";
