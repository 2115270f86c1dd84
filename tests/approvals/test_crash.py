"""Crash-safe runs (SPEC §7, issue 20 bullet 3): a KiteMesh process is killed with SIGKILL at the worst
moments — a resumed tool call in flight, an open stream, an automatic tool call — and a new process on
the same database finds the run, once its lease lapsed: `running` calls become `unknown`, a resuming
approval `interrupted` (resumed once more: an idempotent tool's call is sent again with the same
Idempotency-Key, another tool's is not and the model is told), any other run `failed` with
`run_interrupted`, and no credit stays held. Nothing but the database connects the processes."""

import contextlib
import io
import json
import math
import threading
import time
from decimal import Decimal

import httpx
import pytest
from django.core.management import call_command

from billing.models import CreditAccount, Hold
from chat.engine.rounds import UNKNOWN_OUTCOME
from core.models import Approval, Execution, Step, Tool, ToolExecution
from tests.conftest import Setup, make_setup
from tests.support.helpers import wait_for
from tests.support.server_process import LEASE_SECONDS, ServerProcess
from tests.support.tool_server import ToolResponse, ToolServer
from tests.support.upstream import FakeUpstream, Reply

ARGUMENTS = '{"priority": "high"}'
TOOL_PRICE = 3
BRAIN = {"input_per_1k": "10", "output_per_1k": "20"}


@pytest.fixture
def crash_setup(transactional_db, upstream: FakeUpstream, tool_server: ToolServer) -> Setup:
    setup = make_setup(upstream, **BRAIN)
    for name, approval in [("create_ticket", True), ("lookup", False)]:
        tool = Tool.objects.create(
            team=setup.team,
            name=name,
            method=Tool.Method.POST,
            url=f"{tool_server.url}/{name}",
            parameters={"type": "object", "properties": {"priority": {"type": "string"}}},
            requires_approval=approval,
            price=Decimal(TOOL_PRICE),
        )
        setup.group.tools.add(tool)
    return setup


def tool_call(name: str = "create_ticket", call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": ARGUMENTS}}


def tools_reply(*calls: dict) -> Reply:
    return Reply(
        content=None,
        finish_reason="tool_calls",
        tool_calls=list(calls),
        usage={"prompt_tokens": 10, "completion_tokens": 5},
    )


def post(server: ServerProcess, setup: Setup, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, headers=setup.headers, timeout=30, **kwargs)


def get(server: ServerProcess, setup: Setup, path: str) -> dict:
    response = httpx.get(f"{server.url}{path}", headers=setup.headers, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def in_background(send) -> threading.Thread:
    """Send a request whose answer will never come (its server is killed meanwhile)."""

    def run() -> None:
        with contextlib.suppress(httpx.HTTPError):
            send()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def held(setup: Setup) -> int:
    return CreditAccount.objects.get(team=setup.team).held


def paused_round(server: ServerProcess, setup: Setup, upstream: FakeUpstream) -> dict:
    upstream.queue(tools_reply(tool_call()))
    paused = post(
        server,
        setup,
        "/v1/chat/completions",
        {"model": setup.model, "messages": [{"role": "user", "content": "Open a ticket"}]},
    )
    assert paused.status_code == 200, paused.text
    return paused.json()


def killed_during_the_resumed_tool_call(
    servers, setup: Setup, upstream: FakeUpstream, tool_server: ToolServer
) -> tuple[dict, ServerProcess]:
    """Pause, resume approving the call, and SIGKILL the server while the tool is answering; a new
    server, once the lease lapsed."""
    server_a = servers()
    paused = paused_round(server_a, setup, upstream)
    [call] = paused["choices"][0]["message"]["tool_calls"]
    tool_server.queue(ToolResponse(status=201, body='{"ticket": "T-1"}', delay=5))
    body = {
        "model": setup.model,
        "approval_id": paused["kitemesh"]["approval_id"],
        "approved_tool_execution_ids": [call["id"]],
    }
    in_background(lambda: post(server_a, setup, "/v1/chat/resume", body))
    wait_for(lambda: tool_server.requests, 10, "the tool call to be in flight")

    server_a.kill()
    time.sleep(LEASE_SECONDS * 1.5)
    return paused, servers()


def test_a_kill_during_a_resumed_tool_call_interrupts_the_approval_and_its_next_resume_does_not_send_it_again(
    crash_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer, servers
):
    setup = crash_setup
    paused, server_b = killed_during_the_resumed_tool_call(servers, setup, upstream, tool_server)
    approval_id, execution_id = paused["kitemesh"]["approval_id"], paused["kitemesh"]["execution_id"]
    [call] = paused["choices"][0]["message"]["tool_calls"]
    balance = CreditAccount.objects.get(team=setup.team).balance

    approval = get(server_b, setup, f"/v1/approvals/{approval_id}")  # the read recovers the run

    assert approval["status"] == "interrupted"
    assert [te["status"] for te in approval["tool_executions"]] == ["unknown"]
    assert get(server_b, setup, f"/v1/executions/{execution_id}")["status"] == "paused"
    assert held(setup) == 0
    assert not Hold.objects.filter(status=Hold.Status.ACTIVE).exists()
    assert CreditAccount.objects.get(team=setup.team).balance == balance  # nothing completed: nothing charged

    upstream.queue(Reply(content="I could not tell whether the ticket was opened."))
    retried = post(server_b, setup, "/v1/chat/resume", {"model": setup.model, "approval_id": approval_id})

    assert retried.status_code == 200, retried.text
    assert retried.json()["kitemesh"]["execution_id"] == execution_id
    assert len(tool_server.requests) == 1  # not sent again: the tool is not idempotent
    told = [m for m in upstream.received[-1].body["messages"] if m["role"] == "tool"]
    assert json.loads(told[-1]["content"]) == {"error": UNKNOWN_OUTCOME}
    assert ToolExecution.objects.get(pk=call["id"]).status == ToolExecution.Status.UNKNOWN
    assert Execution.objects.get(pk=execution_id).status == Execution.Status.SUCCEEDED
    assert held(setup) == 0
    once_more = post(server_b, setup, "/v1/chat/resume", {"model": setup.model, "approval_id": approval_id})
    assert once_more.status_code == 409
    assert once_more.json()["error"]["code"] == "approval_already_resumed"


def test_an_idempotent_tools_unknown_call_is_sent_again_with_the_same_idempotency_key(
    crash_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer, servers
):
    setup = crash_setup
    Tool.objects.filter(name="create_ticket").update(idempotent=True)
    paused, server_b = killed_during_the_resumed_tool_call(servers, setup, upstream, tool_server)
    [call] = paused["choices"][0]["message"]["tool_calls"]
    balance = CreditAccount.objects.get(team=setup.team).balance
    tool_server.queue(ToolResponse(status=200, body='{"ticket": "T-1", "duplicate": true}'))
    upstream.queue(Reply(content="Ticket T-1 is open.", usage={"prompt_tokens": 40, "completion_tokens": 10}))

    retried = post(
        server_b, setup, "/v1/chat/resume", {"model": setup.model, "approval_id": paused["kitemesh"]["approval_id"]}
    )

    assert retried.status_code == 200, retried.text
    assert [r.headers["idempotency-key"] for r in tool_server.requests] == [call["id"], call["id"]]
    assert ToolExecution.objects.get(pk=call["id"]).status == ToolExecution.Status.SUCCEEDED
    brain = (40 * 10 + 10 * 20) / 1000
    assert CreditAccount.objects.get(team=setup.team).balance == balance - TOOL_PRICE - math.ceil(brain)
    assert held(setup) == 0


def test_decisions_sent_with_the_resume_of_an_interrupted_approval_must_agree_with_those_recorded(
    crash_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer, servers
):
    setup = crash_setup
    paused, server_b = killed_during_the_resumed_tool_call(servers, setup, upstream, tool_server)
    [call] = paused["choices"][0]["message"]["tool_calls"]
    body = {"model": setup.model, "approval_id": paused["kitemesh"]["approval_id"]}

    denied = post(server_b, setup, "/v1/chat/resume", {**body, "denied_tools": [{"tool_execution_id": call["id"]}]})

    assert denied.status_code == 409, denied.text
    assert denied.json()["error"]["code"] == "decision_conflict"
    assert Approval.objects.get(pk=body["approval_id"]).status == Approval.Status.INTERRUPTED
    upstream.queue(Reply(content="ok"))
    agreeing = post(server_b, setup, "/v1/chat/resume", {**body, "approved_tool_execution_ids": [call["id"]]})
    assert agreeing.status_code == 200, agreeing.text


def test_a_kill_during_an_open_stream_fails_the_run_settles_what_completed_and_frees_its_request_id(
    crash_setup: Setup, upstream: FakeUpstream, servers
):
    setup = crash_setup
    server_a = servers()
    upstream.queue(Reply(chunks=["one ", "two ", "three"] * 20, chunk_delay=0.1))
    balance = CreditAccount.objects.get(team=setup.team).balance
    body = {
        "model": setup.model,
        "messages": [{"role": "user", "content": "Count"}],
        "stream": True,
        "metadata": {"request_id": "req_crash_stream"},
    }
    with httpx.stream(
        "POST", f"{server_a.url}/v1/chat/completions", json=body, headers=setup.headers, timeout=30
    ) as response:
        lines = response.iter_lines()
        while "one" not in next(lines):
            pass
        server_a.kill()
    time.sleep(LEASE_SECONDS * 1.5)
    server_b = servers()
    execution_id = Execution.objects.get().pk

    execution = get(server_b, setup, f"/v1/executions/{execution_id}")

    assert execution["status"] == "failed"
    assert execution["error"]["code"] == "run_interrupted"
    assert held(setup) == 0
    assert CreditAccount.objects.get(team=setup.team).balance == balance  # the call never completed
    upstream.queue(Reply(content="One two three."))
    again = post(server_b, setup, "/v1/chat/completions", {**body, "stream": False})
    assert again.status_code == 200, again.text
    assert again.json()["kitemesh"]["execution_id"] != str(execution_id)  # a new run: the id was freed


def test_a_kill_during_an_automatic_tool_call_charges_the_completed_model_call_and_leaves_the_call_unknown(
    crash_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer, servers
):
    setup = crash_setup
    server_a = servers()
    upstream.queue(tools_reply(tool_call("lookup")))
    tool_server.queue(ToolResponse(delay=5))
    balance = CreditAccount.objects.get(team=setup.team).balance
    body = {"model": setup.model, "messages": [{"role": "user", "content": "Look it up"}]}
    in_background(lambda: post(server_a, setup, "/v1/chat/completions", body))
    wait_for(lambda: tool_server.requests, 10, "the tool call to be in flight")
    server_a.kill()
    time.sleep(LEASE_SECONDS * 1.5)
    out = io.StringIO()

    call_command("sweep", stdout=out)  # no process needed: the sweep finds it

    assert (
        out.getvalue().strip()
        == "recovered 1 run(s); expired 0 approval(s); requeued 0 webhook delivery(ies); recorded 0 credit alert(s)"
    )
    execution = Execution.objects.get()
    assert (execution.status, execution.error["code"]) == ("failed", "run_interrupted")
    assert execution.tool_executions.get().status == ToolExecution.Status.UNKNOWN
    [step] = Step.objects.filter(execution=execution)  # the brain's call, written before the tool was sent
    assert step.settled and step.completion_tokens == 5
    brain = (10 * 10 + 5 * 20) / 1000
    assert CreditAccount.objects.get(team=setup.team).balance == balance - math.ceil(brain)
    assert execution.credits_charged == math.ceil(brain)
    assert held(setup) == 0
