// The fleet dashboard: polls /fleet and /fleet/jobs, follows one job's log over SSE.
// Everything shown from the fleet goes in as text nodes (never innerHTML): job output,
// labels and host names are not trusted.
"use strict";

const POLL_MS = 2000;
const MAX_LOG_LINES = 5000;
const FAILED = new Set(["failed", "error", "timeout"]);

const state = { fleet: null, jobs: [], filter: "all", selected: null, source: null, lastOk: 0, busy: new Set() };

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") node.className = value;
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

const $ = (selector) => document.querySelector(selector);

// Puts `items` in `container` in order, one node each, rebuilding a node only when what
// it shows (`sigOf`) changed: focus, hover and selection survive the polls.
function reconcile(container, items, keyOf, sigOf, build) {
  const existing = new Map([...container.children].map((node) => [node.dataset.key, node]));
  const wanted = items.map((item) => {
    const key = keyOf(item), sig = sigOf(item);
    let node = existing.get(key);
    if (!node || node.dataset.sig !== sig) {
      node = build(item);
      node.dataset.key = key;
      node.dataset.sig = sig;
    }
    return node;
  });
  const keep = new Set(wanted);
  for (const child of [...container.children]) if (!keep.has(child)) child.remove();
  wanted.forEach((node, i) => {
    if (container.children[i] !== node) container.insertBefore(node, container.children[i] || null);
  });
}

// --- formatting -------------------------------------------------------------------------
function duration(seconds) {
  seconds = Math.max(0, Math.floor(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(s).padStart(2, "0")}s`;
  return `${s}s`;
}

function ago(seconds) {
  return seconds < 1.5 ? "just now" : `${duration(seconds)} ago`;
}

function clock(iso) {
  if (!iso) return "–";
  const when = new Date(iso);
  const sameDay = when.toDateString() === new Date().toDateString();
  const time = when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
  return sameDay ? time : `${when.toLocaleDateString([], { month: "short", day: "numeric" })} ${time}`;
}

function mib(value) {
  return value >= 1024 ? `${(value / 1024).toFixed(value % 1024 ? 1 : 0)} GiB` : `${value} MiB`;
}

function jobStatus(job) {
  if (job.status) return job.status;
  if (job.state === "running" || job.state === "requeued" || job.state === "superseded") return job.state;
  return "queued";
}

function hostState(host) {
  if (host.unreachable) return "unreachable";
  if (host.draining) return "draining";
  return host.running > 0 ? "busy" : "idle";
}

// --- talking to the daemon ------------------------------------------------------------------
async function getJSON(path) {
  const response = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json" } });
  if (response.status === 401) {
    window.location.reload(); // the session ended: the page becomes the sign-in form
    throw new Error("signed out");
  }
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

async function poll() {
  try {
    const [fleet, jobs] = await Promise.all([getJSON("/fleet"), getJSON("/fleet/jobs?limit=50")]);
    state.fleet = fleet;
    state.jobs = jobs.jobs;
    state.silent = jobs.silent;
    state.lastOk = Date.now();
    render();
  } catch (error) {
    showFreshness(error.message);
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

async function setDraining(host, draining) {
  state.busy.add(host);
  renderHosts();
  try {
    const response = await fetch(`/fleet/hosts/${encodeURIComponent(host)}/${draining ? "drain" : "resume"}`, {
      method: "POST", credentials: "same-origin",
    });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    const known = state.fleet && state.fleet.hosts.find((h) => h.host === host);
    if (known) Object.assign(known, { draining: body.draining, running: body.running });
  } catch (error) {
    showFreshness(`${draining ? "drain" : "resume"} ${host}: ${error.message}`);
  } finally {
    state.busy.delete(host);
    renderHosts();
    renderSummary();
  }
}

// --- rendering ------------------------------------------------------------------------------
function render() {
  $("#served-by").textContent = state.fleet.host;
  renderSummary();
  renderHosts();
  renderJobs();
  showFreshness();
}

function showFreshness(problem) {
  const node = $("#freshness");
  if (problem) {
    node.className = "freshness stale";
    node.textContent = `update failed: ${problem}`;
  } else {
    node.className = "freshness live";
    node.textContent = `live · updated ${new Date(state.lastOk).toLocaleTimeString()}`;
  }
}

function renderSummary() {
  const hosts = state.fleet.hosts;
  const count = (s) => hosts.filter((h) => hostState(h) === s).length;
  const running = state.jobs.filter((j) => j.state === "running").length;
  const failed = state.jobs.filter((j) => FAILED.has(j.status)).length;
  const tile = (label, value, tone, hint) =>
    el("div", { class: `tile ${value && tone ? tone : ""}`, title: hint },
      el("div", { class: "tile-value" }, value), el("div", { class: "tile-label" }, label));
  $("#summary").replaceChildren(
    tile("hosts", hosts.length, "", "hosts heard from"),
    tile("busy", count("busy"), "tone-busy", "running jobs"),
    tile("idle", count("idle"), "", "taking work, running nothing"),
    tile("draining", count("draining"), "tone-warn", "taking no new work"),
    tile("unreachable", count("unreachable"), "tone-bad", `no heartbeat for ${state.fleet.unreachable_after_s} s`),
    tile("jobs running", running, "tone-busy", "across the fleet"),
    tile("failed recently", failed, "tone-bad", "failed, error or timeout among the recent jobs"),
  );
}

function meter(label, used, total, text) {
  const share = total > 0 ? Math.min(1, used / total) : 0;
  const level = share >= 0.9 ? "full" : share >= 0.7 ? "high" : "";
  const fill = el("span");
  fill.style.width = `${(share * 100).toFixed(1)}%`; // CSSOM: the page's policy allows no inline style attributes
  return el("div", { class: "meter" },
    el("div", { class: "meter-head" }, el("span", {}, label), el("span", { class: "mono" }, text)),
    el("div", { class: `bar ${level}`, role: "img", "aria-label": `${label}: ${text}` }, fill));
}

function hostCard(host) {
  const current = hostState(host);
  const busy = state.busy.has(host.host);
  const badges = [el("span", { class: `badge state-${current}` }, current)];
  const warm = Object.entries(host.warm_by_label || {}).filter(([, n]) => n > 0)
    .map(([label, n]) => `${label} ×${n}`).join(", ");
  return el("article", { class: `host ${current}`, dataset: { host: host.host, state: current } },
    el("div", { class: "host-head" },
      el("span", { class: `dot ${current}`, "aria-hidden": "true" }),
      el("h3", { class: "mono" }, host.host),
      badges,
      el("span", { class: "version muted" }, `v${host.version}`)),
    meter("Slots", host.running, host.max_concurrency, `${host.running} / ${host.max_concurrency}`),
    meter("vCPU", host.cpus_used, host.cpus_total, `${host.cpus_used} / ${host.cpus_total}`),
    meter("Memory", host.memory_mb_used, host.memory_mb_total, `${mib(host.memory_mb_used)} / ${mib(host.memory_mb_total)}`),
    el("div", { class: "labels" }, host.labels.map((label) => el("span", { class: "label" }, label))),
    el("div", { class: "node muted", title: "the RabbitMQ node this host is connected to" }, nodeText(host)),
    el("div", { class: "host-foot" },
      el("span", { class: "muted" }, host.warm ? `${host.warm} warm VM${host.warm === 1 ? "" : "s"} (${warm})` : "no warm VMs"),
      el("span", { class: host.unreachable ? "seen bad" : "seen muted", title: host.last_seen }, seenText(host)),
      el("button", {
        type: "button", class: host.draining ? "resume" : "drain", dataset: { host: host.host },
        disabled: busy || host.unreachable,
        onclick: () => setDraining(host.host, !host.draining),
      }, busy ? "…" : host.draining ? "Resume" : "Drain")));
}

function nodeText(host) {
  // On a broker cluster, where each host is connected (it moves when its node goes).
  if (!host.broker_node) return "not connected to a broker";
  return `${host.unreachable ? "last on" : "on"} broker node ${host.broker_node}`;
}

function seenText(host) {
  return host.unreachable ? `silent for ${duration(host.silent_s)}` : `seen ${ago(host.silent_s)}`;
}

function renderHosts() {
  if (!state.fleet) return;
  const hosts = state.fleet.hosts;
  const shown = (host) => {
    const { silent_s, last_seen, at, ...rest } = host; // these change every poll: updated in place below
    return JSON.stringify([rest, state.busy.has(host.host)]);
  };
  reconcile($("#hosts"), hosts, (host) => host.host, shown, hostCard);
  for (const host of hosts) {
    const seen = $("#hosts").querySelector(`article[data-key="${CSS.escape(host.host)}"] .seen`);
    if (seen) {
      seen.textContent = seenText(host);
      seen.title = host.last_seen;
    }
  }
  const silent = (state.silent || []).length;
  $("#hosts-note").textContent = silent ? `${silent} host(s) did not list their jobs in time` : "";
}

function visibleJobs() {
  if (state.filter === "running") return state.jobs.filter((j) => j.state === "running" || j.state === "accepted");
  if (state.filter === "failed") return state.jobs.filter((j) => FAILED.has(j.status));
  return state.jobs;
}

function renderJobs() {
  const jobs = visibleJobs();
  const shown = (job) => JSON.stringify([job, state.selected === job.job_id]);
  reconcile($("#jobs tbody"), jobs, (job) => job.job_id, shown, jobRow);
  $("#jobs-empty").hidden = jobs.length > 0;
  tick();
}

function jobRow(job) {
  const status = jobStatus(job);
  const start = job.started_at || job.accepted_at;
  const live = !job.finished_at && (job.state === "running" || job.state === "accepted");
  const took = start ? ((job.finished_at ? new Date(job.finished_at) : new Date()) - new Date(start)) / 1000 : null;
  return el("tr", {
    class: `job status-${status} ${state.selected === job.job_id ? "selected" : ""}`,
    dataset: { job: job.job_id, host: job.host }, tabindex: 0, title: job.summary || "",
    onclick: () => openLog(job),
    onkeydown: (event) => { if (event.key === "Enter") openLog(job); },
  },
    el("td", {}, el("span", { class: `pill ${status}` }, status)),
    el("td", { class: "mono" }, job.job_id.slice(0, 8), job.warm ? el("span", { class: "warm-mark", title: "took a warm VM" }, " ⚡") : null),
    el("td", {}, job.label || "–"),
    el("td", { class: "mono" }, job.host),
    el("td", {}, clock(start)),
    el("td", { class: "num mono duration", dataset: live && start ? { since: start } : {} }, took === null ? "–" : duration(took)));
}

function tick() {
  for (const cell of document.querySelectorAll("td.duration[data-since]")) {
    cell.textContent = duration((Date.now() - new Date(cell.dataset.since)) / 1000);
  }
}

// --- the log pane -----------------------------------------------------------------------------
function openLog(job) {
  if (state.source) state.source.close();
  state.selected = job.job_id;
  renderJobs();
  const lines = $("#log-lines");
  lines.replaceChildren();
  $("#log-job").replaceChildren(
    el("span", { class: "mono" }, job.job_id), " on ", el("span", { class: "mono" }, job.host),
    " ", el("span", { class: `pill ${jobStatus(job)}` }, jobStatus(job)));
  const logState = $("#log-state");
  logState.textContent = "connecting…";
  const source = new EventSource(`/fleet/jobs/${encodeURIComponent(job.job_id)}/log/stream`);
  state.source = source;
  source.onopen = () => { logState.textContent = "streaming"; };
  source.onmessage = (event) => appendLine(event.data);
  source.addEventListener("end", () => {
    source.close();
    logState.textContent = "the job has ended: this is its whole log";
  });
  source.onerror = () => {
    if (source.readyState === EventSource.CLOSED) logState.textContent = "the log is not available";
    else logState.textContent = "reconnecting…";
  };
  const pane = document.getElementById("log").getBoundingClientRect();
  if (pane.top > window.innerHeight - 120) document.getElementById("log").scrollIntoView({ block: "start" }); // stacked layout
}

function appendLine(text) {
  const lines = $("#log-lines");
  const follow = $("#log-follow").checked;
  lines.append(el("span", { class: "line" }, text), "\n");
  while (lines.childNodes.length > 2 * MAX_LOG_LINES) {
    lines.firstChild.remove();
    lines.firstChild.remove();
  }
  if (follow) lines.scrollTop = lines.scrollHeight;
}

// --- start ------------------------------------------------------------------------------------
document.addEventListener("DOMContentLoaded", () => {
  for (const chip of document.querySelectorAll(".filters .chip")) {
    chip.addEventListener("click", () => {
      state.filter = chip.dataset.filter;
      for (const other of document.querySelectorAll(".filters .chip")) {
        other.classList.toggle("selected", other === chip);
        other.setAttribute("aria-pressed", String(other === chip));
      }
      renderJobs();
    });
  }
  setInterval(tick, 1000);
  poll();
});
