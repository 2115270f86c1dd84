"""Processes for the benchmark: starting and stopping the servers under test, CPU pinning, and sampling a
worker's memory and CPU time from /proc."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Pinning:
    """`taskset` prefixes: the gateway under test on CPU 0, the upstream and the drivers on CPU 1."""

    gateway: list[str]
    driver: list[str]

    @classmethod
    def detect(cls) -> Pinning:
        if shutil.which("taskset") and len(os.sched_getaffinity(0)) >= 2:
            return cls(["taskset", "-c", "0"], ["taskset", "-c", "1"])
        return cls([], [])

    @property
    def enabled(self) -> bool:
        return bool(self.gateway)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Service:
    """A server started for the run, in its own session so it and any children stop together."""

    name: str
    port: int
    log_path: Path
    process: subprocess.Popen | None = None
    _worker_pid: int | None = None

    def start(self, command: list[str], env: dict[str, str], cwd: Path) -> None:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()  # the child keeps its own descriptor

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, path: str, timeout: float = 180.0) -> None:
        """Poll `path` until it answers 200; fail early when the process dies."""
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}{path}"
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited during start-up:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise RuntimeError(f"{self.name} was not ready after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        """SIGTERM the session we started, then SIGKILL it if it lingers."""
        if self.process is None or self.process.poll() is not None:
            return
        pgid = self.process.pid  # the session leader's pid is its group id (start_new_session)
        for sig, wait in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(pgid, sig)
            except ProcessLookupError:
                return
            try:
                self.process.wait(timeout=wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def worker_pid(self) -> int:
        """The process that owns the listening socket: the uvicorn worker, whatever wrapper started it."""
        assert self.process is not None
        if self._worker_pid is None:
            self._worker_pid = self.process.pid
            inode = _listening_inode(self.port)
            for pid in [self.process.pid, *_descendants(self.process.pid)] if inode else []:
                if _owns_socket(pid, inode):
                    self._worker_pid = pid
                    break
        return self._worker_pid


def _listening_inode(port: int) -> str | None:
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return fields[9]
    return None


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        for child in children.get(queue.pop(), []):
            found.append(child)
            queue.append(child)
    return found


def _owns_socket(pid: int, inode: str) -> bool:
    try:
        fds = list(Path(f"/proc/{pid}/fd").iterdir())
    except OSError:
        return False
    target = f"socket:[{inode}]"
    for fd in fds:
        try:
            if os.readlink(fd) == target:
                return True
        except OSError:
            continue
    return False


# --- /proc sampling -------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (its threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of stat(5)


@dataclass
class Sampler:
    """Samples a process's RSS in a thread while a scenario runs, and its CPU time over the run."""

    pid: int
    interval: float = 0.1
    baseline_rss: int = 0
    peak_rss: int = 0
    cpu_s: float = 0.0
    wall_s: float = 0.0
    _cpu0: float = 0.0
    _t0: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Sampler:
        self.baseline_rss = self.peak_rss = rss_bytes(self.pid)
        self._cpu0, self._t0 = cpu_seconds(self.pid), time.monotonic()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
            except OSError:
                return  # the process died; the scenario reports it

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join()
        try:
            self.peak_rss = max(self.peak_rss, rss_bytes(self.pid))
            self.cpu_s = cpu_seconds(self.pid) - self._cpu0
        except OSError:
            pass
        self.wall_s = time.monotonic() - self._t0

    def as_dict(self) -> dict:
        mb = 1_000_000  # decimal megabytes, the stricter reading of the 300 MB target
        return {
            "pid": self.pid,
            "baseline_rss_mb": self.baseline_rss / mb,
            "peak_rss_mb": self.peak_rss / mb,
            "cpu_s": self.cpu_s,
            "wall_s": self.wall_s,
            "cpu_percent": 100 * self.cpu_s / self.wall_s if self.wall_s else 0.0,
        }
