"""The machine and software a benchmark ran on, for the header of bench/results.md."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from procs import Pinning

LITELLM_PYTHON = Path(__file__).resolve().parent / ".litellm-venv" / "bin" / "python"
VERSIONS_SCRIPT = """
import json
from importlib import metadata
found = {}
for name in ("litellm", "uvicorn", "uvloop", "httptools"):
    try:
        found[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        found[name] = None
print(json.dumps(found))
"""


def _lscpu(field: str) -> str | None:
    try:
        output = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return None
    for line in output.splitlines():
        name, _, value = line.partition(":")
        if name.strip() == field:
            return value.strip()
    return None


def _memory_gb() -> float | None:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024 / 1e9
    return None


def _os_name() -> str:
    try:
        release = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        return platform.platform()
    name = release.get("PRETTY_NAME", "").strip('"')
    debian = Path("/etc/debian_version")
    return f"{name} ({debian.read_text().strip()})" if debian.exists() else name


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _postgres_version() -> str | None:
    try:
        import psycopg

        with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", connect_timeout=3) as conn:
            row = conn.execute("SHOW server_version").fetchone()
    except Exception:
        return None
    return f"PostgreSQL {row[0]}" if row else None


def _litellm_versions() -> dict:
    if not LITELLM_PYTHON.exists():
        return {}
    done = subprocess.run([str(LITELLM_PYTHON), "-c", VERSIONS_SCRIPT], capture_output=True, text=True, check=False)
    return json.loads(done.stdout) if done.returncode == 0 else {}


def machine_describe(pin: Pinning, uvicorn_flags: list[str], wrk: str | None) -> dict:
    return {
        "cpu_model": _lscpu("Model name") or platform.processor(),
        "cpus": os.cpu_count(),
        "hypervisor": _lscpu("Hypervisor vendor"),
        "memory_gb": _memory_gb(),
        "kernel": platform.release(),
        "os": _os_name(),
        "python": sys.version.split()[0],
        "postgresql": _postgres_version(),
        "kitemesh": {name: _version(name) for name in ("django", "uvicorn", "uvloop", "httptools", "psycopg")},
        "kitemesh_uvicorn_flags": uvicorn_flags,
        "litellm": _litellm_versions(),
        "wrk": wrk,
        "pinned": pin.enabled,
    }
