"""The load drivers, each run in its own process on the driver CPU: wrk for the non-stream scenarios
(bench/post.lua) and bench/load.py for streams and approvals (and for non-stream when wrk is missing)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from load import PROMPT

BENCH_DIR = Path(__file__).resolve().parent
UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
LATENCY_LINE = re.compile(r"^\s*(50|75|90|99)%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)


class DriverError(Exception):
    pass


@dataclass(frozen=True)
class Endpoint:
    """A chat completions URL and who we are to it."""

    url: str
    token: str
    model: str

    def body(self) -> str:
        # The same prompt as bench/load.py sends, so every scenario asks the same question.
        return json.dumps({"model": self.model, "messages": [{"role": "user", "content": PROMPT}]})


def wrk_available() -> bool:
    return shutil.which("wrk") is not None


def wrk_version() -> str:
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False)
    return (done.stdout or done.stderr).splitlines()[0].strip() if (done.stdout or done.stderr) else "wrk"


def wrk_run(endpoint: Endpoint, connections: int, duration: float, pin: list[str]) -> dict:
    """`wrk --latency -t1 -cN -dT` with bench/post.lua; p50/p99 in ms, requests/s, errors."""
    command = [
        *pin,
        "wrk",
        "--latency",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(duration))}s",
        "--timeout",
        "30s",
        "-s",
        str(BENCH_DIR / "post.lua"),
        endpoint.url,
    ]
    env = {**os.environ, "BENCH_BODY": endpoint.body(), "BENCH_TOKEN": endpoint.token}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=duration + 60, check=False)
    if done.returncode != 0:
        raise DriverError(f"wrk failed ({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
    return wrk_parse(done.stdout)


def wrk_parse(output: str) -> dict:
    latencies = {f"p{q}": float(value) * UNITS_MS[unit] for q, value, unit in LATENCY_LINE.findall(output)}
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.MULTILINE)
    total = re.search(r"^\s*(\d+) requests in", output, re.MULTILINE)
    if rps is None or "p50" not in latencies or "p99" not in latencies:
        raise DriverError(f"cannot read wrk's output:\n{output}")
    non_2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    errors = {"non_2xx": int(non_2xx[1]) if non_2xx else 0}
    if socket_errors:
        errors |= dict(zip(("connect", "read", "write", "timeout"), map(int, socket_errors.groups()), strict=True))
    return {
        "driver": "wrk",
        "requests": int(total[1]) if total else None,
        "requests_per_s": float(rps[1]),
        "p50_ms": latencies["p50"],
        "p99_ms": latencies["p99"],
        "errors": {"total": sum(errors.values()), "by_kind": {k: v for k, v in errors.items() if v}},
    }


def load_run(scenario: str, endpoint: Endpoint, pin: list[str], wall_timeout: float, **options: float) -> dict:
    """Run one bench/load.py scenario in its own process and return its JSON."""
    command = [*pin, sys.executable, str(BENCH_DIR / "load.py"), scenario]
    command += ["--url", endpoint.url, "--token", endpoint.token, "--model", endpoint.model]
    for name, value in options.items():
        command += [f"--{name}", str(value)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=wall_timeout, check=False)
    if done.returncode != 0:
        raise DriverError(f"load.py {scenario} failed ({done.returncode}):\n{done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout)


def nonstream_run(endpoint: Endpoint, connections: int, duration: float, pin: list[str]) -> dict:
    """wrk when installed, else bench/load.py's closed-loop driver with the same shape of result."""
    if wrk_available():
        return wrk_run(endpoint, connections, duration, pin)
    result = load_run("nonstream", endpoint, pin, duration + 60, concurrency=connections, duration=duration)
    return {
        "driver": "load.py",
        "requests": result["latency_ms"]["count"],
        "requests_per_s": result["requests_per_s"],
        "p50_ms": result["latency_ms"]["p50"],
        "p99_ms": result["latency_ms"]["p99"],
        "errors": result["errors"],
    }
