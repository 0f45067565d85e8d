// Student page. testids: join-form, student-name, analysis-toggle, join, leave, status, preview, analysis-notice,
// retention-note; meeting mode: meeting-grid, video-tile, self-view, mic-toggle, camera-toggle, assistant-status.
// Two modes, chosen by the server's welcome: "direct" (video only to the assistant, over its own WebRTC connection)
// and "sfu" (welcome.media.mode: a real meeting through the media server; see meeting.js).
"use strict";
const room = CM.roomFromPath("/join/");
const key = new URLSearchParams(location.search).get("k") || "";
const $ = (id) => document.getElementById(id);
let ws = null, pc = null, stream = null, cameraPending = null, botId = null, iceServers = [], video = { width: 320, height: 240, fps: 3, kbps: 90 };
let joined = false, myName = "", retryTimer = null, backoff = 1000, lastError = null, attempt = 0;
let mediaLosses = 0, reconnecting = false;   // video connections to the assistant lost after working (each
                                            // reconnect waits longer); a reconnect under way (it retries until one works)
let mode = "direct", meeting = null;

const INVALID_LINK = "This link is not valid any more: ask your teacher for a new one.";
const ERRORS = {
  unauthorized: INVALID_LINK,
  unknown_room: INVALID_LINK,
  room_full: "The class is full: ask your teacher, then press Join to try again.",
  rate_limited: "Too many messages came from this page: wait a minute, then press Join.",
  server_full: "The server is busy right now.",
  busy: "The server is busy right now.",
  timeout: "The connection was too slow: press Join to try again.",
  opted_out: "Analysis is off: your video is not sent to the assistant.",
  no_bot: "The assistant is not in the room yet.",
};
// Close codes 4400..4499: do not retry with the same credentials (docs/architecture.md).
const CLOSED = { 4401: INVALID_LINK, 4404: INVALID_LINK, 4408: ERRORS.timeout,
                 4429: "The class is full or busy: wait a minute, then press Join." };

function status(text, kind) { $("status").textContent = text; $("status").className = "status " + (kind || ""); }
function errorText(code, message) { return ERRORS[code] || (message ? "Problem: " + message + "." : "Something went wrong."); }
function analysisOn() { return $("analysis-toggle").checked; }
function send(msg) {
  if (!ws || ws.readyState !== WebSocket.OPEN) return false;
  ws.send(JSON.stringify(Object.assign({ v: 1 }, msg)));
  return true;
}
function setButtons(inClass) { $("join").disabled = inClass; $("leave").disabled = !inClass; }

// ---- meeting mode ---------------------------------------------------------------------------------------------
// The notice says what the switch does in this mode; the page learns the mode from /api/policy (media_mode, when
// the server tells it) and for certain from the welcome.
function showMode(next) { mode = next === "sfu" ? "sfu" : "direct"; document.body.dataset.mode = mode; }

function assistantLine() {
  $("assistant-status").textContent = !botId ? "The expression-analysis assistant is not in the room."
    : analysisOn() ? "The expression-analysis assistant is in the room and receives your video."
    : "The expression-analysis assistant is in the room; analysis is off: it receives nothing from you.";
}

function meetingStatus(text, kind) { if (joined && mode === "sfu") status(text, kind); }

function enterMeeting(welcome) {
  if (!meeting) {
    meeting = new Meeting({
      send, status: meetingStatus, selfView: $("self-view"),
      // The teacher's tile goes on the stage; other students beside your own view.
      place(tile, feed) {
        if (feed.role === "teacher") $("stage").appendChild(tile); else $("others").appendChild(tile);
        stageHint();
      },
    });
    meeting.setMic(!pressed("mic-toggle")); meeting.setCamera(!pressed("camera-toggle"));
  }
  $("meeting").classList.remove("hidden");
  $("meeting-controls").appendChild($("leave"));   // Leave sits with the other meeting buttons
  meeting.start(welcome);
  assistantLine(); stageHint();
}
function stageHint() { $("stage-empty").classList.toggle("hidden", $("stage").querySelector(".tile") !== null); }
function pressed(id) { return $(id).getAttribute("aria-pressed") === "true"; }
function toggle(id, apply) {
  const on = !pressed(id);   // pressed = microphone muted / camera off
  $(id).setAttribute("aria-pressed", String(on));
  if (meeting) apply(!on);
}

// ---- camera: live only while joined with analysis on -------------------------------------------------------
function stopTracks(media) { if (media) media.getTracks().forEach((t) => t.stop()); }
function stopCamera() { stopTracks(stream); stream = null; $("preview").srcObject = null; $("preview").classList.add("hidden"); }

function startCamera() {
  if (stream) return Promise.resolve(stream);
  if (cameraPending) return cameraPending;
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    const err = new Error("the camera API is not available on this page"); err.name = "InsecureContextError";
    return Promise.reject(err);
  }
  cameraPending = navigator.mediaDevices.getUserMedia({ audio: false, video: {
    width: { ideal: video.width }, height: { ideal: video.height }, frameRate: { ideal: video.fps, max: video.fps * 2 } } })
    .then((media) => {
      cameraPending = null;
      if (!joined || !analysisOn()) { stopTracks(media); return null; }  // switched off, left or disconnected meanwhile
      stream = media; $("preview").srcObject = media; $("preview").classList.remove("hidden");
      for (const track of media.getVideoTracks()) {
        track.addEventListener("ended", () => {   // unplugged, or stopped by the browser or the system
          if (stream !== media) return;
          closePeer(); stopCamera();
          status("Your camera stopped: switch analysis off and on to restart it.", "warn");
        });
      }
      return media;
    }, (err) => { cameraPending = null; throw err; });
  return cameraPending;
}

function cameraProblem(err) {
  switch (err && err.name) {
    case "NotAllowedError": case "SecurityError":
      return "Camera blocked: allow it in the address bar, then switch analysis off and on.";
    case "NotFoundError": case "OverconstrainedError":
      return "No camera found: connect one, then switch analysis off and on.";
    case "NotReadableError": case "AbortError":
      return "Your camera is busy (is another app using it?): close that app, then switch analysis off and on.";
    case "InsecureContextError":
      return "This page cannot use your camera: open the exact link your teacher sent (it starts with https).";
    default:
      return "Camera not available: switch analysis off and on to try again.";
  }
}

// ---- the video connection to the assistant ----------------------------------------------------------------
function closePeer() { if (pc) { try { pc.close(); } catch (e) { /* already closed */ } pc = null; } }

function waitForIce(peer) {
  return new Promise((resolve) => {
    if (peer.iceGatheringState === "complete") return resolve();
    const done = () => { if (peer.iceGatheringState === "complete") { peer.removeEventListener("icegatheringstatechange", done); resolve(); } };
    peer.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, 5000);  // send what we have: vanilla ICE, no trickle
  });
}

async function connectToBot() {
  const mine = ++attempt;   // a newer call (switch, bot arriving or leaving, reconnect) supersedes this one
  closePeer();
  if (!joined) return;
  if (!analysisOn()) {
    stopCamera();
    status("Analysis is off: your camera is off and nothing is sent to the assistant.", "");
    return;
  }
  let media;
  try { media = await startCamera(); } catch (err) {
    if (mine === attempt && joined) status(cameraProblem(err), "warn");
    return;
  }
  if (mine !== attempt || !media || !joined || !analysisOn()) return;   // the switch may have changed meanwhile
  if (!botId) { status("Connected. Waiting for the assistant to join.", ""); return; }
  const peer = new RTCPeerConnection({ iceServers });
  pc = peer;
  // Capped at what the server asks (welcome.video.kbps): the assistant sends no bandwidth feedback, and
  // uncapped a browser stays near its start rate (~300 kbit/s), several times what 2 Hz analysis needs.
  const sendEncodings = [{ maxBitrate: 1000 * (video.kbps || 90), maxFramerate: video.fps }];
  for (const track of media.getVideoTracks()) peer.addTransceiver(track, { direction: "sendonly", streams: [media], sendEncodings });
  let worked = false;
  peer.addEventListener("connectionstatechange", () => {
    if (pc !== peer) return;
    if (peer.connectionState === "connected") {
      worked = true; reconnecting = false;
      status("Connected — the assistant is analysing your expressions.", "ok");
    } else if ((peer.connectionState === "failed" || peer.connectionState === "closed") && (worked || reconnecting)) {
      // It worked, then broke (a network fault, a busy assistant that gave up on us): connect again, later
      // each time it happens, while still in class with analysis on.
      closePeer();
      reconnecting = true;
      const wait = Math.min(30000, 2000 * 2 ** mediaLosses++);
      status("The connection to the assistant was lost; reconnecting…", "warn");
      const mine = attempt;
      setTimeout(() => { if (mine === attempt && joined && analysisOn() && !pc) connectToBot(); }, wait);
    } else if (peer.connectionState === "failed") {
      status("Could not reach the assistant (network). Your teacher may need a TURN server.", "warn");
    }
  });
  status("Connecting to the assistant…", "");
  try {
    await peer.setLocalDescription(await peer.createOffer());
    await waitForIce(peer);
  } catch (err) {
    if (pc === peer) { closePeer(); status("Could not start the video connection: switch analysis off and on to try again.", "warn"); }
    return;
  }
  if (pc !== peer || !joined || !analysisOn()) return;
  send({ type: "signal", to: botId, data: { type: "offer", sdp: peer.localDescription.sdp } });
}

// ---- the signaling socket, reconnected with backoff -------------------------------------------------------
function disconnected() {
  attempt++; joined = false; botId = null;
  closePeer(); stopCamera();
  if (meeting) { meeting.closeAll(false); stageHint(); }   // the camera stays on for the reconnect
}

function openSocket() {
  retryTimer = null; lastError = null;
  const sock = new WebSocket(CM.wsUrl());
  ws = sock;
  sock.addEventListener("open", () => {
    if (ws === sock) send({ type: "hello", role: "student", room, key, name: myName, analysis: analysisOn() });
  });
  sock.addEventListener("message", async (event) => {
    if (ws !== sock) return;
    let msg; try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.type === "welcome") {
      joined = true; backoff = 1000; lastError = null;
      botId = msg.bot; iceServers = msg.ice_servers || []; video = msg.video || video;
      showMode(msg.media && msg.media.mode);
      if (mode === "sfu") enterMeeting(msg); else await connectToBot();
    } else if (mode === "sfu" && meeting && meeting.handle(msg)) {
      stageHint();
    } else if (msg.type === "bot") {
      botId = msg.peer_id;
      if (mode === "sfu") assistantLine(); else await connectToBot();
    } else if (msg.type === "signal" && msg.data && msg.data.type === "answer" && pc && msg.from === botId) {
      const peer = pc;
      try { await peer.setRemoteDescription({ type: "answer", sdp: msg.data.sdp }); } catch (e) {
        if (pc === peer) status("The video connection failed: switch analysis off and on to try again.", "warn");
      }
    } else if (msg.type === "class_ended") {
      classEnded();
    } else if (msg.type === "error") {
      if (!joined || msg.code === "rate_limited") lastError = msg;   // these end the connection: say why at close
      status(errorText(msg.code, msg.message), "warn");
    }
  });
  sock.addEventListener("close", (event) => {
    if (ws !== sock) return;   // left the class, or replaced by a newer connection
    ws = null;
    disconnected();
    if (event.code === 4411) { classEnded(); return; }   // the teacher ended the class
    if (event.code >= 4400 && event.code <= 4499) {
      status(lastError ? errorText(lastError.code, lastError.message)
        : (CLOSED[event.code] || `You were disconnected (code ${event.code}): press Join to try again.`), "warn");
      setButtons(false);
      return;
    }
    const wait = backoff; backoff = Math.min(backoff * 2, 15000);
    status((lastError ? errorText(lastError.code, lastError.message) + " " : "Connection lost. ") +
           `Reconnecting in ${Math.round(wait / 1000)} s…`, "warn");
    retryTimer = setTimeout(openSocket, wait);
  });
}

function join(event) {
  if (event) event.preventDefault();
  if (ws || retryTimer) return;   // already in (or rejoining) the class
  const typed = $("student-name").value.trim();
  if (!typed) { status("Please type your name first.", "warn"); $("student-name").focus(); return; }
  if (!key) { status("This link is incomplete: ask your teacher for the full student link.", "warn"); return; }
  myName = typed.slice(0, 60); backoff = 1000;
  setButtons(true);
  status("Connecting…", "");
  openSocket();
}

function leave() {
  clearTimeout(retryTimer); retryTimer = null;
  const sock = ws; ws = null;   // its close event is ignored from now on
  disconnected();
  if (meeting) {   // camera and microphone off too; the Leave button goes back beside Join
    meeting.closeAll(true); $("meeting").classList.add("hidden"); $("form-buttons").appendChild($("leave"));
  }
  if (sock) sock.close(1000);
  setButtons(false);
  status("You left the class.", "");
}

// The teacher ended the class: camera (and in a meeting microphone and the others' video) off, no reconnect.
function classEnded() {
  leave();
  status("The class has ended: your camera and microphone are off. You can close this page.", "");
}

$("join-form").addEventListener("submit", join);
$("leave").addEventListener("click", leave);
$("analysis-toggle").addEventListener("change", async () => {
  if (!joined) return;   // the next hello carries the switch
  send({ type: "consent", analysis: analysisOn() });
  // In a meeting the camera stays on: the server stops the assistant's copy of the video, the class still sees you.
  if (mode === "sfu") assistantLine(); else await connectToBot();
});
$("mic-toggle").addEventListener("click", () => toggle("mic-toggle", (on) => meeting.setMic(on)));
$("camera-toggle").addEventListener("click", () => toggle("camera-toggle", (on) => meeting.setCamera(on)));
if (!key) status("This link is incomplete: ask your teacher for the full student link.", "warn");

// How long estimates are kept (the server's storage.retention_days), told before anyone joins.
CM.api("GET", "/api/policy").then((res) => {
  const days = res.ok && res.data ? res.data.retention_days : null;
  if (res.ok && res.data && res.data.media_mode && !joined) showMode(res.data.media_mode);
  if (days > 0) {
    $("retention-note").textContent = `They are erased ${days} days after class at the latest; your teacher can delete them sooner.`;
  } else if (res.ok) {
    $("retention-note").textContent = "They are kept until your teacher deletes them.";
  }
});
