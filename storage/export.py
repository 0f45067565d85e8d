"""Export a stored session (samples.csv, alerts.csv, review.json), or erase stored sessions.

    python -m storage.export --list
    python -m storage.export --session SID --out DIR [--storage-url sqlite:///classmood.sqlite]
    python -m storage.export --delete SID          # erase one session (samples, alerts, participants)
    python -m storage.export --erase-expired       # erase sessions older than storage.retention_days now
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING
from pathlib import Path

from core import settings as settings_mod
from core.errors import describe
from storage.csvrows import iso_time

if TYPE_CHECKING:
    from storage.repository import Repository


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--session", help="session id (see --list)")
    parser.add_argument("--out", help="folder to write samples.csv, alerts.csv and review.json into")
    parser.add_argument("--list", action="store_true", help="list stored sessions")
    parser.add_argument("--delete", metavar="SID", action="append", default=[],
                        help="erase this session and everything stored about it (repeatable)")
    parser.add_argument("--erase-expired", action="store_true",
                        help="erase the sessions that storage.retention_days has expired (the server does this hourly)")
    parser.add_argument("--db", metavar="PATH_OR_URL",
                        help="a SQLite file or any SQLAlchemy URL (overrides --storage-url)")
    settings_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_mod.load(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = (args.db if "://" in args.db else f"sqlite:///{args.db}") if args.db else settings.storage.url
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        # Opening a missing file would create an empty database: say what is wrong instead.
        print(f"error: database file {path} not found", file=sys.stderr)
        return 2
    from sqlalchemy.exc import SQLAlchemyError

    from storage.repository import Repository
    try:
        repo = Repository(url)
    except (SQLAlchemyError, ImportError, ValueError) as exc:   # bad file, bad URL, missing driver
        print(f"error: cannot open database {url}: {describe(exc)}", file=sys.stderr)
        return 2
    try:
        if args.list:
            for s in repo.list_sessions(None):
                ended = "open" if s["ended_at"] is None else f"ended {iso_time(s['ended_at'])}"
                print(f"{s['session_id']}  room {s['room_id']}  started {iso_time(s['started_at'])}  {ended}  "
                      f"participants {s['participants']}  samples {s['samples']}  alerts {s['alerts']}")
            return 0
        if args.delete or args.erase_expired:
            return erase(repo, args.delete, settings.storage.retention_days if args.erase_expired else None, url)
        if not args.session or not args.out:
            print("error: give --session SID and --out DIR (or --list)", file=sys.stderr)
            return 2
        review = repo.session_review(args.session)
        if review is None:
            print(f"error: no session {args.session!r} in {url}", file=sys.stderr)
            return 2
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.csv", "w", newline="", encoding="utf-8") as f:
            f.writelines(repo.iter_samples_csv(args.session))
        with open(out / "alerts.csv", "w", newline="", encoding="utf-8") as f:
            f.writelines(repo.iter_alerts_csv(args.session))
        (out / "review.json").write_text(json.dumps(review, indent=1), encoding="utf-8")
        for name in ("samples.csv", "alerts.csv", "review.json"):
            print(out / name)
        return 0
    except (OSError, SQLAlchemyError) as exc:
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 2
    finally:
        repo.close()


def erase(repo: Repository, session_ids: list[str], retention_days: float | None, url: str) -> int:
    missing = [sid for sid in session_ids if not repo.delete_session(sid)]
    for sid in session_ids:
        if sid not in missing:
            print(f"deleted {sid}")
    for sid in missing:
        print(f"error: no session {sid!r} in {url}", file=sys.stderr)
    if retention_days is not None:
        if retention_days <= 0:
            print("error: storage.retention_days is 0 (keep until deleted): nothing expires", file=sys.stderr)
            return 2
        erased = repo.delete_sessions_before(time.time() - retention_days * 86400)
        print(f"erased {len(erased)} session(s) older than {retention_days:g} days" + "".join(f"\n  {sid}" for sid in erased))
    return 2 if missing else 0


def sqlite_path(url: str) -> Path | None:
    """The file behind a sqlite:/// URL, or None (another database, or in-memory SQLite)."""
    if not url.startswith("sqlite") or ":memory:" in url or "///" not in url:
        return None
    path = url.split("///", 1)[1].split("?", 1)[0]
    return Path(path) if path else None


if __name__ == "__main__":
    sys.exit(main())
