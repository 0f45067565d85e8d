"""GET /metrics: Prometheus's text format, through prometheus-client.

Every process keeps one CollectorRegistry of its own (`METRICS_KEY` on the server app), filled by collectors
that read the live objects when scraped: nothing is counted twice and nothing in the media or inference path
pays for metrics. What each process reports:
- the server: rooms, connected students and workers (`ServerCollector`), and the store's writer when the store
  is the real database (`StorageCollector`: backlog, rows written and lost, database errors);
- a bot (bot/metrics.py): students analysed, samples, inference round time, dropped frames, and its writer.
`python -m bot run` is one process: the bot's collector joins the server's registry, one endpoint. A separate
`bot worker` serves its own registry with `--metrics-port`.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from signaling.state import STATE_KEY

log = logging.getLogger("classmood.metrics")

METRICS_KEY = web.AppKey("metrics", CollectorRegistry)


class ServerCollector(Collector):
    """Rooms and connections of one signaling server, read from its registry of rooms when scraped."""

    def __init__(self, app: web.Application) -> None:
        self.app = app

    def collect(self) -> Iterable[Metric]:
        registry = self.app[STATE_KEY].registry
        rooms = list(registry.rooms.values())
        yield GaugeMetricFamily("classmood_rooms", "Rooms open on this server", value=len(rooms))
        yield GaugeMetricFamily("classmood_rooms_with_bot", "Rooms whose bot is connected",
                                value=sum(1 for room in rooms if room.bot is not None))
        yield GaugeMetricFamily("classmood_students_connected", "Students connected to a room",
                                value=sum(len(room.students) for room in rooms))
        yield GaugeMetricFamily("classmood_students_consenting", "Connected students with analysis on",
                                value=sum(1 for room in rooms for p in room.students.values() if p.analysis))
        yield GaugeMetricFamily("classmood_workers", "Bot workers connected to this server",
                                value=len(registry.workers))


class StorageCollector(Collector):
    """The database writer of one process (storage.Repository.stats())."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self.stats = stats

    def collect(self) -> Iterable[Metric]:
        stats = self.stats()
        yield GaugeMetricFamily("classmood_writer_backlog", "Operations accepted and not yet committed",
                                value=stats.get("pending", 0))
        yield CounterMetricFamily("classmood_db_errors", "Failed database commits (each retried)",
                                  value=stats.get("write_errors", 0))
        yield CounterMetricFamily("classmood_rows_written", "Rows committed by the writer",
                                  value=stats.get("written", 0))
        yield CounterMetricFamily("classmood_rows_lost", "Rows dropped: over max_pending_rows, rejected, or "
                                  "refused after close", value=stats.get("lost", 0))


def install(app: web.Application) -> CollectorRegistry:
    """Give `app` its registry (server and, if the store is the database, storage metrics) and return it."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServerCollector(app))
    store_stats = getattr(app[STATE_KEY].store, "stats", None)
    if callable(store_stats):
        registry.register(StorageCollector(store_stats))
    app[METRICS_KEY] = registry
    return registry


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS_KEY])
    # CONTENT_TYPE_LATEST carries the charset; aiohttp wants it apart.
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
