// qed-report, part 3 of 4: the rollout browser: filters, a sortable table, a rollout's texts, and its GRPO group
// side by side.
const MAX_ROWS = 500;
const ROWS = DATA.runs.flatMap((run, r) => (run.rollouts || []).map((rec, i) => ({...rec, _run: r, _id: `${r}-${i}`})));
const groupOf = (rec) => [rec._run, rec.step, rec.group, rec.problem_id, rec.cycle, rec.scaffold].map(String).join("|");
const GROUPS = new Map();
for (const rec of ROWS) { const k = groupOf(rec); if (!GROUPS.has(k)) GROUPS.set(k, []); GROUPS.get(k).push(rec); }
const FILTERS = {run: "", step: "", problem: "", score: "", status: "", audit: "", text: ""};
const VIEW = {sort: null, desc: false, rec: null, group: null};
const keyOf = (rec) => ({run: String(rec._run), step: rec.step === null || rec.step === undefined ? "eval" : String(rec.step),
  problem: String(rec.problem_id), score: rec.score === null || rec.score === undefined ? "none" : String(rec.score), status: String(rec.status)});
const COLUMNS = [["run", (r) => DATA.runs[r._run].name], ["step", (r) => r.step], ["problem", (r) => r.problem_id], ["#", (r) => r.sample],
  ["score", (r) => r.score], ["audit", (r) => r.audit_score], ["reward", (r) => r.reward], ["advantage", (r) => r.advantage], ["status", (r) => r.status],
  ["tokens", (r) => r.completion_tokens], ["finish", (r) => r.finish_reason]];

function filterSelect(name, label, values, describe = (v) => v) {
  const s = el("select", {id: `filter-${name}`, "aria-label": label}, el("option", {value: "", text: `${label}: all`}),
    ...values.map((v) => el("option", {value: v, text: describe(v)})));
  s.addEventListener("change", () => { FILTERS[name] = s.value; renderTable(); });
  return s;
}
// the judge audit (callbacks.JudgeAudit): records a second judge regraded; a disagreement is 2 or more points apart
const audited = (rec) => rec.audit_score !== null && rec.audit_score !== undefined;
const disagrees = (rec) => audited(rec) && rec.score !== null && rec.score !== undefined && Math.abs(rec.score - rec.audit_score) >= 2;
function auditSelect() {
  const s = el("select", {id: "filter-audit", "aria-label": "audit"}, el("option", {value: "", text: "audit: all"}),
    el("option", {value: "audited", text: "audited"}), el("option", {value: "disagree", text: "disagree (|train - audit| >= 2)"}));
  s.addEventListener("change", () => { FILTERS.audit = s.value; renderTable(); });
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
    filterSelect("status", "status", uniq("status")), ROWS.some(audited) ? auditSelect() : null, text),
  el("p", {id: "row-count", class: "note"}),
  el("div", {class: "browser"}, el("div", {class: "table-wrap"}, el("table", {id: "rollout-table"})), el("div", {id: "detail", class: "detail"},
    el("p", {class: "empty", text: "Select a rollout to read its proof, rubric and judge reply."}))),
  el("div", {id: "group-view"}));
  renderTable();
}

function matches(rec) {
  const k = keyOf(rec);
  for (const f of ["run", "step", "problem", "score", "status"]) if (FILTERS[f] && k[f] !== FILTERS[f]) return false;
  if (FILTERS.audit === "audited" && !audited(rec)) return false;
  if (FILTERS.audit === "disagree" && !disagrees(rec)) return false;
  if (!FILTERS.text) return true;
  return [rec.completion, rec.judge_reply, rec.audit_reply, rec.problem, rec.prompt].some((t) => t && t.toLowerCase().includes(FILTERS.text));
}

// numbers before text, blanks last whichever the direction
function compare(a, b) {
  const blank = (v) => v === null || v === undefined || v === "";
  if (blank(a) || blank(b)) return blank(a) - blank(b);
  return (typeof a === "number" && typeof b === "number") ? a - b : String(a).localeCompare(String(b), undefined, {numeric: true});
}

function sortBy(name) {
  VIEW.desc = VIEW.sort === name ? !VIEW.desc : false;
  VIEW.sort = name;
  renderTable();
}

function renderTable() {
  let shown = ROWS.filter(matches);
  if (VIEW.sort) {
    const get = COLUMNS.find(([n]) => n === VIEW.sort)[1], sign = VIEW.desc ? -1 : 1;
    shown = shown.map((r, i) => [r, i]).sort(([a, i], [b, j]) => {
      const blankA = get(a) === null || get(a) === undefined, blankB = get(b) === null || get(b) === undefined;
      return blankA !== blankB ? blankA - blankB : (sign * compare(get(a), get(b)) || i - j);
    }).map(([r]) => r);
  }
  document.getElementById("row-count").textContent = `${shown.length} of ${ROWS.length} rollouts` + (shown.length > MAX_ROWS ? ` (first ${MAX_ROWS} listed)` : "");
  const head = el("tr", {}, ...COLUMNS.map(([name]) => el("th", {text: name, "data-key": name, class: "sortable", title: "sort",
    "aria-sort": VIEW.sort === name ? (VIEW.desc ? "descending" : "ascending") : "none", onclick: () => sortBy(name)})));
  const rows = shown.slice(0, MAX_ROWS).map((rec) => {
    const k = keyOf(rec);
    const tr = el("tr", {class: `rollout status-${rec.status}`, "data-score": k.score, "data-step": k.step, "data-id": rec._id},
      el("td", {text: DATA.runs[rec._run].name}), el("td", {text: k.step}), el("td", {text: k.problem}),
      el("td", {text: rec.sample ?? ""}), el("td", {class: "score", text: k.score}),
      el("td", {class: disagrees(rec) ? "audit disagree" : "audit", text: rec.audit_score ?? ""}), el("td", {class: "reward", text: fmt(rec.reward)}),
      el("td", {text: rec.advantage === undefined ? "" : fmt(rec.advantage)}), el("td", {text: rec.status}),
      el("td", {text: rec.completion_tokens ?? ""}), el("td", {text: rec.finish_reason || ""}));
    tr.addEventListener("click", () => select(rec));
    return tr;
  });
  document.getElementById("rollout-table").replaceChildren(el("thead", {}, head), el("tbody", {}, ...rows));
}

function select(rec) {
  document.querySelectorAll("tr.selected").forEach((t) => t.classList.remove("selected"));
  const row = document.querySelector(`tr.rollout[data-id="${rec._id}"]`);
  if (row) row.classList.add("selected");
  showDetail(rec);
}

function textBlock(title, body, {open = true, mono = true, cls = "", math = true} = {}) {
  const pre = fillText(el("pre", {class: `${mono ? "mono" : "prose"} ${cls}`}), body || "(empty)", math && mathOn());
  return el("details", open ? {open: ""} : {}, el("summary", {text: `${title}${body ? ` (${body.length.toLocaleString()} characters)` : ""}`}), pre);
}

function splitCompletion(rec) {
  const completion = rec.completion || "", cut = completion.lastIndexOf("</think>");
  const whole = !(rec._cut && rec._cut.completion);  // a cut completion may have lost its </think>: show what is left
  return {cut, thinking: cut >= 0 ? completion.slice(0, cut + 8) : (rec.proof && whole ? "" : completion),
    proof: rec.proof ?? (cut >= 0 ? completion.slice(cut + 8).trim() : "")};
}

function showDetail(rec) {
  VIEW.rec = rec;
  const {cut, thinking, proof} = splitCompletion(rec), group = GROUPS.get(groupOf(rec)) || [rec];
  const facts = [["run", DATA.runs[rec._run].name], ["step", rec.step ?? "eval"], ["problem", rec.problem_id], ["source", rec.source],
    ["score", rec.score ?? "none"], ["audit score", rec.audit_score], ["audit status", rec.audit_status], ["reward", fmt(rec.reward)], ["advantage", fmt(rec.advantage)], ["status", rec.status],
    ["finish", rec.finish_reason], ["tokens", rec.completion_tokens], ["policy version", rec.policy_version], ["cycle", rec.cycle],
    ["scaffold", rec.scaffold], ["judge cache", rec.judge_cached ? "hit" : null], ["record", rec._at]].filter(([, v]) => v !== undefined && v !== null && v !== "");
  const cutNote = rec._cut ? el("p", {class: "cut-note", text: `Cut to fit the page: ${Object.entries(rec._cut).map(([f, n]) =>
    `${f} (${n.toLocaleString()} characters)`).join(", ")}; the whole texts are in ${rec._at}.`}) : null;
  const left = el("div", {class: "col"},
    textBlock(rec.proof === null && cut < 0 ? "Proof (not graded: no </think>)" : "Proof (the text the judge graded)", proof, {cls: "proof"}),
    textBlock("Thinking", thinking, {open: false, math: false}), textBlock("Prompt", rec.prompt, {open: false, math: false}),
    rec.state ? textBlock("RC state summary", rec.state, {open: false, mono: false}) : null);
  const right = el("div", {class: "col"},
    textBlock("Rubric", rec.rubric || (rec.step === null ? "(evaluation samples do not record the grading guidelines)" : ""), {mono: false, cls: "rubric"}),
    textBlock("Judge reply", rec.judge_reply, {cls: "reply"}),
    audited(rec) ? textBlock("Audit judge reply", rec.audit_reply, {cls: "audit-reply"}) : null, rec.problem ? textBlock("Problem", rec.problem, {open: false, mono: false}) : null);
  const compare = group.length > 1 ? el("button", {id: "show-group", type: "button", text: `Compare the group (${group.length} samples)`,
    onclick: () => showGroup(group)}) : null;
  document.getElementById("detail").replaceChildren(
    el("div", {class: "facts"}, ...facts.map(([k, v]) => el("span", {}, el("b", {text: `${k} `}), String(v)))), compare, cutNote,
    el("div", {class: "pair"}, left, right));
}

// the group's samples side by side: one column per sample, its scores on top, its proof and the judge's reply under
function showGroup(group) {
  VIEW.group = group;
  const first = group[0], scores = group.map((r) => r.score).filter((s) => s !== null && s !== undefined);
  const mean = scores.length ? scores.reduce((a, b) => a + b, 0) / scores.length : null;
  const columns = group.map((rec) => {
    const {proof} = splitCompletion(rec);
    const head = el("div", {class: "sample-head"}, el("b", {text: `#${rec.sample ?? ""}`}),
      el("span", {class: "score", text: `score ${rec.score ?? "none"}`}), el("span", {text: `reward ${fmt(rec.reward)}`}),
      el("span", {text: `adv ${fmt(rec.advantage)}`}), el("span", {text: `${rec.status} · ${rec.completion_tokens ?? "?"} tok`}));
    const open = el("button", {type: "button", class: "open", text: "open", onclick: () => select(rec)});
    return el("div", {class: `group-sample status-${rec.status}`, "data-id": rec._id, "data-score": keyOf(rec).score}, head, open,
      fillText(el("pre", {class: "mono proof"}), proof || "(empty)"),
      el("details", {}, el("summary", {text: "judge reply"}), fillText(el("pre", {class: "mono"}), rec.judge_reply || "(empty)")));
  });
  document.getElementById("group-view").replaceChildren(el("h3", {text: `Group: ${DATA.runs[first._run].name}, step ${first.step ?? "eval"}, ` +
    `problem ${first.problem_id}: ${group.length} samples, mean score ${fmt(mean)}, scores ${group.map((r) => r.score ?? "none").join(" ")}`}),
    el("div", {class: "group-grid"}, ...columns));
  document.getElementById("group-view").scrollIntoView({block: "start"});
}

function rerenderTexts() {
  if (VIEW.rec) showDetail(VIEW.rec);
  if (VIEW.group) showGroup(VIEW.group);
}
