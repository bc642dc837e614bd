// wfctl web: the runs page and the run page. Vanilla JS, no external asset.
// Everything shown comes from this page's own server (/api/...), which asks wfd
// through its socket; text goes into the page as text, never as markup. The two SVGs
// (DAG, Gantt) are drawn by the server, which escapes every name in them.
"use strict";

const RUN_STATES = ["QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "CORRUPT"];
const ACTION_LABELS = {cancel: "Cancel", resume: "Resume", retry: "Retry"};
// Which run states each action makes sense in (others: the button is disabled).
const ACTION_STATES = {cancel: ["QUEUED", "RUNNING"], resume: ["FAILED", "CANCELLED"],
                       retry: ["FAILED", "CANCELLED"]};

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function showError(message) {
  const box = document.getElementById("error");
  box.textContent = message;
  box.hidden = !message;
}

async function getJSON(url) {
  const response = await fetch(url, {credentials: "same-origin"});
  const body = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

async function postJSON(url) {
  // X-Wfd: the server refuses a change without it (another origin cannot send it).
  const response = await fetch(url, {method: "POST", credentials: "same-origin",
                                     headers: {"X-Wfd": "1"}});
  const body = await response.json().catch(() => ({error: response.statusText}));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

function pad(n) { return String(n).padStart(2, "0"); }

function localTime(ts) {
  if (!ts) return "-";
  const d = new Date(ts);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ` +
         `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

function duration(seconds) {  // as wfctl's tables: 0.4s, 12.3s, 3m04s, 2h05m, 3d04h
  seconds = Math.max(0, seconds);
  if (seconds < 60) return `${seconds.toFixed(1)}s`;
  const s = Math.floor(seconds);
  if (s < 3600) return `${Math.floor(s / 60)}m${pad(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h${pad(Math.floor(s % 3600 / 60))}m`;
  return `${Math.floor(s / 86400)}d${pad(Math.floor(s % 86400 / 3600))}h`;
}

function span(start, end, running) {
  if (!start) return "-";
  if (end) return duration((new Date(end) - new Date(start)) / 1000);
  return running ? duration((Date.now() - new Date(start)) / 1000) : "-";
}

function badge(node, state) {
  node.textContent = state;
  node.className = `badge s-${state}`;
}

// ---- runs page -----------------------------------------------------------------------

function runsPage() {
  const params = new URLSearchParams(location.search);
  const chosen = new Set((params.get("state") || "").split(",").filter(Boolean));
  const boxes = document.getElementById("state-filters");
  for (const state of RUN_STATES) {
    const box = el("input", {type: "checkbox", value: state, id: `filter-${state}`});
    box.checked = chosen.has(state);
    boxes.append(el("label", {class: `chip s-${state}`}, box, state));
  }
  const name = document.getElementById("name-filter");
  name.value = params.get("name") || "";
  let timer = null;

  function query() {
    const states = [...boxes.querySelectorAll("input:checked")].map((b) => b.value);
    const q = new URLSearchParams();
    if (states.length) q.set("state", states.join(","));
    if (name.value.trim()) q.set("name", name.value.trim());
    return q.toString();
  }

  async function refresh() {
    clearTimeout(timer);
    const q = query();
    history.replaceState(null, "", q ? `/?${q}` : "/");
    try {
      render(await getJSON(`/api/runs${q ? "?" + q : ""}`));
      showError("");
    } catch (e) {
      showError(`cannot list runs: ${e.message}`);
    }
    timer = setTimeout(refresh, 2000);
  }

  function render(data) {
    const body = document.querySelector("#runs tbody");
    body.replaceChildren(...data.runs.map((run) => {
      const state = el("span", {}); badge(state, run.state);
      return el("tr", {"data-run": run.run_id},
        el("td", {}, el("a", {href: `/run/${encodeURIComponent(run.run_id)}`,
                              text: run.run_id})),
        el("td", {text: run.name}), el("td", {}, state), el("td", {text: run.owner}),
        el("td", {text: localTime(run.created_at)}),
        el("td", {text: span(run.created_at, run.finished_at, run.state === "RUNNING")}));
    }));
    document.getElementById("empty").hidden = data.runs.length > 0;
    const counts = Object.entries(data.counts).map(([s, n]) => `${n} ${s}`).join(", ");
    document.getElementById("summary").textContent =
      `${data.runs.length} shown of ${data.total} runs${counts ? ": " + counts : ""}`;
  }

  boxes.addEventListener("change", refresh);
  name.addEventListener("input", refresh);
  document.getElementById("filters").addEventListener("submit", (e) => e.preventDefault());
  refresh();
}

// ---- run page ------------------------------------------------------------------------

function runPage() {
  const runId = decodeURIComponent(location.pathname.split("/")[2] || "");
  const base = `/api/runs/${encodeURIComponent(runId)}`;
  const dag = document.getElementById("dag");
  const rows = new Map();
  let status = null;
  let events = null;
  let logStream = null;
  let actions = [];
  document.getElementById("run-id").textContent = runId;
  document.title = `wfd run ${runId}`;

  function live(text) { document.getElementById("live").textContent = text; }

  function stepRow(stepId) {
    let row = rows.get(stepId);
    if (!row) {
      row = el("tr", {"data-step": stepId, class: "step"});
      for (const cls of ["id", "state", "attempts", "exit", "duration", "err"]) {
        row.append(el("td", {class: cls}));
      }
      row.querySelector(".id").append(el("a", {href: "#", text: stepId}));
      row.addEventListener("click", (e) => { e.preventDefault(); openLog(stepId); });
      document.querySelector("#steps tbody").append(row);
      rows.set(stepId, row);
    }
    return row;
  }

  function showStatus(next) {
    status = next;
    badge(document.getElementById("run-state"), next.state);
    let meta = `${next.name} · owner ${next.owner} · created ${localTime(next.created_at)}`;
    if (next.finished_at) {
      meta += ` · finished ${localTime(next.finished_at)} ` +
              `(${span(next.created_at, next.finished_at, false)})`;
    }
    if (next.error) meta += ` · ${next.error}`;
    document.getElementById("run-meta").textContent = meta;
    for (const [stepId, step] of Object.entries(next.steps)) {
      const node = dag.querySelector(`[data-step="${CSS.escape(stepId)}"]`);
      if (node) {
        node.setAttribute("class", `n s-${step.state}`);
        const title = node.querySelector("title");
        if (title) title.textContent = `${stepId}: ${step.state}, ${step.attempts} attempt(s)` +
                                       (step.error ? `\n${step.error}` : "");
      }
      const row = stepRow(stepId);
      row.dataset.state = step.state;
      const state = row.querySelector(".state");
      state.replaceChildren(el("span", {})); badge(state.firstChild, step.state);
      row.querySelector(".attempts").textContent = step.attempts;
      row.querySelector(".exit").textContent = step.exit_code === null ? "-" : step.exit_code;
      row.querySelector(".duration").textContent =
        span(step.started_at, step.finished_at, step.state === "RUNNING");
      row.querySelector(".err").textContent = step.error || "-";
    }
    for (const name of actions) {
      const button = document.getElementById(`action-${name}`);
      if (button) button.disabled = !(ACTION_STATES[name] || []).includes(next.state);
    }
  }

  function showView(view) {
    showStatus(view.status);
    document.getElementById("gantt").innerHTML = view.gantt;
    const log = document.getElementById("transitions");
    log.textContent = view.transitions.join("\n");
  }

  function follow() {
    if (events) events.close();
    events = new EventSource(`${base}/events`);
    live("live");
    events.addEventListener("update", (e) => { live("live"); showView(JSON.parse(e.data)); });
    events.addEventListener("end", (e) => {
      showView(JSON.parse(e.data));
      events.close(); events = null;
      live("");
    });
    events.addEventListener("failure", (e) => {
      const failure = JSON.parse(e.data);
      showError(failure.error);
      events.close(); events = null;
      live("");
      if (failure.code !== 2) {  // not "no such run": the daemon may be restarting
        live("retrying…");
        setTimeout(() => { if (!events) { showError(""); follow(); } }, 3000);
      }
    });
    events.onerror = () => live("reconnecting…");  // EventSource retries by itself
  }

  function openLog(stepId) {
    if (logStream) logStream.close();
    const pre = document.getElementById("log");
    pre.textContent = "";
    document.getElementById("log-section").hidden = false;
    document.getElementById("log-step").textContent = stepId;
    document.getElementById("log-attempt").textContent = "";
    document.getElementById("log-state").textContent = "following…";
    let shown = null;
    const stream = new EventSource(
      `${base}/logs/${encodeURIComponent(stepId)}?follow=1`);
    logStream = stream;
    stream.addEventListener("chunk", (e) => {
      const chunk = JSON.parse(e.data);
      if (shown !== null && chunk.attempt !== shown) {
        pre.append(`\n--- attempt ${chunk.attempt} ---\n`);
      }
      shown = chunk.attempt;
      document.getElementById("log-attempt").textContent = `attempt ${chunk.attempt}`;
      const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
      pre.append(chunk.text);
      if (atBottom) pre.scrollTop = pre.scrollHeight;
    });
    stream.addEventListener("end", (e) => {
      const end = JSON.parse(e.data);
      document.getElementById("log-state").textContent =
        end.attempt === null ? `${end.step_state}, never ran` : `${end.step_state}`;
      if (!pre.textContent) pre.append(end.attempt === null ? "(no attempt yet)" : "(no output)");
      stream.close();
    });
    stream.addEventListener("failure", (e) => {
      document.getElementById("log-state").textContent = JSON.parse(e.data).error;
      stream.close();
    });
  }

  async function act(name) {
    if (name === "cancel" &&
        !confirm(`Cancel run ${runId}? Its running steps are killed.`)) return;
    const button = document.getElementById(`action-${name}`);
    button.disabled = true;
    try {
      await postJSON(`${base}/${name}`);
      showError("");
      if (!events) follow();  // a resumed run goes on: watch it again
    } catch (e) {
      showError(`${name}: ${e.message}`);
      if (status) showStatus(status);
    }
  }

  document.getElementById("log-close").addEventListener("click", () => {
    if (logStream) logStream.close();
    document.getElementById("log-section").hidden = true;
  });
  document.getElementById("fit").addEventListener("click", (e) => {
    const fitted = dag.classList.toggle("fit");
    e.target.textContent = fitted ? "1:1" : "fit";
  });
  dag.addEventListener("click", (e) => {
    const node = e.target.closest("[data-step]");
    if (node) openLog(node.dataset.step);
  });

  getJSON(base).then((data) => {
    actions = data.actions;
    const bar = document.getElementById("actions");
    for (const name of actions) {
      const button = el("button", {type: "button", id: `action-${name}`,
                                   text: ACTION_LABELS[name] || name});
      button.addEventListener("click", () => act(name));
      bar.append(button);
    }
    dag.innerHTML = data.dag;
    showStatus(data.status);
    follow();
  }).catch((e) => showError(`run ${runId}: ${e.message}`));
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "runs") runsPage();
  else if (document.body.dataset.page === "run") runPage();
});
