"""`make bench-floors`: where a non-stream completion's latency goes at concurrency 1, layer by layer.

One KiteMesh worker (bench/floor_app.py: KiteMesh plus endpoints that stop part of the way through a
completion) pinned as `make bench` pins it, measured with wrk at c=1 against each endpoint in turn, in
interleaved rounds (the median of the rounds' p50s); then the request path's two database statements (the
run's start and its settlement) alone, in a loop in a process of their own on the gateway CPU. Prints a
table, and writes it to bench/.run/floors.md. About two minutes.

    python bench/floors.py [--db postgres|sqlite] [--rounds 5] [--seconds 3] [--count 3000]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import uuid

from drivers import Endpoint, nonstream_run
from load import PROMPT
from run import (
    GROUPS,
    PYTHON,
    ROOT,
    RUN_DIR,
    Pinning,
    Run,
    Settings,
    kitemesh_prepare,
    kitemesh_serve,
    postgres_available,
    start_upstream,
)

# (label, path on the KiteMesh worker, or None for the direct upstream); each includes the one before.
LAYERS = [
    ("the fake upstream, direct", None),
    ("uvicorn: a bare ASGI answer", "/floor/raw"),
    ("+ Django's API handler and DRF view, token and group cached, body parsed", "/v1/floor/view"),
    ("+ one upstream call through the engine's provider (aiohttp)", "/v1/floor/upstream"),
    ("the whole completion (its start and settlement included)", "/v1/chat/completions"),
]


def statements_loop(count: int, ledger: str) -> dict:
    """The run's start and settlement, `count` times, as a completion calls them (hold, execution, one
    model step, charge), through the `ledger` backend ("auto": the database's; "transaction": statements in a
    transaction, to compare): thread CPU and wall time per pair. Run in KiteMesh's environment."""
    import django

    django.setup()
    from django.conf import settings

    from billing.ledger import TransactionLedger
    from chat.services import executions

    if ledger == "transaction":
        executions.ledger = TransactionLedger  # the backend the executions' service asks for, swapped

    from billing.pricing import call_worst_case, model_cost
    from chat.selectors import group_for_run_get
    from chat.services.executions import execution_finish, execution_start
    from core.callers import Caller
    from core.config_version import config_guard
    from core.models import ApiToken, Execution, Step

    token = ApiToken.objects.filter(revoked_at__isnull=True).latest("id")
    caller = Caller(token.team, 0, token=token)
    version, parts = group_for_run_get(caller=caller, group_id=uuid.UUID(GROUPS["chat_group"]))
    brain, messages = parts.group.brain, [{"role": "user", "content": PROMPT}]
    hold_amount = call_worst_case(brain, messages, [], settings.KITEMESH_DEFAULT_MAX_OUTPUT_TOKENS)

    def pair() -> None:
        start = execution_start(
            caller=caller,
            group=parts.group,
            mode="normal",
            request_id=f"req_{uuid.uuid4().hex}",
            client_request_id=False,
            body_hash="0" * 64,
            stream=False,
            metadata={},
            hold_amount=hold_amount,
            guard=config_guard(version),
        )
        step = Step(
            execution=start.execution,
            kind=Step.Kind.MODEL_CALL,
            custom_model=brain,
            model_name=brain.model,
            status=Step.Status.SUCCEEDED,
            prompt_tokens=20,
            completion_tokens=40,
            cost=model_cost(brain, 20, 40),
            latency_ms=1,
        )
        execution_finish(execution=start.execution, hold=start.hold, steps=[step], status=Execution.Status.SUCCEEDED)

    for _ in range(count // 10):  # warm-up: connection, prepared statements
        pair()
    cpu, wall = time.thread_time(), time.perf_counter()
    for _ in range(count):
        pair()
    return {
        "cpu_ms": 1000 * (time.thread_time() - cpu) / count,
        "wall_ms": 1000 * (time.perf_counter() - wall) / count,
    }


def p50_at_c1(endpoint: Endpoint, seconds: float, pin: Pinning) -> float:
    result = nonstream_run(endpoint, 1, seconds, pin.driver)
    if result["errors"]["total"]:
        raise RuntimeError(f"{endpoint.url}: {result['errors']}")
    return result["p50_ms"]


def measure(args: argparse.Namespace) -> list[tuple[str, float, float | None]]:
    run = Run(Settings.from_env(quick=False), Pinning.detect())
    try:
        upstream = start_upstream(run)
        env, token = kitemesh_prepare(run, upstream, args.db)
        target = kitemesh_serve(run, env, token, "floors", app="floor_app:application")
        base = target.chat.url.removesuffix("/v1/chat/completions")
        direct = f"http://127.0.0.1:{upstream.port}/v1/chat/completions"
        endpoints = [
            Endpoint(direct, "none", "fake") if path is None else Endpoint(base + path, token, target.chat.model)
            for _, path in LAYERS
        ]
        for endpoint in endpoints:  # warm-up, and a check that each answers
            p50_at_c1(endpoint, 1, run.pin)
        p50s: list[list[float]] = [[] for _ in endpoints]
        for _ in range(args.rounds):
            for endpoint, rounds in zip(endpoints, p50s, strict=True):
                rounds.append(p50_at_c1(endpoint, args.seconds, run.pin))
        loops = {ledger: statements_measure(run, env, args.count, ledger) for ledger in ("auto", "transaction")}
    finally:
        for service in reversed(run.services):
            service.stop()
    rows = [(label, statistics.median(p50), None) for (label, _), p50 in zip(LAYERS, p50s, strict=True)]
    for ledger, label in [("auto", "the database's ledger"), ("transaction", "TransactionLedger")]:
        loop = loops[ledger]
        rows.append((f"the start and settlement alone, {label}, in a loop (wall; thread CPU)", *loop.values()))
    return rows


def statements_measure(run: Run, env: dict, count: int, ledger: str) -> dict:
    """statements_loop in a process of its own, on the gateway's CPU: {"wall_ms", "cpu_ms"}."""
    statements = subprocess.run(
        [*run.pin.gateway, PYTHON, __file__, "statements", "--count", str(count), "--ledger", ledger],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if statements.returncode != 0:
        raise RuntimeError(f"the statements loop failed:\n{statements.stderr[-3000:]}")
    loop = json.loads(statements.stdout.splitlines()[-1])
    return {"wall_ms": loop["wall_ms"], "cpu_ms": loop["cpu_ms"]}


def table(rows: list[tuple[str, float, float | None]], args: argparse.Namespace) -> str:
    lines = [
        f"Non-stream latency at c=1, layer by layer (`python bench/floors.py --db {args.db}`, median p50 of "
        f"{args.rounds} rounds × {args.seconds:g} s; the statements: {args.count} pairs)",
        "",
        "| layer | p50 | added by the layer |",
        "|---|---|---|",
    ]
    previous = None
    for label, value, cpu in rows:
        if cpu is not None:
            lines.append(f"| {label} | {value:.2f} ms | {cpu:.2f} ms of CPU |")
            continue
        added = f"{value - previous:+.2f} ms" if previous is not None else ""
        lines.append(f"| {label} | {value:.2f} ms | {added} |")
        previous = value
    return "\n".join(lines) + "\n"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", nargs="?", default="layers", choices=["layers", "statements"])
    parser.add_argument("--db", default="postgres", choices=["postgres", "sqlite"])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=3)
    parser.add_argument("--count", type=int, default=3000, help="start and settlement pairs in the loop")
    parser.add_argument("--ledger", default="auto", choices=["auto", "transaction"], help="(statements mode)")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.mode == "statements":
        print(json.dumps(statements_loop(args.count, args.ledger)))
        return 0
    if args.db == "postgres" and not postgres_available():
        raise SystemExit("PostgreSQL is not reachable: run with --db sqlite")
    RUN_DIR.mkdir(exist_ok=True)
    text = table(measure(args), args)
    (RUN_DIR / "floors.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
