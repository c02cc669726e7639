// netra's chat page: a client of the wire protocol (PROTOCOL.md §2-§4, docs/protocol.md)
// in plain JavaScript, served from the binary. A thread is drawn from its event log:
// opening one sends `subscribe {thread_id, after_seq: 0}`, so history, a stopped run's
// partial answer and a run still going all arrive as the same events, in `seq` order.
// Events are applied strictly one after another (seq = last + 1): a repeat is dropped, a
// gap asks the server again from the last applied seq, so nothing shows twice or is lost
// across reloads and reconnects. Model and user text only ever reach the DOM as text.

import { applyTheme, el, toggleTheme } from "./common.js";
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEY = { token: "netra.token", name: "netra.name" };
const threadKey = (user) => `netra.thread.${user}`;
const tabs = "BroadcastChannel" in window ? new BroadcastChannel("netra") : null;

const state = {
  token: null,
  user: null,
  threads: [],
  current: null, // the open thread's id; null is a new, empty chat
  lastSeq: 0, // the last seq of the open thread applied to the view
  askedFrom: -1, // after_seq of the last subscribe sent for the open thread
  runs: new Map(), // run_id -> view of a run in the open thread
  renaming: false, // a thread title is being edited in the sidebar
  pendingNew: false, // a first message was sent; the next thread_created is ours
  pending: new Map(), // message_id -> optimistic user bubble, until its echo arrives
  ws: null,
  attempt: 0,
  reconnectTimer: null,
  countdown: null,
  signingOut: false,
  sendCount: 0,
  sentAt: null, // performance.now() of the last send, until its first token shows
};

// ---------- small helpers ----------

function formatMs(ms) {
  if (ms == null) return "";
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10_000 ? 1 : 0)} s`;
}

function toast(message) {
  const t = $("toast");
  t.textContent = message;
  t.classList.add("show");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.classList.remove("show"), 4000);
}

async function api(path, options = {}) {
  const r = await fetch(path, {
    ...options,
    headers: { Authorization: `Bearer ${state.token}`, "Content-Type": "application/json", ...(options.headers || {}) },
  });
  if (r.status === 401) {
    signOut("Your session ended. Sign in again.");
    throw new Error("unauthorized");
  }
  const body = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}

// ---------- sign-in ----------

async function showSignin(message = "") {
  $("app").hidden = true;
  $("signin").hidden = false;
  $("signin-error").textContent = message;
  let dev = false;
  try {
    dev = (await (await fetch("/auth/config")).json()).development_mode === true;
  } catch {
    $("signin-error").textContent = "The server does not answer. Is netra running?";
  }
  $("signin-dev").hidden = !dev;
  $("signin-token").hidden = dev;
  $("signin-name").required = dev;
  $("signin-name").value = localStorage.getItem(KEY.name) || "alice";
  (dev ? $("signin-name") : $("signin-jwt")).focus();
  $("signin-form").dataset.mode = dev ? "dev" : "token";
}

async function signIn(event) {
  event.preventDefault();
  $("signin-error").textContent = "";
  let token;
  if ($("signin-form").dataset.mode === "dev") {
    const name = $("signin-name").value.trim();
    if (!name) return;
    const r = await fetch("/auth/dev/login", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ email: name, password: "dev" }),
    });
    if (!r.ok) {
      $("signin-error").textContent = (await r.json().catch(() => ({}))).detail || "Sign-in failed.";
      return;
    }
    token = (await r.json()).access_token;
    localStorage.setItem(KEY.name, name);
  } else {
    token = $("signin-jwt").value.trim();
    if (!token) return;
  }
  localStorage.setItem(KEY.token, token);
  tabs?.postMessage({ kind: "signed-in" });
  await start(token);
}

function signOut(message = "") {
  localStorage.removeItem(KEY.token);
  state.token = null;
  state.signingOut = true;
  clearTimeout(state.reconnectTimer);
  clearInterval(state.countdown);
  state.ws?.close(1000, "sign out");
  state.ws = null;
  if (!message) tabs?.postMessage({ kind: "signed-out" });
  showSignin(message);
}

// ---------- start ----------

async function start(token) {
  state.token = token;
  state.signingOut = false;
  let me;
  try {
    me = await api("/auth/me");
  } catch (e) {
    if (e.message !== "unauthorized") showSignin(`Cannot sign in: ${e.message}`);
    return;
  }
  state.user = me.id;
  $("whoami").textContent = me.name || me.id;
  $("whoami").title = `signed in as ${me.id}`;
  $("signin").hidden = true;
  $("app").hidden = false;
  const last = localStorage.getItem(threadKey(state.user));
  if (last) openThread(last);
  else newChat();
  loadThreads();
  connect();
  $("input").focus();
}

// ---------- threads ----------

async function loadThreads() {
  try {
    state.threads = await api("/api/threads?limit=100&offset=0");
  } catch {
    return;
  }
  renderThreads();
  const open = state.threads.find((t) => t.id === state.current);
  if (open) setTitle(open.title);
}

let refreshTimer = null;
function refreshThreadsSoon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(loadThreads, 150);
}

function renderThreads() {
  // A background refresh must not take the title being edited away.
  if (state.renaming) return;
  const filter = $("search").value.trim().toLowerCase();
  const shown = state.threads.filter((t) => t.title.toLowerCase().includes(filter));
  $("threads-empty").hidden = state.threads.length > 0;
  $("threads").replaceChildren(
    ...shown.map((t) => {
      const li = el("li", t.id === state.current ? "thread active" : "thread");
      li.dataset.id = t.id;
      const open = el("button", "thread-open", t.title);
      open.type = "button";
      open.title = `${t.title}\nupdated ${new Date(t.updated_at * 1000).toLocaleString()}`;
      if (t.id === state.current) open.setAttribute("aria-current", "page");
      open.addEventListener("click", () => {
        openThread(t.id);
        document.body.classList.remove("sidebar-open");
        $("input").focus();
      });
      const rename = el("button", "icon rename", "✎");
      rename.type = "button";
      rename.setAttribute("aria-label", `Rename “${t.title}”`);
      rename.addEventListener("click", () => startRename(li, t));
      const del = el("button", "icon delete", "×");
      del.type = "button";
      del.setAttribute("aria-label", `Delete “${t.title}”`);
      del.addEventListener("click", () => confirmDelete(del, t));
      li.append(open, rename, del);
      return li;
    }),
  );
}

function startRename(li, thread) {
  const input = el("input", "rename-input");
  input.value = thread.title;
  input.setAttribute("aria-label", "New title; Enter saves, Escape cancels");
  input.maxLength = 200;
  li.replaceChildren(input);
  state.renaming = true;
  input.focus();
  input.select();
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    state.renaming = false;
    const title = input.value.trim();
    if (save && title && title !== thread.title) {
      try {
        await api(`/api/threads/${encodeURIComponent(thread.id)}`, { method: "PUT", body: JSON.stringify({ title }) });
        tabs?.postMessage({ kind: "threads" });
      } catch (e) {
        toast(`Rename failed: ${e.message}`);
      }
    }
    await loadThreads();
    li.isConnected || document.querySelector(`.thread[data-id="${CSS.escape(thread.id)}"] .thread-open`)?.focus();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function confirmDelete(button, thread) {
  if (!button.classList.contains("confirm")) {
    button.classList.add("confirm");
    button.textContent = "Delete?";
    button.setAttribute("aria-label", `Confirm deleting “${thread.title}”`);
    setTimeout(() => {
      if (button.isConnected && button.classList.contains("confirm")) {
        button.classList.remove("confirm");
        button.textContent = "×";
        button.setAttribute("aria-label", `Delete “${thread.title}”`);
      }
    }, 4000);
    return;
  }
  api(`/api/threads/${encodeURIComponent(thread.id)}`, { method: "DELETE" })
    .then(() => {
      if (thread.id === state.current) newChat();
      tabs?.postMessage({ kind: "threads", deleted: thread.id });
      loadThreads();
    })
    .catch((e) => toast(`Delete failed: ${e.message}`));
}

function setTitle(title) {
  $("title").textContent = title;
  document.title = title === "New chat" ? "netra" : `${title} · netra`;
}

// ---------- the open thread ----------

function clearView() {
  state.runs.clear();
  state.pending.clear();
  state.lastSeq = 0;
  state.askedFrom = -1;
  $("log").replaceChildren();
  updateComposer();
}

function newChat() {
  state.current = null;
  state.pendingNew = false;
  if (state.user) localStorage.removeItem(threadKey(state.user));
  clearView();
  setTitle("New chat");
  $("empty").hidden = false;
  renderThreads();
}

function openThread(id) {
  state.current = id;
  state.pendingNew = false;
  localStorage.setItem(threadKey(state.user), id);
  clearView();
  $("empty").hidden = true;
  const known = state.threads.find((t) => t.id === id);
  setTitle(known ? known.title : "…");
  renderThreads();
  subscribe();
}

/** Asks for the open thread's events after the last one applied (all of them at first). */
function subscribe() {
  if (!state.current || !state.ws || state.ws.readyState !== WebSocket.OPEN) return;
  if (state.askedFrom === state.lastSeq) return;
  state.askedFrom = state.lastSeq;
  sendFrame({
    type: "subscribe",
    message_id: `sub:${state.current}`,
    payload: { thread_id: state.current, after_seq: state.lastSeq },
  });
}

function sendFrame(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) return false;
  state.ws.send(JSON.stringify(frame));
  return true;
}

// ---------- the socket ----------

function setConn(kind, text) {
  $("conn").dataset.state = kind;
  $("conn-text").textContent = text;
  updateComposer();
}

function connect() {
  clearTimeout(state.reconnectTimer);
  clearInterval(state.countdown);
  if (!state.token) return;
  setConn(state.attempt ? "reconnecting" : "connecting", state.attempt ? "reconnecting…" : "connecting…");
  const encoded = btoa(state.token).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws`, ["netra", `jwt.${encoded}`]);
  state.ws = ws;
  ws.onmessage = (e) => {
    if (ws !== state.ws) return;
    let frame;
    try {
      frame = JSON.parse(e.data);
    } catch {
      return;
    }
    onFrame(frame);
  };
  ws.onopen = () => {
    if (ws !== state.ws) return;
    state.askedFrom = -1;
    // Resume: everything of the open thread after the last event shown.
    subscribe();
  };
  ws.onclose = (e) => {
    if (ws !== state.ws) return;
    state.ws = null;
    if (state.signingOut) return;
    if (e.code === 1008) {
      signOut(e.reason === "Token expired" ? "Your session expired. Sign in again." : "The server refused this token. Sign in again.");
      return;
    }
    scheduleReconnect();
  };
}

function scheduleReconnect() {
  clearTimeout(state.reconnectTimer);
  clearInterval(state.countdown);
  if (!navigator.onLine) {
    setConn("offline", "offline — waiting for the network");
    return;
  }
  // Exponential backoff with jitter: about 0.5 s, 1 s, 2 s … capped at 15 s.
  const delay = Math.min(15_000, 500 * 2 ** state.attempt) * (0.75 + Math.random() / 2);
  state.attempt++;
  const until = Date.now() + delay;
  const tick = () => {
    const left = Math.ceil((until - Date.now()) / 1000);
    setConn("reconnecting", left > 1 ? `reconnecting in ${left} s…` : "reconnecting…");
  };
  tick();
  state.countdown = setInterval(tick, 500);
  state.reconnectTimer = setTimeout(connect, delay);
}

window.addEventListener("online", () => {
  if (state.token && !state.ws) {
    state.attempt = 0;
    connect();
  }
});
window.addEventListener("offline", () => {
  if (state.token && !state.ws) setConn("offline", "offline — waiting for the network");
});

function onFrame(f) {
  const p = f.payload || {};
  if (f.type === "system_message") {
    state.attempt = 0;
    setConn("connected", `connected as ${p.user_id || state.user}`);
    return;
  }
  if (f.type === "pong") return;
  if (f.type === "error" && f.seq == null) return protocolError(p);
  const tid = f.thread_id;
  if (!tid) return;
  if (f.type === "thread_created" && state.current === null && state.pendingNew) {
    // Our first message made this thread: it becomes the open one.
    state.current = tid;
    state.pendingNew = false;
    state.lastSeq = 0;
    state.askedFrom = 0;
    localStorage.setItem(threadKey(state.user), tid);
    setTitle(p.title || "New chat");
  }
  if (["thread_created", "final_report", "agent_completed", "agent_error"].includes(f.type)) refreshThreadsSoon();
  if (tid !== state.current || typeof f.seq !== "number") return;
  if (f.seq <= state.lastSeq) return; // already shown
  if (f.seq > state.lastSeq + 1) {
    subscribe(); // a gap: the server sends again from the last one shown
    return;
  }
  state.lastSeq = f.seq;
  apply(f);
}

function protocolError(p) {
  const ref = p.ref || "";
  if (ref.startsWith("sub:")) {
    if (ref === `sub:${state.current}`) {
      // The remembered thread is gone (deleted) or is not this user's.
      newChat();
      toast("That thread is no longer available.");
    }
    return;
  }
  if (p.run_id && state.runs.has(p.run_id)) {
    state.runs.get(p.run_id).end("failed", p.error_message || p.message);
    return;
  }
  const bubble = state.pending.get(ref);
  if (bubble) {
    bubble.classList.add("failed");
    bubble.querySelector(".note")?.remove();
    bubble.appendChild(el("div", "note", `Not sent: ${p.message || p.error_message}`));
    state.pending.delete(ref);
    if (state.pendingNew) state.pendingNew = false;
    updateComposer();
    return;
  }
  toast(p.message || p.error_message || "Something went wrong.");
}

// ---------- drawing events ----------

function apply(f) {
  const p = f.payload || {};
  $("empty").hidden = true;
  switch (f.type) {
    case "thread_created":
      if (p.title) setTitle(p.title);
      break;
    case "user_message": {
      // Our own optimistic bubble is replaced by the stored message.
      for (const [id, bubble] of state.pending) {
        if (bubble.dataset.text === p.content) {
          bubble.remove();
          state.pending.delete(id);
          break;
        }
      }
      addUser(p.content, f.timestamp);
      break;
    }
    case "agent_started":
      run(f.run_id, f.timestamp);
      break;
    case "agent_thinking":
      run(f.run_id).thinking(p.reasoning || p.message || "Thinking");
      break;
    case "tool_executing":
      run(f.run_id).toolStart(p.tool_name, p.parameters);
      break;
    case "tool_completed":
      run(f.run_id).toolDone(p.tool_name, p.result, p.execution_time_ms, p.status);
      break;
    case "partial_result":
    case "stream_chunk":
      run(f.run_id).append(p.content ?? p.chunk ?? "");
      break;
    case "agent_completed":
      if (p.status === "cancelled") run(f.run_id).end("cancelled", p.message, p.execution_time_ms);
      else run(f.run_id).completed(p);
      break;
    case "final_report":
      run(f.run_id).final(p.executive_summary ?? "", p.total_duration_ms);
      break;
    case "agent_error":
      run(f.run_id).end("failed", p.error_message || p.message, null, p.error_context);
      break;
    case "error":
      if (f.run_id) run(f.run_id).end("failed", p.error_message || p.message);
      break;
  }
  updateComposer();
}

function stickToBottom(fn) {
  const log = $("log");
  const atBottom = log.scrollHeight - log.scrollTop - log.clientHeight < 80;
  fn();
  if (atBottom) log.scrollTop = log.scrollHeight;
}

function addUser(text, timestamp, pendingId) {
  const turn = el("article", "turn user");
  const bubble = el("div", "bubble");
  bubble.appendChild(el("div", "text", text));
  turn.dataset.text = text;
  if (timestamp) turn.title = new Date(timestamp).toLocaleString();
  turn.appendChild(bubble);
  if (pendingId) {
    turn.classList.add("pending");
    state.pending.set(pendingId, turn);
  }
  stickToBottom(() => $("log").appendChild(turn));
  return turn;
}

/** The view of run `id` in the open thread, made on its first event. */
function run(id, timestamp) {
  let view = state.runs.get(id);
  if (!view) {
    view = new RunView(id, timestamp);
    state.runs.set(id, view);
    stickToBottom(() => $("log").appendChild(view.node));
  }
  return view;
}

class RunView {
  constructor(id, timestamp) {
    this.id = id;
    this.text = "";
    this.status = "running";
    this.tools = [];
    this.node = el("article", "turn assistant");
    this.node.dataset.runId = id;
    this.node.dataset.status = "running";
    this.node.setAttribute("aria-busy", "true");
    if (timestamp) this.started = Date.parse(timestamp);
    const avatar = el("img", "avatar");
    avatar.src = "/favicon.svg";
    avatar.alt = "";
    const bubble = el("div", "bubble");
    this.activity = el("div", "activity");
    this.indicator = el("div", "thinking");
    this.indicator.append(el("span", "dots"), el("span", "thinking-text", "Thinking"));
    this.answer = el("div", "answer markdown");
    this.foot = el("div", "run-foot");
    bubble.append(this.activity, this.indicator, this.answer, this.foot);
    this.node.append(avatar, bubble);
  }

  thinking(text) {
    this.indicator.querySelector(".thinking-text").textContent = text;
  }

  toolStart(name, args) {
    const chip = el("details", "chip tool running");
    chip.dataset.tool = name;
    const summary = el("summary");
    summary.append(el("span", "chip-icon", "⚙"), el("span", "chip-name", name), el("span", "chip-state", "running…"));
    const body = el("div", "chip-body");
    body.append(el("div", "chip-label", "Arguments"), el("pre", "chip-args", JSON.stringify(args ?? {}, null, 2)));
    chip.append(summary, body);
    this.tools.push({ name, chip, done: false });
    stickToBottom(() => this.activity.appendChild(chip));
  }

  toolDone(name, result, ms, status) {
    let tool = this.tools.find((t) => t.name === name && !t.done);
    if (!tool) {
      this.toolStart(name, {});
      tool = this.tools.at(-1);
    }
    tool.done = true;
    const failed = status === "error" || (result && typeof result === "object" && "error" in result);
    tool.chip.classList.remove("running");
    tool.chip.classList.add(failed ? "failed" : "done");
    tool.chip.querySelector(".chip-icon").textContent = failed ? "✕" : "✓";
    tool.chip.querySelector(".chip-state").textContent = ms != null ? formatMs(ms) : "done";
    const body = tool.chip.querySelector(".chip-body");
    body.append(el("div", "chip-label", "Result"), el("pre", "chip-result", JSON.stringify(result ?? {}, null, 2)));
  }

  append(delta) {
    if (!delta) return;
    if (!this.text && state.sentAt != null) {
      // Click (or Enter) to the first token on screen, as the user sees it.
      performance.mark("netra:first-token");
      performance.measure("netra:click-to-first-token", { start: state.sentAt, end: performance.now() });
      state.sentAt = null;
    }
    this.text += delta;
    this.draw();
  }

  draw(now = false) {
    if (this.text) this.node.classList.add("has-text");
    if (now) {
      stickToBottom(() => this.answer.replaceChildren(renderMarkdown(this.text)));
      return;
    }
    if (this.drawing) return;
    this.drawing = true;
    // One markdown pass per frame, however many deltas arrived in it.
    requestAnimationFrame(() => {
      this.drawing = false;
      this.draw(true);
    });
  }

  completed(p) {
    this.result = p;
  }

  final(text, ms) {
    this.text = text;
    this.draw(true);
    this.settle("completed");
    const parts = [`answered in ${formatMs(ms ?? this.result?.execution_time_ms)}`];
    const m = this.result?.metrics || {};
    const tokens = [];
    if (m.prompt_tokens != null) tokens.push(`${m.prompt_tokens} prompt`);
    if (m.completion_tokens != null) tokens.push(`${m.completion_tokens} completion`);
    const detail = [...parts];
    if (tokens.length) detail.push(`tokens: ${tokens.join(" + ")}`);
    const used = this.result?.result?.tools;
    if (used?.length) detail.push(`tools: ${used.join(", ")}`);
    this.foot.textContent = tokens.length ? `${parts[0]} · ${(m.prompt_tokens || 0) + (m.completion_tokens || 0)} tokens` : parts[0];
    this.foot.title = detail.join("\n");
    this.node.title = detail.join("\n");
  }

  end(status, message, ms, context) {
    if (this.status !== "running") return;
    this.draw(true);
    this.settle(status);
    const what = status === "cancelled" ? "Stopped" : "Failed";
    const kept = this.text ? " — the answer above is partial" : "";
    this.foot.textContent = "";
    this.foot.append(el("span", "badge", what), document.createTextNode(`${message ? `: ${message}` : ""}${kept}`));
    const detail = [status === "cancelled" ? `stopped after ${formatMs(ms)}` : `failed: ${message || "unknown error"}`];
    if (context?.reason) detail.push(`reason: ${context.reason}`);
    this.foot.title = detail.join("\n");
    for (const t of this.tools.filter((t) => !t.done)) {
      t.chip.classList.remove("running");
      t.chip.querySelector(".chip-state").textContent = "interrupted";
    }
  }

  settle(status) {
    this.status = status;
    this.node.dataset.status = status;
    this.node.removeAttribute("aria-busy");
  }
}

// ---------- composing ----------

function runningHere() {
  return [...state.runs.values()].some((r) => r.status === "running");
}

function updateComposer() {
  const connected = state.ws?.readyState === WebSocket.OPEN;
  const busy = runningHere() || state.pendingNew;
  $("stop").hidden = !busy;
  $("send").hidden = busy;
  $("send").disabled = !connected;
  $("composer").dataset.busy = busy ? "true" : "false";
}

function send(text) {
  text = text.trim();
  if (!text || runningHere() || state.pendingNew) return false;
  const id = `send:${++state.sendCount}`;
  const frame = { type: "user_message", message_id: id, payload: { content: text, thread_id: state.current } };
  if (!sendFrame(frame)) {
    toast("Not connected yet: your message is still in the box.");
    return false;
  }
  state.sentAt = performance.now();
  performance.mark("netra:send");
  if (!state.current) state.pendingNew = true;
  $("empty").hidden = true;
  addUser(text, null, id);
  updateComposer();
  return true;
}

function stop() {
  sendFrame({ type: "stop_agent", payload: state.current ? { thread_id: state.current } : {} });
  $("input").focus();
}

function autosize() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

// ---------- wiring ----------

function wire() {
  $("signin-form").addEventListener("submit", signIn);
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    if (send($("input").value)) {
      $("input").value = "";
      autosize();
    }
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("input").addEventListener("input", autosize);
  $("stop").addEventListener("click", stop);
  $("new").addEventListener("click", () => {
    newChat();
    document.body.classList.remove("sidebar-open");
    $("input").focus();
  });
  $("search").addEventListener("input", renderThreads);
  $("theme").addEventListener("click", toggleTheme);
  $("signout").addEventListener("click", () => signOut());
  $("open-sidebar").addEventListener("click", () => {
    document.body.classList.add("sidebar-open");
    $("search").focus();
  });
  $("close-sidebar").addEventListener("click", () => {
    document.body.classList.remove("sidebar-open");
    $("open-sidebar").focus();
  });
  for (const b of document.querySelectorAll(".suggestion")) {
    b.addEventListener("click", () => {
      $("input").value = b.textContent;
      $("composer").requestSubmit();
    });
  }
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape") document.body.classList.remove("sidebar-open");
  });
  // Other tabs of this browser: thread list changes and sign-in/out.
  tabs?.addEventListener("message", ({ data }) => {
    if (data.kind === "threads") {
      if (data.deleted && data.deleted === state.current) newChat();
      loadThreads();
    } else if (data.kind === "signed-out" && state.token) {
      signOut("Signed out in another tab.");
    } else if (data.kind === "signed-in" && !state.token) {
      start(localStorage.getItem(KEY.token));
    }
  });
}

function boot() {
  applyTheme();
  wire();
  const params = new URLSearchParams(location.search);
  if (params.get("token")) {
    localStorage.setItem(KEY.token, params.get("token"));
    history.replaceState(null, "", location.pathname);
  }
  const token = localStorage.getItem(KEY.token);
  if (token) start(token);
  else showSignin();
}

boot();
