"""The media server of the main job: an embedded Janus child process (kept alive), or an external one.

    media = await open_media_server(settings)      # None when janus.mode is off
    app = create_app(settings, store=..., sfu=media.sfu)
    ...
    await media.close()

Embedded: Debian's Janus on 127.0.0.1 with secrets made up for this run, restarted within a second if
it dies (the Sfu reconnects and the rooms publish again). External: `janus.url` with the configured
secrets; a Janus that is down or refuses the secret is a clear MediaServerError naming the URL.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass

from core.settings import JANUS_MODES, Settings
from signaling.janus import JanusError, JanusUnavailable
from signaling.janus_process import INSTALL_HINT, JanusConfig, JanusNotInstalled, JanusProcess, free_port
from signaling.sfu import Sfu

log = logging.getLogger("classmood.media")

class MediaServerError(RuntimeError):
    """The media server cannot be used; the message says which and what to do."""


@dataclass
class MediaServer:
    sfu: Sfu
    process: JanusProcess | None = None
    _watch: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        return self.sfu.url

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
        await self.sfu.close()
        if self.process is not None:
            await self.process.stop()
            self.process.cleanup()

    async def _keep_alive(self) -> None:
        """Restart an embedded Janus that died (crash, OOM, kill): the class must not lose its media."""
        assert self.process is not None
        while True:
            await asyncio.sleep(0.5)
            if not self.process.running():
                log.error("the embedded Janus exited (code %s); restarting it. Its log: %s",
                          self.process.process.returncode if self.process.process else "?", self.process.log_tail(5))
                try:
                    await self.process.start()
                except (RuntimeError, OSError) as exc:
                    log.error("restarting Janus failed: %s; trying again", exc)
                    await asyncio.sleep(2)


async def open_media_server(settings: Settings) -> MediaServer | None:
    cfg = settings.janus
    if cfg.mode not in JANUS_MODES:
        raise MediaServerError(f"janus.mode must be one of {', '.join(JANUS_MODES)} (got {cfg.mode!r})")
    if cfg.mode == "off":
        return None
    process = None
    if cfg.mode == "embedded":
        janus = JanusConfig(host="127.0.0.1", port=cfg.port or free_port(), api_secret=secrets.token_urlsafe(24),
                            admin_key=secrets.token_urlsafe(24), rtp_ports=cfg.rtp_ports)
        process = JanusProcess(janus)
        try:
            await process.start()
        except JanusNotInstalled as exc:
            raise MediaServerError(f"{exc} (or run without meetings: --janus-mode off)") from None
        except (RuntimeError, OSError) as exc:
            process.cleanup()
            raise MediaServerError(f"could not start Janus: {exc}") from None
        url, api_secret, admin_key = janus.url, janus.api_secret, janus.admin_key
    else:
        if not cfg.url:
            raise MediaServerError("janus.mode is external but janus.url is empty: set --janus-url ws://HOST:8188/")
        url, api_secret, admin_key = cfg.url, cfg.api_secret, cfg.admin_key
    sfu = Sfu(url, api_secret, admin_key, max_publishers=settings.server.max_participants_per_room
              + settings.server.max_teachers_per_room)
    try:
        await sfu.start(cfg.connect_timeout_seconds)
        await sfu.check()
    except JanusUnavailable as exc:
        if process is not None:
            await process.stop()
            process.cleanup()
        raise MediaServerError(f"{exc.reason}. Start Janus there (its WebSocket transport on), "
                               f"or let classmood run its own (--janus-mode embedded; {INSTALL_HINT})") from None
    except JanusError as exc:
        if process is not None:
            await process.stop()
            process.cleanup()
        # 403: Janus's API secret; 429/433: the VideoRoom's admin_key missing or wrong.
        hint = {403: " (check --janus-api-secret)", 429: " (check --janus-admin-key)",
                433: " (check --janus-admin-key)"}.get(exc.code, "")
        raise MediaServerError(f"Janus at {url} refused classmood: {exc.reason}{hint}") from None
    server = MediaServer(sfu, process)
    if process is not None:
        server._watch = asyncio.ensure_future(server._keep_alive())
    log.info("meetings on Janus at %s (%s)", url, cfg.mode)
    return server
