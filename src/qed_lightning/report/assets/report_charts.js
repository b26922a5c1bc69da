// qed-report, part 2 of 4: line charts (hover values at any length, smoothing) and bar charts.
function niceTicks(lo, hi, n = 5) {
  if (lo === hi) { lo -= 1; hi += 1; }
  const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((s) => s >= raw);
  const ticks = [];
  for (let t = Math.ceil(lo / step) * step; t <= hi + step * 1e-9; t += step) ticks.push(Number(t.toPrecision(12)));
  return ticks;
}

// TensorBoard's smoothing: an exponential moving average, debiased so the first points are not pulled to 0
function smooth(points, weight) {
  if (!weight) return points;
  let last = 0, n = 0;
  return points.map(([x, y]) => { last = last * weight + (1 - weight) * y; n += 1; return [x, last / (1 - Math.pow(weight, n))]; });
}
const smoothing = () => Number(document.getElementById("smoothing").value);

// the nearest value of each series at x (the points are in x order): what the hover shows
function nearest(points, x) {
  let lo = 0, hi = points.length - 1;
  while (hi - lo > 1) { const mid = (lo + hi) >> 1; if (points[mid][0] < x) lo = mid; else hi = mid; }
  return Math.abs(points[lo][0] - x) <= Math.abs(points[hi][0] - x) ? points[lo] : points[hi];
}

function frame(W, H) { return svg("svg", {viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img"}); }

// series = [{label, color, dash, points: [[x, y]], band: [[x, lo, hi]]}]
function lineChart(title, series, {xlabel = "step", note = null} = {}) {
  const W = 460, H = 250, L = 52, R = 12, T = 12, B = 34, weight = smoothing();
  const drawn = series.map((s) => ({...s, shown: smooth(s.points, weight)}));
  const all = series.flatMap((s) => s.points.concat((s.band || []).flatMap(([x, lo, hi]) => [[x, lo], [x, hi]])));
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  let [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  if (x0 === x1) { x0 -= 1; x1 += 1; }
  const yt = niceTicks(y0, y1); y0 = Math.min(y0, yt[0]); y1 = Math.max(y1, yt[yt.length - 1]);
  const sx = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), sy = (y) => H - B - (y - y0) / ((y1 - y0) || 1) * (H - T - B);
  const root = frame(W, H);
  root.setAttribute("aria-label", title);
  for (const t of yt) {
    root.append(svg("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    root.append(svg("text", {x: L - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end"}, fmt(t)));
  }
  for (const t of niceTicks(x0, x1, 6).filter((t) => t >= x0 && t <= x1))
    root.append(svg("text", {x: sx(t), y: H - B + 16, class: "tick", "text-anchor": "middle"}, fmt(t)));
  root.append(svg("text", {x: (L + W - R) / 2, y: H - 4, class: "axis", "text-anchor": "middle"}, xlabel));
  const path = (pts) => pts.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
  for (const s of drawn) {
    if (s.band && s.band.length > 1) {
      const up = s.band.map(([x, , hi]) => `${sx(x)},${sy(hi)}`), down = s.band.slice().reverse().map(([x, lo]) => `${sx(x)},${sy(lo)}`);
      root.append(svg("polygon", {points: up.concat(down).join(" "), fill: s.color, class: "band"}));
    }
    if (weight) root.append(svg("path", {d: path(s.points), stroke: s.color, class: "line raw"}));
    root.append(svg("path", {d: path(s.shown), stroke: s.color, "stroke-dasharray": s.dash || "", class: "line", "data-label": s.label}));
  }
  hover(root, drawn, {sx, sy, x0, x1, L, R, T, B, W, H});
  const legend = el("div", {class: "legend"}, ...series.map((s) => el("span", {class: "key"},
    el("i", {style: `border-top: 3px ${s.dash ? "dashed" : "solid"} ${s.color}`}), s.label)));
  return el("div", {class: "card"}, el("h3", {text: title}), root, legend, note ? el("p", {class: "note", text: note}) : null);
}

// a guide line and every series' value at the step nearest the pointer, however many points a series has
function hover(root, series, g) {
  const layer = svg("g", {class: "hover", visibility: "hidden"});
  const guide = svg("line", {y1: g.T, y2: g.H - g.B, class: "guide"}), box = svg("rect", {class: "tip-box", rx: 4});
  const label = svg("text", {class: "hover-label"});
  layer.append(guide, box, label);
  const overlay = svg("rect", {x: g.L, y: g.T, width: g.W - g.L - g.R, height: g.H - g.T - g.B, class: "overlay"});
  root.append(layer, overlay);
  overlay.addEventListener("mousemove", (ev) => {
    const pt = new DOMPoint(ev.clientX, ev.clientY).matrixTransform(root.getScreenCTM().inverse());
    const x = g.x0 + (pt.x - g.L) / (g.W - g.L - g.R) * (g.x1 - g.x0);
    const hits = series.filter((s) => s.shown.length).map((s) => [s, nearest(s.shown, x), nearest(s.points, x)]);
    if (!hits.length) return;
    const at = hits.reduce((a, b) => Math.abs(b[1][0] - x) < Math.abs(a[1][0] - x) ? b : a)[1][0];
    const lines = [`step ${fmt(at, 6)}`, ...hits.filter(([, p]) => p[0] === at).map(([s, p, raw]) =>
      `${s.label}: ${fmt(p[1], 4)}${p === raw || raw[1] === p[1] ? "" : ` (raw ${fmt(raw[1], 4)})`}`)];
    label.replaceChildren(...lines.map((t, i) => svg("tspan", {x: 0, dy: i ? 13 : 0}, t)));
    const left = g.sx(at) > (g.L + g.W - g.R) / 2, tx = left ? g.sx(at) - 8 : g.sx(at) + 8;
    label.setAttribute("transform", `translate(${tx},${g.T + 14})`);
    label.setAttribute("text-anchor", left ? "end" : "start");
    guide.setAttribute("x1", g.sx(at)); guide.setAttribute("x2", g.sx(at));
    layer.setAttribute("visibility", "visible");
    const bb = label.getBBox();
    Object.entries({x: tx + bb.x - 4, y: g.T + 14 + bb.y - 3, width: bb.width + 8, height: bb.height + 6}).forEach(([k, v]) => box.setAttribute(k, v));
  });
  overlay.addEventListener("mouseleave", () => layer.setAttribute("visibility", "hidden"));
}

// grouped bars: categories on x (e.g. scores 0..7), one bar per group in each; a score histogram is bars, not a line
function barChart(title, categories, groups, {xlabel = "score", ylabel = "samples"} = {}) {
  const W = 460, H = 250, L = 44, R = 12, T = 12, B = 34;
  const top = Math.max(1, ...groups.flatMap((g) => g.values)), yt = niceTicks(0, top), y1 = yt[yt.length - 1];
  const sy = (v) => H - B - v / y1 * (H - T - B), cw = (W - L - R) / categories.length, bw = cw * 0.8 / groups.length;
  const root = frame(W, H);
  root.classList.add("bars");
  root.setAttribute("aria-label", title);
  for (const t of yt) {
    root.append(svg("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    root.append(svg("text", {x: L - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end"}, fmt(t)));
  }
  categories.forEach((c, i) => {
    root.append(svg("text", {x: L + (i + 0.5) * cw, y: H - B + 16, class: "tick", "text-anchor": "middle"}, c));
    groups.forEach((g, j) => {
      const v = g.values[i] || 0, bar = svg("rect", {x: L + i * cw + cw * 0.1 + j * bw, width: bw, y: sy(v), height: sy(0) - sy(v), fill: g.color, class: "bar"});
      bar.append(svg("title", {}, `${g.label}: ${xlabel} ${c}: ${v} ${ylabel}`));
      root.append(bar);
    });
  });
  root.append(svg("text", {x: (L + W - R) / 2, y: H - 4, class: "axis", "text-anchor": "middle"}, xlabel));
  const legend = el("div", {class: "legend"}, ...groups.map((g) => el("span", {class: "key"}, el("i", {style: `border-top: 8px solid ${g.color}`}), g.label)));
  return el("div", {class: "card"}, el("h3", {text: title}), root, legend);
}

// stacked bars: the judge's score distribution per step of one run
function scoreBars(run) {
  const keys = [...Array(8).keys()].map((k) => `judge/score_${k}`).filter((k) => run.metrics[k]);
  if (!keys.length) return null;
  const steps = [...new Set(keys.flatMap((k) => run.metrics[k].map((p) => p[0])))].sort((a, b) => a - b);
  const W = 460, H = 250, L = 40, R = 12, T = 12, B = 34, bw = (W - L - R) / steps.length;
  const root = frame(W, H);
  root.classList.add("scores");
  const sy = (v) => H - B - v * (H - T - B), at = {};
  for (let k = 0; k < 8; k++) at[k] = new Map((run.metrics[`judge/score_${k}`] || []).map((p) => [p[0], p[1]]));
  for (const t of [0, 0.25, 0.5, 0.75, 1]) {
    root.append(svg("line", {x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: "grid"}));
    root.append(svg("text", {x: L - 6, y: sy(t) + 4, class: "tick", "text-anchor": "end"}, `${t * 100}%`));
  }
  steps.forEach((step, i) => {
    let base = 0;
    for (let k = 0; k < 8; k++) {
      const v = at[k].get(step) || 0;
      if (v <= 0) continue;
      const rect = svg("rect", {x: L + i * bw + bw * 0.1, width: bw * 0.8, y: sy(base + v), height: sy(base) - sy(base + v), fill: SCORE_COLORS[k]});
      rect.append(svg("title", {}, `step ${step}: score ${k} for ${(v * 100).toFixed(0)}%`));
      root.append(rect); base += v;
    }
    if (steps.length <= 30 || i % Math.ceil(steps.length / 15) === 0)
      root.append(svg("text", {x: L + (i + 0.5) * bw, y: H - B + 16, class: "tick", "text-anchor": "middle"}, step));
  });
  root.append(svg("text", {x: (L + W - R) / 2, y: H - 4, class: "axis", "text-anchor": "middle"}, "step"));
  const legend = el("div", {class: "legend"}, ...SCORE_COLORS.slice(0, 8).map((c, k) => el("span", {class: "key"}, el("i", {style: `border-top: 8px solid ${c}`}), `${k}`)));
  return el("div", {class: "card"}, el("h3", {text: `Judge score distribution per step: ${run.name}`}), root, legend);
}
