"""One-line descriptions of exceptions for log lines and CLI errors (driver messages can run to pages)."""
from __future__ import annotations


def describe(exc: BaseException, limit: int = 200) -> str:
    """"TypeName: first line of the message", capped; a database error shows its driver's message."""
    text = str(getattr(exc, "orig", None) or exc)
    first = (text.splitlines() or [""])[0].strip()[:limit]
    return f"{type(exc).__name__}: {first}" if first else type(exc).__name__
