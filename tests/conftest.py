"""Shared fixtures: a loopback upstream, KiteMesh live under uvicorn, and a configured team."""

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal

import httpx
import pytest
from django.db import connection

from billing.ledger import credits_grant
from chat.engine import providers
from chat.services.config_cache import config_cache_clear
from chat.services.tokens import token_create
from chat.services.vault import secret_set
from core.models import ApiToken, CustomModel, Group, Team
from tests.support.browser import CHROMIUM_ARGS, chromium_or_skip
from tests.support.live_server import LiveServer
from tests.support.server_process import LEASE_SECONDS, ServerProcess
from tests.support.tool_server import ToolServer
from tests.support.upstream import FakeUpstream

UPSTREAM_API_KEY = "sk-upstream-secret-do-not-leak"


@pytest.fixture(autouse=True)
def _config_cache_empty() -> None:
    """Each test starts with no cached group configuration: flushing the database between tests
    sends no signal, and a later test may reuse a group id with other rows behind it."""
    config_cache_clear()


@pytest.fixture(autouse=True)
def _circuits_closed() -> None:
    """Each test starts with every upstream's circuit closed: breakers are per process and keyed by base
    URL and model, and a test's fake upstream may get the port of an earlier test's that failed."""
    providers._breakers.clear()


@pytest.fixture
def upstream() -> Iterator[FakeUpstream]:
    server = FakeUpstream().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def live_server_session(django_db_setup, django_db_blocker) -> Iterator[LiveServer]:
    with django_db_blocker.unblock():
        server = LiveServer().start()
    yield server
    server.stop()
    with django_db_blocker.unblock():
        connection.close()


@pytest.fixture
def live(live_server_session: LiveServer, transactional_db) -> LiveServer:
    """The live server, with a database whose writes it can see (committed, flushed after the test)."""
    return live_server_session


@dataclass
class Setup:
    """A team with credits, a brain on the loopback upstream, a group and a token for it."""

    team: Team
    brain: CustomModel
    group: Group
    token: ApiToken
    raw_token: str

    @property
    def model(self) -> str:
        return f"group:{self.group.id}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.raw_token}"}


def make_setup(
    upstream: FakeUpstream,
    *,
    team_name: str = "acme",
    credits: int = 1000,
    input_per_1k: str = "10",
    output_per_1k: str = "20",
    system: str = "You are the acme brain.",
) -> Setup:
    team = Team.objects.create(name=team_name)
    if credits:
        credits_grant(team=team, amount=credits, reason="test grant")
    key = secret_set(team=team, name="upstream-key", value=UPSTREAM_API_KEY)
    brain = CustomModel.objects.create(
        team=team,
        name="brain",
        provider=CustomModel.Provider.OPENAI,
        base_url=upstream.base_url,
        model="up-model",
        api_key_secret=key,
        system=system,
        input_per_1k=Decimal(input_per_1k),
        output_per_1k=Decimal(output_per_1k),
    )
    group = Group.objects.create(id=uuid.uuid4(), team=team, name="support", brain=brain)
    token, raw = token_create(team=team, name="test")
    return Setup(team=team, brain=brain, group=group, token=token, raw_token=raw)


@pytest.fixture
def setup(upstream: FakeUpstream, db) -> Setup:
    return make_setup(upstream)


@pytest.fixture
def http(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client


@pytest.fixture
def tool_server() -> Iterator[ToolServer]:
    """A scriptable HTTP tool on 127.0.0.1 that records what it receives."""
    server = ToolServer().start()
    yield server
    server.stop()


@pytest.fixture
def servers() -> Iterator:
    """Start KiteMesh processes (ServerProcess) with a short run lease (LEASE_SECONDS), as the crash tests
    kill them; all are stopped at the test's end."""
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        server = ServerProcess(env={"KITEMESH_RUN_LEASE_SECONDS": str(LEASE_SECONDS)})
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="module")
def browser(monkeypatch_module):
    """Headless Chromium (Debian's /usr/bin/chromium; never downloaded), one per test module: Playwright's
    sync API keeps an event loop running in this thread until it stops, which other modules must not see."""
    from playwright.sync_api import sync_playwright

    path = chromium_or_skip()
    # The browser's loop runs in this thread, yet the test's own ORM calls are plain sync calls.
    monkeypatch_module.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=path, args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


@pytest.fixture
def page(browser, live):
    """A fresh browser context and page on the live server."""
    context = browser.new_context(base_url=live.url, viewport={"width": 1280, "height": 900})
    page = context.new_page()
    yield page
    context.close()


# --- Tools of the group, on the loopback tool server (tests/approvals) -----------------------------


@pytest.fixture
def tools_on_loopback(settings) -> None:
    """Tools may reach 127.0.0.1 (the live server thread shares these settings)."""
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]


@pytest.fixture
def group_tool(setup: Setup, tool_server: ToolServer, tools_on_loopback):
    """Make a Tool of setup's team on the loopback tool server (path `/<name>` unless given) and add it to
    setup's group (or `group`)."""
    from core.models import Tool

    def make(
        name: str = "create_ticket",
        *,
        method: str = "POST",
        parameters: dict | None = None,
        requires_approval: bool = False,
        approver: str = "any",
        price: str | int = 0,
        risk: str = "",
        path: str | None = None,
        url: str | None = None,
        group: Group | None = None,
        description: str = "",
        approval_rules: list | None = None,
        approvals_required: int = 1,
    ) -> Tool:
        tool = Tool.objects.create(
            team=setup.team,
            name=name,
            description=description or f"The {name} tool.",
            method=method,
            url=url or f"{tool_server.url}{path or '/' + name}",
            parameters={"type": "object", "properties": {}} if parameters is None else parameters,
            requires_approval=requires_approval,
            approver=approver,
            price=Decimal(str(price)),
            risk=risk,
            approval_rules=approval_rules or [],
            approvals_required=approvals_required,
        )
        (group or setup.group).tools.add(tool)
        return tool

    return make
