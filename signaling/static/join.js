// Student page. testids: student-name, analysis-toggle, join, leave, status, preview, analysis-notice, retention-note
"use strict";
const room = CM.roomFromPath("/join/");
const key = new URLSearchParams(location.search).get("k") || "";
const $ = (id) => document.getElementById(id);
let ws = null, pc = null, stream = null, botId = null, iceServers = [], video = { width: 320, height: 240, fps: 5 };
let joined = false;

function status(text, kind) { $("status").textContent = text; $("status").className = "status " + (kind || ""); }
function analysisOn() { return $("analysis-toggle").checked; }
function send(msg) { if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(Object.assign({ v: 1 }, msg))); }

async function startCamera() {
  if (stream) return stream;
  stream = await navigator.mediaDevices.getUserMedia({ audio: false, video: {
    width: { ideal: video.width }, height: { ideal: video.height }, frameRate: { ideal: video.fps, max: video.fps * 2 } } });
  $("preview").srcObject = stream;
  return stream;
}

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
  closePeer();
  if (!joined) return;
  if (!analysisOn()) { status("Analysis is off: your video is not sent to the assistant.", ""); return; }
  if (!botId) { status("Connected. Waiting for the assistant to join.", ""); return; }
  const media = await startCamera();
  const peer = new RTCPeerConnection({ iceServers });
  pc = peer;
  for (const track of media.getVideoTracks()) peer.addTransceiver(track, { direction: "sendonly", streams: [media] });
  peer.addEventListener("connectionstatechange", () => {
    if (pc !== peer) return;
    if (peer.connectionState === "connected") status("Connected — the assistant is analysing your expressions.", "ok");
    else if (peer.connectionState === "failed") status("Could not reach the assistant (network). Your teacher may need a TURN server.", "warn");
  });
  await peer.setLocalDescription(await peer.createOffer());
  await waitForIce(peer);
  if (pc !== peer) return;
  send({ type: "signal", to: botId, data: { type: "offer", sdp: peer.localDescription.sdp } });
  status("Connecting to the assistant…", "");
}

function join() {
  const name = $("student-name").value.trim();
  if (!name) { status("Please type your name first.", "warn"); return; }
  $("join").disabled = true;
  ws = new WebSocket(CM.wsUrl());
  ws.addEventListener("open", () => send({ type: "hello", role: "student", room, key, name: name.slice(0, 60), analysis: analysisOn() }));
  ws.addEventListener("message", async (event) => {
    let msg; try { msg = JSON.parse(event.data); } catch (e) { return; }
    if (msg.type === "welcome") {
      joined = true; botId = msg.bot; iceServers = msg.ice_servers || []; video = msg.video || video;
      $("leave").disabled = false;
      try { await startCamera(); } catch (e) { status("Camera not available: " + e.message, "warn"); }
      await connectToBot();
    } else if (msg.type === "bot") {
      botId = msg.peer_id; await connectToBot();
    } else if (msg.type === "signal" && msg.data && msg.data.type === "answer" && pc) {
      try { await pc.setRemoteDescription({ type: "answer", sdp: msg.data.sdp }); } catch (e) { status("Connection error: " + e.message, "warn"); }
    } else if (msg.type === "error") {
      status("The server says: " + msg.message, "warn");
    }
  });
  ws.addEventListener("close", () => {
    closePeer(); joined = false; $("join").disabled = false; $("leave").disabled = true;
    if (!$("status").classList.contains("warn")) status("Disconnected.", "");
  });
}

function leave() {
  closePeer();
  if (ws) ws.close();
  if (stream) { stream.getTracks().forEach((t) => t.stop()); stream = null; $("preview").srcObject = null; }
  joined = false; status("You left the class.", "");
}

$("join").addEventListener("click", join);
$("leave").addEventListener("click", leave);
$("analysis-toggle").addEventListener("change", async () => {
  if (!joined) return;
  send({ type: "consent", analysis: analysisOn() });
  await connectToBot();
});
if (!key) status("This link is incomplete: ask your teacher for the full student link.", "warn");

// How long estimates are kept (the server's storage.retention_days), told before anyone joins.
CM.api("GET", "/api/policy").then((res) => {
  const days = res.ok && res.data ? res.data.retention_days : null;
  if (days > 0) {
    document.getElementById("retention-note").textContent =
      `They are erased ${days} days after class at the latest; your teacher can delete them sooner.`;
  }
});
