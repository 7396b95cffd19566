// The Knocker dashboard: plain JavaScript over the admin API, no dependencies.
// Every value from the API is written with textContent (never as HTML): job URLs and
// headers are other clients' input.
"use strict";

const TOKEN_KEY = "knocker-admin-token";
const STATES = ["pending", "in_flight", "delivered", "failed"];
const view = document.getElementById("view");
let token = sessionStorage.getItem(TOKEN_KEY) || "";
let timer = null;
let previous = null; // the last metrics sample, for rates

// A token in the fragment (`#jobs&token=…`, never sent to a server) is kept for this tab
// and taken out of the address.
function takeTokenFromHash() {
  const m = location.hash.match(/[?&]token=([^&]*)/);
  if (!m) return;
  token = decodeURIComponent(m[1]);
  sessionStorage.setItem(TOKEN_KEY, token);
  history.replaceState(null, "", location.pathname + location.hash.replace(/[?&]token=[^&]*/, ""));
}

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function notice(text) {
  const n = document.getElementById("notice");
  n.hidden = !text;
  n.textContent = text || "";
}

async function api(path, options) {
  const headers = {};
  if (token) headers.Authorization = "Bearer " + token;
  const r = await fetch(path, Object.assign({ headers }, options || {}));
  if (r.status === 401) {
    notice("This instance needs its admin token: enter it above (kept for this tab only).");
    throw new Error("401");
  }
  if (!r.ok) {
    const text = await r.text();
    throw new Error(r.status + " " + text);
  }
  notice("");
  return r;
}

const json = async (path) => (await api(path)).json();

function state(s) {
  return el("span", { class: "state " + (s || "") }, (s || "-").replace("_", " "));
}

function when(rfc3339) {
  if (!rfc3339) return "-";
  return rfc3339.replace("T", " ").replace(/\.\d+/, "").replace("Z", " UTC");
}

function seconds(s) {
  if (s < 1) return Math.round(s * 1000) + " ms";
  if (s < 120) return s.toFixed(1) + " s";
  if (s < 7200) return Math.round(s / 60) + " min";
  return (s / 3600).toFixed(1) + " h";
}

function attemptText(a) {
  return a.error ? a.status + " " + a.error : String(a.status);
}

// ---- Overview: from /metrics ----

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-z_]+)(\{(.*)\})? (\S+)/);
    if (!m) continue;
    const labels = {};
    for (const l of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]] = l[2];
    samples.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return samples;
}

function sum(samples, name, where) {
  return samples
    .filter((s) => s.name === name && Object.entries(where || {}).every(([k, v]) => s.labels[k] === v))
    .reduce((a, s) => a + s.value, 0);
}

async function overview() {
  const samples = parseMetrics(await (await api("/knocker/metrics")).text());
  const now = Date.now();
  const totals = {
    accepted: sum(samples, "knocker_submissions_total", { result: "accepted" }),
    delivered: sum(samples, "knocker_jobs_finished_total", { result: "delivered" }),
    failed: sum(samples, "knocker_jobs_finished_total", { result: "failed" }),
  };
  const rates = {};
  for (const k of Object.keys(totals)) {
    rates[k] = previous ? (totals[k] - previous.totals[k]) / ((now - previous.at) / 1000) : null;
  }
  previous = { at: now, totals };
  const tile = (label, key) =>
    el("div", { class: "tile", "data-metric": key },
      el("div", { class: "label" }, label),
      el("div", { class: "value" }, totals[key]),
      el("div", { class: "rate" }, rates[key] === null ? "per second: measuring…" : rates[key].toFixed(1) + " per second"));
  const queue = STATES.map((s) => [s, sum(samples, "knocker_jobs", { state: s })]);
  const most = Math.max(1, ...queue.map(([, n]) => n));
  const oldest = sum(samples, "knocker_oldest_pending_age_seconds");
  return [
    el("h1", {}, "Overview"),
    el("div", { class: "tiles" },
      tile("accepted", "accepted"), tile("delivered", "delivered"), tile("failed", "failed"),
      el("div", { class: "tile", "data-metric": "oldest" },
        el("div", { class: "label" }, "oldest due job waiting"),
        el("div", { class: "value" }, seconds(oldest)))),
    el("h2", {}, "Queue by state"),
    ...queue.map(([s, n]) =>
      el("div", { class: "queue-row", "data-state": s },
        state(s),
        el("div", {}, el("div", { class: "bar", style: "width:" + (100 * n) / most + "%" })),
        el("div", { class: "num" }, n))),
  ];
}

// ---- Jobs ----

function params() {
  const q = location.hash.split("?")[1] || "";
  return new URLSearchParams(q);
}

async function jobs() {
  const p = params();
  const wanted = STATES.includes(p.get("state")) ? p.get("state") : "failed";
  const target = p.get("target") || "";
  const page = await json("/knocker/jobs?state=" + wanted + "&limit=200");
  const list = page.jobs.filter((j) => !target || j.url.includes("//" + target + "/") || j.url.includes("//" + target + "?") || j.url.endsWith("//" + target));
  const select = el("select", { id: "state-filter", onchange: go }, ...STATES.map((s) => el("option", { value: s, selected: s === wanted }, s.replace("_", " "))));
  const input = el("input", { id: "target-filter", placeholder: "target host:port", value: target, onchange: go });
  function go() {
    const q = new URLSearchParams({ state: select.value });
    if (input.value) q.set("target", input.value);
    location.hash = "jobs?" + q.toString();
  }
  const action = (label, method, path) =>
    el("button", { class: "small", onclick: async () => { await api(path, { method }); render(); } }, label);
  const rows = list.map((j) => {
    const last = j.attempts[j.attempts.length - 1];
    const finished = j.state === "delivered" || j.state === "failed";
    return el("tr", { "data-job": j.id },
      el("td", {}, el("a", { href: "#job/" + encodeURIComponent(j.id), class: "mono" }, j.id)),
      el("td", {}, state(j.waiting_in_lane ? "queued" : j.state)),
      el("td", { class: "num" }, j.attempts.length),
      el("td", {}, j.waiting_in_lane ? "in lane" : when(j.next_attempt_at)),
      el("td", { class: "mono" }, j.method + " " + j.url),
      el("td", {}, last ? attemptText(last) : "-"),
      el("td", {}, token ? [finished ? action("replay", "POST", "/knocker/jobs/" + encodeURIComponent(j.id) + "/replay") : null, " ",
                            action("delete", "DELETE", "/knocker/jobs/" + encodeURIComponent(j.id))] : null));
  });
  return [
    el("h1", {}, "Jobs"),
    el("div", { class: "filters" }, "state", select, "target", input,
      token ? null : el("span", { class: "muted" }, "enter the admin token to replay or delete")),
    rows.length
      ? el("table", { id: "jobs" }, el("tr", {}, ["id", "state", "attempts", "next attempt", "request", "last attempt", ""].map((h) => el("th", {}, h))), rows)
      : el("p", { class: "muted" }, "No " + wanted.replace("_", " ") + " jobs" + (target ? " to " + target : "") + "."),
    page.next ? el("p", { class: "muted" }, "Showing the oldest 200.") : null,
  ];
}

async function job(id) {
  const j = await json("/knocker/jobs/" + encodeURIComponent(id));
  const created = Date.parse(j.created_at);
  const slowest = Math.max(1, ...j.attempts.map((a) => a.latency_ms));
  const field = (k, v) => [el("div", {}, k), el("div", {}, v)];
  return [
    el("h1", {}, "Job ", el("span", { class: "mono" }, j.id), " ", state(j.state)),
    el("div", { class: "fields" },
      field("request", j.method + " " + j.url),
      field("kind", j.kind),
      field("created", when(j.created_at)),
      field("attempts left", j.attempts_left === null ? "until it expires" : j.attempts_left),
      field("next attempt", j.waiting_in_lane ? "waiting in lane " + j.lane : when(j.next_attempt_at)),
      field("expires", when(j.expires_at)),
      field("finished", when(j.finished_at))),
    el("h2", {}, "Attempts"),
    j.attempts.length
      ? el("div", { class: "timeline", id: "timeline" }, j.attempts.map((a, i) => {
          const ok = !a.error && a.status >= 200 && a.status < 300;
          return el("div", { class: "attempt" + (ok ? " ok" : ""), "data-attempt": i + 1 },
            el("strong", {}, "#" + (i + 1)), " +", seconds((Date.parse(a.at) - created) / 1000), " ",
            el("span", {}, attemptText(a)), " ", el("span", { class: "muted" }, a.latency_ms + " ms"),
            el("div", { class: "bar", style: "width:" + Math.max(1, (60 * a.latency_ms) / slowest) + "%" }));
        }))
      : el("p", { class: "muted" }, "Not attempted yet."),
  ];
}

// ---- Broadcasts: each broadcast's members × the state of their copy ----

async function broadcasts() {
  const groups = (await json("/knocker/groups")).groups;
  const found = new Map();
  for (const s of STATES) {
    for (const j of (await json("/knocker/jobs?state=" + s + "&limit=1000")).jobs) {
      const b = j.config && j.config.broadcast;
      if (!b) continue;
      if (!found.has(b.id)) found.set(b.id, { group: b.group, members: {} });
      found.get(b.id).members[b.member] = j.waiting_in_lane ? "queued" : j.state;
    }
  }
  const sections = [];
  for (const [name, g] of Object.entries(groups)) {
    const members = [...new Set([...(g.members || []), ...[...found.values()].filter((b) => b.group === name).flatMap((b) => Object.keys(b.members))])];
    const rows = [...found.entries()].filter(([, b]) => b.group === name).reverse();
    sections.push(
      el("h2", {}, "Group " + name + " ", el("span", { class: "muted" }, g.agents ? "agents" : g.dns ? "dns " + g.dns : members.length + " members")),
      rows.length
        ? el("table", { class: "matrix", "data-group": name },
            el("tr", {}, el("th", {}, "broadcast"), members.map((m) => el("th", { class: "mono" }, m))),
            rows.map(([id, b]) => el("tr", { "data-broadcast": id },
              el("td", { class: "mono" }, id),
              members.map((m) => el("td", { "data-member": m }, b.members[m] ? state(b.members[m]) : "-")))))
        : el("p", { class: "muted" }, "No broadcasts kept for this group."));
  }
  return [el("h1", {}, "Broadcasts"), sections.length ? sections : el("p", { class: "muted" }, "No groups configured.")];
}

// ---- Monitors: a status page ----

function sparkline(values) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("class", "spark");
  svg.setAttribute("viewBox", "0 0 240 32");
  if (values.length > 1) {
    const top = Math.max(1, ...values);
    const points = values.map((v, i) => (i * 240) / (values.length - 1) + "," + (30 - (28 * v) / top)).join(" ");
    const line = document.createElementNS(ns, "polyline");
    line.setAttribute("points", points);
    svg.append(line);
  }
  return svg;
}

async function monitors() {
  const list = (await json("/knocker/monitors")).monitors;
  const cards = [];
  for (const m of list) {
    const detail = await json("/knocker/monitors/" + encodeURIComponent(m.name));
    const results = (detail.results || []).slice(0, 60).reverse(); // oldest first
    const pct = (v) => (v === null || v === undefined ? "-" : (100 * v).toFixed(2) + "%");
    cards.push(el("div", { class: "monitor", "data-monitor": m.name },
      el("div", { class: "head" }, el("strong", {}, m.name), state(m.health), el("span", { class: "mono muted" }, m.url)),
      el("div", { class: "uptime-bars", title: "the last checks, oldest first" },
        results.map((r) => el("span", { class: r.ok ? "" : "bad", title: when(r.at) + (r.ok ? " ok" : " " + (r.failed_condition || "failed")) }))),
      el("div", {}, "uptime 24h ", el("strong", {}, pct(m.uptime["24h"])), " · 7d ", pct(m.uptime["7d"]), " · 30d ", pct(m.uptime["30d"])),
      el("div", { class: "muted" }, "latency (ms) ", sparkline(results.map((r) => r.latency_ms)),
        m.last ? " last: " + (m.last.ok ? "ok " + m.last.status + " in " + m.last.latency_ms + " ms" : "failed: " + m.last.failed_condition) : " no check yet")));
  }
  return [el("h1", {}, "Monitors"), cards.length ? cards : el("p", { class: "muted" }, "No monitors.")];
}

// ---- Routing ----

async function render() {
  clearTimeout(timer);
  takeTokenFromHash();
  const hash = location.hash.replace(/^#/, "") || "overview";
  const [name, rest] = hash.split("/");
  const page = name.split("?")[0];
  for (const a of document.querySelectorAll("nav a")) {
    a.classList.toggle("active", a.dataset.view === page || (page === "job" && a.dataset.view === "jobs"));
  }
  try {
    const content =
      page === "jobs" ? await jobs()
      : page === "job" ? await job(decodeURIComponent(rest || ""))
      : page === "broadcasts" ? await broadcasts()
      : page === "monitors" ? await monitors()
      : await overview();
    view.replaceChildren(...content.flat().filter(Boolean));
    document.body.dataset.ready = page;
  } catch (e) {
    if (e.message !== "401") notice("Cannot load: " + e.message);
    view.replaceChildren(el("p", { class: "muted" }, e.message === "401" ? "Waiting for the admin token." : "Cannot load this page."));
    document.body.dataset.ready = "error";
  }
  // The overview and monitors refresh themselves.
  if (page === "overview" || page === "monitors" || page === "") timer = setTimeout(render, page === "monitors" ? 10000 : 2000);
}

document.getElementById("token-form").addEventListener("submit", (e) => {
  e.preventDefault();
  token = document.getElementById("token").value;
  sessionStorage.setItem(TOKEN_KEY, token);
  document.getElementById("token").value = "";
  render();
});
window.addEventListener("hashchange", render);
render();
