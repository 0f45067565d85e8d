"""python -m signaling: the server alone with an in-memory store (development; `python -m bot run` is the product)."""
from __future__ import annotations

import logging
import sys

from aiohttp import web

from core import settings as settings_mod
from signaling.server import create_app


def main(argv: list[str] | None = None) -> int:
    try:
        _, settings = settings_mod.parse(argv, description=__doc__)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    print(f"signaling server on http://{settings.server.host}:{settings.server.port}/ (in-memory store)", flush=True)
    web.run_app(create_app(settings), host=settings.server.host, port=settings.server.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
