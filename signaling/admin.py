"""Operator commands for a classmood deployment.

    python -m signaling.admin teacher-link ROOM [--storage-url URL] [--server-public-url URL]

teacher-link: a teacher lost the teacher link. Prints a new one (and the review link); only the new
token's sha256 is stored, so the old link stops working. A server that has the room loaded in memory
right now still accepts the old token until it unloads the room (room_idle_seconds after everyone left)
or restarts: run this between classes, or restart the server.
"""
from __future__ import annotations

import argparse
import secrets
import sys

from core import settings as settings_mod
from core.errors import describe
from signaling import protocol
from signaling.auth import token_hash


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m signaling.admin", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    link = commands.add_parser("teacher-link", help="print a new teacher link for ROOM (the old one is revoked)")
    link.add_argument("room", help="the room id (in the old link: /teach/ROOM)")
    # Only what this command reads: where the database is (storage.*) and the links' address (server.*).
    settings_mod.add_arguments(link, sections=("server", "storage"))
    args = parser.parse_args(argv)
    try:
        settings = settings_mod.load(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not protocol.is_id(args.room):
        print(f"error: {args.room!r} is not a room id", file=sys.stderr)
        return 2
    # The wiring, as in bot/__main__.py: signaling/ itself never imports storage/.
    from storage.export import sqlite_path
    path = sqlite_path(settings.storage.url)
    if path is not None and not path.is_file():
        print(f"error: database file {path} not found (set --storage-url)", file=sys.stderr)
        return 2
    from storage import Repository
    try:
        repo = Repository.from_settings(settings.storage)
    except Exception as exc:   # bad URL, missing driver, unreadable file
        print(f"error: cannot open database {settings.storage.url}: {describe(exc)}", file=sys.stderr)
        return 2
    try:
        room = repo.get_room(args.room)
        if room is None or not room.get("join_key"):
            print(f"error: no room {args.room} in {settings.storage.url}", file=sys.stderr)
            return 1
        token = secrets.token_urlsafe(24)
        repo.replace_teacher_token_hash(args.room, token_hash(token))
    finally:
        repo.close()
    base = settings.base_url()
    print(f"{base}/teach/{args.room}#t={token}")
    print(f"review: {base}/review/{args.room}#t={token}", file=sys.stderr)
    print("the old teacher link no longer works (a server with the room loaded accepts it until it unloads "
          "the room or restarts)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
