"""The slow `install` tests' fresh virtualenvs, built side by side.

Each one (`pip install .` of a copy of the repository, and each image's Dockerfile pip steps) is a minute or
more of pip, much of it waiting for downloads and the disk: built one after the other they were ~190 s of
the suite. The first test that needs one starts every one the selected tests need, each on its own thread;
a test module's fixture then waits for its own (`fresh_installs.get(name)`), and a failed build fails the
tests that need it with the builder's own message.
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable

import pytest

BUILDERS: dict[str, Callable[[Path], Any]] = {}    # fixture name -> builds into an empty folder, returns the result
_selected: set[str] = set()                        # the fixture names the selected tests use


def builder(name: str) -> Callable[[Callable[[Path], Any]], Callable[[Path], Any]]:
    """Registers a test module's build function for the fixture `name` (at import, i.e. at collection)."""
    def register(build: Callable[[Path], Any]) -> Callable[[Path], Any]:
        BUILDERS[name] = build
        return build
    return register


def note_selected(items: Iterable[pytest.Item]) -> None:
    for item in items:
        _selected.update(name for name in getattr(item, "fixturenames", ()) if name in BUILDERS)


class FreshInstalls:
    def __init__(self, tmp_path_factory: pytest.TempPathFactory) -> None:
        self._factory = tmp_path_factory
        self._pool = ThreadPoolExecutor(max_workers=max(1, len(_selected)), thread_name_prefix="fresh-install")
        self._builds: dict[str, Future] = {}
        for name in sorted(_selected):
            self._start(name)

    def _start(self, name: str) -> Future:
        if name not in self._builds:
            self._builds[name] = self._pool.submit(BUILDERS[name], self._factory.mktemp(name))
        return self._builds[name]

    def get(self, name: str) -> Any:
        return self._start(name).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
