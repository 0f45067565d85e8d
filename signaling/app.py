"""create_app: builds one signaling server (its ServerState, middlewares, background hooks, routes).

Where the rest lives: signaling/api.py (HTTP API), signaling/relay.py (WebSockets), signaling/pages.py
(pages and assets), signaling/housekeeping.py (retention, lonely bots, shutdown), signaling/routes.py
(the route table), signaling/state.py (what handlers read from the app).
"""
from __future__ import annotations

import logging
import secrets
from pathlib import Path

from aiohttp import web

from core.settings import ServerSettings, Settings
from core.simulcast import temporal_layer_for
from signaling import housekeeping, ingest, metrics
from signaling.guard import GUARD_KEY, ConnectionGuard, guard_middleware
from signaling.joins import JoinLimits
from signaling.meeting import Meeting
from signaling.middleware import client_address_middleware, response_headers, security_headers
from signaling.rooms import Registry
from signaling.routes import ROUTES
from signaling.sfu import Sfu
from signaling.state import REGISTRY_KEY, SETTINGS_KEY, SOCKETS_KEY, STATE_KEY, ServerState
from signaling.store import Store

log = logging.getLogger("classmood.signaling")
STATIC_DIR = Path(__file__).resolve().parent / "static"
CLIENT_MAX_SIZE = 64 * 1024   # any request body; POST /api/rooms allows far less (api.MAX_BODY)


def create_app(settings: Settings, store: Store | None = None, static_dir: Path | None = None,
               sfu: Sfu | None = None) -> web.Application:
    """The signaling server. `store` defaults to an in-memory MemoryStore; `static_dir` to signaling/static.
    With `sfu` (a connected signaling.sfu.Sfu), every room is a meeting on Janus (signaling/meeting.py);
    without it, students send their video straight to the bot."""
    if store is None:
        from signaling.memory_store import MemoryStore
        store = MemoryStore()
    cfg: ServerSettings = settings.server
    ice_servers = settings.ice_servers()
    registry = Registry(cfg.max_rooms, cfg.max_participants_per_room, cfg.room_idle_seconds,
                        cfg.max_teachers_per_room)
    static = Path(static_dir or STATIC_DIR).resolve()
    trusted = settings.trusted_proxy_networks()
    guard = ConnectionGuard(cfg.header_timeout_seconds, cfg.max_connections_per_address, trusted)
    # keepalive_timeout: aiohttp closes a connection this long after its last response (or after it opened)
    # unless a complete request head has arrived; trickled bytes do not extend it (signaling/guard.py).
    app = web.Application(middlewares=[client_address_middleware(trusted), guard_middleware(guard),
                                       security_headers], client_max_size=CLIENT_MAX_SIZE,
                          handler_args={"keepalive_timeout": cfg.idle_timeout_seconds,
                                        # unread body after a response: drained at most this long
                                        "lingering_time": cfg.body_timeout_seconds})
    app[GUARD_KEY] = guard
    app.on_response_prepare.append(response_headers(cfg.public_url))
    default_key = cfg.worker_key == ServerSettings.worker_key
    if default_key and cfg.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("server.worker_key is the development default on a non-loopback host: set your own")
    # The development key is public, so tokens derived from it would be guessable: with it, bot tokens
    # come from a secret of this process instead (they then do not survive a restart).
    bot_token_secret = secrets.token_urlsafe(32) if default_key else cfg.worker_key
    state = ServerState(settings=settings, store=store, registry=registry, static=static, ice_servers=ice_servers,
                        video={"width": cfg.video_width, "height": cfg.video_height, "fps": cfg.video_fps,
                               "kbps": cfg.video_kbps},
                        bot_token_secret=bot_token_secret, joins=JoinLimits(cfg))
    if sfu is not None:
        state.meeting = Meeting(sfu, lambda: list(registry.rooms.values()),
                                students_see_students=cfg.students_see_students,
                                publish={"width": cfg.meeting_video_width, "height": cfg.meeting_video_height,
                                         "fps": cfg.meeting_video_fps, "simulcast": True},
                                gallery_low_from=cfg.meeting_gallery_low_from,
                                bot_temporal_layer=temporal_layer_for(settings.bot.sample_hz))
        meeting = state.meeting
        app.on_cleanup.append(lambda _app: meeting.stop_tasks())
    app[STATE_KEY] = state
    app[SETTINGS_KEY] = settings
    app[REGISTRY_KEY] = registry
    app[SOCKETS_KEY] = state.sockets
    app.on_shutdown.append(housekeeping.close_sockets)
    app.cleanup_ctx.append(housekeeping.erase_expired_sessions)
    app.cleanup_ctx.append(housekeeping.dismiss_lonely_bots)
    app.cleanup_ctx.append(housekeeping.reassign_orphaned_rooms)
    ingest.setup(app)
    metrics.install(app)
    app.router.add_routes(ROUTES)
    return app
