"""Every route of the signaling server, in one table. A new endpoint is one line here plus its handler."""
from __future__ import annotations

from aiohttp import web

from signaling import api, ingest, lifecycle, metrics, pages, relay

ROUTES: list[web.RouteDef] = [
    # pages and their assets
    web.get("/", pages.page("index.html")),
    web.get("/join/{room}", pages.page("join.html")),
    web.get("/teach/{room}", pages.page("teach.html")),
    web.get("/review/{room}", pages.page("review.html")),
    web.get("/static/{name}", pages.static_file),
    web.get("/favicon.ico", pages.favicon),
    # public
    web.get("/healthz", api.healthz),
    web.get("/metrics", metrics.metrics),   # Prometheus text format (counts only: no names, no ids)
    web.get("/api/policy", api.policy),
    # rooms (teacher token)
    web.post("/api/rooms", api.create_room),
    web.get("/api/rooms/{room}", api.room_info),
    web.post("/api/rooms/{room}/invite", api.invite),
    web.post("/api/rooms/{room}/end", lifecycle.end_class),
    # meeting-bot services (Recall.ai, Attendee): signaling/ingest.py
    web.post("/api/rooms/{room}/ingest", ingest.create),
    web.get("/api/rooms/{room}/ingest", ingest.status),
    web.delete("/api/rooms/{room}/ingest", ingest.revoke),
    web.post("/api/rooms/{room}/ingest/consent", ingest.consent),
    # review (teacher token of the session's room)
    web.get("/api/rooms/{room}/sessions", api.sessions),
    web.get("/api/sessions/{sid}/review", api.review),
    web.delete("/api/sessions/{sid}", api.delete_session),
    web.get("/api/sessions/{sid}/samples.csv", api.samples_csv),
    web.get("/api/sessions/{sid}/alerts.csv", api.alerts_csv),
    web.get("/api/sessions/{sid}/alerts", lifecycle.session_alerts),
    # WebSockets
    web.get("/ws", relay.ws_room),
    web.get("/ws/worker", relay.ws_worker),
    web.get("/ingest/{service}/{secret}", ingest.ws_ingest),
]
