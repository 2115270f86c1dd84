"""KiteMesh as a separate uvicorn PROCESS on a loopback port, on the test run's own database.

The in-process LiveServer shares Python objects with the test; this one shares nothing but the database
(and the loopback upstream and tool servers the test started), so what it sees is what was committed.
It runs with `kitemesh_site.settings.base` and a DATABASE_URL built from the test database's settings as
this run sees them (after pytest-django switched to the test database), so it uses that database as is."""

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

import httpx
from django.conf import settings
from django.db import connection

START_TIMEOUT = 30.0
LEASE_SECONDS = 1.0  # the run lease of the `servers` fixture's processes: a killed run lapses fast
STOP_TIMEOUT = 15.0


def database_url_of_this_run() -> str:
    """A DATABASE_URL naming the database this test run uses (the test database, not the configured one)."""
    db = connection.settings_dict
    if connection.vendor == "sqlite":
        path = Path(db["NAME"]).resolve()
        return f"sqlite:///{path}"
    if connection.vendor == "postgresql":
        user = quote(db.get("USER") or "", safe="")
        password = quote(db.get("PASSWORD") or "", safe="")
        credentials = f"{user}:{password}@" if password else (f"{user}@" if user else "")
        host = db.get("HOST") or "127.0.0.1"
        port = f":{db['PORT']}" if db.get("PORT") else ""
        return f"postgres://{credentials}{host}{port}/{quote(db['NAME'], safe='')}"
    raise RuntimeError(f"no DATABASE_URL form for {db['ENGINE']}")


def _free_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


class ServerProcess:
    """`python -m uvicorn kitemesh_site.asgi:application` in its own process. `start()` returns once
    /healthz answers; `stop()` terminates it and waits until it has exited."""

    def __init__(self, *, env: dict[str, str] | None = None, command: list[str] | None = None) -> None:
        self.command = command  # another process of the project instead (the worker), started without waiting
        self.port = _free_port()
        # Nothing inherited may point the process at a service outside the test; a test passes REDIS_URL itself.
        inherited = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
        self.env = {
            **inherited,
            "DJANGO_SETTINGS_MODULE": "kitemesh_site.settings.base",
            "DATABASE_URL": database_url_of_this_run(),
            "DATABASE_CONN_MAX_AGE": "0",
            "DJANGO_DEBUG": "0",
            "KITEMESH_TOOL_HOST_ALLOWLIST": "127.0.0.1",
            "KITEMESH_LOG_LEVEL": "WARNING",
            "KITEMESH_VAULT_KEY": settings.KITEMESH_VAULT_KEY,  # the secrets the test wrote must decrypt there
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.log = tempfile.NamedTemporaryFile(prefix="kitemesh-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def start(self) -> "ServerProcess":
        if self.command is not None:
            self.process = subprocess.Popen(
                [sys.executable, *self.command],
                cwd=settings.BASE_DIR,
                env=self.env,
                stdout=self.log,
                stderr=subprocess.STDOUT,
            )
            return self
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "kitemesh_site.asgi:application",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
        ]
        self.process = subprocess.Popen(
            command, cwd=settings.BASE_DIR, env=self.env, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server process exited ({self.process.returncode}):\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"the server process did not answer /healthz in {START_TIMEOUT:g} s:\n{self.output()}"
                )
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=STOP_TIMEOUT)

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no shutdown code of the process runs."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=STOP_TIMEOUT)

    def close(self) -> None:
        """Stop it and remove its log."""
        self.stop()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
