"""Consent in someone else's meeting: the opt-out tags a participant puts in their display name, and the
texts the bot posts where the meeting has a chat. Shared by bot/janus_room.py (another app's Janus room)
and signaling/ingest.py (Zoom / Meet / Teams through a meeting-bot service)."""
from __future__ import annotations

import re

OPT_OUT = re.compile(r"\[no[- ]analysis\]|\(no[- ]analysis\)|#optout", re.I)
NOTICE = ("An expression-analysis assistant (classmood) has joined this class. It estimates facial expressions "
          "from students' video (never audio, never recordings), stores only those estimates, and alerts the "
          "teacher privately. To opt out at any time, add [no-analysis] to your display name: analysis of "
          "your video stops at once.")
GREETING = "Welcome {name}: an expression-analysis assistant is in this class. To opt out, add [no-analysis] to your name."


def analysable(display: str, teacher: str) -> bool:
    """False for the teacher (by display name), anyone with an opt-out tag, and other bots ("classmood...")."""
    name = display.strip()
    return not (OPT_OUT.search(name) or (teacher and name.lower() == teacher.strip().lower())
                or name.lower().startswith("classmood"))
