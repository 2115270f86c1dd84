"""An approval resumes once (SPEC §2 POST /v1/chat/resume: "a second or concurrent resume → 409
approval_already_resumed"; "approved tools run exactly once"), against the live server: ten resumes of
one approval released together, and a resume sent twice in a row. The parallel cases need PostgreSQL's
row locks (SQLite serialises every writer, so it cannot show a race); they run in CI's PostgreSQL pass."""

import json
import threading
from decimal import Decimal

import httpx
import pytest
from django.contrib.auth import get_user_model
from django.db import connection

from approvals.services import approval_decide
from billing.models import CreditAccount, Hold, LedgerEntry
from core.models import Approval, Execution, Step, Tool, ToolExecution
from tests.conftest import Setup, make_setup
from tests.support.tool_server import ToolResponse, ToolServer
from tests.support.upstream import FakeUpstream, Reply

PARALLEL = 10
TOOL_PRICE = 7
GRANT = 1000
TOOL_ARGUMENTS = '{"priority": "high"}'

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="parallel resumes need PostgreSQL row locks; CI runs them in its PostgreSQL pass",
)


@pytest.fixture
def approval_setup(live, upstream: FakeUpstream, tool_server: ToolServer, settings) -> Setup:
    """A group whose tool needs approval and costs TOOL_PRICE; the brain is free, so every credit
    charged is a tool run."""
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    setup = make_setup(upstream, credits=GRANT, input_per_1k="0", output_per_1k="0")
    tool = Tool.objects.create(
        team=setup.team,
        name="create_ticket",
        method=Tool.Method.POST,
        url=f"{tool_server.url}/tickets",
        parameters={"type": "object", "properties": {"priority": {"type": "string"}}, "required": ["priority"]},
        requires_approval=True,
        price=Decimal(TOOL_PRICE),
    )
    setup.group.tools.add(tool)
    return setup


def pause(http: httpx.Client, setup: Setup, upstream: FakeUpstream) -> dict:
    """A completion whose brain asks for the tool (then answers "Ticket opened." after it), paused."""
    upstream.queue(
        Reply(
            content=None,
            finish_reason="tool_calls",
            tool_calls=[
                {"id": "call_1", "type": "function", "function": {"name": "create_ticket", "arguments": TOOL_ARGUMENTS}}
            ],
        ),
        Reply(content="Ticket opened."),
    )
    response = http.post(
        "/v1/chat/completions",
        json={"model": setup.model, "messages": [{"role": "user", "content": "Open a ticket"}]},
        headers=setup.headers,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "tool_calls"
    return body


def resume_body(setup: Setup, paused: dict, *, approve: bool) -> dict:
    body = {"model": setup.model, "approval_id": paused["kitemesh"]["approval_id"], "messages": []}
    if approve:
        body["approved_tool_execution_ids"] = [c["id"] for c in paused["choices"][0]["message"]["tool_calls"]]
    return body


def resume_in_parallel(live, setup: Setup, body: dict, count: int = PARALLEL) -> list[httpx.Response]:
    """`count` resumes, each from its own thread and connection (opened beforehand), released together."""
    barrier = threading.Barrier(count)
    responses: list[httpx.Response | BaseException | None] = [None] * count

    def resume(index: int) -> None:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            try:
                assert client.get("/healthz").status_code == 200  # the connection is open before the race
                barrier.wait(timeout=30)
                responses[index] = client.post("/v1/chat/resume", json=body, headers=setup.headers)
            except BaseException as exc:
                barrier.abort()
                responses[index] = exc

    threads = [threading.Thread(target=resume, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    assert not any(t.is_alive() for t in threads), "a resume did not finish in time"
    failures = [r for r in responses if not isinstance(r, httpx.Response)]
    assert not failures, failures
    return responses  # type: ignore[return-value]


def assert_already_resumed(response: httpx.Response) -> None:
    assert response.status_code == 409, response.text
    error = response.json()["error"]
    assert error["type"] == "conflict_error"
    assert error["code"] == "approval_already_resumed"
    assert error["request_id"] == response.headers["X-Request-ID"]


def assert_ran_and_charged_once(setup: Setup, paused: dict, tool_server: ToolServer, upstream: FakeUpstream) -> None:
    execution_id = paused["kitemesh"]["execution_id"]
    [call] = paused["choices"][0]["message"]["tool_calls"]
    # The tool server received one call, with the paused arguments; the brain was called again once.
    assert len(tool_server.requests) == 1
    assert tool_server.requests[0].method == "POST"
    assert tool_server.requests[0].json() == json.loads(TOOL_ARGUMENTS)
    assert len(upstream.received) == 2
    assert ToolExecution.objects.get(pk=call["id"]).status == ToolExecution.Status.SUCCEEDED
    assert Step.objects.filter(execution_id=execution_id, kind=Step.Kind.TOOL_CALL).count() == 1
    assert Approval.objects.get(pk=paused["kitemesh"]["approval_id"]).status == Approval.Status.RESUMED
    execution = Execution.objects.get(pk=execution_id)
    assert execution.status == Execution.Status.SUCCEEDED
    # The ledger charged the tool's price once; every hold is settled; the balance shows one run.
    charges = list(
        LedgerEntry.objects.filter(execution_id=execution_id, kind=LedgerEntry.Kind.CHARGE).values_list(
            "amount", flat=True
        )
    )
    assert charges == [-TOOL_PRICE]
    assert execution.credits_charged == TOOL_PRICE
    assert not Hold.objects.filter(execution_id=execution_id, status=Hold.Status.ACTIVE).exists()
    account = CreditAccount.objects.get(team=setup.team)
    assert (account.balance, account.held) == (GRANT - TOOL_PRICE, 0)


@postgresql_only
def test_ten_concurrent_resumes_of_an_approval_decided_in_the_ui_run_the_tool_once(
    live, http, approval_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    setup = approval_setup
    tool_server.queue(ToolResponse(status=201, body='{"ticket": "T-1"}'))
    paused = pause(http, setup, upstream)
    approval = Approval.objects.get(pk=paused["kitemesh"]["approval_id"])
    approver = get_user_model().objects.create_user("approver", password="pw-approver-1")
    for tool_execution in approval.tool_executions.all():
        approval_decide(approval=approval, tool_execution=tool_execution, approve=True, reason="ok", actor=approver)

    responses = resume_in_parallel(live, setup, resume_body(setup, paused, approve=False))

    succeeded = [r for r in responses if r.status_code == 200]
    assert len(succeeded) == 1, [(r.status_code, r.text) for r in responses]
    answer = succeeded[0].json()
    assert answer["choices"][0]["message"]["content"] == "Ticket opened."
    assert answer["kitemesh"]["execution_id"] == paused["kitemesh"]["execution_id"]
    assert answer["kitemesh"]["credits_charged"] == TOOL_PRICE
    for response in responses:
        if response is not succeeded[0]:
            assert_already_resumed(response)
    assert_ran_and_charged_once(setup, paused, tool_server, upstream)


@postgresql_only
def test_ten_concurrent_resumes_each_approving_through_the_api_run_the_tool_once(
    live, http, approval_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    setup = approval_setup
    tool_server.queue(ToolResponse(status=201, body='{"ticket": "T-1"}'))
    paused = pause(http, setup, upstream)

    responses = resume_in_parallel(live, setup, resume_body(setup, paused, approve=True))

    statuses = sorted(r.status_code for r in responses)
    assert statuses == [200] + [409] * (PARALLEL - 1), [(r.status_code, r.text) for r in responses]
    [succeeded] = [r for r in responses if r.status_code == 200]
    assert succeeded.json()["choices"][0]["message"]["content"] == "Ticket opened."
    assert succeeded.json()["kitemesh"]["execution_id"] == paused["kitemesh"]["execution_id"]
    for response in responses:
        if response.status_code == 409:
            assert_already_resumed(response)
    [call] = paused["choices"][0]["message"]["tool_calls"]
    decided = ToolExecution.objects.get(pk=call["id"])
    assert decided.decided_via == ToolExecution.DecidedVia.API
    assert decided.decided_by == f"token:{setup.token.name}"
    assert_ran_and_charged_once(setup, paused, tool_server, upstream)


def test_a_second_resume_of_the_same_approval_is_refused_and_the_tool_ran_once(
    live, http, approval_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    setup = approval_setup
    paused = pause(http, setup, upstream)
    body = resume_body(setup, paused, approve=True)

    first = http.post("/v1/chat/resume", json=body, headers=setup.headers)
    second = http.post("/v1/chat/resume", json=body, headers=setup.headers)

    assert first.status_code == 200, first.text
    assert first.json()["choices"][0]["message"]["content"] == "Ticket opened."
    assert_already_resumed(second)
    assert_ran_and_charged_once(setup, paused, tool_server, upstream)


def test_a_resume_after_an_approved_resume_is_refused_even_without_decisions(
    live, http, approval_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    """The second resume is refused for being second, not for lacking decisions (409 decision_required
    would mean the approval was still open)."""
    setup = approval_setup
    paused = pause(http, setup, upstream)

    first = http.post("/v1/chat/resume", json=resume_body(setup, paused, approve=True), headers=setup.headers)
    second = http.post("/v1/chat/resume", json=resume_body(setup, paused, approve=False), headers=setup.headers)

    assert first.status_code == 200, first.text
    assert_already_resumed(second)
    assert_ran_and_charged_once(setup, paused, tool_server, upstream)
