// kbtune's training page: the form posts to /training/start, the status view polls /training/status,
// the Stop button posts /training/stop, the Try it card streams POST /models/{version}/generate.
// No framework and nothing fetched from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const state = {
  viewing: null,        // a session picked from the list; null = follow the running/most recent one
  current: null,        // the last status payload shown
  lastTerminalId: null, // refresh the versions when a session ends
  timer: null,
  versionsKey: "",
  auditKey: "", auditAt: 0, audit: {},
  generating: false,      // the version selects are rebuilt only when the list changes (an open select stays open)
};

// -- API -------------------------------------------------------------------------------------------
function token() {
  try { return localStorage.getItem("kbtune-token") || ""; } catch (e) { return ""; }
}

async function api(method, path, body) {
  const headers = { "Accept": "application/json" };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (token()) headers["Authorization"] = "Bearer " + token();
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (response.status === 401) $("token-box").hidden = false;
  return { status: response.status, ok: response.ok, data };
}

// -- formatting ------------------------------------------------------------------------------------
function fmtDuration(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "–";
  seconds = Math.max(0, Math.round(seconds));
  const h = Math.floor(seconds / 3600), m = Math.floor((seconds % 3600) / 60), s = seconds % 60;
  const mm = String(m).padStart(h ? 2 : 1, "0"), ss = String(s).padStart(2, "0");
  return h ? `${h}:${mm}:${ss}` : `${mm}:${ss}`;
}
const fmtNum = (v, digits = 4) => (typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "–");
const fmtDate = (iso) => (iso ? new Date(iso).toLocaleString() : "–");
const short = (id) => (id ? id.slice(0, 8) : "");

function text(el, value) { el.textContent = value; }

// -- theme -----------------------------------------------------------------------------------------
function applyTheme(theme) {
  document.documentElement.dataset.theme = theme;
  const next = theme === "dark" ? "light" : "dark";
  const button = $("theme-toggle");
  button.textContent = theme === "dark" ? "☀ Light theme" : "☾ Dark theme";
  button.setAttribute("aria-label", `Switch to the ${next} theme`);
  button.dataset.theme = theme;
  if (state.current) drawChart(state.current.progress);
}

function toggleTheme() {
  const theme = document.documentElement.dataset.theme === "dark" ? "light" : "dark";
  try { localStorage.setItem("kbtune-theme", theme); } catch (e) { /* private mode: not remembered */ }
  applyTheme(theme);
}

// -- the form --------------------------------------------------------------------------------------
// Values go to the API as typed: a number where the text is one, the raw text otherwise, so every
// message the user sees is the API's own.
function readValue(input) {
  const raw = input.value.trim();
  if (raw === "") return undefined;
  const kind = input.dataset.kind;
  if (kind === "text") return raw;
  const asNumber = Number(raw);
  if (!isFinite(asNumber)) return raw;
  if (kind === "float") return asNumber;
  return asNumber;
}

function clearErrors() {
  document.querySelectorAll(".field-error").forEach((el) => text(el, ""));
  document.querySelectorAll(".field.invalid").forEach((el) => el.classList.remove("invalid"));
  $("form-errors").replaceChildren();
}

function showErrors(detail) {
  const list = $("form-errors");
  const items = Array.isArray(detail) ? detail : [{ loc: ["body"], msg: String(detail) }];
  for (const item of items) {
    const field = Array.isArray(item.loc) && item.loc.length > 1 ? item.loc[item.loc.length - 1] : null;
    const slot = field ? document.querySelector(`.field-error[data-for="${CSS.escape(String(field))}"]`) : null;
    if (slot) {
      slot.textContent = slot.textContent ? `${slot.textContent}; ${item.msg}` : item.msg;
      slot.closest(".field").classList.add("invalid");
    } else {
      const li = document.createElement("li");
      li.textContent = field ? `${field}: ${item.msg}` : item.msg;
      list.appendChild(li);
    }
  }
}

async function submitForm(event) {
  event.preventDefault();
  clearErrors();
  const body = {};
  const form = $("training-form");
  const model = form.elements.model.value;
  if (model) body.model = model;
  form.querySelectorAll("input[name]").forEach((input) => {
    const value = readValue(input);
    if (value !== undefined) body[input.name] = value;
  });
  const overrides = form.elements.overrides.value.split("\n").map((line) => line.trim()).filter(Boolean);
  if (overrides.length) body.overrides = overrides;
  const button = $("start-button");
  button.disabled = true;
  try {
    const result = await api("POST", "/training/start", body);
    if (result.status === 201) {
      state.viewing = null;
      render(result.data);
      text($("action-message"), `Started session ${result.data.id}.`);
      refreshSessions();
    } else if (result.status === 422) {
      showErrors(result.data && result.data.detail);
    } else {
      showErrors((result.data && result.data.detail) || `HTTP ${result.status}`);
    }
  } catch (e) {
    showErrors(`The server did not answer: ${e}`);
  } finally {
    button.disabled = false;
    poll();
  }
}

// -- the status view -------------------------------------------------------------------------------
function render(s) {
  state.current = s;
  const badge = $("status-badge");
  if (!s) {
    badge.dataset.status = "none";
    text(badge, "no session");
    text($("session-line"), "No training yet: start one.");
    setProgress(0, "0%");
    $("stop-button").disabled = true;
    $("resume-button").hidden = true;
    $("error-text").hidden = true;
    drawChart(null);
    return;
  }
  const p = s.progress || {};
  const status = s.status;
  badge.dataset.status = status;
  text(badge, s.stop_requested ? "stopping…" : status);
  const model = (s.config && s.config.model && s.config.model.name) || "?";
  text($("session-line"), `Session ${s.id} · model ${model} · started ${fmtDate(s.started_at)}` +
    (p.phase && !["completed", "stopped", "failed"].includes(status) ? ` · ${p.phase}` : ""));

  let percent = typeof p.percent === "number" ? p.percent : 0;
  if (status === "completed") percent = 100;
  const steps = p.total_steps ? `${p.step} / ${p.total_steps}` : (p.step ?? "–");
  setProgress(percent, `${percent.toFixed(percent >= 100 ? 0 : 1)}%`);
  text($("m-step"), String(steps));
  text($("m-epoch"), p.epoch === undefined ? "–" : (p.max_epochs ? `${p.epoch + 1} / ${p.max_epochs}` : String(p.epoch + 1)));
  text($("m-elapsed"), fmtDuration(p.elapsed_s));
  text($("m-eta"), status === "running" ? fmtDuration(p.eta_s) : "–");
  text($("m-tokens"), typeof p.tokens_per_s === "number" ? Math.round(p.tokens_per_s).toLocaleString() : "–");
  const metrics = s.metrics || {};
  text($("m-train"), fmtNum(p.train_loss ?? metrics["train/loss"]));
  text($("m-val"), fmtNum(p.val_loss ?? metrics["val/loss"]));
  text($("m-ppl"), fmtNum(metrics["val/perplexity"], 2));

  const error = $("error-text");
  error.hidden = !(status === "failed" && s.error);
  text(error, status === "failed" ? (s.error || "") : "");

  const open = status === "running" || status === "pending";
  $("stop-button").disabled = !open || s.stop_requested;
  $("resume-button").hidden = !s.resumable;
  $("follow-button").hidden = state.viewing === null;
  drawChart(p);

  if (!open && state.lastTerminalId !== `${s.id}:${status}`) {
    state.lastTerminalId = `${s.id}:${status}`;
    refreshVersions();
    refreshSessions();
  }
}

function setProgress(percent, label) {
  const bar = $("progress");
  bar.setAttribute("aria-valuenow", String(Math.round(percent * 100) / 100));
  $("progress-fill").style.width = `${Math.max(0, Math.min(100, percent))}%`;
  text($("progress-label"), label);
}

// -- the loss chart (canvas, drawn by hand) --------------------------------------------------------
function drawChart(progress) {
  const canvas = $("loss-chart");
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 600, height = canvas.clientHeight || 260;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  const css = getComputedStyle(document.documentElement);
  const color = (name) => css.getPropertyValue(name).trim();
  ctx.clearRect(0, 0, width, height);

  const history = (progress && progress.history) || { train: [], val: [] };
  const train = history.train || [], val = history.val || [];
  canvas.dataset.trainPoints = String(train.length);
  canvas.dataset.valPoints = String(val.length);
  const all = train.concat(val);
  ctx.font = "12px system-ui, sans-serif";
  if (all.length === 0) {
    ctx.fillStyle = color("--muted");
    ctx.textAlign = "center";
    ctx.fillText("The loss chart appears with the first training steps.", width / 2, height / 2);
    return;
  }
  const pad = { left: 52, right: 14, top: 14, bottom: 34 };
  const plotW = width - pad.left - pad.right, plotH = height - pad.top - pad.bottom;
  const xMax = Math.max(progress.total_steps || 0, ...all.map((p) => p[0]), 1);
  let yMin = Math.min(...all.map((p) => p[1])), yMax = Math.max(...all.map((p) => p[1]));
  if (yMax - yMin < 1e-6) { yMin -= 0.5; yMax += 0.5; }
  const margin = (yMax - yMin) * 0.08;
  yMin -= margin; yMax += margin;
  const x = (step) => pad.left + (step / xMax) * plotW;
  const y = (loss) => pad.top + (1 - (loss - yMin) / (yMax - yMin)) * plotH;

  // grid and axes
  ctx.strokeStyle = color("--grid");
  ctx.fillStyle = color("--muted");
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const value = yMin + ((yMax - yMin) * i) / 4;
    const py = y(value);
    ctx.beginPath(); ctx.moveTo(pad.left, py); ctx.lineTo(width - pad.right, py); ctx.stroke();
    ctx.fillText(value.toFixed(2), pad.left - 6, py);
  }
  ctx.textAlign = "center";
  ctx.textBaseline = "top";
  for (let i = 0; i <= 4; i++) {
    const step = Math.round((xMax * i) / 4);
    ctx.fillText(String(step), x(step), height - pad.bottom + 6);
  }
  ctx.fillText("step", pad.left + plotW / 2, height - 14);

  const line = (points, stroke, dots) => {
    if (!points.length) return;
    ctx.strokeStyle = stroke;
    ctx.fillStyle = stroke;
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
    ctx.stroke();
    if (dots || points.length === 1) {
      for (const p of points) { ctx.beginPath(); ctx.arc(x(p[0]), y(p[1]), 3, 0, 2 * Math.PI); ctx.fill(); }
    }
  };
  line(train, color("--train"), false);
  line(val, color("--val"), true);

  // legend
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  const legend = [["train/loss", color("--train")], ["val/loss", color("--val")]];
  let lx = width - pad.right - 170;
  for (const [label, stroke] of legend) {
    ctx.fillStyle = stroke;
    ctx.fillRect(lx, pad.top + 4, 14, 3);
    ctx.fillStyle = color("--text");
    ctx.fillText(label, lx + 18, pad.top + 6);
    lx += 85;
  }
}

// -- actions ---------------------------------------------------------------------------------------
async function stopTraining() {
  const s = state.current;
  if (!s) return;
  $("stop-button").disabled = true;
  const result = await api("POST", `/training/stop?session_id=${encodeURIComponent(s.id)}`);
  if (result.ok) {
    render(result.data);
    text($("action-message"), "Stop requested: the current step finishes and a checkpoint is saved.");
  } else {
    text($("action-message"), (result.data && result.data.detail) || `Stop failed (HTTP ${result.status}).`);
  }
  poll();
}

async function resumeTraining() {
  const s = state.current;
  if (!s) return;
  const result = await api("POST", "/training/start", { resume: s.id });
  if (result.ok) {
    state.viewing = null;
    render(result.data);
    text($("action-message"), `Resumed session ${s.id}.`);
  } else {
    const detail = result.data && result.data.detail;
    text($("action-message"), typeof detail === "string" ? detail : `Resume failed (HTTP ${result.status}).`);
  }
  poll();
}

// -- listings --------------------------------------------------------------------------------------
function cell(row, value, code) {
  const td = document.createElement("td");
  if (code) { const c = document.createElement("code"); c.textContent = value; td.appendChild(c); } else td.textContent = value;
  row.appendChild(td);
}

function fillTable(table, rows, columns, build) {
  const body = table.querySelector("tbody");
  body.replaceChildren();
  if (!rows.length) {
    const tr = document.createElement("tr");
    const td = document.createElement("td");
    td.colSpan = columns; td.className = "muted"; td.textContent = "none yet";
    tr.appendChild(td); body.appendChild(tr);
    return;
  }
  rows.forEach((row) => body.appendChild(build(row)));
}

function fmtPct(value) {
  return typeof value === "number" ? `${(100 * value).toFixed(1)}%` : "-";
}

// The KB's change since the champion (or latest) and the versions trained on documents since deleted or
// changed: read again when the versions change, and at most every 30 s (each reads the whole KB).
async function refreshKbChange(key) {
  if (key === state.auditKey && Date.now() - state.auditAt < 30000) return;
  state.auditKey = key; state.auditAt = Date.now();
  const [diff, audit] = await Promise.all([api("GET", "/kb/diff"), api("GET", "/audit")]);
  text($("kb-diff"), diff.ok ? `Knowledge base: ${diff.data.summary}.` : "");
  state.audit = {};
  if (audit.ok) audit.data.versions.forEach((a) => { state.audit[a.version] = a; });
}

function versionCell(tr, v) {
  const td = document.createElement("td");
  td.textContent = v.version;
  const a = (state.audit || {})[v.version];
  if (a && a.affected) {
    const badge = document.createElement("span");
    badge.className = "audit-badge";
    badge.textContent = "KB changed";
    badge.title = `trained on ${a.deleted.length} documents since deleted and ${a.changed.length} since changed (kbtune audit)`;
    td.append(" ", badge);
  }
  tr.appendChild(td);
}

async function refreshVersions() {
  const result = await api("GET", "/models/versions");
  if (!result.ok) return;
  await refreshKbChange(JSON.stringify(result.data.map((v) => [v.version, v.aliases])));
  fillVersionSelects(result.data);
  fillTable($("versions-table"), result.data, 10, (v) => {
    const m = v.metrics || {};
    const tr = document.createElement("tr");
    versionCell(tr, v); cell(tr, v.id); cell(tr, short(v.training_session_id), true);
    cell(tr, fmtDate(v.created_at));
    const start = m["knowledge/start/recall_trained"];
    cell(tr, fmtPct(m["knowledge/recall_trained"]) + (typeof start === "number" ? ` (${fmtPct(start)})` : ""));
    cell(tr, fmtPct(m["knowledge/recall_heldout"])); cell(tr, fmtPct(m["knowledge/retain_perplexity_change"]));
    cell(tr, fmtNum(m["val/loss"])); cell(tr, (v.aliases || []).join(", "));
    const td = document.createElement("td");
    const button = document.createElement("button");
    button.type = "button"; button.textContent = "Details"; button.className = "details";
    button.addEventListener("click", () => showVersion(v.version));
    td.appendChild(button); tr.appendChild(td);
    return tr;
  });
}

async function showVersion(version) {
  const result = await api("GET", `/models/${encodeURIComponent(version)}/knowledge`);
  if (!result.ok) return;
  const d = result.data;
  $("version-detail").hidden = false;
  text($("version-detail-title"), `Version ${d.version}: what it learned`);
  text($("version-detail-message"), d.evaluated ? "" : "Not evaluated for knowledge yet (python scripts/evaluate.py version=" + d.version + ").");
  fillTable($("worst-table"), d.worst_trained, 6, (row) => {
    const tr = document.createElement("tr");
    cell(tr, row.document_id, true); cell(tr, String(row.probes)); cell(tr, fmtPct(row.recall));
    cell(tr, fmtPct(row.recall_before)); cell(tr, fmtNum(row.loss_after)); cell(tr, fmtNum(row.loss_before));
    return tr;
  });
  $("promote-button").onclick = () => promote(d.version, false);
}

async function promote(version, force) {
  text($("version-detail-message"), `Evaluating ${version} against the champion...`);
  const result = await api("POST", `/models/${encodeURIComponent(version)}/promote`, { alias: "champion", force });
  const detail = result.data && result.data.detail;
  if (result.status === 409 && !force) {
    text($("version-detail-message"), `Refused: ${detail}`);
    if (window.confirm(`Promotion refused:\n${detail}\n\nPromote anyway?`)) return promote(version, true);
    return;
  }
  text($("version-detail-message"), result.ok ? `${version} is now champion.` : `Promotion failed: ${fmtDetail(detail, result.status)}`);
  refreshVersions();
}

async function refreshSessions() {
  const result = await api("GET", "/training/sessions?limit=10");
  if (!result.ok) return;
  fillTable($("sessions-table"), result.data, 5, (s) => {
    const tr = document.createElement("tr");
    tr.dataset.id = s.id;
    if (state.current && state.current.id === s.id) tr.className = "selected";
    cell(tr, short(s.id), true); cell(tr, s.status);
    cell(tr, (s.config && s.config.model && s.config.model.name) || "?");
    cell(tr, fmtDate(s.started_at)); cell(tr, fmtNum((s.metrics || {})["val/loss"]));
    tr.addEventListener("click", () => { state.viewing = s.id; poll(); });
    return tr;
  });
}

// -- try it: stream a version's continuation (and a second version's, side by side) ---------------
function newestOrChampion(versions) {
  const champion = versions.find((v) => (v.aliases || []).includes("champion"));
  return champion || versions.reduce((a, b) => (Number(b.id) > Number(a.id) ? b : a));
}

function fillVersionSelects(versions) {
  const key = JSON.stringify(versions.map((v) => [v.version, v.aliases]));
  if (key === state.versionsKey) return;
  state.versionsKey = key;
  const first = versions.length ? newestOrChampion(versions) : null;
  const second = versions.find((v) => v !== first) || first;
  for (const [id, fallback] of [["try-version", first], ["try-version-b", second]]) {
    const select = $(id);
    const previous = select.value;
    select.replaceChildren(...versions.map((v) => {
      const option = document.createElement("option");
      option.value = v.version;
      option.textContent = v.version + ((v.aliases || []).length ? ` (${v.aliases.join(", ")})` : "");
      return option;
    }));
    select.value = versions.some((v) => v.version === previous) ? previous : (fallback ? fallback.version : "");
  }
  $("try-button").disabled = versions.length === 0 || state.generating;
  if (!versions.length) text($("try-message"), "No model version yet: train one first.");
  else if ($("try-message").textContent.startsWith("No model")) text($("try-message"), "");
}

function fmtDetail(detail, status) {
  if (Array.isArray(detail)) return detail.map((d) => `${(d.loc || []).slice(-1)[0]}: ${d.msg}`).join("; ");
  return detail ? String(detail) : `HTTP ${status}`;
}

// Server-sent events over fetch (EventSource cannot POST): `data:` lines carry JSON; a named event
// (done, error) applies to the data that follows it until the blank line ending the event.
async function streamInto(version, body, output, stats) {
  output.textContent = "";
  text(stats, "waiting for the first token…");
  const headers = { "Content-Type": "application/json", "Accept": "text/event-stream" };
  if (token()) headers["Authorization"] = "Bearer " + token();
  const started = performance.now();
  const response = await fetch(`/models/${encodeURIComponent(version)}/generate`,
    { method: "POST", headers, body: JSON.stringify(body) });
  if (!response.ok) {
    if (response.status === 401) $("token-box").hidden = false;
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    throw new Error(fmtDetail(data && data.detail, response.status));
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "", event = "message", first = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (line === "") { event = "message"; continue; }
      if (line.startsWith("event:")) { event = line.slice(6).trim(); continue; }
      if (!line.startsWith("data:")) continue;
      const data = JSON.parse(line.slice(5));
      if (event === "error") throw new Error(data.detail);
      if (event === "done") {
        const firstText = first === null ? "no text: the model ended at once" : `first text after ${first.toFixed(2)} s`;
        text(stats, `${data.tokens} tokens in ${data.seconds.toFixed(2)} s · ${firstText}`);
      } else {
        if (first === null) first = (performance.now() - started) / 1000;
        output.textContent += data.text;
      }
    }
  }
}

async function tryGenerate(event) {
  event.preventDefault();
  const raw = $("try-max-tokens").value.trim();
  // Sent as typed (a number where it is one) so the message for a bad value is the API's own.
  const body = { prompt: $("try-prompt").value, stream: true };
  if (raw !== "") body.max_new_tokens = isFinite(Number(raw)) ? Number(raw) : raw;
  const compare = $("try-compare").checked;
  const panes = [[$("try-version").value, "try-output", "try-stats", "try-label"]];
  if (compare) panes.push([$("try-version-b").value, "try-output-b", "try-stats-b", "try-label-b"]);
  $("try-pane-b").hidden = !compare;
  $("try-outputs").classList.toggle("compare", compare);
  state.generating = true;
  $("try-button").disabled = true;
  text($("try-message"), "Generating…");
  const results = await Promise.allSettled(panes.map(([version, output, stats, label]) => {
    text($(label), `Version ${version}`);
    return streamInto(version, body, $(output), $(stats));
  }));
  results.forEach((r, i) => { if (r.status === "rejected") text($(panes[i][2]), `Failed: ${r.reason.message || r.reason}`); });
  state.generating = false;
  $("try-button").disabled = !$("try-version").value;
  text($("try-message"), results.every((r) => r.status === "fulfilled") ? "" : "Generation failed: see below.");
}

// -- polling ---------------------------------------------------------------------------------------
async function poll() {
  clearTimeout(state.timer);
  let open = false;
  try {
    const path = state.viewing ? `/training/status?session_id=${encodeURIComponent(state.viewing)}` : "/training/status";
    const result = await api("GET", path);
    if (result.ok) {
      render(result.data);
      open = result.data.status === "running" || result.data.status === "pending";
    } else if (result.status === 404 && !state.viewing) {
      render(null);
    }
  } catch (e) {
    text($("action-message"), `The server did not answer: ${e}`);
  }
  // Once a second while a training runs; slower when idle (another client may start one). The
  // listings follow while idle: a version is registered just after its session reads completed.
  if (!open) { refreshVersions(); refreshSessions(); }
  state.timer = setTimeout(poll, open ? 1000 : 4000);
}

function init() {
  applyTheme(document.documentElement.dataset.theme === "dark" ? "dark" : "light");
  $("theme-toggle").addEventListener("click", toggleTheme);
  $("training-form").addEventListener("submit", submitForm);
  $("stop-button").addEventListener("click", stopTraining);
  $("resume-button").addEventListener("click", resumeTraining);
  $("follow-button").addEventListener("click", () => { state.viewing = null; poll(); });
  $("try-form").addEventListener("submit", tryGenerate);
  $("try-compare").addEventListener("change", () => { $("try-version-b").disabled = !$("try-compare").checked; });
  const input = $("token-input");
  input.value = token();
  input.addEventListener("change", () => {
    try { localStorage.setItem("kbtune-token", input.value.trim()); } catch (e) {}
    poll(); refreshVersions(); refreshSessions();
  });
  window.addEventListener("resize", () => state.current && drawChart(state.current.progress));
  poll();
  refreshVersions();
  refreshSessions();
}

document.addEventListener("DOMContentLoaded", init);
