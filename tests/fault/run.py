"""The seeded fault run (`make fault`): concurrent clients drive completions, streams, pauses, page
decisions and resumes against a live KiteMesh process on PostgreSQL, with a loopback upstream that streams
slowly and a loopback tool service that answers slowly, while the process is killed with SIGKILL at
random moments and started again. After each kill, once the lease and the sweep have had their time,
the promises are checked:

- per team, grants + refunds + adjustments - charges = balance, and held = the sum of its active holds;
- no active hold belongs to a finished execution;
- no run stays running past its lease and a sweep;
- the tool service never saw one Idempotency-Key twice, unless its tool is idempotent;
- no approved call reached the tool with other arguments than those its pause showed.

The seed drives every choice of the clients and of the killer (the operating system's scheduling still
varies): `python -m tests.fault.run --seed N`. Any failure prints the seed again.
"""

import argparse
import io
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[2]
LEASE_SECONDS = 2.0
SWEEP_SECONDS = 1.0
GROUP_ID = "0f1e2d3c-4b5a-4968-8776-a5b4c3d2e1f0"
TOOL_DIRECTIVE = re.compile(r"^!tool\s+([a-z_]+)\s*(.*)$", re.MULTILINE)
IDEMPOTENT_TOOLS = {"lookup", "refund"}
TEAM_CREDITS = 10_000_000


# --- The loopback services -----------------------------------------------------------------------------


class _QuietServer(ThreadingHTTPServer):
    """A loopback service whose clients vanish when KiteMesh is killed: that is the point, not an error."""

    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class Upstream(_QuietServer):
    """An OpenAI-compatible upstream that answers like KiteMesh's scripted model (a `!tool NAME {json}` line
    of the last user message is a tool call; after tool results it sums them up) and streams a word every
    few milliseconds, so a kill can land mid-stream."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _UpstreamHandler)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"


class _UpstreamHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        messages = body["messages"]
        calls, text = [], ""
        if messages[-1]["role"] == "tool":
            text = "Tool results: " + " | ".join(str(m["content"])[:40] for m in messages if m["role"] == "tool")
        else:
            last = next(m["content"] for m in reversed(messages) if m["role"] == "user")
            calls = [
                {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": args or "{}"}}
                for i, (name, args) in enumerate(TOOL_DIRECTIVE.findall(last), start=1)
            ]
            text = "" if calls else "Answer to " + " ".join(f"word{i}" for i in range(12))
        usage = {"prompt_tokens": 40, "completion_tokens": max(len(text) // 4, 5)}
        try:
            if body.get("stream"):
                self._stream(text, calls, usage)
            else:
                time.sleep(0.05)
                message = {"role": "assistant", "content": text or None, **({"tool_calls": calls} if calls else {})}
                reason = "tool_calls" if calls else "stop"
                self._json({"choices": [{"index": 0, "message": message, "finish_reason": reason}], "usage": usage})
        except (BrokenPipeError, ConnectionResetError):
            pass

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _stream(self, text: str, calls: list[dict], usage: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for word in text.split(" ") if text else []:
            self._event({"choices": [{"index": 0, "delta": {"content": word + " "}, "finish_reason": None}]})
            time.sleep(0.03)
        for index, call in enumerate(calls):
            self._event({"choices": [{"index": 0, "delta": {"tool_calls": [{"index": index, **call}]}}]})
        reason = "tool_calls" if calls else "stop"
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
        self._event({"choices": [], "usage": usage})
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def _event(self, body: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(body).encode() + b"\n\n")
        self.wfile.flush()


class ToolService(_QuietServer):
    """The tools' HTTP service: answers after up to half a second, and records every call it receives
    (Idempotency-Key, tool, arguments), so a kill can land mid-call and duplicates can be counted."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ToolHandler)
        self.calls: list[tuple[str, str, Any]] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _ToolHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: ToolService

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        arguments = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        with self.server.lock:
            self.server.calls.append((self.headers["Idempotency-Key"], self.path.strip("/"), arguments))
        time.sleep(random.uniform(0, 0.5))
        data = b'{"ok": true}'
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass


# --- KiteMesh, its database and its processes ----------------------------------------------------------


def database_fresh(url: str) -> None:
    """Drop and create the run's database (its name is the URL's path), then migrate it."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    admin = parts._replace(path="/postgres").geturl().replace("postgres://", "postgresql://", 1)
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v0"], cwd=ROOT, env=_env(url), check=True)


def _env(database_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "kitemesh_site.settings.base",
        "DATABASE_URL": database_url,
        "DJANGO_DEBUG": "0",
        "KITEMESH_RUN_LEASE_SECONDS": str(LEASE_SECONDS),
        "KITEMESH_SWEEP_SECONDS": str(SWEEP_SECONDS),
        "KITEMESH_TOOL_HOST_ALLOWLIST": "127.0.0.1",
        "KITEMESH_LOG_LEVEL": "ERROR",
    }


class Process:
    """A KiteMesh process (the server or the worker), started again after every kill."""

    def __init__(self, command: list[str], database_url: str, log: Path) -> None:
        self.command, self.env, self.log = command, _env(database_url), log
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=out, stderr=out)

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=30)


def server_up(url: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("the KiteMesh server did not start")


CONFIG = """
teams: [{{name: fault, credits: {credits}}}]
models:
  - {{name: brain, team: fault, provider: openai, base_url: "{upstream}", model: fault-model,
     price: {{input_per_1k: 3, output_per_1k: 7}}}}
tools:
  - {{name: ticket, team: fault, method: POST, url: "{tools}/ticket", requires_approval: true, price: 2,
     parameters: {{type: object, properties: {{n: {{type: integer}}, note: {{type: string}}}}}}}}
  - {{name: refund, team: fault, method: POST, url: "{tools}/refund", requires_approval: true, idempotent: true,
     price: 3, parameters: {{type: object, properties: {{n: {{type: integer}}}}}}}}
  - {{name: lookup, team: fault, method: POST, url: "{tools}/lookup", idempotent: true, price: 1,
     parameters: {{type: object, properties: {{n: {{type: integer}}}}}}}}
groups:
  - {{id: {group}, name: fault, team: fault, brain: brain, tools: [ticket, refund, lookup],
     approval_ttl_seconds: 3600}}
"""


def configure(upstream: Upstream, tools: ToolService, workdir: Path) -> tuple[str, tuple[str, str]]:
    """The team, its group and tools, an API token, and an approver; (the token, the approver's login)."""
    from django.contrib.auth.models import Permission, User
    from django.core.management import call_command

    from chat.services.tokens import token_create
    from core.models import Team

    path = workdir / "fault.yaml"
    path.write_text(CONFIG.format(credits=TEAM_CREDITS, upstream=upstream.base_url, tools=tools.url, group=GROUP_ID))
    call_command("apply_config", str(path), stdout=io.StringIO())
    team = Team.objects.get(name="fault")
    _, raw = token_create(team=team, name=f"fault-{uuid.uuid4().hex[:6]}")
    approver = User.objects.create_user("approver", password="fault-approver-password")
    approver.user_permissions.add(Permission.objects.get(codename="decide_approval"))
    team.members.add(approver)
    return raw, ("approver", "fault-approver-password")


# --- The clients ----------------------------------------------------------------------------------------


@dataclass
class Tally:
    lock: threading.Lock = field(default_factory=threading.Lock)
    counts: Counter = field(default_factory=Counter)
    shown: dict[str, Any] = field(default_factory=dict)  # tool execution id → the arguments its pause showed

    def add(self, what: str, n: int = 1) -> None:
        with self.lock:
            self.counts[what] += n


class Client:
    """One API client (and, for page decisions, one approver) with its own random choices."""

    def __init__(self, base: str, token: str, login: tuple[str, str], rng: random.Random, tally: Tally) -> None:
        self.base, self.rng, self.tally, self.login = base, rng, tally, login
        self.api = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=30)
        self.page: httpx.Client | None = None

    def run(self, deadline: float) -> None:
        actions = [self.plain, self.plain, self.streamed, self.automatic_tool, self.approval, self.approval]
        while time.monotonic() < deadline:
            try:
                self.rng.choice(actions)()
            except (httpx.HTTPError, ValueError):  # the server was killed under the request
                self.tally.add("cut by a kill")
                time.sleep(0.3)

    def complete(self, content: str, *, stream: bool = False) -> dict | None:
        body = {"model": f"group:{GROUP_ID}", "messages": [{"role": "user", "content": content}], "stream": stream}
        self.tally.add("streams" if stream else "completions")
        if not stream:
            response = self.api.post("/v1/chat/completions", json=body)
            return response.json() if response.status_code == 200 else None
        final = None
        with self.api.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    final = chunk if chunk.get("choices") and chunk["choices"][0].get("finish_reason") else final
        return final

    def plain(self) -> None:
        self.complete(f"Tell me something about {self.rng.randrange(10**6)}")

    def streamed(self) -> None:
        self.complete(f"Stream something about {self.rng.randrange(10**6)}", stream=True)

    def automatic_tool(self) -> None:
        self.complete(f'!tool lookup {{"n": {self.rng.randrange(10**6)}}}', stream=self.rng.random() < 0.3)

    def approval(self) -> None:
        tool = self.rng.choice(["ticket", "refund"])
        arguments = {"n": self.rng.randrange(10**6)} | (
            {"note": f"note {self.rng.randrange(99)}"} if tool == "ticket" else {}
        )
        paused = self.complete(f"!tool {tool} {json.dumps(arguments)}", stream=self.rng.random() < 0.3)
        if not paused or "approval_id" not in paused.get("kitemesh", {}):
            return
        self.tally.add("pauses")
        delta = paused["choices"][0].get("delta") or paused["choices"][0].get("message") or {}
        calls = delta["tool_calls"]
        with self.tally.lock:
            for call in calls:
                self.tally.shown[call["id"]] = json.loads(call["function"]["arguments"])
        approval_id = paused["kitemesh"]["approval_id"]
        choice = self.rng.random()
        if choice < 0.1:
            return  # left waiting (its hold stays active, as a paused run's does)
        decisions: dict[str, Any] = {"approved_tool_execution_ids": [c["id"] for c in calls]}
        if choice < 0.4:
            self.page_decide(approval_id, [c["id"] for c in calls], approve=self.rng.random() < 0.8)
            decisions = {}
        elif choice < 0.5:
            decisions = {"denied_tools": [{"tool_execution_id": c["id"], "reason": "no"} for c in calls]}
        self.resume(approval_id, decisions)

    def resume(self, approval_id: str, decisions: dict) -> None:
        """Resume, as a client whose connection a kill cut would: the same request again until it is
        answered, or the approval has been resumed by a run that finished (an interrupted one is resumed
        once more: the decisions sent again agree with those recorded)."""
        body = {"model": f"group:{GROUP_ID}", "approval_id": approval_id, **decisions}
        for _ in range(10):
            try:
                response = self.api.post("/v1/chat/resume", json=body)
                self.tally.add("resumes")
                if response.status_code != 409 or response.json()["error"]["code"] != "approval_already_resumed":
                    return
                # Resumed by our earlier, cut request: done, unless its run died with the server. Once
                # its lease lapsed, a read recovers it.
                time.sleep(LEASE_SECONDS)
                if self.api.get(f"/v1/approvals/{approval_id}").json()["status"] != "interrupted":
                    return
            except httpx.HTTPError:
                self.tally.add("resumes cut by a kill")
                time.sleep(0.5)

    def page_decide(self, approval_id: str, call_ids: list[str], *, approve: bool) -> None:
        if self.page is None:
            self.page = httpx.Client(base_url=self.base, timeout=30, follow_redirects=True)
            form = self.page.get("/accounts/login/")
            token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', form.text)[1]
            username, password = self.login
            self.page.post(
                "/accounts/login/", data={"csrfmiddlewaretoken": token, "username": username, "password": password}
            )
        detail = self.page.get(f"/approvals/{approval_id}/")
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', detail.text)
        for call_id in call_ids:
            self.page.post(
                f"/approvals/{approval_id}/decide/",
                data={
                    "csrfmiddlewaretoken": token[1] if token else "",
                    "tool_execution": call_id,
                    "decision": "approve" if approve else "deny",
                    "reason": "fault run",
                },
            )
        self.tally.add("page decisions", len(call_ids))


# --- The invariants -------------------------------------------------------------------------------------


def invariants_check(tools: ToolService, tally: Tally) -> list[str]:
    """The promises, read in one snapshot of the database; the list of what broke (empty: all held)."""
    from django.db import connection, transaction
    from django.db.models import Q, Sum
    from django.utils import timezone

    from billing.models import CreditAccount, Hold, LedgerEntry
    from core.models import Execution

    failures = []
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        for account in CreditAccount.objects.select_related("team"):
            kinds = ["grant", "refund", "adjustment", "charge"]
            moved = LedgerEntry.objects.filter(team=account.team, kind__in=kinds).aggregate(s=Sum("amount"))["s"]
            if moved != account.balance:
                failures.append(
                    f"team {account.team.name}: the ledger sums to {moved}, the balance is {account.balance}"
                )
            holds = Hold.objects.filter(team=account.team, status=Hold.Status.ACTIVE).aggregate(s=Sum("amount"))["s"]
            if (holds or 0) != account.held:
                failures.append(f"team {account.team.name}: active holds sum to {holds or 0}, held is {account.held}")
        finished = ["succeeded", "failed", "cancelled", "expired"]
        stray = Hold.objects.filter(status=Hold.Status.ACTIVE, execution__status__in=finished).count()
        if stray:
            failures.append(f"{stray} active hold(s) of finished executions")
        overdue = timezone.now() - timezone.timedelta(seconds=SWEEP_SECONDS * 3)
        stuck = Execution.objects.filter(
            Q(lease_expires_at__lt=overdue) | Q(lease_expires_at__isnull=True), status="running"
        ).count()
        if stuck:
            failures.append(f"{stuck} run(s) still running past their lease and a sweep")
    with tools.lock:
        calls = list(tools.calls)
    sent = Counter((key, tool) for key, tool, _ in calls)
    twice = [f"{tool} {key}" for (key, tool), n in sent.items() if n > 1 and tool not in IDEMPOTENT_TOOLS]
    if twice:
        failures.append(f"sent twice with one Idempotency-Key: {', '.join(twice)}")
    with tally.lock:
        shown = dict(tally.shown)
    other = [key for key, tool, arguments in calls if key in shown and shown[key] != arguments]
    if other:
        failures.append(f"approved calls sent with other arguments than shown: {', '.join(other)}")
    return failures


# --- The run --------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=None, help="the run's seed (default: a new one, printed)")
    parser.add_argument("--seconds", type=float, default=180, help="how long clients run (at most 300)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument(
        "--database-url",
        default=os.environ.get("KITEMESH_FAULT_DATABASE_URL", "postgres://postgres@127.0.0.1:5432/kitemesh_fault"),
        help="a PostgreSQL database the run drops and creates",
    )
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(10**9)
    seconds = min(args.seconds, 300)
    print(f"fault run: seed {seed}, {seconds:g} s, {args.clients} clients, PostgreSQL", flush=True)
    rng = random.Random(seed)

    database_fresh(args.database_url)
    os.environ.update(_env(args.database_url))
    import django

    django.setup()

    workdir = ROOT / "var" / "fault"
    workdir.mkdir(parents=True, exist_ok=True)
    upstream, tools = Upstream(), ToolService()
    for service in (upstream, tools):
        threading.Thread(target=service.serve_forever, args=(0.05,), daemon=True).start()
    token, login = configure(upstream, tools, workdir)
    with socket.create_server(("127.0.0.1", 0)) as probe:  # a free port for the server
        port = probe.getsockname()[1]
    base = f"http://127.0.0.1:{port}"
    server = Process(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "kitemesh_site.asgi:application",
            "--port",
            str(port),
            "--log-level",
            "error",
        ],
        args.database_url,
        workdir / "server.log",
    )
    worker = Process(
        [sys.executable, "manage.py", "worker", "--verbosity", "0"], args.database_url, workdir / "worker.log"
    )
    server.start()
    worker.start()
    server_up(base)

    tally = Tally()
    deadline = time.monotonic() + seconds
    clients = [Client(base, token, login, random.Random(rng.random()), tally) for _ in range(args.clients)]
    threads = [threading.Thread(target=c.run, args=(deadline,), daemon=True) for c in clients]
    for thread in threads:
        thread.start()

    kills, checks, failures = 0, 0, []
    while time.monotonic() < deadline - 2:
        time.sleep(rng.uniform(0.5, 3.0))
        server.kill()
        kills += 1
        server.start()
        server_up(base)
        time.sleep(LEASE_SECONDS + SWEEP_SECONDS * 2)  # the lease lapses, a sweep runs
        found = invariants_check(tools, tally)
        checks += 1
        for failure in found:
            print(f"  after kill {kills}: {failure}", flush=True)
        failures += found
    for thread in threads:
        thread.join(timeout=60)
    time.sleep(LEASE_SECONDS + SWEEP_SECONDS * 2)
    failures += invariants_check(tools, tally)
    checks += 1
    server.stop()
    worker.stop()

    from core.models import Execution

    statuses = Counter(Execution.objects.values_list("status", flat=True))
    print(f"runs: {sum(statuses.values())} executions ({', '.join(f'{n} {s}' for s, n in sorted(statuses.items()))})")
    print("clients: " + ", ".join(f"{n} {what}" for what, n in sorted(tally.counts.items())))
    print(f"tool calls received: {len(tools.calls)}")
    print(
        f"kills: {kills} (SIGKILL of the server, then a restart); invariant checks: {checks}, failures: {len(failures)}"
    )
    if failures:
        print(f"FAILED — run again with: python -m tests.fault.run --seed {seed}")
        return 1
    print(f"passed (seed {seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
