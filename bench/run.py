"""`make bench`: measures KiteMesh's cost per request and its streaming capacity against the direct fake
upstream and against LiteLLM proxy, on this machine, in one run; writes bench/results.md and results.json.

Each server under test is one uvicorn worker pinned to CPU 0, measured by drivers pinned with the fake upstream
to CPU 1. The non-stream scenarios are interleaved across the servers in rounds; the others run one server at
a time. Durations come from the environment (BENCH_DURATION, …, see Settings); `--quick` is a
smoke run that writes bench/.run/results-quick.* instead.

Two A/B options add columns measured in the same interleaved rounds, so the VM's drift hits both sides alike:
`--baseline REF` serves KiteMesh as of commit REF beside the working tree's (its own database; the approval
scenario too), and `--variants a,b` serves each factory of bench/variants.py on KiteMesh's database.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import resource
import secrets
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from string import Template

from drivers import DriverError, Endpoint, load_run, nonstream_run, wrk_available, wrk_version
from machine import machine_describe
from procs import Pinning, Sampler, Service, free_port
from report import render_markdown

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RUN_DIR = BENCH_DIR / ".run"
PYTHON = sys.executable  # the project venv's python: `make bench` runs us with it
LITELLM = BENCH_DIR / ".litellm-venv" / "bin" / "litellm"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
POSTGRES_DB = "kitemesh_bench"
BASELINE_DIR = RUN_DIR / "baseline"
BASELINE_DB = "kitemesh_bench_baseline"
# pyproject.toml's packages: the venv's editable install maps each to this checkout.
PROJECT_PACKAGES = ("kitemesh_site", "core", "chat", "approvals", "billing")
GROUPS = {
    "chat_group": "00000000-0000-4000-8000-00000000b001",
    "slow_group": "00000000-0000-4000-8000-00000000b002",
    "approval_group": "00000000-0000-4000-8000-00000000b003",
}
CONCURRENCIES = (1, 16, 64)
TARGETS = ("direct", "kitemesh", "kitemesh_sqlite", "litellm")
# Variables that would change what is measured if inherited from the caller's shell.
INHERITED_NOISE = ("DATABASE_URL", "REDIS_URL", "PROMETHEUS_MULTIPROC_DIR", "DJANGO_SETTINGS_MODULE")


@dataclass(frozen=True)
class Settings:
    """What the run does; every number can be set from the environment."""

    quick: bool
    duration: float  # seconds per non-stream measurement (over all rounds) and for the approval scenario
    rounds: int  # the non-stream measurements are interleaved across targets in this many rounds
    warmup: float
    sse_tokens: int
    sse_tokens_per_second: float
    sse_streams: int
    sse_concurrency: int
    streams: int
    stream_tokens: int
    stream_tokens_per_second: float
    approval_concurrency: int
    upstream_latency_ms: float
    kitemesh_db: str  # the main KiteMesh column's database: postgres, as deployed (sqlite when it is down)

    @classmethod
    def from_env(cls, quick: bool) -> Settings:
        def num(name: str, default: float, quick_default: float) -> float:
            return float(os.environ.get(name) or (quick_default if quick else default))

        return cls(
            quick=quick,
            duration=num("BENCH_DURATION", 10, 2),
            rounds=int(num("BENCH_ROUNDS", 3, 1)),
            warmup=num("BENCH_WARMUP", 3, 1),
            sse_tokens=int(num("BENCH_SSE_TOKENS", 200, 40)),
            sse_tokens_per_second=num("BENCH_SSE_TOKENS_PER_SECOND", 50, 50),
            sse_streams=int(num("BENCH_SSE_STREAMS", 32, 4)),
            sse_concurrency=int(num("BENCH_SSE_CONCURRENCY", 8, 2)),
            streams=int(num("BENCH_STREAMS", 1000, 100)),
            stream_tokens=int(num("BENCH_STREAM_TOKENS", 60, 6)),
            stream_tokens_per_second=num("BENCH_STREAM_TOKENS_PER_SECOND", 2, 2),
            approval_concurrency=int(num("BENCH_APPROVAL_CONCURRENCY", 8, 4)),
            upstream_latency_ms=num("BENCH_UPSTREAM_LATENCY_MS", 0, 0),
            kitemesh_db="postgres",
        )

    @property
    def slow_model(self) -> str:
        """The upstream model name that carries the slow stream's pace (see bench/upstream.py)."""
        return f"fake-{self.stream_tokens}tok-{self.stream_tokens_per_second:g}tps"

    @property
    def stream_timeout(self) -> float:
        return 60 + 3 * self.stream_tokens / self.stream_tokens_per_second


@dataclass
class Target:
    """One column of the table: where its three endpoints are, and the process whose cost we sample."""

    key: str
    chat: Endpoint
    slow: Endpoint
    approval: Endpoint | None
    service: Service
    env: dict[str, str] | None = None  # KiteMesh's environment: the variants run in the main target's
    results: dict = field(default_factory=dict)


@dataclass
class Run:
    """The whole run's state: what every target measured, what failed, and what to stop at the end."""

    settings: Settings
    pin: Pinning
    results: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    services: list[Service] = field(default_factory=list)

    def attempt(self, target: Target, key: str, measure: Callable[[], dict]) -> None:
        """Run one measurement; a failure is recorded and reported, and the run goes on."""
        print(f"  {target.key}: {key} …", flush=True)
        try:
            target.results[key] = measure()
        except (DriverError, RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
            target.results[key] = {"failed": str(exc)}
            self.failures.append(f"{target.key} / {key}: {exc}")
            print(f"    failed: {exc}", flush=True)


# --- Environment and set-up -----------------------------------------------------------------------


def raise_open_files_limit() -> None:
    """Children inherit it: 1,000 streams mean 2,000 sockets in a gateway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in INHERITED_NOISE}
    return env | extra


def render(template: str, **values: object) -> Path:
    """Fill a config template from bench/ into bench/.run/."""
    text = Template((BENCH_DIR / template).read_text()).substitute({k: str(v) for k, v in values.items()})
    path = RUN_DIR / template
    path.write_text(text)
    return path


def uvicorn_speedups() -> list[str]:
    """uvloop and httptools when the project venv has them (it does with uvicorn[standard])."""
    flags = []
    if importlib.util.find_spec("uvloop"):
        flags += ["--loop", "uvloop"]
    if importlib.util.find_spec("httptools"):
        flags += ["--http", "httptools"]
    return flags


def start_upstream(run: Run) -> Service:
    settings = run.settings
    service = Service("upstream", free_port(), RUN_DIR / "upstream.log")
    command = [*run.pin.driver, PYTHON, str(BENCH_DIR / "upstream.py"), "--port", str(service.port)]
    command += ["--latency-ms", str(settings.upstream_latency_ms), "--tokens", str(settings.sse_tokens)]
    command += ["--tokens-per-second", str(settings.sse_tokens_per_second)]
    run.services.append(service)
    service.start(command, clean_env(), ROOT)
    service.wait_ready("/health", timeout=30)
    return service


def postgres_reset(database: str) -> None:
    """Drop and recreate a bench database, so every run starts from the same empty state."""
    import psycopg

    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f"DROP DATABASE IF EXISTS {database} WITH (FORCE)")
            conn.execute(f"CREATE DATABASE {database}")
    except psycopg.Error as exc:
        raise RuntimeError(f"cannot reset the {database} database: {exc}") from exc


def postgres_available() -> bool:
    try:
        import psycopg

        psycopg.connect(POSTGRES_ADMIN_URL, connect_timeout=3).close()
    except Exception:
        return False
    return True


POSTGRES_SOCKET = Path("/var/run/postgresql/.s.PGSQL.5432")


def database_url(db: str, database: str = POSTGRES_DB) -> str:
    """A fresh, empty database named `database` (var/bench.sqlite3 for the main one on SQLite)."""
    if db == "postgres":
        postgres_reset(database)
        # The Unix socket when PostgreSQL is on this host, as a same-host deployment would connect:
        # loopback TCP costs the worker about 2 ms of CPU a request in kernel time (README, Benchmarks).
        if POSTGRES_SOCKET.exists():
            return f"postgres://postgres@%2Fvar%2Frun%2Fpostgresql/{database}"
        return f"postgres://postgres@127.0.0.1:5432/{database}"
    path = ROOT / "var" / f"{database.removeprefix('kitemesh_')}.sqlite3"
    for suffix in ("", "-wal", "-shm", "-journal"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    return f"sqlite:///{path}"


def kitemesh_env(db: str, database: str = POSTGRES_DB) -> dict[str, str]:
    return clean_env(
        DJANGO_SETTINGS_MODULE="kitemesh_site.settings.base",
        DJANGO_DEBUG="0",
        DJANGO_SECRET_KEY="bench",
        KITEMESH_LOG_LEVEL="WARNING",
        KITEMESH_LOG_FORMAT="text",
        KITEMESH_TOOL_HOST_ALLOWLIST="127.0.0.1",
        DATABASE_URL=database_url(db, database),
    )


def manage(env: dict[str, str], *args: str, root: Path = ROOT) -> str:
    """`manage.py` of the checkout at `root` (this one, or the baseline's worktree)."""
    done = subprocess.run(
        [PYTHON, "manage.py", *args], cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"manage.py {' '.join(args)} failed:\n{done.stderr.strip()[-3000:]}")
    return done.stdout


def kitemesh_start(
    run: Run, upstream: Service, db: str, key: str, root: Path = ROOT, database: str = POSTGRES_DB
) -> Target:
    """A fresh database, the bench config, a token; then one uvicorn worker on the gateway CPU."""
    env, token = kitemesh_prepare(run, upstream, db, root, database)
    return kitemesh_serve(run, env, token, key, root=root)


def kitemesh_prepare(
    run: Run, upstream: Service, db: str, root: Path = ROOT, database: str = POSTGRES_DB
) -> tuple[dict[str, str], str]:
    """A fresh database with the bench config and a token, made by the manage.py of the checkout at `root`:
    the environment to run KiteMesh in, and the token."""
    env = kitemesh_env(db, database)
    config = render("kitemesh.yaml", upstream_port=upstream.port, slow_model=run.settings.slow_model, **GROUPS)
    manage(env, "migrate", "--noinput", root=root)
    manage(env, "apply_config", str(config), root=root)
    issued = manage(env, "issue_token", "--team", "bench", "--name", f"bench-{int(time.time())}", root=root)
    return env, issued.splitlines()[-1]


def kitemesh_serve(
    run: Run,
    env: dict[str, str],
    token: str,
    key: str,
    app: str = "kitemesh_site.asgi:application",
    root: Path = ROOT,
    factory: bool = False,
) -> Target:
    """One uvicorn worker serving `app` (a module of the checkout at `root`, or of bench/; with `factory`, a
    function that returns the application) on the gateway CPU. `--app-dir` puts that directory first on
    sys.path, ahead of the venv's editable install of this checkout."""
    service = Service(key, free_port(), RUN_DIR / f"{key}.log")
    app_dir = BENCH_DIR if (BENCH_DIR / f"{app.split(':')[0]}.py").exists() else root
    command = [*run.pin.gateway, PYTHON, "-m", "uvicorn", app, "--app-dir", str(app_dir)]
    command += ["--factory"] if factory else []
    command += ["--host", "127.0.0.1", "--port", str(service.port), "--workers", "1"]
    command += ["--no-access-log", "--log-level", "warning", *uvicorn_speedups()]
    run.services.append(service)
    service.start(command, env, root)
    service.wait_ready("/healthz")
    url = f"http://127.0.0.1:{service.port}/v1/chat/completions"
    return Target(
        key=key,
        chat=Endpoint(url, token, f"group:{GROUPS['chat_group']}"),
        slow=Endpoint(url, token, f"group:{GROUPS['slow_group']}"),
        approval=Endpoint(url, token, f"group:{GROUPS['approval_group']}"),
        service=service,
        env=env,
    )


def variant_start(run: Run, started: dict[str, Target], name: str) -> Target:
    """A factory of bench/variants.py, served on the main KiteMesh target's database with its token: the
    variant differs from it by the one piece swapped."""
    kitemesh = started.get("kitemesh")
    if kitemesh is None or kitemesh.env is None:
        raise RuntimeError("the variants are served beside the kitemesh target, which did not start")
    return kitemesh_serve(
        run, kitemesh.env, kitemesh.chat.token, f"kitemesh_{name}", app=f"variants:{name}", factory=True
    )


# --- The baseline: KiteMesh as of another commit --------------------------------------------------


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {done.stderr.strip()}")
    return done.stdout.strip()


def baseline_worktree(ref: str) -> dict:
    """KiteMesh as of `ref`, checked out in a git worktree at bench/.run/baseline: kept between runs, made
    again when it is at another commit. Returns what the report names it by."""
    commit = git("rev-parse", "--verify", f"{ref}^{{commit}}")
    is_worktree = (BASELINE_DIR / ".git").is_file()  # without it, `git -C` would answer for this checkout
    if is_worktree and git("-C", str(BASELINE_DIR), "rev-parse", "HEAD") != commit:
        git("worktree", "remove", "--force", str(BASELINE_DIR))
    if not (BASELINE_DIR / ".git").is_file():
        git("worktree", "prune")  # forgets a worktree whose directory was deleted by hand
        git("worktree", "add", "--detach", str(BASELINE_DIR), commit)
    baseline_imports_check(BASELINE_DIR)
    return {"ref": ref, "commit": commit, "short": git("rev-parse", "--short", ref), "path": str(BASELINE_DIR)}


def baseline_imports_check(worktree: Path) -> None:
    """The baseline's processes must run the worktree's code, not this checkout's. The venv's editable
    install maps the project's packages to this checkout, but through a finder appended to sys.meta_path,
    which Python asks only after sys.path's entries; the worktree is sys.path's first entry for every
    process started there (manage.py's own directory; for uvicorn, `-m`'s cwd and `--app-dir`). Checked by
    importing each package with the same python and cwd (`python -c`, whose first entry is the cwd) and
    reading its __file__."""
    packages = [name for name in PROJECT_PACKAGES if (worktree / name / "__init__.py").exists()]
    code = f"import importlib; print(*(importlib.import_module(n).__file__ for n in {packages!r}))"
    done = subprocess.run(
        [PYTHON, "-c", code], cwd=worktree, env=clean_env(), capture_output=True, text=True, timeout=60, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"cannot import the baseline's packages:\n{done.stderr.strip()[-2000:]}")
    strays = [path for path in done.stdout.split() if not Path(path).resolve().is_relative_to(worktree)]
    if strays:
        raise RuntimeError(f"the baseline would run code from outside {worktree}: {strays}")


def litellm_start(run: Run, upstream: Service) -> Target:
    master_key = f"sk-bench-{secrets.token_hex(16)}"
    config = render(
        "litellm.yaml", upstream_port=upstream.port, slow_model=run.settings.slow_model, master_key=master_key
    )
    service = Service("litellm", free_port(), RUN_DIR / "litellm.log")
    command = [*run.pin.gateway, str(LITELLM), "--config", str(config), "--host", "127.0.0.1"]
    command += ["--port", str(service.port), "--num_workers", "1"]
    # Quiet logs, no telemetry, and no fetch of the model price map from GitHub: loopback traffic only.
    env = clean_env(
        LITELLM_LOG="ERROR", LITELLM_LOCAL_MODEL_COST_MAP="True", LITELLM_TELEMETRY="False", LITELLM_MODE="PRODUCTION"
    )
    run.services.append(service)
    service.start(command, env, ROOT)
    service.wait_ready("/health/liveliness")
    url = f"http://127.0.0.1:{service.port}/v1/chat/completions"
    return Target("litellm", Endpoint(url, master_key, "bench"), Endpoint(url, master_key, "bench-slow"), None, service)


def direct_target(upstream: Service, settings: Settings) -> Target:
    url = f"http://127.0.0.1:{upstream.port}/v1/chat/completions"
    return Target("direct", Endpoint(url, "none", "fake"), Endpoint(url, "none", settings.slow_model), None, upstream)


# --- Measurements ---------------------------------------------------------------------------------


def verify(endpoint: Endpoint) -> dict:
    """One request before measuring: the answer must be a real completion, else the numbers mean nothing."""
    request = urllib.request.Request(
        endpoint.url,
        data=endpoint.body().encode(),
        headers={"Authorization": f"Bearer {endpoint.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            body = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"POST {endpoint.url} → HTTP {exc.code}: {exc.read().decode(errors='replace')}") from None
    if not body.get("choices", [{}])[0].get("message", {}).get("content"):
        raise RuntimeError(f"POST {endpoint.url} → no content: {json.dumps(body)[:1000]}")
    return {"usage": body.get("usage"), "kitemesh": body.get("kitemesh")}


def prepare_target(run: Run, target: Target) -> bool:
    """One checked request, then a warm-up: connections, pools and lazily built state exist before
    anything is timed. False when the target does not answer properly."""
    run.attempt(target, "verify", lambda: verify(target.chat))
    if "failed" in target.results["verify"]:
        return False
    run.attempt(target, "warmup", lambda: nonstream_run(target.chat, 16, run.settings.warmup, run.pin.driver))
    return True


def nonstream_rounds(run: Run, targets: list[Target]) -> None:
    """The non-stream scenarios, interleaved: every target in turn at each concurrency, `rounds` times,
    each time for duration / rounds. On a shared VM whose speed drifts during a run, the drift then hits
    every column alike instead of whichever target was measured at the time."""
    settings = run.settings
    seconds = settings.duration / settings.rounds
    measured: dict[tuple[str, int], list[dict]] = {(t.key, c): [] for t in targets for c in CONCURRENCIES}
    for round_number in range(1, settings.rounds + 1):
        for connections in CONCURRENCIES:
            for target in targets:
                print(f"  round {round_number}: {target.key} c={connections} …", flush=True)
                try:
                    result = nonstream_measure(run, target, connections, seconds)
                except (DriverError, RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
                    run.failures.append(f"{target.key} / nonstream_c{connections} round {round_number}: {exc}")
                    print(f"    failed: {exc}", flush=True)
                    continue
                measured[(target.key, connections)].append(result)
    for target in targets:
        for connections in CONCURRENCIES:
            rounds = measured[(target.key, connections)]
            key = f"nonstream_c{connections}"
            target.results[key] = rounds_merge(rounds) if rounds else {"failed": "every round failed"}


def rounds_merge(rounds: list[dict]) -> dict:
    """One scenario's rounds as one result: requests and CPU summed, latency percentiles the median of
    the rounds' (each round's own, as wrk reports them)."""
    requests = sum(r["requests"] or 0 for r in rounds)
    seconds = sum(r["worker"]["wall_s"] for r in rounds)
    cpu_s = sum(r["worker"]["cpu_s"] for r in rounds)
    errors: dict[str, int] = {}
    for r in rounds:
        for kind, count in r["errors"]["by_kind"].items():
            errors[kind] = errors.get(kind, 0) + count
    return {
        "driver": rounds[0]["driver"],
        "requests": requests,
        "requests_per_s": requests / seconds if seconds else None,
        "p50_ms": statistics.median(r["p50_ms"] for r in rounds),
        "p99_ms": statistics.median(r["p99_ms"] for r in rounds),
        "errors": {"total": sum(errors.values()), "by_kind": errors},
        "worker": {
            "cpu_s": cpu_s,
            "wall_s": seconds,
            "cpu_percent": 100 * cpu_s / seconds if seconds else 0.0,
            "peak_rss_mb": max(r["worker"]["peak_rss_mb"] for r in rounds),
        },
        "cpu_ms_per_request": 1000 * cpu_s / requests if requests else None,
        "rounds": [{k: r[k] for k in ("requests", "requests_per_s", "p50_ms", "p99_ms")} for r in rounds],
    }


def scenarios_measure(run: Run, target: Target, upstream: Service, scenarios: set[str]) -> None:
    """The scenarios measured for one target alone: SSE, concurrent streams, approvals."""
    if "sse" in scenarios:
        run.attempt(target, "sse", lambda: sse_measure(run, target))
    if "streams" in scenarios:
        run.attempt(target, "streams", lambda: streams_measure(run, target))
    if "approvals" in scenarios and target.approval is not None:
        run.attempt(target, "approvals", lambda: approvals_measure(run, target, upstream))


def nonstream_measure(run: Run, target: Target, connections: int, seconds: float) -> dict:
    """wrk's numbers plus the worker's CPU time per request: the gateway's cost, whatever the client sees."""
    with Sampler(target.service.worker_pid()) as sampler:
        result = nonstream_run(target.chat, connections, seconds, run.pin.driver)
    worker = sampler.as_dict()
    requests = result.get("requests")
    cpu_per_request = 1000 * worker["cpu_s"] / requests if requests else None
    return result | {"worker": worker, "cpu_ms_per_request": cpu_per_request}


def sse_measure(run: Run, target: Target) -> dict:
    s = run.settings
    timeout = 120 + s.sse_streams * s.sse_tokens / s.sse_tokens_per_second
    load_run("sse", target.chat, run.pin.driver, timeout, concurrency=2, count=2)  # warm-up
    return load_run("sse", target.chat, run.pin.driver, timeout, concurrency=s.sse_concurrency, count=s.sse_streams)


def streams_measure(run: Run, target: Target) -> dict:
    s = run.settings
    with Sampler(target.service.worker_pid()) as sampler:
        result = load_run(
            "streams", target.slow, run.pin.driver, s.stream_timeout + 60, count=s.streams, timeout=s.stream_timeout
        )
    return result | {"worker": sampler.as_dict()}


def approvals_measure(run: Run, target: Target, upstream: Service) -> dict:
    """Round trips per second, how many times the tool really ran per round trip (1.0 expected), and the
    worker's CPU time per round trip (its pause, its resume and the tool call between)."""
    s = run.settings
    assert target.approval is not None
    options = {"concurrency": s.approval_concurrency}
    load_run("approvals", target.approval, run.pin.driver, 120, duration=s.warmup, **options)  # warm-up
    before = upstream_stats(upstream)["tool_runs"]
    with Sampler(target.service.worker_pid()) as sampler:
        result = load_run(
            "approvals", target.approval, run.pin.driver, s.duration + 120, duration=s.duration, **options
        )
    tool_runs = upstream_stats(upstream)["tool_runs"] - before
    worker, round_trips = sampler.as_dict(), result["round_trips"]
    return result | {
        "tool_runs": tool_runs,
        "tool_runs_per_round_trip": tool_runs / round_trips if round_trips else None,
        "worker": worker,
        "cpu_ms_per_round_trip": 1000 * worker["cpu_s"] / round_trips if round_trips else None,
    }


def upstream_stats(upstream: Service) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{upstream.port}/stats", timeout=5) as response:
        return json.loads(response.read())


def log_findings(service: Service) -> dict:
    """Warnings, errors and tracebacks the server logged during the run (the log level is WARNING)."""
    try:
        lines = service.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return {}
    flagged = [line for line in lines if any(word in line for word in ("ERROR", "WARNING", "Traceback", "Error"))]
    distinct = list(dict.fromkeys(line.strip()[:300] for line in flagged))
    return {"flagged_lines": len(flagged), "samples": distinct[:15]}


# --- The run --------------------------------------------------------------------------------------


def gateway_start(run: Run, key: str, start: Callable[[], Target]) -> Target | None:
    print(f"== starting {key}", flush=True)
    try:
        return start()
    except (RuntimeError, OSError, ValueError, subprocess.TimeoutExpired) as exc:
        run.failures.append(f"{key} start-up: {exc}")
        print(f"  start-up failed: {exc}", flush=True)
        return None


def gateway_stop(target: Target) -> None:
    target.service.stop()
    target.results["log"] = log_findings(target.service)


def run_all(run: Run, selected: list[str], baseline: Path | None, variants: list[str]) -> None:
    """All servers up (an idle one costs nothing); the non-stream scenarios interleaved across them, in the
    order of `selected`; then each server's other scenarios with no other load, each gateway stopped when it
    is done. The variants take part in the non-stream rounds only, the baseline in the approvals too."""
    settings = run.settings
    upstream = start_upstream(run)
    everything = {"sse", "streams", "approvals"}
    started: dict[str, Target] = {}
    starts: dict[str, tuple[Callable[[], Target], set[str]]] = {
        "direct": (lambda: direct_target(upstream, settings), everything),
        "kitemesh": (lambda: kitemesh_start(run, upstream, settings.kitemesh_db, "kitemesh"), everything),
        "kitemesh_sqlite": (lambda: kitemesh_start(run, upstream, "sqlite", "kitemesh_sqlite"), set()),
        "litellm": (lambda: litellm_start(run, upstream), everything),
    }
    for name in variants:
        starts[f"kitemesh_{name}"] = (functools.partial(variant_start, run, started, name), set())
    if baseline is not None:
        starts["kitemesh_baseline"] = (
            functools.partial(
                kitemesh_start, run, upstream, settings.kitemesh_db, "kitemesh_baseline", baseline, BASELINE_DB
            ),
            {"approvals"},
        )
    targets: list[tuple[Target, set[str]]] = []
    for key in selected:
        start, scenarios = starts[key]
        target = gateway_start(run, key, start)
        if target is not None:
            started[key] = target
            run.results[key] = target.results
            if prepare_target(run, target):
                targets.append((target, scenarios))
            elif target.key != "direct":
                gateway_stop(target)
    print("== non-stream, interleaved", flush=True)
    nonstream_rounds(run, [target for target, _ in targets])
    for target, scenarios in targets:
        if scenarios:
            print(f"== {target.key}", flush=True)
            scenarios_measure(run, target, upstream, scenarios)
        if target.key != "direct":  # the upstream keeps running for the gateways
            gateway_stop(target)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a short smoke run (results in bench/.run/)")
    parser.add_argument("--targets", default=",".join(TARGETS), help=f"comma-separated subset of {', '.join(TARGETS)}")
    parser.add_argument("--baseline", metavar="REF", help="also serve KiteMesh as of this commit (kitemesh_baseline)")
    parser.add_argument(
        "--variants", default="", help="comma-separated factories of bench/variants.py, each served as kitemesh_<name>"
    )
    return parser.parse_args()


def measured_order(requested: list[str], baseline: bool, variants: list[str]) -> list[str]:
    """The targets in the order each round measures them: the standard ones in TARGETS' order, KiteMesh's
    variants and baseline right after it."""
    standard = [t for t in TARGETS if t in requested]
    extra = [f"kitemesh_{name}" for name in variants] + (["kitemesh_baseline"] if baseline else [])
    at = standard.index("kitemesh") + 1 if "kitemesh" in standard else len(standard)
    return standard[:at] + extra + standard[at:]


def variants_check(names: list[str], selected: list[str]) -> None:
    """Before anything starts: each name a factory of bench/variants.py, and the target they share with."""
    import variants

    unknown = [name for name in names if not callable(getattr(variants, name, None))]
    if unknown:
        raise SystemExit(f"no such factory in bench/variants.py: {', '.join(unknown)}")
    if names and "kitemesh" not in selected:
        raise SystemExit("--variants run on the kitemesh target's database: keep kitemesh in --targets")


def main() -> int:
    args = parse_args()
    settings = Settings.from_env(args.quick)
    requested = [t.strip() for t in args.targets.split(",") if t.strip()]
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if settings.kitemesh_db == "postgres" and not postgres_available():
        print("PostgreSQL is not reachable: KiteMesh runs on SQLite only.", flush=True)  # said in results.md too
        settings = Settings(**(asdict(settings) | {"kitemesh_db": "sqlite"}))
        requested = [t for t in requested if t != "kitemesh_sqlite"]
    if "litellm" in requested and not LITELLM.exists():
        raise SystemExit(f"{LITELLM} is missing: run `make bench`, which installs it.")
    variants_check(variants, requested)
    RUN_DIR.mkdir(exist_ok=True)
    try:
        baseline = baseline_worktree(args.baseline) if args.baseline else None
    except RuntimeError as exc:
        raise SystemExit(f"--baseline {args.baseline}: {exc}") from None
    selected = measured_order(requested, baseline is not None, variants)
    raise_open_files_limit()
    run = Run(settings, Pinning.detect())
    started, load_before = datetime.now(UTC), os.getloadavg()[0]
    try:
        run_all(run, selected, Path(baseline["path"]) if baseline else None, variants)
    finally:
        for service in reversed(run.services):
            service.stop()
    output = {
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "settings": asdict(settings),
        "machine": machine_describe(run.pin, uvicorn_speedups(), wrk_version() if wrk_available() else None),
        # Other work on the machine skews everything: the 1-minute load average says whether there was any.
        "load_average": {"before": load_before, "after": os.getloadavg()[0]},
        "baseline": baseline,
        "variants": variants,
        "results": run.results,
        "failures": run.failures,
    }
    stem = RUN_DIR / "results-quick" if settings.quick else BENCH_DIR / "results"
    Path(f"{stem}.json").write_text(json.dumps(output, indent=2) + "\n")
    Path(f"{stem}.md").write_text(render_markdown(output))
    print(f"wrote {stem}.md and {stem}.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
