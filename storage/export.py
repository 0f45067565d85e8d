"""Export a stored session: samples.csv, alerts.csv and review.json.

    python -m storage.export --list
    python -m storage.export --session SID --out DIR [--storage-url sqlite:///classmood.sqlite]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core import settings as settings_mod


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m storage.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--session", help="session id (see --list)")
    parser.add_argument("--out", help="folder to write samples.csv, alerts.csv and review.json into")
    parser.add_argument("--list", action="store_true", help="list stored sessions")
    parser.add_argument("--db", help="shortcut for --storage-url sqlite:///PATH")
    settings_mod.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = settings_mod.load(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    url = f"sqlite:///{args.db}" if args.db else settings.storage.url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).exists():
        print(f"error: database {url[len('sqlite:///'):]} not found", file=sys.stderr)
        return 2
    from sqlalchemy import select
    from sqlalchemy.exc import SQLAlchemyError

    from storage import schema
    from storage.repository import Repository
    try:
        repo = Repository(url)
    except SQLAlchemyError as exc:
        print(f"error: cannot open database {url}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    try:
        if args.list:
            with repo.engine.connect() as conn:
                rows = conn.execute(select(schema.sessions).order_by(schema.sessions.c.started_at.desc())).mappings().all()
            for row in rows:
                for s in repo.list_sessions(row["room_id"]):
                    if s["session_id"] == row["session_id"]:
                        print(f"{s['session_id']}  room {s['room_id']}  participants {s['participants']}  "
                              f"samples {s['samples']}  alerts {s['alerts']}")
            return 0
        if not args.session or not args.out:
            print("error: give --session SID and --out DIR (or --list)", file=sys.stderr)
            return 2
        review = repo.session_review(args.session)
        if review is None:
            print(f"error: no session {args.session!r} in {url}", file=sys.stderr)
            return 2
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.csv", "w", newline="") as f:
            f.writelines(repo.iter_samples_csv(args.session))
        with open(out / "alerts.csv", "w", newline="") as f:
            f.writelines(repo.iter_alerts_csv(args.session))
        (out / "review.json").write_text(json.dumps(review, indent=1))
        for name in ("samples.csv", "alerts.csv", "review.json"):
            print(out / name)
        return 0
    except (OSError, SQLAlchemyError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    finally:
        repo.close()


if __name__ == "__main__":
    sys.exit(main())
