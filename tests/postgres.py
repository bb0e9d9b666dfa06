"""A real PostgreSQL server for tests: Debian's postgresql-15 binaries, a throwaway cluster in a tmp dir.

``postgres_url`` (session fixture) runs ``initdb`` and ``pg_ctl start`` in a
temporary directory, listening on 127.0.0.1 on a free port with its socket in
that directory, creates a database and yields its SQLAlchemy URL
(``postgresql+psycopg://…``); at the end ``pg_ctl stop -m fast`` and the
directory is removed.  PostgreSQL refuses to run as root, so as root the
cluster runs as the ``postgres`` user (``setpriv``; the directory is handed
to it).  Skipped, saying why, only when the binaries are absent
(``scripts/setup.sh`` installs Debian's ``postgresql`` package).  Import the
fixture into a test module: ``from .postgres import postgres_url``.
"""
from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

PG_BIN = Path(os.environ.get("SUB300_PG_BIN", "/usr/lib/postgresql/15/bin"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _as_postgres(argv: list[str]) -> list[str]:
    """``argv`` run as the ``postgres`` user when we are root (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return argv
    user = pwd.getpwnam("postgres")
    return ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups", *argv]


def _run(argv: list[str], what: str, timeout: float = 60.0) -> None:
    done = subprocess.run(_as_postgres(argv), capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    if not (PG_BIN / "initdb").exists() or not (PG_BIN / "pg_ctl").exists():
        pytest.skip(f"PostgreSQL 15 binaries not found in {PG_BIN} (Debian: apt-get install postgresql; "
                    "scripts/setup.sh does it)")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to run the server as")
    root = Path(tempfile.mkdtemp(prefix="sub300-pg-"))
    data, sockets = root / "data", root / "run"
    sockets.mkdir()
    if os.geteuid() == 0:
        user = pwd.getpwnam("postgres")
        os.chmod(root, 0o755)
        for path in (root, sockets):
            os.chown(path, user.pw_uid, user.pw_gid)
    port = _free_port()
    started = False
    try:
        _run([str(PG_BIN / "initdb"), "-D", str(data), "-U", "sub300", "--auth=trust", "-E", "UTF8",
              "--no-sync"], "initdb")
        _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-l", str(root / "server.log"), "-w", "-t", "60",
              "-o", f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={sockets} "
                    "-c fsync=off", "start"], "pg_ctl start")
        started = True
        _run([str(PG_BIN.parent / "bin" / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "sub300",
              "records"], "createdb")
        yield f"postgresql+psycopg://sub300@127.0.0.1:{port}/records"
    finally:
        if started:
            try:
                _run([str(PG_BIN / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"], "pg_ctl stop")
            except Exception as error:   # the directory still goes; say why the server may linger
                print(f"tests/postgres.py: {error}")
        shutil.rmtree(root, ignore_errors=True)
