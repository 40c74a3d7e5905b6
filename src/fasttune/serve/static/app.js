// The fasttune page. Runs: /api/runs (run directories as the CLI writes them), polled while a run trains.
// Chat: /v1/chat/completions with stream=true, read as server-sent events. No framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const COLORS = ["#2f6fde", "#d9480f"];
const state = { runs: [], selected: null, compare: "", messages: [], poll: null, busy: false };

// ---- HTTP --------------------------------------------------------------------------------------------

function headers(json) {
  const h = json ? { "Content-Type": "application/json" } : {};
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

async function errorOf(resp) {
  try {
    const body = await resp.json();
    if (body && body.error) return `${resp.status}: ${body.error.message}`;
  } catch (e) { /* not JSON */ }
  return `${resp.status} ${resp.statusText}`;
}

async function getJSON(path) {
  const resp = await fetch(path, { headers: headers(false) });
  if (!resp.ok) throw new Error(await errorOf(resp));
  return resp.json();
}

async function postJSON(path, body) {
  const resp = await fetch(path, { method: "POST", headers: headers(true), body: JSON.stringify(body) });
  if (!resp.ok) throw new Error(await errorOf(resp));
  return resp.json();
}

function el(tag, attrs = {}, text = "") {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== "") e.textContent = text;
  return e;
}

const fmt = (x, digits = 4) => (x === null || x === undefined ? "–" : typeof x === "number" ? +x.toFixed(digits) : x);

// ---- runs ---------------------------------------------------------------------------------------------

async function loadRuns() {
  let data;
  try { data = await getJSON("/api/runs"); } catch (e) { $("run-hint").textContent = String(e.message); return; }
  state.runs = data.runs;
  $("runs-root").textContent = data.root;
  const types = $("export-type");
  if (types.options.length === 0) {
    for (const t of data.gguf_types) types.append(el("option", { value: t }, t));
    types.value = data.gguf_default;
  }
  $("runs-empty").hidden = data.runs.length > 0;
  const list = $("run-list");
  list.replaceChildren();
  for (const r of data.runs) {
    const li = el("li", { "data-run": r.name });
    li.append(el("div", {}, r.name), el("div", { class: "meta" },
      `${r.state} · step ${fmt(r.step)} · loss ${fmt(r.loss, 3)}`));
    if (r.name === state.selected) li.classList.add("selected");
    li.onclick = () => selectRun(r.name);
    list.append(li);
  }
  const sel = $("compare");
  sel.replaceChildren(el("option", { value: "" }, "(none)"));
  for (const r of data.runs) if (r.name !== state.selected) sel.append(el("option", { value: r.name }, r.name));
  sel.value = state.compare;
}

async function selectRun(name) {
  state.selected = name;
  state.compare = "";
  $("export-status").textContent = "";
  await loadRuns();
  await showRun();
}

async function showRun() {
  if (!state.selected) return;
  let run, other = null;
  try {
    run = await getJSON(`/api/runs/${encodeURIComponent(state.selected)}`);
    if (state.compare) other = await getJSON(`/api/runs/${encodeURIComponent(state.compare)}`);
  } catch (e) { $("run-hint").textContent = String(e.message); return; }
  $("run-hint").hidden = true;
  $("run-body").hidden = false;
  $("run-title").textContent = run.name;
  $("run-state").textContent = run.state;
  $("run-state").className = "badge " + run.state;
  const runs = other ? [run, other] : [run];
  drawChart(runs);
  drawSummary(runs);
  drawAnswers(run);
  $("config").textContent = JSON.stringify(run.config, null, 2);
  clearTimeout(state.poll);  // live curves: read the run again while any shown run trains
  if (runs.some((r) => r.state === "training")) state.poll = setTimeout(() => { loadRuns(); showRun(); }, 3000);
}

// run.yaml's dataset: one path, or a mixed list of entries (a path, or {path, weight, ...})
function datasetText(value) {
  if (!Array.isArray(value)) return value;
  return value.map((e) => (typeof e === "string" ? e : e.weight == null ? e.path : `${e.path} (weight ${e.weight})`))
    .join(", ");
}

function drawSummary(runs) {
  const rows = [
    ["state", (r) => r.state], ["model", (r) => r.config.model?.model_name ?? r.config.model_name],
    ["dataset", (r) => datasetText(r.config.data?.dataset ?? r.config.dataset)], ["steps", (r) => r.summary.step],
    ["train loss (first → last)", (r) => `${fmt(r.summary.first_loss, 3)} → ${fmt(r.summary.loss, 3)}`],
    ["eval loss (first → last)", (r) => `${fmt(r.summary.first_eval_loss, 3)} → ${fmt(r.summary.eval_loss, 3)}`],
    ["exact match", (r) => fmt(r.summary.exact_match, 3)],
    ["tokens/s (mean)", (r) => fmt(r.summary.tokens_per_s, 1)],
    ["peak memory GiB", (r) => `${fmt(r.summary.memory_gib, 2)} ${r.summary.memory_kind ?? ""}`],
  ];
  const table = $("summary");
  table.replaceChildren();
  const head = el("tr");
  head.append(el("th"), ...runs.map((r, i) => el("th", { style: `color:${COLORS[i]}` }, r.name)));
  table.append(head);
  for (const [label, get] of rows) {
    const tr = el("tr");
    tr.append(el("th", {}, label), ...runs.map((r) => el("td", {}, String(get(r) ?? "–"))));
    table.append(tr);
  }
}

function drawAnswers(run) {
  const table = $("answers");
  table.replaceChildren();
  const a = run.answers;
  if (!a || !a.before || a.before.length === 0) {
    const tr = el("tr");
    tr.append(el("td", { class: "muted" }, "No answers recorded yet."));
    table.append(tr);
    return;
  }
  const head = el("tr");
  head.append(el("th", {}, "question"), el("th", {}, "before training"), el("th", {}, "after training"));
  table.append(head);
  a.before.forEach((b, i) => {
    const tr = el("tr");
    const after = a.after ? a.after[i]?.answer ?? "" : "(training…)";
    tr.append(el("td", {}, b.question), el("td", {}, b.answer), el("td", {}, after));
    table.append(tr);
  });
}

// One SVG: train loss solid, eval loss dashed, one colour per run.
function drawChart(runs) {
  const W = 760, H = 300, L = 52, R = 14, T = 12, B = 30;
  const series = [];
  runs.forEach((r, i) => {
    const train = r.metrics.filter((m) => m.kind === "train" && typeof m.loss === "number").map((m) => [m.step, m.loss]);
    const ev = r.metrics.filter((m) => m.kind === "eval" && typeof m.eval_loss === "number").map((m) => [m.step, m.eval_loss]);
    series.push({ run: r.name, kind: "train", color: COLORS[i], dash: "", pts: train });
    series.push({ run: r.name, kind: "eval", color: COLORS[i], dash: "6 4", pts: ev });
  });
  const all = series.flatMap((s) => s.pts);
  const chart = $("chart");
  if (all.length === 0) { chart.replaceChildren(el("p", { class: "muted" }, "No metrics yet.")); return; }
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const sx = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const sy = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  const parts = [];
  for (let k = 0; k <= 4; k++) {
    const y = y0 + ((y1 - y0) * k) / 4;
    parts.push(`<line class="gridline" x1="${L}" x2="${W - R}" y1="${sy(y)}" y2="${sy(y)}"/>`,
      `<text x="${L - 6}" y="${sy(y) + 4}" text-anchor="end">${y.toFixed(2)}</text>`);
    const x = x0 + ((x1 - x0) * k) / 4;
    parts.push(`<text x="${sx(x)}" y="${H - 10}" text-anchor="middle">${Math.round(x)}</text>`);
  }
  parts.push(`<line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>`,
    `<line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>`,
    `<text x="${W - R}" y="${H - B - 6}" text-anchor="end">step</text>`);
  let legend = 0;
  for (const s of series) {
    if (s.pts.length === 0) continue;
    const d = s.pts.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
    parts.push(`<polyline class="series" data-run="${s.run}" data-kind="${s.kind}" data-points="${s.pts.length}"
      points="${d}" fill="none" stroke="${s.color}" stroke-width="2" stroke-dasharray="${s.dash}"/>`);
    const ly = T + 14 * legend++;
    parts.push(`<line x1="${W - 190}" x2="${W - 166}" y1="${ly + 8}" y2="${ly + 8}" stroke="${s.color}"
      stroke-width="2" stroke-dasharray="${s.dash}"/>`, `<text x="${W - 160}" y="${ly + 12}">${s.run} ${s.kind} loss</text>`);
  }
  chart.innerHTML = `<svg viewBox="0 0 ${W} ${H}" preserveAspectRatio="none">${parts.join("")}</svg>`;
}

async function startExport() {
  const kind = $("export-kind").value;
  const body = kind === "merge" ? { kind } : { kind, type: $("export-type").value };
  const status = $("export-status");
  $("export-go").disabled = true;
  try {
    let job = await postJSON(`/api/runs/${encodeURIComponent(state.selected)}/export`, body);
    while (job.status === "running" || job.status === "checking") {
      status.textContent = `${job.kind} export: ${job.status}…`;
      await new Promise((ok) => setTimeout(ok, 1000));
      job = await getJSON(`/api/exports/${job.id}`);
    }
    status.dataset.status = job.status;
    status.textContent = job.status === "done"
      ? `wrote ${job.output} in ${job.seconds} s\n${job.check.summary}` : `export failed: ${job.error}`;
  } catch (e) {
    status.dataset.status = "failed";
    status.textContent = `export refused: ${e.message}`;
  } finally {
    $("export-go").disabled = false;
  }
}

// ---- chat ---------------------------------------------------------------------------------------------

function chatRequest() {
  const num = (id) => ($(id).value === "" ? undefined : Number($(id).value));
  const system = $("system").value.trim();
  const body = {
    model: state.model, stream: true, messages: (system ? [{ role: "system", content: system }] : []).concat(state.messages),
    temperature: num("temperature"), top_p: num("top_p"), max_tokens: num("max_tokens"), seed: num("seed"),
  };
  if ($("stop").value) body.stop = $("stop").value;
  return body;
}

function showChatError(message) {
  $("chat-error").textContent = message;
  $("chat-error").hidden = !message;
}

async function send(event) {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  showChatError("");
  state.busy = true;
  $("send").disabled = true;
  state.messages.push({ role: "user", content: text });
  $("messages").append(el("div", { class: "msg user" }, text));
  const out = el("div", { class: "msg assistant", "data-chunks": "0", "data-done": "false" });
  $("messages").append(out);
  const started = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", { method: "POST", headers: headers(true), body: JSON.stringify(chatRequest()) });
    if (!resp.ok) throw new Error(await errorOf(resp));
    const reader = resp.body.getReader(), decoder = new TextDecoder();
    let buffer = "", chunks = 0, first = null;
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, cut).replace(/^data: /, "");
        buffer = buffer.slice(cut + 2);
        if (line === "[DONE]") continue;
        const msg = JSON.parse(line);
        if (msg.error) throw new Error(msg.error.message);
        const piece = msg.choices[0]?.delta?.content;
        if (piece) {
          first = first ?? performance.now();
          out.textContent += piece;
          out.dataset.chunks = String(++chunks);
          $("messages").scrollTop = $("messages").scrollHeight;
        }
      }
    }
    state.messages.push({ role: "assistant", content: out.textContent });
    $("chat-stats").textContent = `${chunks} pieces; first after ${Math.round((first ?? performance.now()) - started)} ms, `
      + `all in ${Math.round(performance.now() - started)} ms`;
    $("prompt").value = "";
  } catch (e) {
    state.messages.pop();
    out.remove();
    showChatError(String(e.message));
  } finally {
    out.dataset.done = "true";
    state.busy = false;
    $("send").disabled = false;
  }
}

async function loadModel() {
  try {
    const models = await getJSON("/v1/models");
    state.model = models.data[0].id;
    $("model-id").textContent = state.model;
  } catch (e) { showChatError(String(e.message)); }
}

// ---- wiring -------------------------------------------------------------------------------------------

function showView(name) {
  for (const b of document.querySelectorAll(".tab")) b.classList.toggle("active", b.dataset.view === name);
  $("view-runs").hidden = name !== "runs";
  $("view-chat").hidden = name !== "chat";
  if (name === "chat" && !state.model) loadModel();
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
}

document.addEventListener("DOMContentLoaded", () => {
  $("api-key").value = localStorage.getItem("fasttune-api-key") || "";
  $("api-key").onchange = () => { localStorage.setItem("fasttune-api-key", $("api-key").value); loadRuns(); loadModel(); };
  for (const b of document.querySelectorAll(".tab")) b.onclick = () => showView(b.dataset.view);
  $("compare").onchange = () => { state.compare = $("compare").value; showRun(); };
  $("export-go").onclick = startExport;
  $("export-kind").onchange = () => { $("export-type").disabled = $("export-kind").value === "merge"; };
  $("chat-form").onsubmit = send;
  $("reset").onclick = () => { state.messages = []; $("messages").replaceChildren(); showChatError(""); };
  $("prompt").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); } };
  const fromHash = () => showView(location.hash === "#chat" ? "chat" : "runs");
  window.addEventListener("hashchange", fromHash);
  fromHash();
  loadRuns().then(() => { if (!state.selected && state.runs.length) selectRun(state.runs[0].name); });
  setInterval(loadRuns, 10000);
});
