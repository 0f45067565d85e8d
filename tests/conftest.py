"""Shared test setup (keep small and generic; the signaling server fixture lives in tests/test_signaling.py)."""
from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
