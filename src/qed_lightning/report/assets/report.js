// qed-report, part 4 of 4: the curves section, evaluations, configs, the header and its warnings; draws the page.
const CHARTS = [
  {title: "Reward (mean, band = std)", lines: [{key: "rollout/reward_mean", band: "rollout/reward_std", label: "train"}, {key: "val/reward_mean", label: "val"}]},
  {title: "Judge audit: training judge vs audit judge on the same samples", lines: [{key: "audit/train_score_mean", label: "training judge"}, {key: "audit/score_mean", label: "audit judge"}, {key: "audit/gap", label: "gap (train - audit)"}],
    note: "A gap that opens while the training reward rises is the sign of reward hacking (callbacks.JudgeAudit); filter the rollouts by audit: disagree."},
  {title: "Hack signals (flags only: the audit decides)", lines: [{key: "signal/length_drift", label: "length drift"}, {key: "signal/repetition", label: "repeated 3-grams"}, {key: "signal/char_repetition", label: "char repetition (zlib)"}, {key: "signal/flat_groups", label: "flat groups"}, {key: "signal/saturated", label: "saturated"}]},
  {title: "Response length (tokens)", lines: [{key: "rollout/response_len_mean", label: "mean"}, {key: "rollout/response_len_max", label: "max"}]},
  {title: "Truncated share", lines: [{key: "rollout/truncated_frac", label: "train"}, {key: "val/truncated_frac", label: "val"}]},
  {title: "Entropy", lines: [{key: "train/entropy"}]},
  {title: "Gradient norm", lines: [{key: "train/grad_norm"}]},
  {title: "Tokens / s", lines: [{key: "train/tokens_per_sec"}]},
  {title: "Phase time (s)", lines: [{key: "time/generate_s", label: "generate"}, {key: "time/grade_s", label: "grade"}, {key: "time/train_s", label: "train"}, {key: "time/rc_loop_s", label: "rc loop"}]},
];

function seriesOf(spec, runs = trainRuns()) {
  const out = [], many = trainRuns().length > 1;
  for (const [run, i] of runs) spec.lines.forEach((line, j) => {
    const pts = run.metrics[line.key];
    if (!pts || !pts.length) return;
    const std = line.band && run.metrics[line.band], at = std ? new Map(std.map((p) => [p[0], p[1]])) : null;
    const band = at ? pts.filter(([x]) => at.has(x)).map(([x, y]) => [x, y - at.get(x), y + at.get(x)]) : null;
    const label = [many ? run.name : null, line.label || (spec.lines.length > 1 ? line.key : null)].filter(Boolean).join(" · ") || line.key;
    out.push({label, color: runColor(i), dash: DASHES[j % DASHES.length], points: pts, band});
  });
  return out;
}

// one loss chart per kind: an SFT run's token NLL, an RL run's policy loss and a DAPO (token_mean) loss differ in scale
function lossCharts(runs) {
  const kinds = new Map();
  for (const [run, i] of runs) { const k = run.loss_kind || "loss"; if (!kinds.has(k)) kinds.set(k, []); kinds.get(k).push([run, i]); }
  return [...kinds].map(([kind, members]) => ({kind, series: seriesOf({lines: [{key: "train/loss", label: "train"}, {key: "val/loss", label: "val"}]}, members)}))
    .filter((c) => c.series.length).map((c) => lineChart(`Loss: ${c.kind}`, c.series));
}

function renderCurves() {
  const host = document.getElementById("curves");
  const runs = trainRuns();
  host.replaceChildren();
  if (!runs.length) { host.append(el("p", {class: "empty", text: "No training run was given (only evaluation folders)."})); return; }
  const grid = el("div", {class: "grid"});
  for (const spec of CHARTS.slice(0, 1)) { const s = seriesOf(spec); if (s.length) grid.append(lineChart(spec.title, s)); }
  grid.append(...lossCharts(runs));
  for (const spec of CHARTS.slice(1)) { const s = seriesOf(spec); if (s.length) grid.append(lineChart(spec.title, s, {note: spec.note})); }
  for (const [run] of runs) { const bars = scoreBars(run); if (bars) grid.append(bars); }
  const keys = [...new Set(runs.flatMap(([r]) => Object.keys(r.metrics)))].sort();
  const old = document.getElementById("metric-pick");
  const pick = el("select", {id: "metric-pick", "aria-label": "metric"}, ...keys.map((k) => el("option", {value: k, text: k})));
  const slot = el("div", {class: "explorer"});
  const draw = () => { slot.replaceChildren(lineChart(pick.value, seriesOf({lines: [{key: pick.value}]}))); };
  pick.addEventListener("change", draw);
  host.append(grid, el("h2", {text: "Any metric"}), el("div", {class: "filters"}, pick), slot);
  if (keys.length) { pick.value = old && keys.includes(old.value) ? old.value : keys.includes("val/reward_mean") ? "val/reward_mean" : keys[0]; draw(); }
}

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
    const entries = Object.entries(scaffolds).filter(([, e]) => e.histogram);
    const categories = [...new Set(entries.flatMap(([, e]) => Object.keys(e.histogram)))];
    const hist = entries.map(([name, e], i) => ({label: name, color: runColor(i), values: categories.map((c) => e.histogram[c] || 0)}));
    const perProblem = table(["scaffold", "problem", "samples", "mean score / 7"], (run.per_problem || []).map((p) => [p.scaffold, p.problem_id, p.n, fmt(p.mean_score)]));
    host.append(el("section", {class: "card wide eval"}, el("h3", {text: `${run.name}: ${run.summary.benchmark || "evaluation"} (${run.summary.model || run.path})`}),
      table(["scaffold", "group", "samples", "score %", "std %", "best-of-n %", "judge fail %", "truncated %", "tokens"], rows),
      hist.length ? el("div", {class: "explorer"}, barChart("Samples per score", categories, hist, {xlabel: "score (0..7; failed = judge failure)"})) : null,
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
  const warnings = [...(DATA.warnings || []), ...PAGE_ERRORS];
  document.getElementById("warnings").replaceChildren(...warnings.map((w) => el("p", {class: "warning", text: `⚠ ${w}`})));
}

function wireControls() {
  const slider = document.getElementById("smoothing"), shown = document.getElementById("smoothing-value");
  slider.addEventListener("input", () => { shown.textContent = slider.value; renderCurves(); });
  const math = document.getElementById("math-toggle");
  if (typeof katex === "undefined") { math.checked = false; math.disabled = true; }
  math.addEventListener("change", rerenderTexts);
}

wireControls(); renderHeader(); renderCurves(); renderBrowser(); renderEvals();
document.body.dataset.ready = "1";
