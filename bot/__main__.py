"""python -m bot run | worker | join — the main job, a bot worker, or one bot in one room.

    python -m bot run                  # signaling server + a bot worker on loopback; prints the links
    python -m bot serve                # the server with the database only (deployments)
    python -m bot worker --server URL  # a bot worker that joins rooms when teachers invite it
    python -m bot join --room R --server URL --token TEACHER_TOKEN   # + the server's worker key (settings)
    python -m bot join --room R --token T --janus ws://HOST:8188/ --janus-room ID [--pin P]   # another app's room
All settings: `--help` (flags) or CLASSMOOD_* environment variables.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import secrets
import signal
import sys
from typing import TYPE_CHECKING, Mapping

from core import logs
from core import settings as settings_mod

if TYPE_CHECKING:   # the sub-commands import what they need when they run (serve loads no models)
    from bot.janus_room import JanusRoomFeeds
    from signaling.sfu import Sfu
    from storage import Repository


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bot", description="classmood bot")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="server + bot worker on loopback (the main job)")
    run.add_argument("--no-room", action="store_true", help="do not create a first room on start")
    run.add_argument("--ready-file", default=None, help="write the links as JSON here once serving (for scripts)")
    run.add_argument("--stats-file", default=None, help="write storage and inference counters as JSON here on exit")
    serve = sub.add_parser("serve", help="the signaling server with the database, no bot (for deployments)")
    worker = sub.add_parser("worker", help="a bot worker: joins rooms when invited")
    worker.add_argument("--server", default=None, help="server base URL (default: from server settings)")
    worker.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                        help="serve this worker's Prometheus metrics on PORT (GET /metrics); `run` and `serve` "
                             "have /metrics on the server's port")
    worker.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                        help="address of --metrics-port (default 127.0.0.1; 0.0.0.0 in a container)")
    worker.add_argument("--ready-file", default=None,
                        help="write {\"worker_id\", \"pid\"} as JSON here once connected to the server (for scripts)")
    worker.add_argument("--stats-file", default=None, help="write storage and inference counters as JSON here on exit")
    join = sub.add_parser("join", help="join one room now")
    join.add_argument("--room", required=True)
    join.add_argument("--server", default=None)
    join.add_argument("--token", default=os.environ.get("CLASSMOOD_ROOM_TOKEN"),
                      help="the room's teacher token or bot token (env CLASSMOOD_ROOM_TOKEN)")
    byo = join.add_argument_group("bring your own Janus room: analyse the publishers of another app's VideoRoom "
                                  "(alerts and review stay on the classmood room --room)")
    byo.add_argument("--janus", default=None, metavar="URL", help="that Janus's WebSocket API, e.g. ws://host:8188/ "
                     "(its API secret, if any: --janus-api-secret)")
    byo.add_argument("--janus-room", default=None, metavar="ID", help="the VideoRoom id (digits = a numeric id)")
    byo.add_argument("--pin", default="", help="the VideoRoom's PIN, if it has one")
    byo.add_argument("--janus-teacher", default="", metavar="NAME",
                     help="the teacher's display name there (never analysed)")
    byo.add_argument("--janus-textroom", default=None, metavar="ID",
                     help="the TextRoom where the bot posts its consent notice (default: the same id as "
                          "--janus-room, if that Janus has one; 'none': post nothing)")
    for p in (run, serve, worker, join):
        p.add_argument("--log-level", default=os.environ.get("CLASSMOOD_LOG_LEVEL", "INFO"))
        p.add_argument("--log-format", choices=logs.LOG_FORMATS, default=os.environ.get("CLASSMOOD_LOG_FORMAT", "text"),
                       help="text, or json: one JSON object per line (env CLASSMOOD_LOG_FORMAT)")
        settings_mod.add_arguments(p)
    return parser


async def _until_signalled() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except NotImplementedError:  # pragma: no cover - non-POSIX
            pass
    await stop.wait()


async def main_async(args: argparse.Namespace, settings: settings_mod.Settings) -> int:
    from aiohttp import web

    from storage import Repository

    repository = Repository.from_settings(settings.storage)
    media = None
    if args.command in ("run", "serve"):
        # The meeting's media server first: a Janus that is down is a clear message, not a half-started class.
        from bot.media_server import MediaServerError, open_media_server
        try:
            media = await open_media_server(settings)
        except MediaServerError as exc:
            print(f"error: {exc}", file=sys.stderr)
            await asyncio.to_thread(repository.close)
            return 2
    if args.command == "serve":
        try:
            return await serve_only(settings, repository, media.sfu if media else None)
        finally:
            if media is not None:
                await media.close()
    # Only now: bot.service brings aiortc, OpenCV and the models, which `serve` (the server image) has not got.
    from bot.service import BotService
    try:
        service = BotService(settings, repository)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:   # RuntimeError: the inference process failed to start
        print(f"error: {exc}", file=sys.stderr)
        repository.close()
        if media is not None:
            await media.close()
        return 2
    await service.start()
    runner = None
    try:
        if args.command == "run":
            from bot import metrics as bot_metrics
            from signaling.metrics import METRICS_KEY
            from signaling.server import ServerRunner, create_app
            app = create_app(settings, store=repository, sfu=media.sfu if media else None)
            # One process, one endpoint: the bot's metrics join the server's /metrics (which already
            # reports this repository's writer).
            bot_metrics.install(app[METRICS_KEY], service, with_storage=False)
            runner = ServerRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, settings.server.host, settings.server.port)
            try:
                await site.start()
            except OSError as exc:
                print(f"error: cannot listen on {settings.server.host}:{settings.server.port} ({exc.strerror}); "
                      f"choose another with --server-port", file=sys.stderr)
                return 2
            base = settings.base_url()
            local = f"http://{settings.server.host}:{settings.server.port}"
            ready = asyncio.Event()
            worker = asyncio.ensure_future(service.serve_worker(local, settings.server.worker_key, ready))
            await asyncio.wait_for(ready.wait(), 30)
            links = {"home": base + "/"}
            if not args.no_room:
                links.update(await _create_room(local, base))
            print(f"classmood is running at {base}/  (Ctrl+C to stop)", flush=True)
            print(f"  meetings: {'on Janus at ' + media.url if media else 'off (video goes to the assistant only)'}",
                  flush=True)
            if "teacher_url" in links:
                print(f"  teacher page (keep it secret): {links['teacher_url']}", flush=True)
                print(f"  student link (share it):       {links['student_url']}", flush=True)
            if args.ready_file:
                write_json_file(args.ready_file, links)
            await _until_signalled()
            worker.cancel()
        elif args.command == "worker":
            server = args.server or f"http://{settings.server.host}:{settings.server.port}"
            if args.metrics_port is not None:
                from bot import metrics as bot_metrics
                try:
                    bot_metrics.serve(service, args.metrics_host, args.metrics_port)
                except OSError as exc:
                    print(f"error: cannot serve metrics on {args.metrics_host}:{args.metrics_port} ({exc.strerror})",
                          file=sys.stderr)
                    return 2
            connected = asyncio.Event()
            worker = asyncio.ensure_future(service.serve_worker(server, settings.server.worker_key, connected))
            if args.ready_file:
                async def announce() -> None:
                    await connected.wait()
                    write_json_file(args.ready_file, {"worker_id": service.worker_id, "pid": os.getpid()})
                announcing = asyncio.ensure_future(announce())
            await _until_signalled()
            worker.cancel()
            if args.ready_file:
                announcing.cancel()
        else:
            if not args.token:
                print("error: --token (the room's teacher token) is required", file=sys.stderr)
                return 2
            server = args.server or f"http://{settings.server.host}:{settings.server.port}"
            external = None
            if args.janus or args.janus_room:
                external = await _external_room(args, settings)
                if external is None:
                    return 2
            peer = service.join(server, args.room, args.token, external=external)
            done = asyncio.ensure_future(_until_signalled())
            await asyncio.wait([done, service.tasks[args.room]], return_when=asyncio.FIRST_COMPLETED)
            await peer.stop()
    finally:
        # A bot worker that is stopped hands its classes over to the other workers (they continue the
        # sessions); `run` stops the server with it, so there the classes end.
        await service.stop(handover=args.command == "worker")
        if runner is not None:
            await runner.cleanup()
        if media is not None:
            await media.close()
        await asyncio.to_thread(repository.close)
        stats = repository.stats()
        logging.getLogger("classmood.bot").info("stopped; storage %s; bot %s", stats, service.stats())
        if getattr(args, "stats_file", None):
            write_json_file(args.stats_file, {**service.stats(), "storage": stats,
                                              "samples_accepted": stats.get("accepted_samples"),
                                              "sample_hz": settings.bot.sample_hz})
    return 0


def write_json_file(path: str, data: Mapping) -> None:
    """Write JSON for scripts that poll for the file (--ready-file, --stats-file): into a temporary file beside
    it, then renamed over it, so that a reader never finds the file existing but still empty or half written."""
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as f:
        json.dump(data, f)
    os.replace(temporary, path)


async def serve_only(settings: settings_mod.Settings, repository: Repository, sfu: Sfu | None = None) -> int:
    """The signaling server with the real database; bot workers connect from elsewhere."""
    from aiohttp import web

    from signaling.server import ServerRunner, create_app
    runner = ServerRunner(create_app(settings, store=repository, sfu=sfu), access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, settings.server.host, settings.server.port).start()
        print(f"classmood server listening on http://{settings.server.host}:{settings.server.port}/ "
              f"(public URL {settings.base_url()}/)", flush=True)
        await _until_signalled()
    except OSError as exc:
        print(f"error: cannot listen on {settings.server.host}:{settings.server.port} ({exc.strerror})", file=sys.stderr)
        return 2
    finally:
        await runner.cleanup()
        await asyncio.to_thread(repository.close)
    return 0


async def _external_room(args: argparse.Namespace, settings: settings_mod.Settings) -> JanusRoomFeeds | None:
    """Join the external VideoRoom first: no such room, a wrong PIN or a Janus that is down is one clear line."""
    from bot.janus_room import JanusRoomError, JanusRoomFeeds
    from core.simulcast import temporal_layer_for
    if not (args.janus and args.janus_room):
        print("error: --janus URL and --janus-room ID go together", file=sys.stderr)
        return None
    room = int(args.janus_room) if args.janus_room.isdigit() else args.janus_room
    chat = args.janus_textroom
    textroom = None if chat is None else "" if chat.lower() == "none" else int(chat) if chat.isdigit() else chat
    feeds = JanusRoomFeeds(args.janus, room, pin=args.pin, api_secret=settings.janus.api_secret,
                           teacher=args.janus_teacher, textroom=textroom,
                           temporal=temporal_layer_for(settings.bot.sample_hz))
    try:
        await feeds.connect()
    except JanusRoomError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    return feeds


async def _create_room(local: str, base: str) -> dict[str, str]:
    import aiohttp
    async with aiohttp.ClientSession() as http:
        async with http.post(local + "/api/rooms", json={"title": "My class"}) as response:
            response.raise_for_status()
            return await response.json()


def check_model(settings: settings_mod.Settings) -> None:
    """Raise if the bot's expression model cannot be found, before the database is opened (core.settings
    cannot check this: the model names and scripted patterns belong to models/ and bot/)."""
    model = settings.model.model
    if model.startswith("scripted:"):
        from models.runtime.analyse import scripted_probs
        scripted_probs(model.split(":", 1)[1])
    else:
        from models.runtime.classifier import resolve_model
        resolve_model(model)


def ensure_worker_key(args: argparse.Namespace, environ: Mapping[str, str]) -> None:
    """`run` with no worker key given (flag or env): the server and its in-process worker share one made up
    for this process, never the public development key (with it, anyone holding a teacher link could seat
    a bot and receive the students' cameras)."""
    if args.command == "run" and args.cm__server__worker_key is None and not environ.get("CLASSMOOD_SERVER_WORKER_KEY"):
        args.cm__server__worker_key = secrets.token_urlsafe(32)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logs.configure(args.log_level, args.log_format)
    except ValueError as exc:   # CLASSMOOD_LOG_FORMAT with another value (argparse checks only the flag)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ensure_worker_key(args, os.environ)
    try:
        settings = settings_mod.load(args)
        if args.command != "serve":
            check_model(settings)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(main_async(args, settings))
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
