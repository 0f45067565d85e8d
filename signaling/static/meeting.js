// Meeting mode (welcome.media.mode === "sfu"), shared by the student and teacher pages: publish own camera and
// microphone to the media server (Janus, through the classmood server: the page never talks to Janus itself) and
// watch every feed the server lists for this connection, one RTCPeerConnection per feed. Vanilla ICE everywhere:
// the server relays whole SDPs, so every offer/answer waits for ICE gathering to finish.
// testids: video-tile (data-peer = peer_id, the name as text), tile-name, tile-info, tile-sound.
"use strict";

const MEETING_RETRY_MAX = 15000;
// In a gallery of at least media.gallery_low_from feeds, a tile this many device pixels wide or narrower gets the low
// simulcast layer (320x240 at 5 frames/s for a 640x480 camera): a class of 100 then costs the teacher ~150 kbit/s a
// student instead of ~600, and the browser decodes a quarter of the pixels. Fewer feeds: full quality everywhere.
const LOW_QUALITY_MAX_PX = 400;
// The media server reads rid simulcast; the low layer is all the assistant's 2 Hz analysis needs.
const SIMULCAST = [{ rid: "l", scaleResolutionDownBy: 2, maxBitrate: 150000, maxFramerate: 5 }, { rid: "h", maxBitrate: 600000 }];

function meetingCameraProblem(err) {
  switch (err && err.name) {
    case "NotAllowedError": case "SecurityError":
      return "Camera and microphone blocked: allow them in the address bar, then reload the page.";
    case "NotFoundError": case "OverconstrainedError":
      return "No camera or microphone found: you can still see and hear the class.";
    case "NotReadableError": case "AbortError":
      return "Your camera is busy (is another app using it?): close that app, then reload the page.";
    case "InsecureContextError":
      return "This page cannot use your camera: open the exact link you were sent (it starts with https).";
    default:
      return "Camera not available: you can still see and hear the class.";
  }
}

// Only the codecs the media server's rooms use (VP8 and Opus) are offered: a browser's full codec list makes the
// SDP several kilobytes longer, and the server refuses SDPs over 12,000 characters.
function preferCodecs(transceiver, kind) {
  if (!transceiver.setCodecPreferences || !window.RTCRtpReceiver || !RTCRtpReceiver.getCapabilities) return;
  const caps = RTCRtpReceiver.getCapabilities(kind);
  if (!caps) return;
  const wanted = kind === "video" ? ["video/vp8", "video/rtx"] : ["audio/opus"];
  const codecs = caps.codecs.filter((c) => wanted.includes(c.mimeType.toLowerCase()));
  if (!codecs.some((c) => c.mimeType.toLowerCase() !== "video/rtx")) return;   // not supported here: leave the default
  try { transceiver.setCodecPreferences(codecs); } catch (e) { /* the default list still works, only longer */ }
}

class Meeting {
  // opts: send(msg) -> bool, status(text, kind), selfView (video element), place(tile, feed) puts a new tile in the
  // page, decorate(tile, feed) after a tile is made or its feed renamed, onLocal(stream) when the camera starts.
  constructor(opts) {
    this.opts = opts;
    this.media = {}; this.iceServers = [];
    this.active = false;            // between a welcome and the socket closing (or Leave)
    this.stream = null; this.cameraPending = null; this.missing = "";
    this.micOn = true; this.cameraOn = true;
    this.pub = null; this.pubWaiting = null; this.pubGen = 0; this.pubRetry = null; this.pubBackoff = 1000;
    this.feeds = new Map();         // peer_id -> {peer_id, name, role}: what the server lets us watch now
    this.subs = new Map();          // peer_id -> {feed, tile, video, pc, timer, backoff, quality, resized}
    // Each tile's size decides the simulcast layer it asks for (see quality; a change subscribes again).
    this.sizes = typeof ResizeObserver === "function" ? new ResizeObserver((entries) => {
      for (const entry of entries) {
        const sub = this.subs.get(entry.target.closest("[data-peer]")?.dataset.peer);
        if (!sub) continue;
        clearTimeout(sub.resized);
        sub.resized = setTimeout(() => this.requalify(sub), 500);
      }
    }) : null;
  }

  // "low" for a small tile in a large gallery, "high" otherwise (or while its size is not known yet).
  quality(sub) {
    const from = Number(this.media.gallery_low_from) || 0;
    const px = sub.video.clientWidth * (window.devicePixelRatio || 1);
    return from > 0 && this.subs.size >= from && px > 0 && px <= LOW_QUALITY_MAX_PX ? "low" : "high";
  }

  // The layer this tile should get now. A change subscribes again (one short renegotiation, for a tile that crossed the
  // size limit or a gallery that crossed gallery_low_from): the server then has one way to set a layer, not two.
  requalify(sub) {
    if (this.subs.get(sub.feed.peer_id) !== sub) return;
    const quality = this.quality(sub);
    if (quality === sub.quality) return;
    sub.quality = quality;
    sub.tile.dataset.quality = quality;
    if (this.active) this.request(sub);
  }

  say(text, kind) { if (this.opts.status) this.opts.status(text, kind || ""); }
  send(msg) { return this.opts.send(msg); }

  // A new welcome (first join or after a reconnect): publish again; the server sends the feed list itself.
  start(welcome) {
    this.closeAll(false);
    this.active = true;
    this.media = welcome.media || {};
    this.iceServers = welcome.ice_servers || [];
    this.pubBackoff = 1000;
    this.publish();
  }

  // Returns true when the message belonged to the meeting.
  handle(msg) {
    if (!this.active) return false;
    if (msg.type === "published") { this.published(msg.sdp); return true; }
    if (msg.type === "feeds") { this.setFeeds(Array.isArray(msg.feeds) ? msg.feeds : []); return true; }
    if (msg.type === "offer" && msg.feed) { this.offered(msg.feed, msg.sdp); return true; }
    if (msg.type === "media" && msg.event === "reset") { this.reset(); return true; }
    if (msg.type === "error" && msg.code === "media_unavailable") {
      // The server sends a media reset once the media server is back: nothing to retry before that.
      clearTimeout(this.pubRetry); this.pubRetry = null;
      this.say("Audio/video is reconnecting…", "warn");
      return true;
    }
    if (msg.type === "error" && msg.code === "media_failed") { this.repair(msg); return true; }
    // A subscribe to a feed that has just gone: the next feed list drops its tile (the watchdog retries otherwise).
    if (msg.type === "error" && msg.code === "bad_target") return true;
    return false;
  }

  // ---- own camera and microphone --------------------------------------------------------------------------------
  camera() {
    if (this.stream) return Promise.resolve(this.stream);
    if (this.cameraPending) return this.cameraPending;
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      const err = new Error("the camera API is not available on this page"); err.name = "InsecureContextError";
      return Promise.reject(err);
    }
    const p = this.media.publish || {};
    const width = p.width || 640, height = p.height || 480, fps = p.fps || 15;
    const video = { width: { ideal: width }, height: { ideal: height }, frameRate: { ideal: fps, max: fps * 2 } };
    const audio = { echoCancellation: true, noiseSuppression: true, autoGainControl: true };
    const gum = (c) => navigator.mediaDevices.getUserMedia(c);
    // Without a microphone (or a camera) the others should still see (or hear) this person.
    this.cameraPending = gum({ audio, video }).then((s) => { this.missing = ""; return s; },
      (err) => gum({ video }).then((s) => { this.missing = "microphone"; return s; },
        () => gum({ audio }).then((s) => { this.missing = "camera"; return s; }, () => { throw err; })))
      .then((media) => {
        this.cameraPending = null;
        if (!this.active) {   // left (or disconnected) while the browser was asking: do not leave the camera on
          media.getTracks().forEach((t) => t.stop());
          const err = new Error("not in class any more"); err.name = "AbortError"; throw err;
        }
        this.stream = media;
        for (const t of media.getAudioTracks()) t.enabled = this.micOn;
        for (const t of media.getVideoTracks()) t.enabled = this.cameraOn;
        if (this.opts.selfView) this.opts.selfView.srcObject = media;
        if (this.opts.onLocal) this.opts.onLocal(media);
        for (const track of media.getTracks()) {
          track.addEventListener("ended", () => {   // unplugged, or stopped by the browser or the system
            if (this.stream !== media) return;
            this.stopCamera();
            this.say(`Your ${track.kind === "audio" ? "microphone" : "camera"} stopped: reload the page to restart it.`, "warn");
          });
        }
        return media;
      }, (err) => { this.cameraPending = null; throw err; });
    return this.cameraPending;
  }

  stopCamera() {
    if (this.stream) this.stream.getTracks().forEach((t) => t.stop());
    this.stream = null;
    if (this.opts.selfView) this.opts.selfView.srcObject = null;
  }

  // Muting is local (track.enabled): the track keeps flowing as silence/black, so nothing needs renegotiating.
  setMic(on) { this.micOn = on; if (this.stream) this.stream.getAudioTracks().forEach((t) => { t.enabled = on; }); }
  setCamera(on) { this.cameraOn = on; if (this.stream) this.stream.getVideoTracks().forEach((t) => { t.enabled = on; }); }

  // ---- publishing -----------------------------------------------------------------------------------------------
  closePub() {
    if (this.pub) { try { this.pub.close(); } catch (e) { /* already closed */ } }
    this.pub = null; this.pubWaiting = null;
  }

  async publish() {
    const gen = ++this.pubGen;   // a newer publish (reset, failure, reconnect) supersedes this one
    clearTimeout(this.pubRetry); this.pubRetry = null;
    this.closePub();
    if (!this.active) return;
    let media;
    try { media = await this.camera(); } catch (err) {
      if (gen === this.pubGen && this.active) this.say(meetingCameraProblem(err), "warn");
      return;
    }
    if (gen !== this.pubGen || !this.active || !media.getTracks().length) return;
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    this.pub = pc;
    const audio = media.getAudioTracks()[0], video = media.getVideoTracks()[0];
    if (audio) preferCodecs(pc.addTransceiver(audio, { direction: "sendonly", streams: [media] }), "audio");
    if (video) {
      let transceiver = null;
      if (this.media.publish && this.media.publish.simulcast) {
        try {
          transceiver = pc.addTransceiver(video, { direction: "sendonly", streams: [media], sendEncodings: SIMULCAST });
        } catch (e) { transceiver = null; }   // no simulcast in this browser: one encoding
      }
      if (!transceiver) transceiver = pc.addTransceiver(video, { direction: "sendonly", streams: [media] });
      preferCodecs(transceiver, "video");
    }
    pc.addEventListener("connectionstatechange", () => {
      if (this.pub !== pc) return;
      if (pc.connectionState === "connected") {
        this.pubBackoff = 1000;
        const without = this.missing ? ` (no ${this.missing} found: the class cannot ${this.missing === "camera" ? "see" : "hear"} you)` : "";
        this.say("You are in the class: the others see and hear you" + without + ".", this.missing ? "warn" : "ok");
      } else if (pc.connectionState === "failed") {
        this.retryPublish("Your audio/video connection failed (network).");
      }
    });
    this.say("Connecting audio and video…", "");
    try {
      await pc.setLocalDescription(await pc.createOffer());
      await CM.waitForIce(pc);
    } catch (err) {
      if (this.pub === pc) this.retryPublish("Could not start your audio/video.");
      return;
    }
    if (this.pub !== pc || !this.active) return;
    this.pubWaiting = pc;
    if (!this.send({ type: "publish", sdp: pc.localDescription.sdp })) { this.retryPublish("Not connected."); return; }
    // No answer, or no media flowing, within 30 s: try again (a media_unavailable error cancels this until reset).
    this.pubRetry = setTimeout(() => {
      if (this.pub === pc && pc.connectionState !== "connected") this.retryPublish("Your audio/video did not connect.");
    }, 30000);
  }

  async published(sdp) {
    const pc = this.pubWaiting;
    if (!pc || pc !== this.pub) return;   // an answer to an offer we have since replaced
    this.pubWaiting = null;
    try { await pc.setRemoteDescription({ type: "answer", sdp }); } catch (e) {
      if (this.pub === pc) this.retryPublish("The media server's answer was not usable.");
    }
  }

  retryPublish(why) {
    if (!this.active) return;
    this.closePub();
    clearTimeout(this.pubRetry);
    const wait = this.pubBackoff; this.pubBackoff = Math.min(this.pubBackoff * 2, MEETING_RETRY_MAX);
    this.say(`${why} Audio/video is reconnecting in ${Math.max(1, Math.round(wait / 1000))} s…`, "warn");
    this.pubRetry = setTimeout(() => this.publish(), wait);
  }

  // ---- watching feeds -------------------------------------------------------------------------------------------
  setFeeds(list) {
    const next = new Map();
    for (const f of list) if (f && typeof f.peer_id === "string") next.set(f.peer_id, f);
    for (const id of [...this.subs.keys()]) if (!next.has(id)) this.drop(id, true);
    this.feeds = next;
    const added = [];
    for (const feed of next.values()) {
      const sub = this.subs.get(feed.peer_id);
      if (sub) {
        sub.feed = feed; sub.tile.dataset.role = feed.role || "";
        sub.tile.querySelector(".tile-name").textContent = Meeting.label(feed);
        if (this.opts.decorate) this.opts.decorate(sub.tile, feed);
      } else {
        added.push(this.add(feed));
      }
    }
    // Subscribe once every tile is placed, so the gallery's size is known; the count may change the others' layer.
    for (const sub of this.subs.values()) { if (added.includes(sub)) this.request(sub); else this.requalify(sub); }
  }

  static label(feed) {
    const name = feed.name || "?";
    return feed.role === "teacher" && !/teacher/i.test(name) ? name + " (teacher)" : name;
  }

  add(feed) {
    const tile = CM.el("figure", { class: "tile", testid: "video-tile", "data-peer": feed.peer_id, "data-role": feed.role || "" });
    const video = CM.el("video", { autoplay: "", playsinline: "", "aria-label": "Video of " + (feed.name || "?") });
    video.autoplay = true; video.playsInline = true;
    tile.appendChild(video);
    const caption = CM.el("figcaption");
    caption.appendChild(CM.el("span", { class: "tile-name", testid: "tile-name" }, Meeting.label(feed)));
    caption.appendChild(CM.el("span", { class: "tile-info", testid: "tile-info" }));
    tile.appendChild(caption);
    const sub = { feed, tile, video, pc: null, timer: null, backoff: 1000, quality: "high", resized: null };
    this.subs.set(feed.peer_id, sub);
    if (this.opts.place) this.opts.place(tile, feed);
    if (this.opts.decorate) this.opts.decorate(tile, feed);
    if (this.sizes) this.sizes.observe(video);
    return sub;
  }

  closeSub(sub) {
    clearTimeout(sub.timer); sub.timer = null;
    if (sub.pc) { try { sub.pc.close(); } catch (e) { /* already closed */ } }
    sub.pc = null;
    sub.tile.classList.remove("live");
  }

  drop(id, unsubscribe) {
    const sub = this.subs.get(id);
    if (!sub) return;
    this.closeSub(sub);
    clearTimeout(sub.resized);
    if (this.sizes) this.sizes.unobserve(sub.video);
    sub.video.srcObject = null;
    sub.tile.remove();
    this.subs.delete(id);
    if (unsubscribe) this.send({ type: "unsubscribe", feed: id });
  }

  // Ask the server for an offer for this feed; if none comes (or the connection fails), ask again with backoff.
  request(sub) {
    this.closeSub(sub);
    if (!this.active || this.subs.get(sub.feed.peer_id) !== sub) return;
    sub.quality = this.quality(sub);
    sub.tile.dataset.quality = sub.quality;
    this.send({ type: "subscribe", feed: sub.feed.peer_id, quality: sub.quality });
    sub.timer = setTimeout(() => this.retrySub(sub), 15000);
  }

  retrySub(sub) {
    if (!this.active || this.subs.get(sub.feed.peer_id) !== sub) return;
    this.closeSub(sub);
    const wait = sub.backoff; sub.backoff = Math.min(sub.backoff * 2, MEETING_RETRY_MAX);
    sub.timer = setTimeout(() => this.request(sub), wait);
  }

  async offered(id, sdp) {
    const sub = this.subs.get(id);
    if (!sub) return;   // the feed left the list meanwhile
    this.closeSub(sub);
    const pc = new RTCPeerConnection({ iceServers: this.iceServers });
    sub.pc = pc;
    const own = new MediaStream();
    pc.addEventListener("track", (event) => {
      if (sub.pc !== pc) return;
      const stream = (event.streams && event.streams[0]) || own;
      if (stream === own) own.addTrack(event.track);
      if (sub.video.srcObject !== stream) sub.video.srcObject = stream;
      this.play(sub);
    });
    pc.addEventListener("connectionstatechange", () => {
      if (sub.pc !== pc) return;
      if (pc.connectionState === "connected") { sub.backoff = 1000; sub.tile.classList.add("live"); }
      else if (pc.connectionState === "failed") this.retrySub(sub);
    });
    // If ICE never connects, ask for a fresh offer rather than show a frozen tile forever.
    sub.timer = setTimeout(() => { if (sub.pc === pc && pc.connectionState !== "connected") this.retrySub(sub); }, 20000);
    try {
      await pc.setRemoteDescription({ type: "offer", sdp });
      await pc.setLocalDescription(await pc.createAnswer());
      await CM.waitForIce(pc);
    } catch (err) {
      if (sub.pc === pc) this.retrySub(sub);
      return;
    }
    if (sub.pc !== pc || !this.active) return;
    this.send({ type: "answer", feed: id, sdp: pc.localDescription.sdp });
  }

  // Autoplay with sound may be refused until the user interacts with the page: play muted and offer a button.
  play(sub) {
    const video = sub.video;
    video.play().catch(() => {
      if (video.muted) return;
      video.muted = true;
      video.play().catch(() => {});
      if (sub.tile.querySelector(".tile-sound")) return;
      const button = CM.el("button", { class: "secondary tile-sound", testid: "tile-sound", type: "button",
                                       "aria-label": "Turn on the sound of " + (sub.feed.name || "?") }, "Turn sound on");
      button.addEventListener("click", () => { video.muted = false; video.play().catch(() => {}); button.remove(); });
      sub.tile.querySelector("figcaption").appendChild(button);
    });
  }

  // media_failed: redo the request that failed. The error may say which (request/feed fields, else its text:
  // "the media server refused the publish (...)"). Never re-publish for a failed subscription: a re-publish replaces
  // this person's feed for everyone watching it.
  repair(msg) {
    const request = msg.request || (/refused the (\w+)/.exec(msg.message || "") || [])[1] || "";
    if (msg.feed && this.subs.has(msg.feed)) { this.retrySub(this.subs.get(msg.feed)); return; }
    if (request === "publish" || (!request && this.pubWaiting)) { this.retryPublish("Audio/video failed."); return; }
    if (request === "subscribe" || request === "answer") {
      for (const sub of this.subs.values()) if (!sub.tile.classList.contains("live")) this.retrySub(sub);
    }
  }

  // The media server restarted: every connection to it is void.
  reset() {
    this.closePub();
    this.pubBackoff = 1000;
    this.publish();
    for (const sub of this.subs.values()) { sub.backoff = 1000; this.request(sub); }
  }

  // Socket lost (stopCamera false: the camera stays on for the reconnect) or Leave (true).
  closeAll(stopCamera) {
    this.active = false;
    ++this.pubGen;
    clearTimeout(this.pubRetry); this.pubRetry = null;
    this.closePub();
    for (const id of [...this.subs.keys()]) this.drop(id, false);
    this.feeds = new Map();
    if (stopCamera) this.stopCamera();
  }

  // For a page's own bookkeeping (tile decorations).
  tile(peerId) { const sub = this.subs.get(peerId); return sub ? sub.tile : null; }
}
