// Review page. testids: session-select, session-info, class-list, class-item, timeline, signals, review-students,
// review-student-row, student-joined, student-left, student-detail, student-timeline, review-alerts,
// download-samples, download-alerts, delete-session, retention
"use strict";
const room = CM.roomFromPath("/review/");
const token = CM.tokenFromHash();
const $ = (id) => document.getElementById(id);
let current = null, sessions = [], roomTitle = "", selectedStudent = null;

for (let i = 0; i < CM.EMOTIONS.length; i++) {
  const span = CM.el("span"); const dot = CM.el("i"); dot.style.background = CM.COLORS[i];
  span.appendChild(dot); span.appendChild(document.createTextNode(CM.EMOTIONS[i])); $("legend").appendChild(span);
}

async function loadSessions() {
  const res = await CM.api("GET", "/api/rooms/" + encodeURIComponent(room) + "/sessions", token);
  if (!res.ok) {
    $("review-error").textContent = res.status === 0 ? "Cannot load sessions: " + res.data.error : "Cannot load sessions (is this the teacher link?)";
    return;
  }
  const days = res.data.retention_days;
  $("retention").textContent = days > 0
    ? `Sessions are erased automatically ${days} days after they end. You can delete one now.`
    : "Sessions are kept until you delete them.";
  const select = $("session-select"); select.replaceChildren();
  for (const s of res.data.sessions) {
    select.appendChild(CM.el("option", { value: s.session_id },
      new Date(s.started_at * 1000).toLocaleString() + ` — ${s.participants} students, ${s.samples} samples, ${s.alerts} alerts`));
  }
  sessions = res.data.sessions; renderClassList();
  // Nothing stored is not an error: a plain note, and nothing to download or delete.
  for (const id of ["delete-session", "download-samples", "download-alerts"]) $(id).disabled = !res.data.sessions.length;
  $("review-error").textContent = "";
  $("review-empty").classList.toggle("hidden", res.data.sessions.length > 0);
  if (!res.data.sessions.length) { current = null; clearReview(); return; }
  await loadReview(res.data.sessions[0].session_id);
}

async function loadReview(sid) {
  const res = await CM.api("GET", "/api/sessions/" + encodeURIComponent(sid) + "/review", token);
  if (!res.ok) { $("review-error").textContent = "Cannot load the session: " + ((res.data && res.data.error) || res.status); return; }
  current = res.data; $("review-error").textContent = "";
  const s = current.session;
  if (s.title) roomTitle = s.title;          // every session of a room has the room's title
  $("session-select").value = sid; selectedStudent = null; $("student-detail").classList.add("hidden");
  renderClassList();
  $("session-info").textContent = (s.title ? s.title + " · " : "") + CM.clock(s.started_at) + " – " + (s.ended_at ? CM.clock(s.ended_at) : "ongoing");
  drawTimeline(); drawSignals(); renderStudents(); renderAlerts();
}

// The teacher's classes in this room, newest first: title, date and time, size; the one shown is marked.
function renderClassList() {
  const list = $("class-list"); list.replaceChildren();
  for (const s of sessions) {
    const shown = current && current.session.session_id === s.session_id;
    const button = CM.el("button", { class: "link", testid: "class-item" },
      `${roomTitle || "Class"} — ${new Date(s.started_at * 1000).toLocaleDateString()} ${CM.clock(s.started_at)}` +
      (s.ended_at ? `–${CM.clock(s.ended_at)}` : " (ongoing)") + ` · ${s.participants} students, ${s.alerts} alerts`);
    if (shown) button.setAttribute("aria-current", "true");
    button.addEventListener("click", () => loadReview(s.session_id));
    list.appendChild(CM.el("li", shown ? { class: "current" } : {})).appendChild(button);
  }
}

// A dashed horizontal line at an alert threshold, labelled at the right.
function thresholdLine(ctx, canvas, value, color, label) {
  if (value == null || !Number.isFinite(value)) return;
  const y = Y(canvas, value);
  ctx.save(); ctx.strokeStyle = color; ctx.lineWidth = 1; ctx.setLineDash([6, 4]);
  ctx.beginPath(); ctx.moveTo(40, y); ctx.lineTo(canvas.width - 10, y); ctx.stroke();
  ctx.setLineDash([]); ctx.fillStyle = color; ctx.textAlign = "right"; ctx.font = "11px system-ui";
  ctx.fillText(label + " " + Number(value).toFixed(2), canvas.width - 12, y - 3); ctx.restore();
}

function axes(ctx, canvas, t0, t1) {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = "#5b6678"; ctx.font = "12px system-ui"; ctx.strokeStyle = "#e3e6ee";
  const ticks = 6;
  for (let i = 0; i <= ticks; i++) {
    const x = 40 + (i / ticks) * (canvas.width - 50);
    ctx.beginPath(); ctx.moveTo(x, 10); ctx.lineTo(x, canvas.height - 20); ctx.stroke();
    // Labels centred on their tick, the first and last aligned inside the canvas (the last was cut off).
    ctx.textAlign = i === 0 ? "left" : i === ticks ? "right" : "center";
    ctx.fillText(new Date((t0 + (i / ticks) * (t1 - t0)) * 1000).toLocaleTimeString(), i === ticks ? canvas.width - 2 : i === 0 ? Math.max(2, x - 28) : x, canvas.height - 5);
  }
  ctx.textAlign = "left";
  ctx.fillText("1", 25, 16); ctx.fillText("0", 25, canvas.height - 22);
}
const X = (canvas, t, t0, t1) => 40 + ((t - t0) / Math.max(1, t1 - t0)) * (canvas.width - 50);
const Y = (canvas, v) => canvas.height - 20 - v * (canvas.height - 30);

function span() {
  const tl = current.timeline;
  if (!tl.length) return [current.session.started_at, (current.session.ended_at || current.session.started_at + 60)];
  return [tl[0].t, tl[tl.length - 1].t + (current.bucket_seconds || 10)];
}

function drawTimeline() {
  const canvas = $("timeline"); const ctx = canvas.getContext("2d"); const [t0, t1] = span();
  axes(ctx, canvas, t0, t1);
  const tl = current.timeline.filter((b) => b.n > 0 && b.probs[0] !== null);
  const when = `from ${CM.clock(t0)} to ${CM.clock(t1)}`;
  if (!tl.length) {
    ctx.fillText("No faces were analysed in this session.", 60, 60);
    canvas.setAttribute("aria-label", `Expression timeline ${when}: no faces were analysed in this session.`);
    return;
  }
  // Text alternative: the session-wide mean of each expression, largest first.
  const total = tl.reduce((sum, b) => sum + b.n, 0) || 1;
  const means = CM.EMOTIONS.map((label, k) => [label, tl.reduce((sum, b) => sum + (b.probs[k] || 0) * b.n, 0) / total]);
  means.sort((a, b) => b[1] - a[1]);
  canvas.setAttribute("aria-label", `Stacked chart of the class's average expression estimates ${when}; over the session: ` +
    means.map(([label, v]) => label + " " + CM.pct(v)).join(", ") + ".");
  // Stacked areas of the seven mean probabilities, each bucket drawn across its whole width (a step
  // chart): a short session that fits in one bucket is a visible block, not a zero-width line.
  const width = current.bucket_seconds || 10;
  let lower = tl.map(() => 0);
  for (let k = 0; k < CM.EMOTIONS.length; k++) {
    const upper = tl.map((b, i) => lower[i] + (b.probs[k] || 0));
    ctx.fillStyle = CM.COLORS[k]; ctx.globalAlpha = 0.85; ctx.beginPath();
    tl.forEach((b, i) => {
      const x0 = X(canvas, b.t, t0, t1), x1 = X(canvas, b.t + width, t0, t1), y = Y(canvas, upper[i]);
      if (i === 0) ctx.moveTo(x0, y); else ctx.lineTo(x0, y);
      ctx.lineTo(x1, y);
    });
    for (let i = tl.length - 1; i >= 0; i--) {
      const y = Y(canvas, lower[i]);
      ctx.lineTo(X(canvas, tl[i].t + width, t0, t1), y); ctx.lineTo(X(canvas, tl[i].t, t0, t1), y);
    }
    ctx.closePath(); ctx.fill(); lower = upper;
  }
  ctx.globalAlpha = 1;
}

function drawSignals() {
  const canvas = $("signals"); const ctx = canvas.getContext("2d"); const [t0, t1] = span();
  axes(ctx, canvas, t0, t1);
  for (const [field, color] of [["confusion", "#d97706"], ["boredom", "#7c3aed"]]) {
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath(); let started = false;
    const width = current.bucket_seconds || 10;
    for (const b of current.timeline) {        // a step per bucket, as in the expression chart
      if (b[field] === null || b[field] === undefined) continue;
      const x0 = X(canvas, b.t, t0, t1), x1 = X(canvas, b.t + width, t0, t1), y = Y(canvas, b[field]);
      if (!started) { ctx.moveTo(x0, y); started = true; } else ctx.lineTo(x0, y);
      ctx.lineTo(x1, y);
    }
    ctx.stroke();
  }
  const th = current.thresholds || {};
  thresholdLine(ctx, canvas, th.confusion, "#d97706", "confusion threshold");
  thresholdLine(ctx, canvas, th.boredom, "#7c3aed", "boredom threshold");
  ctx.strokeStyle = "#b91c1c"; ctx.lineWidth = 1;
  for (const a of current.alerts) {
    const x = X(canvas, a.t, t0, t1); ctx.beginPath(); ctx.moveTo(x, 10); ctx.lineTo(x, canvas.height - 20); ctx.stroke();
  }
  canvas.title = current.alerts.map((a) => CM.clock(a.t) + " " + a.message).join("\n");
  const summary = (field) => {
    const values = current.timeline.map((b) => b[field]).filter((v) => v !== null && v !== undefined);
    if (!values.length) return field + ": no data";
    return `${field} mean ${CM.pct(values.reduce((a, b) => a + b, 0) / values.length)}, peak ${CM.pct(Math.max(...values))}`;
  };
  const n = current.alerts.length;
  canvas.setAttribute("aria-label", `Chart of the class's average confusion and boredom from ${CM.clock(t0)} to ${CM.clock(t1)}: ` +
    `${summary("confusion")}; ${summary("boredom")}; ${n} alert${n === 1 ? "" : "s"} marked (listed under Alerts below).`);
}

function renderStudents() {
  const body = $("students"); body.replaceChildren();
  for (const s of current.students) {
    const tr = CM.el("tr", { testid: "review-student-row", tabindex: "0", class: "clickable",
                             "aria-label": "Show the timeline of " + s.name });
    tr.addEventListener("click", () => showStudent(s));
    tr.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); showStudent(s); } });
    tr.appendChild(CM.el("td", {}, s.name + (s.opted_out ? " (opted out)" : "")));
    tr.appendChild(CM.el("td", { testid: "student-joined" }, CM.clock(s.joined_at)));
    tr.appendChild(CM.el("td", { testid: "student-left" }, s.left_at ? CM.clock(s.left_at) : (current.session.ended_at ? "at the end" : "still in class")));
    tr.appendChild(CM.el("td", {}, Math.round(s.seconds_analysed) + " s"));
    tr.appendChild(CM.el("td", {}, CM.pct(s.face_share)));
    const shares = CM.el("td");
    const strip = CM.el("div", { class: "bar", role: "img", "aria-label": "Expressions of " + s.name + ": " +
      CM.EMOTIONS.map((label) => label + " " + CM.pct(s.share[label] || 0)).join(", ") });
    strip.style.width = "220px"; strip.style.display = "flex";
    CM.EMOTIONS.forEach((label, i) => {
      const part = CM.el("span", { title: label + " " + CM.pct(s.share[label]) });
      part.style.width = ((s.share[label] || 0) * 100) + "%"; part.style.background = CM.COLORS[i]; strip.appendChild(part);
    });
    shares.appendChild(strip); tr.appendChild(shares);
    tr.appendChild(CM.el("td")).appendChild(CM.bar("confusion", s.mean_confusion, "mean confusion of " + s.name));
    tr.appendChild(CM.el("td")).appendChild(CM.bar("boredom", s.mean_boredom, "mean boredom of " + s.name));
    tr.appendChild(CM.el("td", {}, s.alerts));
    body.appendChild(tr);
  }
}

// One student's confusion and boredom over the session (stored scores, bucket means), their alerts and
// the thresholds: what the teacher clicked a row for.
function showStudent(student) {
  selectedStudent = student.participant_id;
  $("student-detail").classList.remove("hidden");
  $("student-detail-title").textContent = student.name + ": confusion and boredom over time";
  const canvas = $("student-timeline"); const ctx = canvas.getContext("2d"); const [t0, t1] = span();
  axes(ctx, canvas, t0, t1);
  const series = (current.student_series || {})[student.participant_id] || [];
  const width = current.bucket_seconds || 10;
  if (!series.length) {
    ctx.fillText(student.opted_out ? "Opted out: not analysed." : "No analysed samples.", 60, 60);
    canvas.setAttribute("aria-label", `${student.name}: no analysed samples.`);
    return;
  }
  const th = current.thresholds || {};
  thresholdLine(ctx, canvas, th.confusion, "#d97706", "confusion threshold");
  thresholdLine(ctx, canvas, th.boredom, "#7c3aed", "boredom threshold");
  for (const [field, color] of [["confusion", "#d97706"], ["boredom", "#7c3aed"]]) {
    ctx.strokeStyle = color; ctx.lineWidth = 2; ctx.beginPath(); let started = false;
    for (const b of series) {
      if (b[field] === null || b[field] === undefined) continue;
      const x0 = X(canvas, b.t, t0, t1), x1 = X(canvas, b.t + width, t0, t1), y = Y(canvas, b[field]);
      if (!started) { ctx.moveTo(x0, y); started = true; } else ctx.lineTo(x0, y);
      ctx.lineTo(x1, y);
    }
    ctx.stroke();
  }
  const mine = current.alerts.filter((a) => a.participant_id === student.participant_id);
  ctx.strokeStyle = "#b91c1c"; ctx.lineWidth = 1;
  for (const a of mine) {
    const x = X(canvas, a.t, t0, t1); ctx.beginPath(); ctx.moveTo(x, 10); ctx.lineTo(x, canvas.height - 20); ctx.stroke();
  }
  const peak = (field) => Math.max(...series.map((b) => b[field] || 0));
  canvas.setAttribute("aria-label", `${student.name}'s confusion (peak ${CM.pct(peak("confusion"))}) and boredom ` +
    `(peak ${CM.pct(peak("boredom"))}) from ${CM.clock(t0)} to ${CM.clock(t1)}; ${mine.length} alert${mine.length === 1 ? "" : "s"} marked.`);
}

function renderAlerts() {
  const list = $("alerts"); list.replaceChildren();
  for (const a of current.alerts) {
    const li = CM.el("li", { class: (a.level === "class" ? "class" : "") + (a.acknowledged ? " acknowledged" : "") });
    li.appendChild(CM.el("strong", {}, a.message)); li.appendChild(CM.el("div", { class: "muted" }, CM.clock(a.t) + " · " + a.level));
    list.appendChild(li);
  }
  if (!current.alerts.length) list.appendChild(CM.el("li", { class: "acknowledged" }, "No alerts in this session."));
}

async function download(kind) {
  if (!current) return;
  const sid = current.session.session_id;
  let res;
  try {
    res = await fetch("/api/sessions/" + encodeURIComponent(sid) + "/" + kind + ".csv", { headers: { Authorization: "Bearer " + token } });
  } catch (e) { $("review-error").textContent = "Download failed: cannot reach the server."; return; }
  if (!res.ok) { $("review-error").textContent = "Download failed: " + res.status; return; }
  const url = URL.createObjectURL(await res.blob());
  const a = CM.el("a", { href: url, download: csvName(current.session, kind) }); document.body.appendChild(a); a.click(); a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 5000);
}

// "classmood-maths-2b-2026-11-30-0905-samples.csv": the class title and its start, not a random session id.
function csvName(session, kind) {
  const d = new Date(session.started_at * 1000), two = (n) => String(n).padStart(2, "0");
  const when = `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())}-${two(d.getHours())}${two(d.getMinutes())}`;
  const title = (session.title || "class").normalize("NFKD").replace(/[^\w]+/g, "-").replace(/^-+|-+$/g, "").toLowerCase().slice(0, 40);
  return `classmood-${title || "class"}-${when}-${kind}.csv`;
}

function clearReview() {
  $("session-info").textContent = "";
  for (const id of ["timeline", "signals"]) {
    const c = $(id); c.getContext("2d").clearRect(0, 0, c.width, c.height); c.setAttribute("aria-label", "No session selected.");
  }
  $("students").replaceChildren(); $("alerts").replaceChildren(); $("class-list").replaceChildren();
  $("student-detail").classList.add("hidden");
}

async function deleteSession() {
  if (!current) return;
  const s = current.session;
  if (!confirm(`Delete the session of ${new Date(s.started_at * 1000).toLocaleString()}? ` +
               "Every stored sample and alert of it is erased; this cannot be undone.")) return;
  const res = await CM.api("DELETE", "/api/sessions/" + encodeURIComponent(s.session_id), token);
  if (!res.ok) { $("review-error").textContent = "Not deleted: " + ((res.data && res.data.error) || res.status); return; }
  await loadSessions();
}

$("session-select").addEventListener("change", (e) => loadReview(e.target.value));
$("download-samples").addEventListener("click", () => download("samples"));
$("download-alerts").addEventListener("click", () => download("alerts"));
$("delete-session").addEventListener("click", deleteSession);
if (!token) $("review-error").textContent = "This review link has no key (#t=…)."; else loadSessions();
