"""The bot's Prometheus metrics (see signaling/metrics.py for the server's and how processes expose them).

Read from the BotService when scraped, except the inference round time, a histogram the inference thread
feeds once per round (one lock and a bucket search: nothing next to the round itself).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from signaling.metrics import StorageCollector

if TYPE_CHECKING:
    from bot.service import BotService

# Rounds take ~5-40 ms for a class (one batched detection + classification); the tail shows starvation.
ROUND_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)


def round_histogram() -> Histogram:
    """Not registered anywhere: BotCollector yields it from whichever registry holds the collector."""
    return Histogram("classmood_inference_round_seconds",
                     "Time of one batched inference round, from taking its frames to their results "
                     "(a round sent ahead waits for the one before it)",
                     buckets=ROUND_BUCKETS, registry=None)


class BotCollector(Collector):
    def __init__(self, service: BotService) -> None:
        self.service = service

    def collect(self) -> Iterable[Metric]:
        service = self.service
        rooms = list(service.rooms.values())
        yield GaugeMetricFamily("classmood_bot_rooms", "Rooms this bot process is in", value=len(rooms))
        yield GaugeMetricFamily("classmood_students_analysed", "Students in the bot's rooms with analysis on",
                                value=sum(1 for room in rooms for s in room.students.values() if s.analysis))
        stats = getattr(service.repository, "stats", None)   # storage.Repository; test recorders may lack it
        yield CounterMetricFamily("classmood_samples", "Sample rows produced (rate(): samples per second)",
                                  value=stats().get("accepted_samples", 0) if callable(stats) else 0)
        yield CounterMetricFamily("classmood_frames_analysed", "Frames through inference",
                                  value=service.analyzer.frames)
        yield CounterMetricFamily("classmood_frames_dropped", "Frames replaced by a newer one before inference "
                                  "(the bot fell behind)", value=service.mailbox.dropped)
        yield CounterMetricFamily("classmood_frame_errors", "Frames that could not be analysed",
                                  value=service.analyzer.errors)
        yield from service.round_seconds.collect()


def install(registry: CollectorRegistry, service: BotService, with_storage: bool) -> None:
    """Add the bot's metrics to `registry` (and its writer's, where no server reports the same store)."""
    registry.register(BotCollector(service))
    stats = getattr(service.repository, "stats", None)
    if with_storage and callable(stats):
        registry.register(StorageCollector(stats))


def serve(service: BotService, host: str, port: int) -> None:
    """A worker's own /metrics on host:port (a thread of prometheus-client's; it ends with the process)."""
    registry = CollectorRegistry(auto_describe=True)
    install(registry, service, with_storage=True)
    start_http_server(port, addr=host, registry=registry)
