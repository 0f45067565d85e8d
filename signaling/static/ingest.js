// Teacher page, "Use with Zoom / Meet / Teams" (signaling/ingest.py): create, copy and revoke the URL a
// meeting-bot service (Recall.ai, Attendee) streams to, and switch analysis off for a meeting participant.
// Kept apart from teach.js: it only uses the HTTP API with the teacher token. testids: ingest-card,
// ingest-service, ingest-create, ingest-url, ingest-copy, ingest-revoke, ingest-status, ingest-people,
// ingest-person, ingest-toggle.
"use strict";
(() => {
  const room = CM.roomFromPath("/teach/");
  const token = CM.tokenFromHash();
  if (!room || !token) return;
  const base = "/api/rooms/" + encodeURIComponent(room) + "/ingest";
  const card = CM.el("section", { class: "card", id: "ingest-card", testid: "ingest-card" });
  card.appendChild(CM.el("h2", {}, "Use with Zoom / Meet / Teams"));
  card.appendChild(CM.el("p", { class: "tight" },
    "Paste this URL into your meeting-bot service's real-time websocket setting. Tell your students: anyone " +
    "who adds [no-analysis] to their name is not analysed."));
  const row = CM.el("div", { class: "row" });
  const service = CM.el("select", { id: "ingest-service", testid: "ingest-service", "aria-label": "Service" });
  for (const [value, label] of [["recall", "Recall.ai"], ["attendee", "Attendee"]]) {
    service.appendChild(CM.el("option", { value }, label));
  }
  const create = CM.el("button", { type: "button", testid: "ingest-create" }, "Use with Zoom / Meet / Teams");
  const copy = CM.el("button", { type: "button", class: "secondary hidden", testid: "ingest-copy" }, "Copy");
  const revoke = CM.el("button", { type: "button", class: "danger hidden", testid: "ingest-revoke" }, "Revoke");
  row.append(service, create, copy, revoke);
  const url = CM.el("code", { class: "link", testid: "ingest-url" });
  const status = CM.el("p", { class: "status", role: "status", testid: "ingest-status" });
  const people = CM.el("ul", { class: "tight", testid: "ingest-people" });
  card.append(row, url, status, people);
  const first = document.querySelector("main > section.card");
  if (first) first.after(card); else document.body.appendChild(card);

  create.addEventListener("click", async () => {
    const res = await CM.api("POST", base, token, { service: service.value });
    if (!res.ok) { status.textContent = (res.data && res.data.error) || "could not create the URL"; return; }
    url.textContent = res.data.url;
    status.textContent = "New URL (any previous one for this service no longer works).";
    copy.classList.remove("hidden"); revoke.classList.remove("hidden");
  });
  copy.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(url.textContent); status.textContent = "Copied."; }
    catch (e) { status.textContent = "Select the URL and copy it."; }
  });
  revoke.addEventListener("click", async () => {
    const res = await CM.api("DELETE", base + "?service=" + encodeURIComponent(service.value), token);
    status.textContent = res.ok ? "Revoked: the service can no longer stream to this class." : "could not revoke";
    if (res.ok) { url.textContent = ""; copy.classList.add("hidden"); revoke.classList.add("hidden"); }
  });

  // Meeting participants (ids rc-… / at-…) with the teacher's analysis switch.
  async function refresh() {
    const res = await CM.api("GET", "/api/rooms/" + encodeURIComponent(room), token);
    if (!res.ok || !res.data) return;
    const meetingPeople = (res.data.participants || []).filter((p) => /^(rc|at)-/.test(p.peer_id));
    people.replaceChildren(...meetingPeople.map((p) => {
      const li = CM.el("li", { testid: "ingest-person" }, p.name + " ");
      const toggle = CM.el("button", { type: "button", class: "secondary", testid: "ingest-toggle",
                                       "aria-pressed": String(!p.analysis) },
                           p.analysis ? "Turn analysis off" : "Turn analysis on");
      toggle.addEventListener("click", async () => {
        await CM.api("POST", base + "/consent", token, { peer_id: p.peer_id, analysis: !p.analysis });
        refresh();
      });
      li.appendChild(toggle);
      return li;
    }));
  }
  refresh();
  setInterval(refresh, 5000);
})();
