"""A paused run survives a restart (SPEC §2 approval pause and resume; README "The conversation is stored
with the approval"): the pause is answered by one KiteMesh PROCESS, which is then stopped; a new process on
the same database resumes it. Nothing but the database connects the two, so the tool arguments, the
conversation the brain receives and the execution id can only come from what the pause persisted."""

import json
import socket
from decimal import Decimal

import httpx
import pytest

from billing.models import CreditAccount
from core.models import Approval, Execution, Tool, ToolExecution
from tests.conftest import Setup, make_setup
from tests.support.server_process import ServerProcess
from tests.support.tool_server import ToolResponse, ToolServer
from tests.support.upstream import FakeUpstream, Reply

SYSTEM = "You are the acme brain."
USER = "Open a high-priority ticket for the broken printer."
TOOL_ARGUMENTS = '{"priority": "high", "title": "Printer on fire"}'
TOOL_BODY = '{"ticket": "T-42"}'
TOOL_PRICE = 3


@pytest.fixture
def restart_setup(transactional_db, upstream: FakeUpstream, tool_server: ToolServer) -> Setup:
    """Committed configuration (the server processes read it from the database): prices of 0 for the
    brain so the only charge is the tool's."""
    setup = make_setup(upstream, input_per_1k="0", output_per_1k="0", system=SYSTEM)
    tool = Tool.objects.create(
        team=setup.team,
        name="create_ticket",
        description="Open a ticket.",
        method=Tool.Method.POST,
        url=f"{tool_server.url}/tickets",
        parameters={
            "type": "object",
            "properties": {"priority": {"type": "string"}, "title": {"type": "string"}},
            "required": ["priority"],
        },
        requires_approval=True,
        price=Decimal(TOOL_PRICE),
    )
    setup.group.tools.add(tool)
    return setup


@pytest.fixture
def processes():
    """Server processes started by a test, all stopped (and their logs removed) at its end."""
    started: list[ServerProcess] = []

    def start() -> ServerProcess:
        server = ServerProcess()
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


def refuses_connections(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex(("127.0.0.1", port)) != 0


def test_a_run_paused_by_one_process_resumes_in_a_new_process_from_the_database(
    restart_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer, processes
):
    setup = restart_setup
    upstream.queue(
        Reply(
            content=None,
            finish_reason="tool_calls",
            tool_calls=[
                {
                    "id": "call_up_1",
                    "type": "function",
                    "function": {"name": "create_ticket", "arguments": TOOL_ARGUMENTS},
                }
            ],
            usage={"prompt_tokens": 30, "completion_tokens": 12},
        ),
        Reply(content="Ticket T-42 is open.", usage={"prompt_tokens": 60, "completion_tokens": 8}),
    )
    tool_server.queue(ToolResponse(status=201, body=TOOL_BODY))

    server_a = processes()
    paused = httpx.post(
        f"{server_a.url}/v1/chat/completions",
        json={"model": setup.model, "messages": [{"role": "user", "content": USER}]},
        headers=setup.headers,
        timeout=30,
    )
    assert paused.status_code == 200, paused.text
    pause = paused.json()
    assert pause["choices"][0]["finish_reason"] == "tool_calls"
    [call] = pause["choices"][0]["message"]["tool_calls"]
    assert call["function"] == {"name": "create_ticket", "arguments": TOOL_ARGUMENTS}
    approval_id, execution_id = pause["kitemesh"]["approval_id"], pause["kitemesh"]["execution_id"]
    assert tool_server.requests == []  # nothing runs before the decision

    server_a.stop()
    assert server_a.process.returncode is not None
    assert refuses_connections(server_a.port)

    server_b = processes()
    assert server_b.pid != server_a.pid
    resumed = httpx.post(
        f"{server_b.url}/v1/chat/resume",
        json={
            "model": setup.model,
            "approval_id": approval_id,
            "approved_tool_execution_ids": [call["id"]],
            "messages": [],
        },
        headers=setup.headers,
        timeout=30,
    )

    assert resumed.status_code == 200, resumed.text
    answer = resumed.json()
    assert answer["choices"][0]["message"] == {"role": "assistant", "content": "Ticket T-42 is open."}
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["kitemesh"]["execution_id"] == execution_id

    # The tool ran once, with exactly the arguments shown at the pause.
    assert len(tool_server.requests) == 1
    sent = tool_server.requests[0]
    assert (sent.method, sent.path) == ("POST", "/tickets")
    assert sent.json() == json.loads(TOOL_ARGUMENTS)

    # The brain's second call carries the persisted conversation: system, user, its own tool call, the result.
    assert len(upstream.received) == 2
    messages = upstream.received[1].body["messages"]
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "tool"]
    assert messages[0]["content"] == SYSTEM
    assert messages[1]["content"] == USER
    assert messages[2]["tool_calls"] == [
        {"id": "call_up_1", "type": "function", "function": {"name": "create_ticket", "arguments": TOOL_ARGUMENTS}}
    ]
    assert messages[3]["tool_call_id"] == "call_up_1"
    assert json.loads(messages[3]["content"]) == {"status": 201, "body": TOOL_BODY}
    # The upstream parameters were persisted too: the tools are offered again.
    assert [t["function"]["name"] for t in upstream.received[1].body["tools"]] == ["create_ticket"]

    approval = Approval.objects.get(pk=approval_id)
    assert approval.status == Approval.Status.RESUMED
    tool_execution = ToolExecution.objects.get(pk=call["id"])
    assert tool_execution.status == ToolExecution.Status.SUCCEEDED
    assert tool_execution.response_status == 201
    execution = Execution.objects.get(pk=execution_id)
    assert execution.status == Execution.Status.SUCCEEDED
    assert execution.credits_charged == TOOL_PRICE
    account = CreditAccount.objects.get(team=setup.team)
    assert (account.balance, account.held) == (1000 - TOOL_PRICE, 0)


def test_a_second_resume_in_another_process_after_a_restart_is_refused(
    restart_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer, processes
):
    """The "resumed" state is in the database too: a new process does not run the tool a second time."""
    setup = restart_setup
    upstream.queue(
        Reply(
            content=None,
            finish_reason="tool_calls",
            tool_calls=[
                {
                    "id": "call_up_1",
                    "type": "function",
                    "function": {"name": "create_ticket", "arguments": TOOL_ARGUMENTS},
                }
            ],
        ),
        Reply(content="Done."),
    )
    server_a = processes()
    pause = httpx.post(
        f"{server_a.url}/v1/chat/completions",
        json={"model": setup.model, "messages": [{"role": "user", "content": USER}]},
        headers=setup.headers,
        timeout=30,
    ).json()
    body = {
        "model": setup.model,
        "approval_id": pause["kitemesh"]["approval_id"],
        "approved_tool_execution_ids": [pause["choices"][0]["message"]["tool_calls"][0]["id"]],
    }
    first = httpx.post(f"{server_a.url}/v1/chat/resume", json=body, headers=setup.headers, timeout=30)
    assert first.status_code == 200, first.text
    server_a.stop()

    server_b = processes()
    second = httpx.post(f"{server_b.url}/v1/chat/resume", json=body, headers=setup.headers, timeout=30)

    assert second.status_code == 409, second.text
    assert second.json()["error"]["code"] == "approval_already_resumed"
    assert second.json()["error"]["type"] == "conflict_error"
    assert len(tool_server.requests) == 1
    assert len(upstream.received) == 2
