// Teacher page. testids: invite-bot, bot-status, teacher-error, teacher-student-link, students, student-row, student-name,
// student-analysis, student-face, student-label, student-confusion, student-boredom, mute-button, alerts, alert-item,
// ack-button, class-analysed, class-confusion, class-boredom, sparkline, threshold-*, review-link, connection,
// sound-toggle, sound-hint, end-class, class-ended, copy-student-link, copy-status; meeting mode (welcome.media.mode "sfu", see meeting.js): meeting-grid, video-tile,
// self-view, mic-toggle, camera-toggle, leave, meeting-status
"use strict";
const room = CM.roomFromPath("/teach/");
const token = CM.tokenFromHash();
const $ = (id) => document.getElementById(id);
let ws = null, backoff = 500, roster = new Map(), lastState = null, audio = null, thresholdsTouched = 0;
let connected = false, lastError = null, botPresent = false, errorTimer = null;
let meeting = null, left = false, ended = false;
// The alert feed of the current session: stored alerts (loaded on open/reload) and live ones, by alert_id.
let feedSession = null, feed = new Map();

const INVALID = "This teacher link is not valid (wrong key, or the room no longer exists).";
const ERRORS = {
  unauthorized: INVALID,
  unknown_room: INVALID,
  room_full: "Too many teacher pages are open for this class: close one, then reload this page.",
  rate_limited: "This page sent too many messages and was disconnected: reload it to reconnect.",
  server_full: "The server is busy right now.",
  timeout: "The connection was too slow to start: reload the page.",
  no_bot: "The assistant is not in the room: invite it first.",
};
// Close codes 4400..4499: do not retry with the same credentials (docs/architecture.md).
const CLOSED = { 4401: INVALID, 4404: INVALID, 4408: ERRORS.timeout, 4429: ERRORS.room_full };
function errorText(code, message) { return ERRORS[code] || ("Error: " + (message || code || "unknown")); }

// Errors go to their own line, so that the "live" indicator stays true; passing ones clear themselves.
function showError(text, passing) {
  clearTimeout(errorTimer); errorTimer = null;
  $("teacher-error").textContent = text || "";
  if (text && passing) errorTimer = setTimeout(() => { $("teacher-error").textContent = ""; }, 20000);
}

$("review-link").href = "/review/" + encodeURIComponent(room) + "#t=" + token;

async function loadRoom() {
  const res = await CM.api("GET", "/api/rooms/" + encodeURIComponent(room), token);
  if (!res.ok) {
    $("connection").textContent = "not connected";
    showError(res.status === 401 || res.status === 404 ? INVALID
      : "Could not load the room: " + ((res.data && res.data.error) || res.status) + ". Reload the page to try again.");
    return false;
  }
  $("room-title").textContent = res.data.title || "Your class";
  $("student-link").textContent = res.data.student_url || "";
  for (const p of res.data.participants || []) roster.set(p.peer_id, p);
  showBot(res.data.bot);
  loadAlerts(res.data.session_id);
  render();
  return true;
}

function setBot(text, kind) { $("bot-status").textContent = text; $("bot-status").className = "status " + (kind || ""); }
function showBot(present) {
  const left = botPresent && !present;
  botPresent = Boolean(present);
  if (present) setBot("The assistant is in the room.", "ok");
  else if (left) setBot("The assistant left the room: press “Invite the assistant” to bring it back.", "warn");
  else setBot("The assistant is not in the room.", "");
}

$("invite-bot").addEventListener("click", async () => {
  ensureAudio(true);
  const button = $("invite-bot");
  button.disabled = true;
  let res;
  try {
    res = await CM.api("POST", "/api/rooms/" + encodeURIComponent(room) + "/invite", token);
  } catch (e) {
    res = { ok: false, status: 0, data: { error: String((e && e.message) || e) } };
  } finally {
    button.disabled = false;
  }
  if (res.ok) setBot(res.data && res.data.already_present ? "The assistant is in the room." : "Invited — the assistant is joining…", "");
  else if (res.status === 503) setBot("No assistant (bot worker) is available. Start one: python -m bot worker", "warn");
  else setBot("Invite failed: " + ((res.data && res.data.error) || res.status), "warn");
});

function send(msg) {
  if (!ws || ws.readyState !== WebSocket.OPEN || !connected) return false;
  ws.send(JSON.stringify(Object.assign({ v: 1 }, msg)));
  return true;
}
function sendOrSay(msg, what) {
  if (send(msg)) return true;
  showError(`Not connected: ${what}. Try again when the page shows “live”.`, true);
  return false;
}

function connect() {
  const sock = new WebSocket(CM.wsUrl());
  ws = sock; connected = false; lastError = null;
  sock.addEventListener("open", () => {
    if (ws === sock) sock.send(JSON.stringify({ v: 1, type: "hello", role: "teacher", room, token }));
  });
  sock.addEventListener("message", (event) => {
    if (ws !== sock) return;
    let msg; try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.type === "welcome") {
      connected = true; backoff = 500; lastError = null; showError("");
      $("connection").textContent = "live";
      roster = new Map((msg.participants || []).map((p) => [p.peer_id, p]));
      if (!msg.bot) lastState = null;   // figures from before the reconnect are stale
      loadAlerts(msg.session_id);
      showBot(msg.bot); render(); drawSparkline();
      if (msg.media && msg.media.mode === "sfu") enterMeeting(msg);
    } else if (meeting && meeting.handle(msg)) {
      showTiles();
    } else if (msg.type === "participant") {
      if (msg.event === "left") roster.delete(msg.peer_id); else roster.set(msg.peer_id, { peer_id: msg.peer_id, name: msg.name, analysis: msg.analysis });
      render();
    } else if (msg.type === "state") {
      lastState = msg.state; showBot(true); render(); drawSparkline(); showThresholds();
    } else if (msg.type === "bot") {
      showBot(msg.peer_id);
      if (!msg.peer_id) { lastState = null; render(); drawSparkline(); }
    } else if (msg.type === "alert") {
      addAlert(msg.alert, true);
    } else if (msg.type === "session") {
      loadAlerts(msg.session_id);
    } else if (msg.type === "class_ended") {
      classEnded(msg.ended_at);
    } else if (msg.type === "error") {
      if (!connected || msg.code === "rate_limited") lastError = msg;   // these end the connection
      showError(errorText(msg.code, msg.message), connected && msg.code !== "rate_limited");
    }
  });
  sock.addEventListener("close", (event) => {
    if (ws !== sock) return;
    connected = false;
    if (event.code === 4411) { classEnded(null); return; }   // the class was ended (perhaps from another tab)
    if (meeting) { meeting.closeAll(false); showTiles(); }   // the camera stays on for the reconnect
    if (event.code >= 4400 && event.code <= 4499) {   // retrying with the same link cannot help
      $("connection").textContent = "disconnected";
      showError(lastError ? errorText(lastError.code, lastError.message)
        : (CLOSED[event.code] || `Disconnected by the server (code ${event.code}): reload the page to reconnect.`));
      return;
    }
    $("connection").textContent = `reconnecting in ${Math.max(1, Math.round(backoff / 1000))} s…`;
    setTimeout(connect, backoff); backoff = Math.min(backoff * 2, 10000);
  });
}

// ---- meeting mode: own camera, the students' tiles, Leave -------------------------------------------------------
function enterMeeting(welcome) {
  document.body.dataset.mode = "sfu";
  if (!meeting) {
    meeting = new Meeting({
      send, selfView: $("self-view"),
      status(text, kind) { if (!left) { $("meeting-status").textContent = text; $("meeting-status").className = "status " + (kind || ""); } },
      // Students first, in the order they arrived; other teachers after them.
      place(tile, feed) {
        const grid = $("meeting-grid");
        const firstTeacher = feed.role === "teacher" ? null : grid.querySelector('.tile[data-role="teacher"]');
        grid.insertBefore(tile, firstTeacher);
        showTiles();
      },
      decorate: (tile) => decorateTile(tile),
    });
    meeting.setMic(!pressed("mic-toggle")); meeting.setCamera(!pressed("camera-toggle"));
  }
  $("meeting").classList.remove("hidden");
  meeting.start(welcome);
  showTiles();
}
function showTiles() { $("no-tiles").classList.toggle("hidden", $("meeting-grid").children.length > 0); }
function pressed(id) { return $(id).getAttribute("aria-pressed") === "true"; }
function toggle(id, apply) {
  const on = !pressed(id);   // pressed = microphone muted / camera off
  $(id).setAttribute("aria-pressed", String(on));
  if (meeting) apply(!on);
}
$("mic-toggle").addEventListener("click", () => toggle("mic-toggle", (on) => meeting.setMic(on)));
$("camera-toggle").addEventListener("click", () => toggle("camera-toggle", (on) => meeting.setCamera(on)));
$("leave").addEventListener("click", () => {
  left = true;
  const sock = ws; ws = null; connected = false;   // its close event is ignored: no reconnect after Leave
  if (meeting) meeting.closeAll(true);
  if (sock) sock.close(1000);
  showTiles();
  for (const id of ["mic-toggle", "camera-toggle", "leave", "invite-bot"]) $(id).disabled = true;
  $("connection").textContent = "You left the class.";
  $("meeting-status").textContent = "You left the class."; $("meeting-status").className = "status";
});

// A student's tile shows their top expression from the assistant's live state (or that analysis is off).
function decorateTile(tile) {
  const info = tile.querySelector(".tile-info");
  if (!info || tile.dataset.role === "teacher") return;
  const s = ((lastState && lastState.students) || []).find((x) => x.peer_id === tile.dataset.peer);
  const p = roster.get(tile.dataset.peer);
  const analysis = s && s.analysis !== undefined ? s.analysis : !p || p.analysis !== false;
  info.textContent = !analysis ? "analysis off" : s && s.top_label ? s.top_label : "";
}

function render() {
  const body = $("students");
  body.replaceChildren();
  const live = new Map(((lastState && lastState.students) || []).map((s) => [s.peer_id, s]));
  const ids = new Set([...roster.keys(), ...live.keys()]);
  let analysed = 0;
  for (const id of ids) {
    const p = roster.get(id) || {}; const s = live.get(id) || {};
    if (!roster.has(id) && lastState) continue;  // left the room
    const analysis = s.analysis !== undefined ? s.analysis : p.analysis !== false;
    if (analysis && s.connected) analysed++;
    const tr = CM.el("tr", { testid: "student-row" });
    const name = s.name || p.name || "?";
    tr.appendChild(CM.el("td", { testid: "student-name" }, name));
    const pill = CM.el("span", { class: "pill" + (analysis ? "" : " off"), testid: "student-analysis" }, analysis ? "on" : "off");
    tr.appendChild(CM.el("td")).appendChild(pill);
    tr.appendChild(CM.el("td", { testid: "student-face" }, !analysis ? "—" : s.face ? "yes" : (s.connected ? "no" : "—")));
    tr.appendChild(CM.el("td", { testid: "student-label" }, analysis && s.top_label ? s.top_label : "—"));
    const th = (lastState && lastState.thresholds) || {};
    for (const kind of ["confusion", "boredom"]) {
      // The bar shows what the alerts compare with the threshold: the score relative to this student's
      // usual once it is known (docs/signals.md, "Baselines"); the raw score and the usual are in the tooltip.
      const adjusted = s[kind + "_adjusted"] != null ? s[kind + "_adjusted"] : s[kind];
      const usual = s[kind + "_baseline"];
      const detail = s[kind] == null ? "not enough data yet" : `${kind} score ${Number(s[kind]).toFixed(2)}` +
        (usual != null ? `, usually ${Number(usual).toFixed(2)}: ${Number(adjusted).toFixed(2)} against this student's usual`
                       : " (this student's usual is still being learnt)") +
        (th[kind] != null ? `; alerts at ${Number(th[kind]).toFixed(2)}` : "");
      tr.appendChild(CM.el("td", { testid: "student-" + kind }))
        .appendChild(CM.scoreBar(kind, analysis ? adjusted : null, th[kind], kind + " of " + name, analysis ? detail : null));
    }
    tr.appendChild(CM.el("td", {}, analysis ? CM.pct(s.attention) : "—"));
    const mute = CM.el("button", { class: "secondary", testid: "mute-button" }, s.muted ? "Unmute" : "Mute");
    mute.title = s.muted ? "Alerts about this student are muted" : "Stop alerts about this student";
    mute.setAttribute("aria-label", (s.muted ? "Unmute alerts about " : "Mute alerts about ") + name);
    mute.addEventListener("click", () => sendOrSay({ type: "control", action: s.muted ? "unmute" : "mute", peer_id: id },
      `alerts about ${name} were not ${s.muted ? "unmuted" : "muted"}`));
    // Alerts are about analysed students only: a student who opted out has nothing to mute.
    if (analysis) tr.appendChild(CM.el("td")).appendChild(mute); else tr.appendChild(CM.el("td"));
    body.appendChild(tr);
  }
  $("no-students").classList.toggle("hidden", body.children.length > 0);
  const cls = lastState && lastState.class;
  $("class-analysed").textContent = cls ? `(${cls.analysed} analysed)` : `(${analysed} analysed)`;
  $("class-confusion").textContent = "confused: " + (cls ? CM.pct(cls.confusion_share) : "—");
  $("class-boredom").textContent = "bored: " + (cls ? CM.pct(cls.boredom_share) : "—");
  for (const tile of $("meeting-grid").querySelectorAll(".tile")) decorateTile(tile);
}

function drawSparkline() {
  const canvas = $("sparkline"); const ctx = canvas.getContext("2d");
  const history = (lastState && lastState.class && lastState.class.history) || [];
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#e3e6ee"; ctx.beginPath(); ctx.moveTo(0, canvas.height / 2); ctx.lineTo(canvas.width, canvas.height / 2); ctx.stroke();
  if (history.length < 2) { canvas.setAttribute("aria-label", "Chart of the share of the class confused and bored: no data yet"); return; }
  const t0 = history[0].t, t1 = history[history.length - 1].t || t0 + 1;
  const now = history[history.length - 1];
  canvas.setAttribute("aria-label", `Chart of the share of the class confused and bored over the last ${Math.max(1, Math.round((t1 - t0) / 60))} min; ` +
    `now ${CM.pct(now.confusion_share)} confused and ${CM.pct(now.boredom_share)} bored`);
  for (const [field, color] of [["confusion_share", "#d97706"], ["boredom_share", "#7c3aed"]]) {
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath();
    history.forEach((p, i) => {
      const x = ((p.t - t0) / Math.max(1, t1 - t0)) * (canvas.width - 4) + 2;
      const y = canvas.height - 4 - (p[field] || 0) * (canvas.height - 8);
      if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function showThresholds() {
  if (!lastState || !lastState.thresholds || Date.now() - thresholdsTouched < 3000) return;
  for (const kind of ["confusion", "boredom", "class_share"]) {
    const v = lastState.thresholds[kind];
    if (v === undefined) continue;
    $("threshold-" + kind).value = v; $("threshold-" + kind + "-value").textContent = Number(v).toFixed(2);
  }
}
for (const kind of ["confusion", "boredom", "class_share"]) {
  const input = $("threshold-" + kind);
  input.addEventListener("input", () => { thresholdsTouched = Date.now(); $("threshold-" + kind + "-value").textContent = Number(input.value).toFixed(2); });
  input.addEventListener("change", () => { thresholdsTouched = Date.now(); sendOrSay({ type: "control", action: "threshold", kind, value: Number(input.value) }, "the threshold was not changed"); });
}

// Browsers keep audio suspended until the user interacts with the page: say so until it runs.
function ensureAudio(resume) {
  if (!audio && window.AudioContext) {
    try { audio = new AudioContext(); audio.addEventListener("statechange", showSoundHint); } catch (e) { audio = null; }
  }
  if (resume && audio && audio.state === "suspended") audio.resume().then(showSoundHint, () => {});
  showSoundHint();
}
function showSoundHint() {
  const waiting = $("sound").checked && audio !== null && audio.state !== "running";
  $("sound-hint").classList.toggle("hidden", !waiting);
}
document.addEventListener("click", () => ensureAudio(true));
document.addEventListener("keydown", () => ensureAudio(true));
$("sound").addEventListener("change", showSoundHint);
ensureAudio(false);
function beep() {
  if (!$("sound").checked || !audio) return;
  const osc = audio.createOscillator(); const gain = audio.createGain();
  osc.frequency.value = 660; gain.gain.value = 0.08; osc.connect(gain); gain.connect(audio.destination);
  osc.start(); osc.stop(audio.currentTime + 0.25);
}

// Stored alerts of the session (with their acknowledgements) come back after a reload; live ones join them.
async function loadAlerts(sessionId) {
  if (!sessionId || sessionId === feedSession) return;
  feedSession = sessionId; feed = new Map(); renderAlerts(null);
  const res = await CM.api("GET", "/api/sessions/" + encodeURIComponent(sessionId) + "/alerts", token);
  if (feedSession !== sessionId) return;   // a newer session started meanwhile
  if (!res.ok) { showError("Could not load this class's earlier alerts: " + ((res.data && res.data.error) || res.status), true); return; }
  for (const alert of (res.data && res.data.alerts) || []) {
    if (!feed.has(alert.alert_id)) feed.set(alert.alert_id, alert);
  }
  renderAlerts(null);
}

function addAlert(alert, fresh) {
  if (alert.session_id && alert.session_id !== feedSession) { feedSession = alert.session_id; feed = new Map(); }
  if (feed.has(alert.alert_id)) return;
  feed.set(alert.alert_id, alert);
  renderAlerts(fresh ? alert.alert_id : null);
  if (fresh) { beep(); if (document.hidden) document.title = "(!) classmood"; }
}

function renderAlerts(freshId) {
  const list = $("alerts");
  list.replaceChildren();
  const newestFirst = [...feed.values()].sort((a, b) => (b.t || 0) - (a.t || 0));
  for (const alert of newestFirst) {
    const li = CM.el("li", { testid: "alert-item", class: alert.level === "class" ? "class" : "" });
    li.appendChild(CM.el("strong", {}, alert.message));
    li.appendChild(CM.el("div", { class: "muted" }, CM.clock(alert.t) + " · " + alert.level + " · " + alert.kind));
    const ack = CM.el("button", { class: "secondary", testid: "ack-button",
      "aria-label": alert.name ? "Acknowledge the alert about " + alert.name : "Acknowledge the class alert" },
      alert.acknowledged ? "Acknowledged" : "Acknowledge");
    if (alert.acknowledged) { li.classList.add("acknowledged"); ack.disabled = true; }
    ack.addEventListener("click", () => {
      if (!sendOrSay({ type: "control", action: "ack", alert_id: alert.alert_id }, "the alert was not acknowledged")) return;
      alert.acknowledged = true; li.classList.add("acknowledged"); ack.disabled = true; ack.textContent = "Acknowledged";
    });
    li.appendChild(ack);
    if (alert.alert_id === freshId) li.classList.add("flash");
    list.appendChild(li);
  }
  $("no-alerts").classList.toggle("hidden", feed.size > 0);
}

// Copy the student link (the clipboard API needs a secure context; otherwise the link is selected for Ctrl+C).
$("copy-student-link").addEventListener("click", async () => {
  const text = $("student-link").textContent;
  try {
    await navigator.clipboard.writeText(text);
    $("copy-status").textContent = "Copied.";
  } catch (e) {
    const range = document.createRange(); range.selectNodeContents($("student-link"));
    const selection = window.getSelection(); selection.removeAllRanges(); selection.addRange(range);
    $("copy-status").textContent = "Selected: press Ctrl+C (⌘C) to copy.";
  }
  setTimeout(() => { $("copy-status").textContent = ""; }, 4000);
});

// ---- End class: the assistant leaves, the recording ends now, students are told ---------------------------------
$("end-class").addEventListener("click", async () => {
  if (!window.confirm("End the class for everyone? The assistant leaves, the recording ends now and students " +
                      "see that class is over.")) return;
  const button = $("end-class");
  button.disabled = true;
  const res = await CM.api("POST", "/api/rooms/" + encodeURIComponent(room) + "/end", token);
  if (res.ok) classEnded(res.data && res.data.ended_at);
  else { button.disabled = false; showError("The class was not ended: " + ((res.data && res.data.error) || res.status), true); }
});

function classEnded(at) {
  const sock = ws; ws = null; connected = false;   // no reconnect: the class is over
  if (sock && sock.readyState <= WebSocket.OPEN) sock.close(1000);
  if (meeting) { meeting.closeAll(true); showTiles(); }
  if (!ended || at) {
    const when = at ? " at " + CM.clock(at) : "";
    const note = $("class-ended");
    note.replaceChildren(document.createTextNode(`Class ended${when}. `));
    const link = CM.el("a", { href: $("review-link").href, testid: "class-ended-review" }, "Review this class");
    note.appendChild(link);
    note.appendChild(document.createTextNode(" · reload this page to start another class."));
    note.classList.remove("hidden");
  }
  ended = true;
  lastState = null; botPresent = false; roster = new Map(); render(); drawSparkline();
  setBot("The assistant has left: the class is over.", "");
  $("connection").textContent = "class ended";
  for (const id of ["end-class", "invite-bot", "mic-toggle", "camera-toggle", "leave"]) $(id).disabled = true;
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) document.title = "classmood — teacher"; });

if (!token) { $("connection").textContent = "not connected"; showError("This teacher link has no key (#t=…)."); }
else { loadRoom().then((ok) => { if (ok) connect(); }); }
