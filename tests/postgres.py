"""A real PostgreSQL server for the tests: its own cluster in a temporary folder, a free port on loopback, its
unix socket in that folder, stopped and removed at the end. Debian's `postgresql` package provides it
(`scripts/setup.sh --with-postgres`, which scripts/test.sh runs).

    @pytest.fixture(params=BACKENDS)  ->  storage_url(request, tmp_path) gives a fresh database per test

Without the binaries the PostgreSQL cases are skipped with the reason, except under CI (CI=true), where that
is a failure: the storage layer must not ship untested on the database the deployment uses.
"""
from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import pytest

INSTALL_HINT = "install it with scripts/setup.sh --with-postgres (Debian's postgresql package)"


def _bin_dir() -> Path | None:
    """Debian keeps the server binaries out of PATH, one folder per major version: take the newest."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parent.parent.name))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """One cluster. The binaries refuse to run as root, so as root they run as the `postgres` system user
    (which owns the folder); as anyone else, as that user."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin_dir = bin_dir
        self.port = _free_port()
        # Not under pytest's tmp_path: that is private to root (0700), and the server's user must reach it.
        self.root = Path(tempfile.mkdtemp(prefix="classmood-pg-"))
        self.data = self.root / "data"
        self.as_user: list[str] = []
        if os.geteuid() == 0:
            self.as_user = ["runuser", "-u", "postgres", "--"]
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres")

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self.as_user, *args], capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")

    def start(self) -> None:
        self._run(str(self.bin_dir / "initdb"), "-D", str(self.data), "--auth=trust", "--username=postgres",
                  "--encoding=UTF8", "--no-sync")
        options = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                   "-c max_connections=200")
        self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"),
                  "-o", options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            if (self.data / "postmaster.pid").exists():
                self._run(str(self.bin_dir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg
        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres",
                             autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)


def unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is required in CI: {reason}")
    pytest.skip(f"PostgreSQL tests skipped: {reason}")


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    bin_dir = _bin_dir()
    if bin_dir is None:
        unavailable(f"no initdb found; {INSTALL_HINT}")
    try:
        import psycopg  # noqa: F401  (the driver of the postgresql+psycopg URLs)
    except ImportError:
        unavailable('the psycopg driver is not installed (pip install -e ".[dev]" brings it)')
    assert bin_dir is not None
    server = PostgresServer(bin_dir)
    try:
        server.start()
    except (RuntimeError, OSError) as exc:
        server.stop()
        unavailable(f"the server did not start: {exc}")
    yield server
    server.stop()


BACKENDS = ["sqlite", "postgresql"]


def url_for(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database of `backend` for one test."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'classmood.sqlite'}"
    server: PostgresServer = request.getfixturevalue("postgres_server")
    return server.create_database()
