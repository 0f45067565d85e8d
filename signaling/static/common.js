// Shared helpers for classmood pages. Text from the network is always inserted with textContent.
"use strict";
const CM = {
  EMOTIONS: ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"],
  COLORS: ["#dc2626", "#65a30d", "#7c3aed", "#f59e0b", "#2563eb", "#db2777", "#94a3b8"],
  wsUrl() { return (location.protocol === "https:" ? "wss://" : "ws://") + location.host + "/ws"; },
  roomFromPath(prefix) { return decodeURIComponent(location.pathname.slice(prefix.length).split("/")[0]); },
  tokenFromHash() { const m = location.hash.match(/[#&]t=([A-Za-z0-9_-]+)/); return m ? m[1] : ""; },
  async api(method, path, token, body) {
    const headers = {};
    if (token) headers.Authorization = "Bearer " + token;
    if (body !== undefined) headers["Content-Type"] = "application/json";
    let res;
    try {
      res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
    } catch (e) {   // network error: never leave a caller waiting on an exception it does not expect
      return { ok: false, status: 0, data: { error: "cannot reach the server: check your connection and try again" } };
    }
    let data = null;
    try { data = await res.json(); } catch (e) { data = null; }
    return { ok: res.ok, status: res.status, data };
  },
  el(tag, attrs, text) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v; else if (k === "testid") node.dataset.testid = v; else node.setAttribute(k, v);
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  },
  // A 0..1 value as a bar; a meter for assistive technology (label: what it measures, e.g. "confusion of Asha").
  bar(kind, value, label) {
    const known = value != null && Number.isFinite(value);
    const percent = known ? Math.round(Math.max(0, Math.min(1, value)) * 100) : 0;
    const text = known ? CM.pct(percent / 100) : "not enough data yet";
    const bar = CM.el("div", { class: "bar " + kind, title: text, role: "meter", "aria-label": label || kind,
                               "aria-valuemin": "0", "aria-valuemax": "100", "aria-valuenow": String(percent),
                               "aria-valuetext": text });
    const fill = CM.el("span");
    fill.style.width = percent + "%";
    bar.appendChild(fill);
    return bar;
  },
  // A score bar with its number beside it and a mark at the alert threshold (teacher page): the bar is
  // what the alerts compare (the score relative to the student's usual, once known); `detail` says more.
  scoreBar(kind, value, threshold, label, detail) {
    const wrap = CM.el("span", { class: "score" });
    const bar = CM.bar(kind, value, label);
    if (threshold != null && Number.isFinite(threshold)) {
      const mark = CM.el("i", { class: "mark", testid: "threshold-mark", title: "alert threshold " + Number(threshold).toFixed(2) });
      mark.style.left = Math.round(Math.max(0, Math.min(1, threshold)) * 100) + "%";
      bar.appendChild(mark);
    }
    if (detail) bar.title = detail;
    wrap.appendChild(bar);
    const known = value != null && Number.isFinite(value);
    wrap.appendChild(CM.el("span", { class: "score-value", testid: kind + "-value" }, known ? Number(value).toFixed(2) : "—"));
    return wrap;
  },
  // Vanilla ICE (no trickle): the server relays whole SDPs, so wait until every candidate is in the description.
  waitForIce(peer, timeoutMs) {
    return new Promise((resolve) => {
      if (peer.iceGatheringState === "complete") return resolve();
      const done = () => {
        if (peer.iceGatheringState !== "complete") return;
        peer.removeEventListener("icegatheringstatechange", done); clearTimeout(timer); resolve();
      };
      const timer = setTimeout(resolve, timeoutMs || 5000);   // send what we have
      peer.addEventListener("icegatheringstatechange", done);
    });
  },
  clock(t) { return t ? new Date(t * 1000).toLocaleTimeString() : "—"; },
  pct(v) { return v == null ? "—" : Math.round(v * 100) + "\u00a0%"; },   // no-break space: "100 %" stays on one line
};
