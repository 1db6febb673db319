// iotgw dashboard: plain JavaScript and SVG, no third-party code (the site may be offline).
// Polls the gateway's HTTP API every few seconds. Rendered data is marked in the DOM
// (data-points on each chart, data-rows / data-types / data-count on lists) for tests and tools.
"use strict";

const POLL_MS = 4000;
const CATALOG_EVERY = 15; // polls
const RANGES = { "15m": 15 * 60e3, "1h": 3600e3, "24h": 86400e3, "7d": 7 * 86400e3 };
const SVG = "http://www.w3.org/2000/svg";
const W = 600, H = 180, M = { l: 48, r: 8, t: 8, b: 20 };

const MIN_SPAN = 10e3;
const state = {
  live: true, span: RANGES["15m"], from: null, to: null, polls: 0,
  // fit: until a range is chosen, a store younger than the default window fills the charts (from its
  // first reading to now) instead of a sliver at the right edge; dataFrom: the first device's first_seen
  fit: true, dataFrom: null,
  token: sessionStorage.getItem("iotgw-token"), charts: new Map(),
};

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c instanceof Node ? c : String(c ?? ""));
  return node;
}

function svgEl(tag, attrs = {}) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  return node;
}

class AuthNeeded extends Error {}

async function api(path) {
  const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
  const response = await fetch(path, { headers, cache: "no-store" });
  if (response.status === 401) throw new AuthNeeded("this gateway needs its API token");
  const body = await response.json();
  if (!response.ok && response.status !== 503) throw new Error(body.detail || response.statusText);
  return body;
}

function fmtTime(ms, spanMs) {
  const d = new Date(ms);
  if (spanMs > 2 * 86400e3) return d.toLocaleDateString([], { month: "short", day: "numeric" }) + " " +
    d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
  return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: spanMs < 3600e3 ? "2-digit" : undefined });
}

function fmtNum(v) {
  if (v === null || v === undefined) return "–";
  const a = Math.abs(v);
  return a >= 1000 || a === 0 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toPrecision(3);
}

function ago(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  return s < 90 ? `${s.toFixed(0)} s ago` : s < 5400 ? `${(s / 60).toFixed(0)} min ago` : `${(s / 3600).toFixed(1)} h ago`;
}

function windowNow() {
  if (!state.live) return [state.from, state.to];
  const to = Date.now();
  if (state.fit && state.dataFrom !== null && to - state.dataFrom < state.span) {
    const age = Math.max(0, to - state.dataFrom);
    return [to - Math.max(MIN_SPAN, age * 1.05), to]; // the data, and a little room before it
  }
  return [to - state.span, to];
}

// -- devices ---------------------------------------------------------------------------------------

async function loadDevices() {
  const [devices, latest] = await Promise.all([api("/api/v1/devices"), api("/api/v1/latest")]);
  const firsts = devices.map((d) => Date.parse(d.first_seen)).filter((t) => !Number.isNaN(t));
  state.dataFrom = firsts.length ? Math.min(...firsts) : null;
  const byDevice = new Map();
  for (const v of latest) {
    if (!byDevice.has(v.device_id)) byDevice.set(v.device_id, []);
    byDevice.get(v.device_id).push(v);
  }
  const tbody = document.querySelector("#devices tbody");
  tbody.replaceChildren(...devices.map((d) => el("tr", { "data-device": d.device_id },
    el("th", { scope: "row" }, d.device_id), el("td", {}, d.transport), el("td", {}, d.device_class),
    el("td", { title: d.last_seen }, ago(d.last_seen)),
    el("td", {}, d.rssi_dbm === null ? "–" : `${fmtNum(d.rssi_dbm)} dBm`),
    el("td", {}, d.battery_pct === null ? "–" : `${fmtNum(d.battery_pct)} %`),
    el("td", {}, (byDevice.get(d.device_id) || []).map((v) => `${v.metric} ${fmtNum(v.value)}${v.unit ? " " + v.unit : ""}`)
      .join(", ")))));
  document.getElementById("devices").dataset.rows = String(devices.length);
  return latest;
}

// -- charts ----------------------------------------------------------------------------------------

function chartFor(device, metric, unit) {
  const key = `${device}/${metric}`;
  let chart = state.charts.get(key);
  if (chart) return chart;
  const svg = svgEl("svg", { viewBox: `0 0 ${W} ${H}`, class: "chart", role: "img", "data-points": "0",
    "data-series": key, "aria-label": `${metric} of ${device}` });
  const meta = el("span", { class: "meta" });
  const figure = el("figure", {}, el("figcaption", {}, `${device} · ${metric}${unit ? " (" + unit + ")" : ""} `, meta), svg);
  document.getElementById("charts").append(figure);
  chart = { key, device, metric, svg, meta, window: null };
  attachDrag(chart);
  state.charts.set(key, chart);
  return chart;
}

function draw(chart, series, from, to) {
  const { svg } = chart;
  chart.window = [from, to];
  const pts = series.points.map((p) => [Date.parse(p.ts), p.value]);
  svg.replaceChildren();
  svg.append(svgEl("line", { class: "axis", x1: M.l, y1: H - M.b, x2: W - M.r, y2: H - M.b }));
  svg.append(svgEl("line", { class: "axis", x1: M.l, y1: M.t, x2: M.l, y2: H - M.b }));
  let lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  if (!pts.length) { lo = 0; hi = 1; }
  if (hi - lo < 1e-9) { lo -= 1; hi += 1; }
  const pad = (hi - lo) * 0.08; lo -= pad; hi += pad;
  const x = (t) => M.l + ((t - from) / (to - from)) * (W - M.l - M.r);
  const y = (v) => H - M.b - ((v - lo) / (hi - lo)) * (H - M.t - M.b);
  const text = (s, attrs) => { const t = svgEl("text", attrs); t.textContent = s; svg.append(t); };
  text(fmtNum(hi - pad), { x: M.l - 4, y: M.t + 8, "text-anchor": "end" });
  text(fmtNum(lo + pad), { x: M.l - 4, y: H - M.b, "text-anchor": "end" });
  text(fmtTime(from, to - from), { x: M.l, y: H - 4 });
  text(fmtTime(to, to - from), { x: W - M.r, y: H - 4, "text-anchor": "end" });
  if (pts.length) {
    svg.append(svgEl("polyline", { class: "line", points: pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ") }));
    if (pts.length <= 80) for (const p of pts) svg.append(svgEl("circle", { class: "dot", cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: 2 }));
  } else {
    text("no data in this range", { x: W / 2, y: H / 2, "text-anchor": "middle" });
  }
  svg.dataset.points = String(pts.length);
  const last = pts.length ? pts[pts.length - 1][1] : null;
  svg.setAttribute("aria-label", `${chart.metric} of ${chart.device}: ${pts.length} points, latest ${fmtNum(last)}`);
  chart.meta.textContent = series.bucket_ms ? `${series.agg} per ${series.bucket_ms / 1000} s, ${pts.length} points` : `${pts.length} points`;
}

function attachDrag(chart) {
  const { svg } = chart;
  let start = null, rect = null;
  const toX = (ev) => { const b = svg.getBoundingClientRect(); return ((ev.clientX - b.left) / b.width) * W; };
  svg.addEventListener("pointerdown", (ev) => {
    start = toX(ev); rect = svgEl("rect", { class: "sel", x: start, y: M.t, width: 0, height: H - M.t - M.b });
    svg.append(rect); svg.setPointerCapture(ev.pointerId);
  });
  svg.addEventListener("pointermove", (ev) => {
    if (start === null) return;
    const cur = toX(ev); rect.setAttribute("x", Math.min(start, cur)); rect.setAttribute("width", Math.abs(cur - start));
  });
  svg.addEventListener("pointerup", (ev) => {
    if (start === null || !chart.window) return;
    const end = toX(ev), [from, to] = chart.window;
    const t = (px) => from + ((Math.min(Math.max(px, M.l), W - M.r) - M.l) / (W - M.l - M.r)) * (to - from);
    const a = t(Math.min(start, end)), b = t(Math.max(start, end));
    start = null; rect.remove();
    if (b - a > 1000) setWindow(false, a, b);
  });
}

async function loadCharts(latest) {
  const [from, to] = windowNow();
  const points = Math.max(50, Math.min(600, Math.round(document.getElementById("charts").clientWidth / 2) || 300));
  const range = `from=${new Date(from).toISOString()}&to=${new Date(to).toISOString()}`;
  const fitted = state.live && to - from < state.span;
  document.getElementById("range-label").textContent =
    `${state.live ? "live, " : ""}${fitted ? "all data, " : ""}${fmtTime(from, to - from)} – ${fmtTime(to, to - from)}`;
  document.querySelectorAll("[data-range]").forEach((b) =>  // no range button is the window while it fits the data
    b.setAttribute("aria-pressed", String(state.live && !fitted && RANGES[b.dataset.range] === state.span)));
  await Promise.all(latest.map(async (v) => {
    const chart = chartFor(v.device_id, v.metric, v.unit);
    const q = `device=${encodeURIComponent(v.device_id)}&metric=${encodeURIComponent(v.metric)}&${range}` +
      `&bucket=auto&points=${points}&agg=mean`;
    draw(chart, await api(`/api/v1/series?${q}`), from, to);
  }));
}

function setWindow(live, from, to) {
  state.live = live;
  if (!live) { state.from = from; state.to = to; state.span = to - from; }
  document.querySelectorAll("[data-range]").forEach((b) =>
    b.setAttribute("aria-pressed", String(live && RANGES[b.dataset.range] === state.span)));
  refresh();
}

function zoom(factor) {
  const [from, to] = windowNow();
  state.fit = false;
  const span = Math.max(10e3, (to - from) * factor);
  if (state.live) { state.span = span; setWindow(true); return; }
  const mid = (from + to) / 2;
  setWindow(false, mid - span / 2, Math.min(Date.now(), mid + span / 2));
}

// -- alerts, health, catalog -----------------------------------------------------------------------

function alertItem(a) {
  const detail = Object.entries(a.detail).map(([k, v]) => `${k}=${v}`).join(" ");
  return el("li", { class: "alert" }, el("strong", { class: a.cleared_at ? "" : "bad" }, a.name), ` on ${a.subject} `,
    el("time", { datetime: a.raised_at }, ago(a.raised_at)), a.cleared_at ? " (cleared)" : "", detail ? ` — ${detail}` : "");
}

async function loadAlerts() {
  const alerts = await api("/api/v1/alerts?limit=20");
  for (const [id, list] of [["alerts-active", alerts.active], ["alerts-recent", alerts.recent]]) {
    const ul = document.getElementById(id);
    ul.replaceChildren(...(list.length ? list.map(alertItem) : [el("li", {}, "none")]));
    ul.dataset.count = String(list.length);
  }
}

function table(caption, header, rows) {
  return el("table", {}, el("caption", {}, caption),
    el("thead", {}, el("tr", {}, ...header.map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => (c instanceof Node ? el("td", {}, c) : el("td", {}, c)))))));
}

async function loadHealth() {
  const [stats, ready] = await Promise.all([api("/api/v1/stats"), api("/readyz")]);
  const status = document.getElementById("status");
  const down = Object.entries(ready.checks).filter(([, v]) => v !== "up");
  status.textContent = down.length ? `not ready: ${down.map(([k, v]) => `${k}: ${v}`).join("; ")}` :
    `ready · ${stats.stored} readings stored · updated ${new Date().toLocaleTimeString()}`;
  status.className = down.length ? "bad" : "";
  const stages = Object.entries(stats.stages).map(([name, s]) => [name, s.in, s.out,
    Object.entries(s.rejected).map(([r, n]) => `${r}=${n}`).join(" ") || "none"]);
  const drivers = Object.entries(stats.drivers).map(([name, d]) => [name, d.connected ? "connected" : "disconnected",
    d.frames, d.readings, Object.entries(d.errors).map(([r, n]) => `${r}=${n}`).join(" ") || "none"]);
  const outboxes = Object.entries((stats.forward.destinations) || {}).map(([name, f]) => [name,
    el("span", { class: f.connected ? "ok" : "bad" }, f.connected ? "connected" : "disconnected"),
    f.depth, f.bytes, `${f.oldest_age_s} s`, f.delivered, f.dropped]);
  const q = stats.queue;
  document.getElementById("health").replaceChildren(
    el("p", {}, `Queue ${q.depth} / ${q.max} (high water ${q.high_water}); journal appended ${stats.journal.appended}; ` +
      `published ${stats.published.events} events, ${stats.published.rejects} rejects.`),
    table("Pipeline stages", ["stage", "in", "out", "rejected by reason"], stages),
    table("Drivers", ["driver", "state", "frames", "readings", "errors"], drivers),
    outboxes.length ? table("Outboxes (backbone)", ["destination", "backbone", "depth", "bytes", "oldest", "delivered", "dropped"], outboxes)
      : el("p", {}, "No backbone destinations configured."));
}

async function loadCatalog() {
  const catalog = await api("/api/v1/catalog");
  const root = document.getElementById("catalog");
  root.replaceChildren(...catalog.types.map((t) => el("details", { "data-type": t.type },
    el("summary", {}, t.type), el("p", {}, t.description),
    el("dl", {}, el("dt", {}, "Topic"), el("dd", {}, el("code", {}, t.topic)),
      el("dt", {}, "Producers"), el("dd", {}, t.producers.join(", ") || "none seen"),
      el("dt", {}, "Consumers"), el("dd", {}, t.consumers.join(", ") || "none")),
    el("p", {}, "Data schema:"), el("pre", {}, JSON.stringify(t.schema, null, 2)))));
  root.dataset.types = String(catalog.types.length);
}

// -- the event portal --------------------------------------------------------------------------------
// Types searched and grouped by version (side by side, changes marked), the subscription tester,
// applications beside learned traffic, and the definition form (errors shown next to their fields).

const CATALOG_FIELD_TYPES = ["number", "integer", "string", "boolean", "datetime"];

function badge(text, kind) { return el("span", { class: `badge ${kind}` }, text); }

function who(list, declaredKey) {
  if (!list.length) return el("span", { class: "hint" }, "none seen");
  return el("span", {}, ...list.map((x, i) => el("span", { "data-client": x.client },
    i ? ", " : "", x.client + (x.filter ? ` (${x.filter})` : ""),
    x[declaredKey] === false ? badge("undeclared", "warn") : "")));
}

function declaredList(list) {
  if (!list.length) return el("span", { class: "hint" }, "no application declares it");
  return el("span", {}, ...list.map((d, i) => el("span", { "data-application": d.application }, i ? ", " : "",
    d.application, d.seen ? badge("seen", "ok") : badge("never seen", "warn"))));
}

function fieldCell(f) {
  if (!f) return "–";
  const range = f.minimum !== null || f.maximum !== null ? ` ${f.minimum ?? ""}..${f.maximum ?? ""}` : "";
  return `${f.type}${f.required ? "" : "?"}${f.unit ? " [" + f.unit + "]" : ""}${range}`;
}

function versionsTable(group) {
  const names = [];
  for (const v of group.versions) for (const f of v.fields) if (!names.includes(f.name)) names.push(f.name);
  const changes = new Map(); // "version/field" -> kind
  for (const step of group.steps) for (const c of step.changes) changes.set(`${step.after}/${c.field}`, c.kind);
  const head = el("tr", {}, el("th", { scope: "col" }, "field"),
    ...group.versions.map((v) => el("th", { scope: "col", "data-version": v.version, class: v.matched ? "hit" : "" },
      `${v.version}${v.builtin ? " (built-in)" : ""}`)));
  const rows = names.map((name) => el("tr", { "data-field-name": name }, el("th", { scope: "row" }, name),
    ...group.versions.map((v) => {
      const f = v.fields.find((x) => x.name === name);
      const kind = changes.get(`${v.version}/${name}`) || (f ? "" : (changes.get(`${v.version}/${name}`) || ""));
      return el("td", { class: kind, "data-version": v.version, title: f ? f.description : "" },
        f ? fieldCell(f) : (kind === "removed" ? "removed" : "–"));
    })));
  return el("table", { class: "versions" }, el("caption", {}, "Data fields by version"), el("thead", {}, head),
    el("tbody", {}, ...rows));
}

function stepList(group) {
  if (!group.steps.length) return el("p", { class: "hint" }, "One version.");
  return el("ul", { class: "steps" }, ...group.steps.map((step) => el("li", { "data-step": `${step.before}>${step.after}` },
    `${step.before} → ${step.after} `, step.compatible ? badge("compatible", "ok") : badge("new major", "warn"), ": ",
    step.changes.length ? step.changes.map((c) => c.kind === "added" ? `+ ${c.field} ${c.after}` :
      c.kind === "removed" ? `− ${c.field}` : `${c.field}: ${c.before} → ${c.after}`).join("; ") : "no field changes")));
}

function groupView(group) {
  const latest = group.versions[group.versions.length - 1];
  const matched = group.versions.some((v) => v.matched);
  const perVersion = group.versions.map((v) => el("div", { class: "who", "data-version": v.version },
    el("h4", {}, `${v.version} · `, el("code", {}, v.topic)), el("p", { class: "hint" }, `${v.description} — from ${v.source}`),
    el("dl", {}, el("dt", {}, "Producers seen"), el("dd", {}, who(v.producers, "declared")),
      el("dt", {}, "Declared producers"), el("dd", {}, declaredList(v.declared_producers)),
      el("dt", {}, "Consumers seen"), el("dd", {}, who(v.consumers, "declared")),
      el("dt", {}, "Declared consumers"), el("dd", {}, declaredList(v.declared_consumers)))));
  const details = el("details", { "data-type-group": group.name, class: matched ? "matched" : "" },
    el("summary", {}, `${group.name} `, el("span", { class: "hint" }, group.versions.map((v) => v.version).join(", "))),
    versionsTable(group), stepList(group), ...perVersion);
  if (!latest.builtin && latest.metric) {
    const next = el("button", { type: "button", "data-new-version": group.name }, "New version of this type…");
    next.addEventListener("click", () => prefillDefinition(latest));
    details.append(next);
  }
  return details;
}

let portalQuery = "";
async function loadPortal() {
  const q = document.getElementById("portal-q").value.trim();
  const [types, apps] = await Promise.all([api(`/api/v1/portal/types?q=${encodeURIComponent(q)}`),
    api("/api/v1/portal/applications")]);
  portalQuery = types.query;
  const root = document.getElementById("portal-types");
  const open = new Set([...root.querySelectorAll("details[open]")].map((d) => d.dataset.typeGroup));
  root.replaceChildren(...types.types.map(groupView));
  root.querySelectorAll("details").forEach((d) => { if (open.has(d.dataset.typeGroup) || (q && d.classList.contains("matched"))) d.open = true; });
  root.dataset.groups = String(types.types.length);
  root.dataset.query = portalQuery;
  document.getElementById("portal-count").textContent = `${types.types.length} type(s)`;
  document.getElementById("define-where").textContent = types.portal_file ?
    `Definitions are checked as catalog files are, written to ${types.portal_file} and applied at once.` :
    "This gateway takes no definitions here (no [catalog] portal_file).";
  renderApps(apps);
}

function renderApps(apps) {
  const rows = apps.applications.map((a) => [
    el("span", { "data-app": a.name }, a.name, a.owner ? el("span", { class: "hint" }, ` (${a.owner})`) : ""),
    a.clients.join(", ") || "–",
    el("span", {}, ...a.events.filter((e) => e.role === "produces").map((e, i) => el("span", { "data-app-event": `${a.name}/produces/${e.type}` },
      i ? ", " : "", e.type, e.seen ? badge("seen", "ok") : badge("declared, never seen", "warn")))),
    el("span", {}, ...a.events.filter((e) => e.role === "consumes").map((e, i) => el("span", { "data-app-event": `${a.name}/consumes/${e.type}` },
      i ? ", " : "", e.type, e.seen ? badge("seen", "ok") : badge("declared, never seen", "warn")))),
  ]);
  const root = document.getElementById("portal-apps");
  root.replaceChildren(
    rows.length ? table("Declared applications", ["application", "clients", "produces", "consumes"], rows)
      : el("p", { class: "hint" }, "No applications declared."),
    apps.undeclared.length ? table("Seen, but declared by no application", ["client", "role", "event type", "its application"],
      apps.undeclared.map((u) => [el("span", { "data-undeclared": `${u.client}/${u.role}/${u.type}` }, u.client), u.role, u.type,
        u.application || "none"])) : el("p", { class: "hint" }, "Everything seen is declared."));
  root.dataset.apps = String(apps.applications.length);
  root.dataset.undeclared = String(apps.undeclared.length);
}

async function testSubscription(ev) {
  ev.preventDefault();
  const filter = document.getElementById("sub-filter").value.trim();
  const syntax = document.getElementById("sub-syntax").value;
  const root = document.getElementById("sub-result");
  const headers = state.token ? { Authorization: "Bearer " + state.token } : {};
  const response = await fetch(`/api/v1/portal/subscriptions?filter=${encodeURIComponent(filter)}&syntax=${syntax}`,
    { headers, cache: "no-store" });
  const body = await response.json();
  if (!response.ok) {
    root.replaceChildren(el("p", { class: "error", "data-error-for": "filter" }, body.detail));
    root.dataset.types = "0"; root.dataset.topics = "0";
    return;
  }
  root.replaceChildren(
    el("p", {}, `Read as ${body.syntax === "smf" ? "Solace/NATS" : "MQTT"} syntax: ${body.types.length} event type(s), ` +
      `${body.topics.length} live topic(s).`),
    table("Event types it receives", ["type", "version", "topic pattern"],
      body.types.map((t) => [el("span", { "data-match-type": t.key }, t.type), t.version, el("code", {}, t.topic)])),
    table("Live topics it matches (newest first)", ["topic", "event type", "messages", "last seen"],
      body.topics.map((t) => [el("code", { "data-match-topic": t.topic }, t.topic), t.type || "none", t.messages, ago(t.last_seen)])));
  root.dataset.types = String(body.types.length);
  root.dataset.topics = String(body.topics.length);
}

// -- the definition form ---------------------------------------------------------------------------

function fieldRow(spec = {}) {
  const row = el("div", { class: "field-row" });
  const input = (attr, label, attrs = {}) => {
    const id = `d-f-${Math.random().toString(36).slice(2)}`;
    const node = attr === "type" ? el("select", { id, "data-attr": attr, ...attrs },
      ...CATALOG_FIELD_TYPES.map((t) => el("option", { value: t }, t))) : el("input", { id, "data-attr": attr, ...attrs });
    if (attr === "required") node.type = "checkbox";
    row.append(el("label", { for: id }, label), node, el("span", { class: "error", "data-attr-error": attr, role: "alert" }));
    return node;
  };
  input("name", "name", { size: 12 }).value = spec.name || "";
  input("type", "type").value = spec.type || "number";
  input("unit", "unit", { size: 6 }).value = spec.unit || "";
  input("required", "required").checked = Boolean(spec.required);
  input("minimum", "min", { size: 6, inputmode: "decimal" }).value = spec.minimum ?? "";
  input("maximum", "max", { size: 6, inputmode: "decimal" }).value = spec.maximum ?? "";
  input("description", "description", { size: 20 }).value = spec.description || "";
  const remove = el("button", { type: "button" }, "Remove");
  remove.addEventListener("click", () => row.remove());
  row.append(remove);
  document.getElementById("d-field-rows").append(row);
  return row;
}

const number = (text) => (text.trim() === "" ? null : (Number.isFinite(Number(text)) ? Number(text) : text.trim()));

function definitionBody() {
  const v = (id) => document.getElementById(id).value.trim();
  const value = { unit: v("d-unit") || null, minimum: number(v("d-min")), maximum: number(v("d-max")) };
  const fields = {};
  for (const row of document.querySelectorAll("#d-field-rows .field-row")) {
    const get = (attr) => row.querySelector(`[data-attr="${attr}"]`);
    const name = get("name").value.trim();
    if (!name) continue;
    fields[name] = { type: get("type").value, unit: get("unit").value.trim() || null, required: get("required").checked,
      minimum: number(get("minimum").value), maximum: number(get("maximum").value), description: get("description").value.trim() };
  }
  return { name: v("d-name"), version: v("d-version"), metric: v("d-metric"),
    device_classes: v("d-classes").split(",").map((x) => x.trim()).filter(Boolean), description: v("d-description"),
    value, fields };
}

function clearErrors() {
  const form = document.getElementById("define-form");
  form.querySelectorAll(".error").forEach((e) => { e.textContent = ""; });
  form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
}

function showError(field, message) {
  // fields.<name>.<attr>: the row of that extra field; fields.<name>: its name; else the named input
  const match = /^fields\.([^.]+)(?:\.(\w+))?$/.exec(field);
  if (match) {
    const row = [...document.querySelectorAll("#d-field-rows .field-row")]
      .find((r) => r.querySelector('[data-attr="name"]').value.trim() === match[1]);
    if (row) {
      const attr = match[2] || "name";
      row.querySelector(`[data-attr-error="${attr}"]`).textContent = message;
      row.querySelector(`[data-attr="${attr}"]`)?.setAttribute("aria-invalid", "true");
      return;
    }
  }
  const span = document.querySelector(`#define-form [data-error-for="${field}"]`) ||
    document.querySelector('#define-form [data-error-for=""]');
  span.textContent += (span.textContent ? " " : "") + message;
  document.querySelector(`#define-form [data-field="${field}"]`)?.setAttribute("aria-invalid", "true");
}

async function submitDefinition(ev) {
  ev.preventDefault();
  clearErrors();
  const result = document.getElementById("define-result");
  result.textContent = "checking…"; result.className = ""; delete result.dataset.key;
  const headers = { "Content-Type": "application/json" };
  if (state.token) headers.Authorization = "Bearer " + state.token;
  const response = await fetch("/api/v1/portal/types", { method: "POST", headers, body: JSON.stringify(definitionBody()) });
  const body = await response.json();
  if (response.status === 201) {
    result.textContent = `${body.type} ${body.version} defined in ${body.file} and applied.`;
    result.className = "ok"; result.dataset.key = body.key;
    await Promise.all([loadPortal(), loadCatalog()]);
    return;
  }
  result.textContent = response.status === 422 ? "Not defined: see the problems next to the fields." : body.detail;
  result.className = "bad";
  for (const problem of body.errors || []) showError(problem.field, problem.message);
}

function prefillDefinition(v) {
  const [major, minor] = v.version.split(".").map(Number);
  const set = (id, value) => { document.getElementById(id).value = value ?? ""; };
  const valueField = v.fields.find((f) => f.name === "value") || {};
  set("d-name", v.type); set("d-version", `${major}.${minor + 1}`); set("d-metric", v.metric);
  set("d-classes", v.device_classes.join(", ")); set("d-description", v.description);
  set("d-unit", valueField.unit); set("d-min", valueField.minimum); set("d-max", valueField.maximum);
  document.getElementById("d-field-rows").replaceChildren();
  for (const name of v.extra_fields) {
    const f = v.fields.find((x) => x.name === name);
    fieldRow({ name, type: f.type.includes("date-time") ? "datetime" : f.type.split(/[ |]/)[0], unit: f.unit,
      required: f.required, minimum: f.minimum, maximum: f.maximum, description: f.description });
  }
  clearErrors();
  document.getElementById("define-form").scrollIntoView();
}

let searchTimer = null;
function setupPortal() {
  document.getElementById("portal-q").addEventListener("input", () => {
    clearTimeout(searchTimer); searchTimer = setTimeout(() => loadPortal().catch(portalFailed), 250);
  });
  document.getElementById("sub-form").addEventListener("submit", (ev) => testSubscription(ev).catch(portalFailed));
  document.getElementById("define-form").addEventListener("submit", (ev) => submitDefinition(ev).catch(portalFailed));
  document.getElementById("d-add-field").addEventListener("click", () => fieldRow());
}

function portalFailed(err) {
  const result = document.getElementById("define-result");
  result.textContent = err.message; result.className = "bad";
}

// -- the loop --------------------------------------------------------------------------------------

let timer = null;
async function refresh() {
  clearTimeout(timer);
  try {
    const latest = await loadDevices();
    const jobs = [loadCharts(latest), loadAlerts(), loadHealth()];
    if (state.polls % CATALOG_EVERY === 0) jobs.push(loadCatalog(), loadPortal());
    await Promise.all(jobs);
    state.polls += 1;
    document.body.dataset.rendered = String(state.polls);
  } catch (err) {
    const status = document.getElementById("status");
    status.textContent = err.message; status.className = "bad";
    if (err instanceof AuthNeeded) { document.getElementById("token-form").hidden = false; return; }
  }
  if (state.live) timer = setTimeout(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  setupPortal();
  document.querySelectorAll("[data-range]").forEach((b) => b.addEventListener("click", () => {
    state.span = RANGES[b.dataset.range]; state.fit = false; setWindow(true);
  }));
  document.getElementById("zoom-in").addEventListener("click", () => zoom(0.5));
  document.getElementById("zoom-out").addEventListener("click", () => zoom(2));
  document.getElementById("live").addEventListener("click", () => setWindow(true));
  document.getElementById("token-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = document.getElementById("token").value.trim();
    sessionStorage.setItem("iotgw-token", state.token);
    document.getElementById("token-form").hidden = true;
    state.polls = 0;
    refresh();
  });
  refresh();
});
