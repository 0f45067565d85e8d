"""Shared test setup (keep small and generic; the signaling server fixture lives in tests/test_signaling.py)."""
from __future__ import annotations

import os

import pytest

from tests import installs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def pytest_collection_finish(session: pytest.Session) -> None:
    installs.note_selected(session.items)


@pytest.fixture(scope="session")
def fresh_installs(tmp_path_factory):
    """The `install` tests' fresh virtualenvs (tests/installs.py): all started by the first test that needs one."""
    builds = installs.FreshInstalls(tmp_path_factory)
    yield builds
    builds.close()
