"""Shared fixtures: a real signaling server on a free loopback port (in-memory store)."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
