// netra's operator page: reads /health, /health/ready, /health/startup and /metrics
// every 2 s and draws what they say. It keeps the last five minutes of samples in memory
// for the small charts; rates are differences between two samples of a counter.

import { applyTheme, el, toggleTheme } from "./common.js";

const $ = (id) => document.getElementById(id);
const PERIOD_MS = 2000;
const WINDOW_MS = 5 * 60 * 1000;
const SVG = "http://www.w3.org/2000/svg";
const samples = []; // { t, m } with m the parsed metrics

/** Prometheus text to { name: [{ labels, value }] }. */
function parseMetrics(text) {
  const out = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = {};
    for (const [, k, v] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[k] = v;
    (out[m[1]] ||= []).push({ labels, value: Number(m[3]) });
  }
  return out;
}

const sum = (m, name, filter = () => true) => (m[name] || []).filter((s) => filter(s.labels)).reduce((a, s) => a + s.value, 0);
const has = (m, name) => Boolean(m[name]);

function byLabel(m, name, label) {
  const out = {};
  for (const s of m[name] || []) out[s.labels[label]] = (out[s.labels[label]] || 0) + s.value;
  return out;
}

/** The sample closest to `ms` before the newest one (or the oldest there is). */
function sampleBefore(ms) {
  const newest = samples.at(-1);
  let pick = samples[0];
  for (const s of samples) if (newest.t - s.t >= ms) pick = s;
  return pick;
}

function formatSeconds(s) {
  if (!Number.isFinite(s)) return "–";
  if (s < 0.001) return `${(s * 1e6).toFixed(0)} µs`;
  if (s < 1) return `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;
  return `${s.toFixed(2)} s`;
}

function spark(id, points) {
  const svg = $(id);
  points = points.filter((p) => Number.isFinite(p.v));
  if (points.length === 0) return svg.replaceChildren();
  // One point is drawn as a level line.
  if (points.length === 1) points = [{ t: points[0].t - 1, v: points[0].v }, points[0]];
  const values = points.map((p) => p.v);
  const t0 = points[0].t;
  const span = Math.max(1, points.at(-1).t - t0);
  const max = Math.max(...values, 1e-9);
  const coords = points.map((p) => `${(((p.t - t0) / span) * 100).toFixed(2)},${(38 - (p.v / max) * 34).toFixed(2)}`);
  const area = document.createElementNS(SVG, "polygon");
  area.setAttribute("points", `0,40 ${coords.join(" ")} 100,40`);
  const line = document.createElementNS(SVG, "polyline");
  line.setAttribute("points", coords.join(" "));
  const title = document.createElementNS(SVG, "title");
  title.textContent = `max ${max}`;
  svg.replaceChildren(title, area, line);
}

/** Per-sample series of a counter's rate per `unitMs`, from consecutive samples. */
function rateSeries(pick, unitMs) {
  const out = [];
  for (let i = 1; i < samples.length; i++) {
    const dt = samples[i].t - samples[i - 1].t;
    out.push({ t: samples[i].t, v: (Math.max(0, pick(samples[i].m) - pick(samples[i - 1].m)) / dt) * unitMs });
  }
  return out;
}

function drawMetrics() {
  const { m } = samples.at(-1);
  const runsTotal = (x) => sum(x, "netra_runs_total");
  const eventsTotal = (x) => sum(x, "netra_events_total");
  const latSum = (x) => sum(x, "netra_delivery_latency_seconds_sum");
  const latCount = (x) => sum(x, "netra_delivery_latency_seconds_count");

  $("m-connections").textContent = String(sum(m, "netra_ws_connections"));
  $("m-connections-sub").textContent = `open sockets · ${sum(m, "netra_runs_active")} runs active · ${sum(m, "netra_ws_connections_total")} opened in all`;
  spark("c-connections", samples.map((s) => ({ t: s.t, v: sum(s.m, "netra_ws_connections") })));

  const minuteAgo = sampleBefore(60_000);
  const elapsed = samples.at(-1).t - minuteAgo.t;
  const perMinute = elapsed > 0 ? ((runsTotal(m) - runsTotal(minuteAgo.m)) / elapsed) * 60_000 : 0;
  $("m-runs").textContent = perMinute.toFixed(perMinute < 10 && perMinute % 1 ? 1 : 0);
  const outcomes = byLabel(m, "netra_runs_total", "outcome");
  $("m-runs-sub").textContent = Object.keys(outcomes).length
    ? Object.entries(outcomes).map(([k, v]) => `${v} ${k}`).join(" · ")
    : "no runs yet";
  spark("c-runs", rateSeries(runsTotal, 60_000));

  const prev = samples.at(-2)?.m;
  const dCount = prev ? latCount(m) - latCount(prev) : latCount(m);
  const dSum = prev ? latSum(m) - latSum(prev) : latSum(m);
  const mean = dCount > 0 ? dSum / dCount : latCount(m) > 0 ? latSum(m) / latCount(m) : NaN;
  $("m-latency").textContent = formatSeconds(mean);
  $("m-latency-sub").textContent =
    dCount > 0 ? `mean of ${dCount} deliveries in the last ${PERIOD_MS / 1000} s` : `mean of all ${latCount(m)} deliveries`;
  const latency = [];
  for (let i = 1; i < samples.length; i++) {
    const c = latCount(samples[i].m) - latCount(samples[i - 1].m);
    latency.push({ t: samples[i].t, v: c > 0 ? ((latSum(samples[i].m) - latSum(samples[i - 1].m)) / c) * 1000 : 0 });
  }
  spark("c-latency", latency);

  $("m-events").textContent = String(eventsTotal(m));
  const events = byLabel(m, "netra_events_total", "outcome");
  $("m-events-sub").textContent = Object.entries(events).map(([k, v]) => `${v} ${k}`).join(" · ") || "none yet";
  spark("c-events", rateSeries(eventsTotal, 1000));

  const totals = [
    ["Frames", `${sum(m, "netra_ws_frames_in_total")} in · ${sum(m, "netra_ws_frames_out_total")} out`],
    ["Closes", Object.entries(byLabel(m, "netra_ws_closes_total", "code")).map(([k, v]) => `${k}: ${v}`).join(" · ") || "none"],
    ["Auth failures", Object.entries(byLabel(m, "netra_auth_failures_total", "reason")).map(([k, v]) => `${k}: ${v}`).join(" · ") || "none"],
    ["HTTP requests", String(sum(m, "netra_http_requests_total"))],
  ];
  if (has(m, "netra_events_dropped_total")) {
    totals.push(["Dropped", Object.entries(byLabel(m, "netra_events_dropped_total", "reason")).map(([k, v]) => `${k}: ${v}`).join(" · ")]);
  }
  $("totals").replaceChildren(
    ...totals.map(([name, value]) => {
      const panel = el("div", "panel");
      panel.append(el("h2", "", name), el("div", "metric-sub", value));
      return panel;
    }),
  );
}

function drawStartup(report) {
  const components = report.components || [];
  const slowest = Math.max(1, ...components.map((c) => c.duration_ms || 0));
  $("startup-summary").textContent = `${report.complete ? "complete" : "in progress"} · ${components.length} components · ${
    report.total_ms != null ? `${report.total_ms.toFixed(1)} ms in all` : ""
  }`;
  $("components").tBodies[0].replaceChildren(
    ...components.map((c) => {
      const tr = el("tr");
      tr.dataset.component = c.name;
      const name = el("td");
      name.append(el("code", "", c.name));
      if (c.error) name.append(el("div", "err", c.error));
      const stateCell = el("td");
      const pill = el("span", "pill", c.state);
      pill.dataset.level = c.state === "ready" ? "ok" : c.state === "failed" ? "bad" : "warn";
      stateCell.append(pill);
      const bar = el("div", "bar");
      bar.style.width = `${Math.max(1, ((c.duration_ms || 0) / slowest) * 100)}%`;
      const barCell = el("td");
      barCell.append(bar);
      tr.append(
        name,
        stateCell,
        el("td", "", c.criticality || ""),
        el("td", "", (c.depends_on || []).join(", ") || "—"),
        el("td", "num", c.duration_ms != null ? c.duration_ms.toFixed(2) : "–"),
        barCell,
      );
      return tr;
    }),
  );
}

function setPill(id, label, level) {
  $(id).textContent = label;
  $(id).dataset.level = level;
}

async function tick() {
  const [health, ready, startup, metrics] = await Promise.allSettled([
    fetch("/health").then((r) => r.json()),
    fetch("/health/ready").then(async (r) => ({ ok: r.ok, body: await r.json().catch(() => ({})) })),
    fetch("/health/startup").then((r) => r.json()),
    fetch("/metrics").then((r) => (r.ok ? r.text() : Promise.reject(new Error(`/metrics ${r.status}`)))),
  ]);
  if (health.status === "fulfilled") {
    const s = health.value.status;
    setPill("health", `health: ${s}`, s === "pass" ? "ok" : s === "warn" ? "warn" : "bad");
  } else {
    setPill("health", "health: unreachable", "bad");
  }
  if (ready.status === "fulfilled") {
    setPill("ready", ready.value.ok ? "ready" : `not ready${ready.value.body.reasons ? `: ${[].concat(ready.value.body.reasons).join(", ")}` : ""}`, ready.value.ok ? "ok" : "warn");
  } else {
    setPill("ready", "ready: unreachable", "bad");
  }
  if (startup.status === "fulfilled") drawStartup(startup.value);
  if (metrics.status === "fulfilled") {
    const now = Date.now();
    samples.push({ t: now, m: parseMetrics(metrics.value) });
    while (samples.length > 2 && now - samples[0].t > WINDOW_MS) samples.shift();
    drawMetrics();
  }
  const failed = [health, ready, startup, metrics].filter((r) => r.status === "rejected").length;
  $("updated").textContent = `updated ${new Date().toLocaleTimeString()}${failed ? ` · ${failed} endpoint(s) did not answer` : ""} · refreshes every ${PERIOD_MS / 1000} s`;
}

$("theme").addEventListener("click", toggleTheme);
applyTheme();
(async function loop() {
  try {
    await tick();
  } finally {
    setTimeout(loop, PERIOD_MS);
  }
})();
