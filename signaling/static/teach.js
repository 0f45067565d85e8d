// Teacher page. testids: invite-bot, bot-status, teacher-student-link, students, student-row, student-name,
// student-analysis, student-face, student-label, student-confusion, student-boredom, mute-button, alerts, alert-item,
// ack-button, class-analysed, class-confusion, class-boredom, sparkline, threshold-*, review-link, connection, sound-toggle
"use strict";
const room = CM.roomFromPath("/teach/");
const token = CM.tokenFromHash();
const $ = (id) => document.getElementById(id);
let ws = null, backoff = 500, roster = new Map(), lastState = null, audio = null, thresholdsTouched = 0;

$("review-link").href = "/review/" + encodeURIComponent(room) + "#t=" + token;

async function loadRoom() {
  const res = await CM.api("GET", "/api/rooms/" + encodeURIComponent(room), token);
  if (!res.ok) { $("connection").textContent = "This teacher link is not valid."; return false; }
  $("room-title").textContent = res.data.title || "Your class";
  $("student-link").textContent = res.data.student_url || "";
  for (const p of res.data.participants || []) roster.set(p.peer_id, p);
  showBot(res.data.bot);
  render();
  return true;
}

function showBot(present) {
  $("bot-status").textContent = present ? "The assistant is in the room." : "The assistant is not in the room.";
  $("bot-status").className = "status " + (present ? "ok" : "");
}

$("invite-bot").addEventListener("click", async () => {
  ensureAudio();
  $("invite-bot").disabled = true;
  const res = await CM.api("POST", "/api/rooms/" + encodeURIComponent(room) + "/invite", token);
  $("invite-bot").disabled = false;
  if (res.ok) { $("bot-status").textContent = "Invited — the assistant is joining…"; $("bot-status").className = "status"; }
  else if (res.status === 503) { $("bot-status").textContent = "No assistant (bot worker) is available. Start one: python -m bot worker"; $("bot-status").className = "status warn"; }
  else { $("bot-status").textContent = "Invite failed: " + ((res.data && res.data.error) || res.status); $("bot-status").className = "status warn"; }
});

function send(msg) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(Object.assign({ v: 1 }, msg))); }

function connect() {
  ws = new WebSocket(CM.wsUrl());
  ws.addEventListener("open", () => { send({ type: "hello", role: "teacher", room, token }); });
  ws.addEventListener("message", (event) => {
    let msg; try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.type === "welcome") {
      backoff = 500; $("connection").textContent = "live";
      roster = new Map((msg.participants || []).map((p) => [p.peer_id, p])); showBot(msg.bot); render();
    } else if (msg.type === "participant") {
      if (msg.event === "left") roster.delete(msg.peer_id); else roster.set(msg.peer_id, { peer_id: msg.peer_id, name: msg.name, analysis: msg.analysis });
      render();
    } else if (msg.type === "state") {
      lastState = msg.state; showBot(true); render(); drawSparkline(); showThresholds();
    } else if (msg.type === "bot") {
      showBot(msg.peer_id);
      if (!msg.peer_id) { lastState = null; render(); }
    } else if (msg.type === "alert") {
      addAlert(msg.alert, true);
    } else if (msg.type === "error") {
      $("connection").textContent = "error: " + msg.message;
    }
  });
  ws.addEventListener("close", () => {
    $("connection").textContent = "reconnecting…";
    setTimeout(connect, backoff); backoff = Math.min(backoff * 2, 10000);
  });
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
    tr.appendChild(CM.el("td", { testid: "student-name" }, s.name || p.name || "?"));
    const pill = CM.el("span", { class: "pill" + (analysis ? "" : " off"), testid: "student-analysis" }, analysis ? "on" : "off");
    tr.appendChild(CM.el("td")).appendChild(pill);
    tr.appendChild(CM.el("td", { testid: "student-face" }, !analysis ? "—" : s.face ? "yes" : (s.connected ? "no" : "—")));
    tr.appendChild(CM.el("td", { testid: "student-label" }, analysis && s.top_label ? s.top_label : "—"));
    tr.appendChild(CM.el("td", { testid: "student-confusion" })).appendChild(CM.bar("confusion", analysis ? s.confusion : null));
    tr.appendChild(CM.el("td", { testid: "student-boredom" })).appendChild(CM.bar("boredom", analysis ? s.boredom : null));
    tr.appendChild(CM.el("td", {}, analysis ? CM.pct(s.attention) : "—"));
    const mute = CM.el("button", { class: "secondary", testid: "mute-button" }, s.muted ? "Unmute" : "Mute");
    mute.title = s.muted ? "Alerts about this student are muted" : "Stop alerts about this student";
    mute.addEventListener("click", () => send({ type: "control", action: s.muted ? "unmute" : "mute", peer_id: id }));
    tr.appendChild(CM.el("td")).appendChild(mute);
    body.appendChild(tr);
  }
  $("no-students").classList.toggle("hidden", body.children.length > 0);
  const cls = lastState && lastState.class;
  $("class-analysed").textContent = cls ? `(${cls.analysed} analysed)` : `(${analysed} analysed)`;
  if (cls) {
    $("class-confusion").textContent = "confused: " + CM.pct(cls.confusion_share);
    $("class-boredom").textContent = "bored: " + CM.pct(cls.boredom_share);
  }
}

function drawSparkline() {
  const canvas = $("sparkline"); const ctx = canvas.getContext("2d");
  const history = (lastState && lastState.class && lastState.class.history) || [];
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.strokeStyle = "#e3e6ee"; ctx.beginPath(); ctx.moveTo(0, canvas.height / 2); ctx.lineTo(canvas.width, canvas.height / 2); ctx.stroke();
  if (history.length < 2) return;
  const t0 = history[0].t, t1 = history[history.length - 1].t || t0 + 1;
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
  input.addEventListener("change", () => { thresholdsTouched = Date.now(); send({ type: "control", action: "threshold", kind, value: Number(input.value) }); });
}

function ensureAudio() { if (!audio && window.AudioContext) { try { audio = new AudioContext(); } catch (e) { audio = null; } } }
document.addEventListener("click", ensureAudio, { once: true });
function beep() {
  if (!$("sound").checked || !audio) return;
  const osc = audio.createOscillator(); const gain = audio.createGain();
  osc.frequency.value = 660; gain.gain.value = 0.08; osc.connect(gain); gain.connect(audio.destination);
  osc.start(); osc.stop(audio.currentTime + 0.25);
}

function addAlert(alert, fresh) {
  const li = CM.el("li", { testid: "alert-item", class: alert.level === "class" ? "class" : "" });
  li.appendChild(CM.el("strong", {}, alert.message));
  li.appendChild(CM.el("div", { class: "muted" }, CM.clock(alert.t) + " · " + alert.level + " · " + alert.kind));
  const ack = CM.el("button", { class: "secondary", testid: "ack-button" }, "Acknowledge");
  ack.addEventListener("click", () => { send({ type: "control", action: "ack", alert_id: alert.alert_id }); li.classList.add("acknowledged"); ack.disabled = true; });
  li.appendChild(ack);
  $("alerts").prepend(li);
  $("no-alerts").classList.add("hidden");
  if (fresh) { li.classList.add("flash"); beep(); if (document.hidden) document.title = "(!) classmood"; }
}
document.addEventListener("visibilitychange", () => { if (!document.hidden) document.title = "classmood — teacher"; });

if (!token) { $("connection").textContent = "This teacher link has no key (#t=…)."; }
else { loadRoom().then((ok) => { if (ok) connect(); }); }
