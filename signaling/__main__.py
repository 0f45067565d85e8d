"""python -m signaling: the signaling server alone, with an in-memory store (development only;
`python -m bot run` / `python -m bot serve` run it with the database). Takes every core.settings
flag, e.g. `--server-host 0.0.0.0 --server-port 8765`; port 0 picks a free port."""
from __future__ import annotations

import asyncio
import logging
import signal
import sys

from aiohttp import web

from core import settings as settings_mod
from signaling.server import AccessLogger, ServerRunner, create_app


async def serve(settings: settings_mod.Settings) -> None:
    runner = ServerRunner(create_app(settings), access_log_class=AccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, settings.server.host, settings.server.port)
    await site.start()
    for host, port, *_ in runner.addresses:
        print(f"signaling server on http://{'[' + host + ']' if ':' in host else host}:{port}/ (in-memory store)",
              flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    try:
        _, settings = settings_mod.parse(argv, description=__doc__)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(serve(settings))
    except KeyboardInterrupt:
        pass
    except OSError as exc:
        print(f"error: cannot listen on {settings.server.host}:{settings.server.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
