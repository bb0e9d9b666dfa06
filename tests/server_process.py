"""A sub300 server in a subprocess, as a user runs it: on a free loopback port, awaited on ``/readyz``,
stopped by its PID (never by name).  Shared by the slow tests that start ``sub300 serve`` or a README
example (tests/test_drain_serve.py, tests/test_examples.py)."""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time
from pathlib import Path

import aiohttp

#: how much of the log a failure message quotes (characters, from the end)
LOG_TAIL = 3000


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that was free a moment ago (TCP, or UDP with ``socket.SOCK_DGRAM``)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``argv`` in a subprocess whose HTTP port is ``port``; stdout to ``out``, stderr to ``err``
    (both to ``out`` when ``err`` is None).  `log` is the stderr (or the merged output)."""

    def __init__(self, argv: list[str], *, port: int, env: dict[str, str], cwd: Path, out: Path,
                 err: Path | None = None) -> None:
        self.port, self.base = port, f"http://127.0.0.1:{port}"
        self.out, self.err = out, err
        with open(out, "wb") as stdout, open(err or out, "ab") as stderr:
            self.proc = subprocess.Popen(argv, stdout=stdout, stderr=stderr if err else subprocess.STDOUT,
                                         env=env, cwd=cwd)

    def log(self) -> str:
        return (self.err or self.out).read_text(errors="replace")

    def tail(self) -> str:
        return self.log()[-LOG_TAIL:]

    async def ready(self, session: aiohttp.ClientSession, timeout: float) -> None:
        """Until ``/readyz`` answers 200; fails at once if the process exits, or after ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"server exited with {self.proc.returncode}: {self.tail()}"
            try:
                async with session.get(self.base + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
        raise TimeoutError(f"server not ready: {self.tail()}")

    async def exited(self, timeout: float) -> tuple[int, float]:
        """(exit status, seconds waited); fails if the process is still running after ``timeout`` s."""
        t0 = time.monotonic()
        while self.proc.poll() is None:
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"server still running {timeout} s after SIGTERM: {self.tail()}")
            await asyncio.sleep(0.05)
        return self.proc.returncode, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
