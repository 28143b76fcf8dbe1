/* prefloop web page: chat (streamed), feedback on every answer, blind compare, models view.
 *
 * Plain browser JavaScript, no library, no build step. Talks to the same origin's HTTP API:
 *   POST /v1/chat/completions (stream: SSE), POST /v1/feedback/rating, POST /v1/feedback/preference,
 *   GET /v1/whoami, GET /v1/admin/{versions,jobs,ab,feedback/daily}, POST /v1/admin/{promote,rollback}.
 * The bearer token (if the server has auth on) is entered once and kept in sessionStorage.
 * All text from the model or the server is inserted with textContent (never as HTML).
 * docs/web.md describes the views and the feedback semantics.
 */
"use strict";

const TOKEN_KEY = "prefloop.token";
const FEEDBACK_ATTEMPTS = 4; // one try + 3 retries on network errors / 502 / 503 / 504

// ---- small helpers -------------------------------------------------------------------------------

const $ = (sel, root = document) => root.querySelector(sel);
const byTestId = (id, root = document) => root.querySelector(`[data-testid="${id}"]`);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return node;
}

/** A random UUID; crypto.randomUUID exists only in secure contexts (https, localhost). */
function uuid() {
  if (window.crypto && typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const b = crypto.getRandomValues(new Uint8Array(16));
  b[6] = (b[6] & 0x0f) | 0x40;
  b[8] = (b[8] & 0x3f) | 0x80;
  const h = [...b].map((x) => x.toString(16).padStart(2, "0")).join("");
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function shuffle2() { return Math.random() < 0.5 ? [0, 1] : [1, 0]; }

function fmtNum(x, digits = 3) {
  return typeof x === "number" && isFinite(x) ? x.toFixed(digits) : "–";
}

function fmtDate(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toISOString().slice(0, 16).replace("T", " ");
}

// ---- API -----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, body) {
    super(message);
    this.status = status;
    this.body = body;
  }
}

function headers(json = true) {
  const h = {};
  if (json) h["Content-Type"] = "application/json";
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (token) h["Authorization"] = `Bearer ${token}`;
  return h;
}

/** The server's error message from an error response (OpenAI body), else the status line. */
async function errorFrom(res) {
  let body = null;
  try { body = await res.json(); } catch (_) { /* not JSON */ }
  const msg = body && body.error && body.error.message;
  return new ApiError(res.status, msg || `HTTP ${res.status} ${res.statusText}`, body);
}

async function api(method, path, body) {
  const res = await fetch(path, {
    method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!res.ok) throw await errorFrom(res);
  return res.json();
}

/** POST feedback with its idempotency key; retried (same key) on network errors and 502/503/504,
 * so a retry of a vote the server already stored is answered as a duplicate, never stored twice. */
async function postFeedback(path, body) {
  body = { ...body, idempotency_key: body.idempotency_key || uuid(), session_id: state.sessionId };
  let lastError = null;
  for (let attempt = 0; attempt < FEEDBACK_ATTEMPTS; attempt++) {
    if (attempt) await sleep(400 * 2 ** (attempt - 1));
    let res;
    try {
      res = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body) });
    } catch (err) { // network error: the request may or may not have arrived; the key makes it safe
      lastError = new ApiError(0, `network error: ${err.message}`);
      continue;
    }
    if (res.ok) return res.json();
    lastError = await errorFrom(res);
    if (![502, 503, 504].includes(res.status)) break;
  }
  throw lastError;
}

// ---- state ---------------------------------------------------------------------------------------

const state = {
  role: "anonymous",
  auth: false,
  sessionId: uuid(),
  history: [],       // [{role, content}] sent with the next message
  controller: null,  // AbortController of the answer being streamed
};

// ---- auth and views ------------------------------------------------------------------------------

function banner(message) {
  const b = byTestId("banner");
  b.textContent = message || "";
  b.hidden = !message;
}

async function loadWhoami() {
  const form = byTestId("token-form");
  const forget = byTestId("token-forget");
  const hasToken = !!sessionStorage.getItem(TOKEN_KEY);
  try {
    const who = await api("GET", "/v1/whoami"); // no token yet: {"role": "none", "auth": true}
    state.role = who.role;
    state.auth = !!who.auth;
    banner(state.auth && state.role === "none" ? "This server needs an access token." : "");
  } catch (err) {
    state.role = "none";
    state.auth = true;
    if (err.status === 401) {
      banner(hasToken ? `The token was refused: ${err.message}` : "This server needs an access token.");
    } else {
      banner(`Cannot reach the server: ${err.message}`);
    }
  }
  const admin = state.role === "admin" || (state.role === "anonymous" && !state.auth);
  byTestId("role").textContent = state.auth ? (state.role === "none" ? "not signed in" : state.role) : "";
  form.hidden = !(state.auth && state.role === "none"); // "Forget token" brings it back
  forget.hidden = !hasToken;
  byTestId("nav-models").hidden = !admin;
  if (!admin && currentView() === "models") showView("chat");
}

function currentView() {
  return byTestId("models-view").hidden ? "chat" : "models";
}

function showView(name) {
  byTestId("chat-view").hidden = name !== "chat";
  byTestId("models-view").hidden = name !== "models";
  for (const tab of document.querySelectorAll(".tab")) {
    tab.classList.toggle("active", tab.dataset.view === name);
  }
  if (name === "models") loadModels();
}

// ---- chat ----------------------------------------------------------------------------------------

function sampling() {
  const body = {};
  const maxTokens = parseInt(byTestId("max-tokens").value, 10);
  if (maxTokens > 0) body.max_tokens = maxTokens;
  const temperature = parseFloat(byTestId("temperature").value);
  if (isFinite(temperature)) body.temperature = temperature;
  // empty: left out (the server's default); any number is sent as typed (the composer is
  // novalidate: the drawer is closed when Send is pressed, so the browser could not show why it
  // refused), and an out-of-range one gets the server's message in the answer
  // (e.g. "frequency_penalty must be in [-2, 2]")
  for (const name of ["repetition", "frequency", "presence"]) {
    const value = parseFloat(byTestId(name + "-penalty").value);
    if (isFinite(value)) body[name + "_penalty"] = value;
  }
  return body;
}

function setBusy(busy) {
  byTestId("send").disabled = busy;
  byTestId("stop").disabled = !busy;
  byTestId("compare-toggle").disabled = busy;
}

function scrollDown() {
  const m = byTestId("messages");
  m.scrollTop = m.scrollHeight;
  window.scrollTo(0, document.body.scrollHeight);
}

function addUserMessage(text) {
  const hint = $(".empty-hint");
  if (hint) hint.remove();
  byTestId("messages").append(el("div", { class: "msg user", "data-testid": "user-message" },
    el("div", { class: "bubble", text })));
}

/** A new assistant message element from the template. */
function newAnswer() {
  const node = $("#answer-template").content.firstElementChild.cloneNode(true);
  node.answer = { text: "", responseId: null, version: null, rating: 0, prompt: null };
  return node;
}

function setAnswerIds(node, responseId, version, revealVersion = true) {
  const a = node.answer;
  if (responseId && !a.responseId) {
    a.responseId = responseId;
    node.dataset.responseId = responseId;
  }
  if (version && !a.version) a.version = version;
  if (revealVersion && a.version) {
    node.dataset.modelVersion = a.version;
    byTestId("answer-version", node).textContent = a.version;
  }
}

function appendText(node, delta) {
  node.answer.text += delta;
  $(".text", node).textContent = node.answer.text;
}

function finishAnswer(node, how) {
  node.classList.remove("streaming");
  node.dataset.state = how; // "done" | "stopped" | "error"
  const s = byTestId("answer-state", node);
  if (how === "stopped") s.textContent = "stopped";
}

function showAnswerError(node, message) {
  node.classList.add("failed");
  node.append(el("p", { class: "error", "data-testid": "chat-error", text: message }));
}

/** Stream one chat completion; `onChunk(choice, chunk)` gets every choice of every SSE event. */
async function streamChat(body, signal, onChunk) {
  const res = await fetch("/v1/chat/completions", {
    method: "POST", headers: headers(), body: JSON.stringify({ ...body, stream: true }), signal,
  });
  if (!res.ok) throw await errorFrom(res);
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, cut).replace(/\r$/, "");
      buffer = buffer.slice(cut + 1);
      if (!line.startsWith("data:")) continue;
      const data = line.slice(5).trim();
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new ApiError(500, chunk.error.message || "stream error", chunk);
      for (const choice of chunk.choices || []) onChunk(choice, chunk);
    }
  }
}

async function send() {
  const promptBox = byTestId("prompt");
  const text = promptBox.value.trim();
  if (!text || state.controller) return;
  promptBox.value = "";
  addUserMessage(text);
  state.history.push({ role: "user", content: text });
  const messages = state.history.slice();
  const compare = byTestId("compare-toggle").checked;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    if (compare) await sendCompare(messages, controller);
    else await sendSingle(messages, controller);
  } finally {
    state.controller = null;
    setBusy(false);
    promptBox.focus();
  }
}

async function sendSingle(messages, controller) {
  const node = newAnswer();
  node.answer.prompt = messages;
  node.classList.add("streaming");
  byTestId("messages").append(node);
  wireFeedback(node);
  const body = { messages, session_id: state.sessionId, ...sampling() };
  try {
    await streamChat(body, controller.signal, (choice, chunk) => {
      setAnswerIds(node, choice.response_id, choice.model_version || chunk.model_version);
      if (choice.delta && choice.delta.content) appendText(node, choice.delta.content);
      scrollDown();
    });
    finishAnswer(node, "done");
  } catch (err) {
    if (controller.signal.aborted) finishAnswer(node, "stopped");
    else { finishAnswer(node, "error"); showAnswerError(node, err.message); }
  }
  if (node.answer.text) state.history.push({ role: "assistant", content: node.answer.text });
  else if (!node.answer.responseId) state.history.pop(); // nothing came back: retry is a resend
}

function stop() {
  if (state.controller) state.controller.abort(); // the server aborts the request in the engine
}

function newChat() {
  stop();
  state.history = [];
  state.sessionId = uuid();
  const m = byTestId("messages");
  m.replaceChildren(el("p", { class: "empty-hint", text: "New chat. Ask something." }));
  byTestId("prompt").focus();
}

// ---- feedback on one answer ----------------------------------------------------------------------

function voteStatus(container, ok, message) {
  const s = $(".vote-status", container);
  s.textContent = message;
  s.className = `vote-status ${ok ? "ok" : "error"}`;
  s.dataset.testid = ok ? "vote-saved" : "vote-error";
}

function voteSending(container) {
  const s = $(".vote-status", container);
  s.textContent = "saving…";
  s.className = "vote-status pending";
  s.dataset.testid = "vote-pending";
}

/** Thumbs: the page keeps the net score of this answer (-1, 0, +1). A click on the pressed thumb
 * takes the vote back by sending the opposite score (the two cancel in every average); a click on
 * the other thumb sends the opposite score twice (take back, then vote). */
async function thumb(node, score) {
  const a = node.answer;
  if (!a.responseId) return;
  const target = a.rating === score ? 0 : score;
  const steps = [];
  let net = a.rating;
  while (net !== target) {
    const step = target > net ? 1 : -1;
    steps.push({ score: step, comment: net !== 0 ? `takes back an earlier ${net > 0 ? "+1" : "-1"}` : "" });
    net += step;
  }
  const buttons = [byTestId("thumbs-up", node), byTestId("thumbs-down", node)];
  buttons.forEach((b) => (b.disabled = true));
  voteSending(node);
  try {
    for (const step of steps) {
      await postFeedback("/v1/feedback/rating", {
        response_id: a.responseId, score: step.score, scale: "thumbs",
        comment: step.comment || undefined,
      });
      a.rating += step.score;
    }
    voteStatus(node, true, a.rating === 0 ? "saved (vote taken back)" : "saved");
  } catch (err) {
    voteStatus(node, false, `not saved: ${err.message}`);
  } finally {
    buttons.forEach((b) => (b.disabled = false));
    byTestId("thumbs-up", node).setAttribute("aria-pressed", String(a.rating > 0));
    byTestId("thumbs-down", node).setAttribute("aria-pressed", String(a.rating < 0));
  }
}

/** Edit: the user's rewrite is recorded as a preference over the model's answer (text form). */
async function saveEdit(node) {
  const a = node.answer;
  const form = $(".edit-form", node);
  const mine = byTestId("edit-text", node).value.trim();
  if (!mine || mine === a.text.trim()) { form.hidden = true; return; }
  const save = byTestId("edit-save", node);
  save.disabled = true;
  voteSending(node);
  try {
    await postFeedback("/v1/feedback/preference", {
      prompt_messages: a.prompt, chosen_text: mine, rejected_text: a.text,
      comment: "user rewrite in the web page",
    });
    voteStatus(node, true, "saved: your answer is recorded as the better one");
    form.hidden = true;
    node.classList.add("edited");
    const original = a.text;
    a.text = mine;
    $(".text", node).textContent = mine;
    $(".bubble", node).title = `model's answer: ${original}`;
    // the conversation goes on from the user's answer
    const i = state.history.findIndex((m) => m.role === "assistant" && m.content === original);
    if (i >= 0) state.history[i] = { role: "assistant", content: mine };
  } catch (err) {
    voteStatus(node, false, `not saved: ${err.message}`);
  } finally {
    save.disabled = false;
  }
}

function wireFeedback(node) {
  byTestId("thumbs-up", node).addEventListener("click", () => thumb(node, 1));
  byTestId("thumbs-down", node).addEventListener("click", () => thumb(node, -1));
  byTestId("edit", node).addEventListener("click", () => {
    const form = $(".edit-form", node);
    form.hidden = !form.hidden;
    if (!form.hidden) {
      const box = byTestId("edit-text", node);
      box.value = node.answer.text;
      box.focus();
    }
  });
  byTestId("edit-cancel", node).addEventListener("click", () => { $(".edit-form", node).hidden = true; });
  $(".edit-form", node).addEventListener("submit", (e) => { e.preventDefault(); saveEdit(node); });
}

// ---- compare (blind A / B) -----------------------------------------------------------------------

async function sendCompare(messages, controller) {
  const order = shuffle2(); // order[slot] = the choice index shown in that slot (A = 0, B = 1)
  const panes = [newAnswer(), newAnswer()];
  const pickButtons = [
    ["pick-a", "A is better"], ["pick-b", "B is better"], ["pick-tie", "Tie"], ["pick-bad", "Both bad"],
  ].map(([id, label]) => el("button", { type: "button", "data-testid": id, disabled: true, text: label }));
  const block = el("div", { class: "compare", "data-testid": "compare" },
    el("div", { class: "panes" }, ...panes),
    el("div", { class: "picks" }, ...pickButtons, el("span", { class: "vote-status" })));
  panes.forEach((p, slot) => {
    p.classList.add("pane", "streaming");
    p.dataset.slot = "AB"[slot];
    p.answer.prompt = messages;
    $(".fb", p).remove(); // in compare mode the vote is the pick
    $(".edit-form", p).remove();
    $(".vote-status", p).remove(); // the block's status line says whether the pick was saved
    $(".bubble", p).prepend(el("span", { class: "slot", text: "AB"[slot] }));
    $(".text", p).before(document.createTextNode(" "));
  });
  byTestId("messages").append(block);
  const body = { messages, session_id: state.sessionId, compare: true, ...sampling() };
  let failed = null;
  try {
    await streamChat(body, controller.signal, (choice, chunk) => {
      const slot = order.indexOf(choice.index);
      if (slot < 0) return;
      // blind: the version is kept, not shown, until the vote
      setAnswerIds(panes[slot], choice.response_id, choice.model_version || chunk.model_version, false);
      if (choice.delta && choice.delta.content) appendText(panes[slot], choice.delta.content);
      scrollDown();
    });
  } catch (err) {
    failed = controller.signal.aborted ? null : err;
  }
  panes.forEach((p) => finishAnswer(p, failed ? "error" : controller.signal.aborted ? "stopped" : "done"));
  if (failed) showAnswerError(block, failed.message);
  const usable = panes.every((p) => p.answer.responseId);
  if (usable) {
    pickButtons.forEach((b) => (b.disabled = false));
    pickButtons.forEach((b, i) => b.addEventListener("click", () => pick(block, panes, pickButtons, i)));
    // the conversation goes on from A until the user picks
    state.history.push({ role: "assistant", content: panes[0].answer.text });
  } else {
    state.history.pop();
  }
}

/** pick: 0 = A, 1 = B, 2 = tie, 3 = both bad. A or B: one preference, the picked response chosen
 * over the other. Tie: nothing is sent (a tie says nothing about which is better). Both bad: a
 * thumbs-down rating on each answer. Then the versions are revealed. */
async function pick(block, panes, buttons, choice) {
  buttons.forEach((b) => (b.disabled = true));
  voteSending(block);
  try {
    if (choice === 0 || choice === 1) {
      const chosen = panes[choice].answer, rejected = panes[1 - choice].answer;
      await postFeedback("/v1/feedback/preference", {
        chosen_response_id: chosen.responseId, rejected_response_id: rejected.responseId,
        comment: "blind compare in the web page",
      });
      const last = state.history[state.history.length - 1];
      if (last && last.role === "assistant") last.content = chosen.text;
      voteStatus(block, true, `saved: ${"AB"[choice]} is better`);
    } else if (choice === 3) {
      for (const p of panes) {
        await postFeedback("/v1/feedback/rating", {
          response_id: p.answer.responseId, score: -1, scale: "thumbs",
          comment: "both bad in a blind compare",
        });
      }
      voteStatus(block, true, "saved: both answers rated bad");
    } else {
      voteStatus(block, true, "saved: tie (nothing sent; a tie prefers neither)");
    }
    block.dataset.picked = ["A", "B", "tie", "bad"][choice];
    buttons[choice].classList.add("picked");
    panes.forEach((p) => {
      setAnswerIds(p, null, null, true); // reveal
      if ((choice === 0 || choice === 1) && p === panes[choice]) p.classList.add("winner");
    });
  } catch (err) {
    voteStatus(block, false, `not saved: ${err.message}`);
    buttons.forEach((b) => (b.disabled = false));
  }
}

// ---- models view ---------------------------------------------------------------------------------

function modelsMsg(message, ok = false) {
  const m = byTestId("models-msg");
  m.textContent = message || "";
  m.className = `models-msg ${ok ? "ok" : "error"}`;
  m.hidden = !message;
}

/** A number of the version's summary (server/version_summary.py), or null. */
function summaryNumber(v, field) {
  const x = (v.summary || {})[field];
  return typeof x === "number" && isFinite(x) ? x : null;
}

const heldoutAccuracy = (v) => summaryNumber(v, "heldout_accuracy");
const klPerToken = (v) => summaryNumber(v, "kl_per_token");
/** The live A/B win rate when the version is in a test, else the gate's. */
const winRate = (v) => summaryNumber(v, "ab_win_rate") ?? summaryNumber(v, "gate_win_rate");

function gateText(v) {
  const g = v.gate;
  if (!g || typeof g.passed !== "boolean") return { text: v.method === "base" ? "base" : "not gated", cls: "" };
  const acc = heldoutAccuracy(v), cur = summaryNumber(v, "current_accuracy");
  let text = g.passed ? "passed" : "failed";
  if (typeof acc === "number" && typeof cur === "number") text += ` (${fmtNum(acc)} vs ${fmtNum(cur)})`;
  return { text, cls: g.passed ? "pass" : "fail", title: (g.reasons || []).join("\n") };
}

async function promote(version) {
  const reason = byTestId("action-reason").value || "web page";
  const force = byTestId("promote-force").checked;
  modelsMsg(`promoting ${version}…`, true);
  try {
    const r = await api("POST", "/v1/admin/promote", { version, reason, force });
    modelsMsg(`promoted: ${r.previous_version} → ${r.current_version}`, true);
  } catch (err) {
    modelsMsg(`promote failed: ${err.message}`);
  }
  loadModels(false);
}

async function rollback() {
  const reason = byTestId("action-reason").value || "web page";
  modelsMsg("rolling back…", true);
  try {
    const r = await api("POST", "/v1/admin/rollback", { reason });
    modelsMsg(`rolled back: ${r.previous_version} → ${r.current_version}`, true);
  } catch (err) {
    modelsMsg(`rollback failed: ${err.message}`);
  }
  loadModels(false);
}

function renderVersions(data) {
  const tbody = $("tbody", byTestId("versions-table"));
  tbody.replaceChildren();
  byTestId("serving").textContent =
    `current ${data.current_version || "–"} · serving ${data.serving_version || "–"}`;
  const versions = data.versions || [];
  for (const v of versions.slice().reverse()) { // newest first
    const gate = gateText(v);
    const isCurrent = v.current || v.version === data.current_version;
    const kl = klPerToken(v);
    const action = isCurrent
      ? el("span", { class: "badge", text: v.version === data.serving_version ? "serving" : "current" })
      : (v.kind && v.kind !== "policy")
        ? el("span", { class: "muted", text: v.kind })
        : el("button", { type: "button", class: "secondary", "data-testid": "promote",
                         "data-version": v.version, onclick: () => promote(v.version), text: "Promote" });
    tbody.append(el("tr", { "data-version": v.version, class: isCurrent ? "current" : "" },
      el("td", { text: v.version }),
      el("td", { text: v.parent || "" }),
      el("td", { text: v.method || "" }),
      el("td", { text: fmtDate(v.created_at) }),
      el("td", { class: gate.cls, title: gate.title, text: gate.text }),
      el("td", { text: fmtNum(heldoutAccuracy(v)) }),
      el("td", { text: kl === null ? "–" : fmtNum(kl, 4) }),
      el("td", { "data-testid": "root-kl", text: fmtNum(summaryNumber(v, "kl_to_root"), 4) }),
      el("td", {}, action)));
  }
  drawQualityChart(byTestId("chart-quality"), versions);
}

// the columns of the job history: one JobRecord per job (server/jobs.py), newest first
const JOB_COLUMNS = ["job", "status", "method", "base → version", "started", "finished", "gate",
  "rows (train / held-out)", "reason"];

function jobGate(gate) {
  if (!gate || typeof gate.passed !== "boolean") return { text: "–", cls: "", title: "" };
  const failed = Array.isArray(gate.failed) && gate.failed.length ? ` (${gate.failed.join(", ")})` : "";
  return { text: (gate.passed ? "passed" : "failed") + failed, cls: gate.passed ? "pass" : "fail",
           title: (gate.reasons || []).join("\n") };
}

function jobRows(data) {
  const rows = (data && data.rows) || {};
  if (rows.train === undefined && rows.heldout === undefined) return "–";
  return `${rows.train ?? "–"} / ${rows.heldout ?? "–"}`;
}

function renderJobs(data) {
  const table = byTestId("jobs-table");
  const jobs = (data.jobs || []).slice().reverse(); // newest first
  $("thead", table).replaceChildren(el("tr", {}, ...JOB_COLUMNS.map((c) => el("th", { text: c }))));
  const tbody = $("tbody", table);
  tbody.replaceChildren();
  if (!jobs.length) {
    tbody.append(el("tr", {}, el("td", { class: "muted", colspan: JOB_COLUMNS.length, text: "no jobs yet" })));
    return;
  }
  for (const j of jobs.slice(0, 50)) {
    const gate = jobGate(j.gate);
    const what = [j.command, j.method].filter((x, i, all) => x && all.indexOf(x) === i).join(" · ");
    const versions = j.base || j.version ? `${j.base || "–"} → ${j.version || "–"}` : "–";
    tbody.append(el("tr", { "data-job-id": j.job_id, "data-status": j.status },
      el("td", { text: j.job_id }),
      el("td", { class: `job-status ${j.status}`, "data-testid": "job-status", text: j.status }),
      el("td", { text: what || "–" }),
      el("td", { text: versions }),
      el("td", { text: fmtDate(j.started_at) }),
      el("td", { text: fmtDate(j.finished_at) }),
      el("td", { class: gate.cls, title: gate.title || undefined, text: gate.text }),
      el("td", { text: jobRows(j.data) }),
      el("td", { class: "reason", title: j.reason || undefined, text: j.reason || "" })));
  }
}

function renderAb(data) {
  const box = byTestId("ab-status");
  box.replaceChildren();
  if (!data || !data.running) {
    box.append(el("p", { class: "muted", text: "No A/B test is running." }));
    if (data && data.status && data.candidate) {  // the last test, and the evidence that ended it
      box.append(el("p", { "data-testid": "ab-last", text:
        `Last test: ${data.candidate} vs ${data.control}, ${data.status} ${data.decided_at || ""}` +
        (data.reason ? ` — ${data.reason}` : "") }));
    }
    return;
  }
  const dl = el("dl", { class: "kv" });
  for (const [k, v] of Object.entries(data)) {
    dl.append(el("dt", { text: k.replace(/_/g, " ") }),
      el("dd", { text: v && typeof v === "object" ? JSON.stringify(v) : String(v) }));
  }
  box.append(dl);
}

async function loadModels(clearMsg = true) {
  if (clearMsg) modelsMsg("");
  const parts = [
    ["versions", "/v1/admin/versions", renderVersions],
    ["jobs", "/v1/admin/jobs", renderJobs],
    ["A/B status", "/v1/admin/ab", renderAb],
    ["votes per day", "/v1/admin/feedback/daily", (d) => drawVotesChart(byTestId("chart-votes"), d.days || [])],
  ];
  const errors = [];
  await Promise.all(parts.map(async ([name, path, render]) => {
    try { render(await api("GET", path)); } catch (err) { errors.push(`${name}: ${err.message}`); }
  }));
  if (errors.length) {
    const m = byTestId("models-msg");
    const prefix = m.hidden ? "" : `${m.textContent} · `;
    modelsMsg(prefix + errors.join(" · "));
  }
  byTestId("models-view").dataset.loaded = String(Date.now());
}

// ---- charts (inline SVG, drawn here) -------------------------------------------------------------

const SVG_NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

const CHART = { w: 480, h: 220, left: 40, right: 24, top: 14, bottom: 44 };

function chartFrame(label) {
  const root = svg("svg", { viewBox: `0 0 ${CHART.w} ${CHART.h}`, role: "img", "aria-label": label,
                            preserveAspectRatio: "xMidYMid meet" });
  return root;
}

function yAxis(root, max, ticks, fmt) {
  const { w, h, left, right, top, bottom } = CHART;
  const plotH = h - top - bottom;
  for (let i = 0; i <= ticks; i++) {
    const v = (max * i) / ticks;
    const y = top + plotH - (plotH * i) / ticks;
    root.append(svg("line", { x1: left, x2: w - right, y1: y, y2: y, class: "grid" }));
    root.append(svg("text", { x: left - 6, y: y + 4, "text-anchor": "end", class: "tick" }, fmt(v)));
  }
}

function xLabels(root, labels, xOf) {
  const step = Math.max(1, Math.ceil(labels.length / 8));
  labels.forEach((l, i) => {
    if (i % step && i !== labels.length - 1) return;
    root.append(svg("text", { x: xOf(i), y: CHART.h - CHART.bottom + 16, "text-anchor": "middle",
                              class: "tick" }, l));
  });
}

function legend(root, items) {
  let x = CHART.left;
  for (const [name, cls] of items) {
    root.append(svg("rect", { x, y: CHART.h - 14, width: 10, height: 10, class: cls }));
    root.append(svg("text", { x: x + 14, y: CHART.h - 5, class: "legend" }, name));
    x += 18 + name.length * 6.5;
  }
}

function emptyChart(container, message) {
  const root = chartFrame(message);
  root.append(svg("text", { x: CHART.w / 2, y: CHART.h / 2, "text-anchor": "middle", class: "muted" }, message));
  container.replaceChildren(root);
}

/** Held-out accuracy and win rate of the promoted (gate-passed, or current) versions, in order. */
function drawQualityChart(container, versions) {
  const points = versions
    .filter((v) => (v.kind || "policy") === "policy" && (v.current || (v.gate && v.gate.passed) || v.method === "base"))
    .sort((a, b) => String(a.created_at).localeCompare(String(b.created_at)))
    .map((v) => ({ label: v.version, acc: heldoutAccuracy(v), win: winRate(v) }))
    .filter((p) => p.acc !== null || p.win !== null);
  if (!points.length) {
    emptyChart(container, "no measured versions yet (a trained version shows its held-out accuracy here)");
    return;
  }
  const { w, h, left, right, top, bottom } = CHART;
  const plotW = w - left - right, plotH = h - top - bottom;
  const xOf = (i) => left + (points.length === 1 ? plotW / 2 : (plotW * i) / (points.length - 1));
  const yOf = (v) => top + plotH - plotH * Math.max(0, Math.min(1, v));
  const root = chartFrame("held-out preference accuracy and win rate per promoted version");
  yAxis(root, 1, 4, (v) => v.toFixed(2));
  root.append(svg("line", { x1: left, x2: w - right, y1: yOf(0.5), y2: yOf(0.5), class: "chance" }));
  xLabels(root, points.map((p) => p.label), xOf);
  for (const [key, cls] of [["acc", "s1"], ["win", "s2"]]) {
    const pts = points.map((p, i) => [i, p[key]]).filter(([, v]) => v !== null);
    if (pts.length > 1) {
      root.append(svg("polyline", { class: `line ${cls}`, fill: "none",
        points: pts.map(([i, v]) => `${xOf(i)},${yOf(v)}`).join(" ") }));
    }
    for (const [i, v] of pts) {
      const dot = svg("circle", { cx: xOf(i), cy: yOf(v), r: 4, class: `dot ${cls}` });
      dot.append(svg("title", {}, `${points[i].label}: ${v.toFixed(3)}`));
      root.append(dot);
    }
  }
  legend(root, [["held-out accuracy", "s1"], ["A/B win rate", "s2"], ["chance (0.5)", "chance-key"]]);
  container.replaceChildren(root);
}

/** Preferences and ratings per day, stacked bars. */
function drawVotesChart(container, days) {
  days = days.slice(-30);
  if (!days.length) { emptyChart(container, "no votes yet"); return; }
  const { w, h, left, right, top, bottom } = CHART;
  const plotW = w - left - right, plotH = h - top - bottom;
  const total = (d) => (d.preferences || 0) + (d.ratings || 0);
  const rawMax = Math.max(4, ...days.map(total));
  const mag = 10 ** Math.floor(Math.log10(rawMax / 4));
  const step = [1, 2, 5, 10].map((m) => m * mag).find((st) => st * 4 >= rawMax);
  const max = step * 4; // four whole-number ticks
  const band = plotW / days.length, barW = Math.max(2, Math.min(36, band * 0.7));
  const xOf = (i) => left + band * i + band / 2;
  const hOf = (v) => (plotH * v) / max;
  const root = chartFrame("votes per day");
  yAxis(root, max, 4, (v) => (Number.isInteger(v) ? String(v) : v.toFixed(1)));
  xLabels(root, days.map((d) => String(d.date).slice(5)), xOf);
  days.forEach((d, i) => {
    const p = d.preferences || 0, r = d.ratings || 0;
    const base = top + plotH;
    const bar1 = svg("rect", { x: xOf(i) - barW / 2, y: base - hOf(p), width: barW, height: hOf(p), class: "s1" });
    const bar2 = svg("rect", { x: xOf(i) - barW / 2, y: base - hOf(p) - hOf(r), width: barW, height: hOf(r), class: "s2" });
    const tip = `${d.date}: ${p} preferences, ${r} ratings`;
    bar1.append(svg("title", {}, tip));
    bar2.append(svg("title", {}, tip));
    root.append(bar1, bar2);
  });
  legend(root, [["preferences", "s1"], ["ratings", "s2"]]);
  container.replaceChildren(root);
}

// ---- wiring --------------------------------------------------------------------------------------

function init() {
  $("#composer").addEventListener("submit", (e) => { e.preventDefault(); send(); });
  byTestId("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); send(); }
  });
  byTestId("stop").addEventListener("click", stop);
  byTestId("new-chat").addEventListener("click", newChat);
  for (const tab of document.querySelectorAll(".tab")) {
    tab.addEventListener("click", () => showView(tab.dataset.view));
  }
  byTestId("models-refresh").addEventListener("click", () => loadModels());
  byTestId("rollback").addEventListener("click", rollback);
  byTestId("token-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const input = byTestId("token-input");
    const token = input.value.trim();
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    input.value = "";
    await loadWhoami();
  });
  byTestId("token-forget").addEventListener("click", async () => {
    sessionStorage.removeItem(TOKEN_KEY);
    await loadWhoami();
  });
  loadWhoami().then(() => { document.body.dataset.ready = "true"; });
}

document.addEventListener("DOMContentLoaded", init);
