"""Approval pauses and POST /v1/chat/resume (SPEC §2 "Approval pause", "SSE", "POST /v1/chat/resume", §3), through
the live server: the pause's shape (JSON and SSE), what runs at resume and what the brain is told, every error
rule, the UI's decisions, expiry, and the credits held and charged across a pause."""

import datetime
import io
import json
import math
import uuid
from decimal import Decimal

import httpx
import openai
import pytest
from django.contrib.auth import get_user_model
from django.core.management import call_command

from approvals.services import approval_decide
from billing.ledger import credits_grant
from billing.models import CreditAccount, Hold, LedgerEntry
from core.models import Approval, Execution, Group, ToolExecution
from tests.conftest import Setup, make_setup
from tests.support.helpers import credits, sse_chunks
from tests.support.upstream import Reply

INPUT_PER_1K = 10
OUTPUT_PER_1K = 20
TICKET_SCHEMA = {
    "type": "object",
    "properties": {"priority": {"type": "string", "enum": ["low", "high"]}, "title": {"type": "string"}},
    "required": ["priority"],
}
ORDER_SCHEMA = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}
TICKET_ARGUMENTS = '{"priority": "high", "title": "Printer on fire"}'
TICKET_PRICE = 3
USER = {"role": "user", "content": "Open a ticket"}


# --- Helpers ---------------------------------------------------------------------------------------


def sdk(live, setup: Setup) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url + "/v1", api_key=setup.raw_token, max_retries=0)


def call(name: str = "create_ticket", arguments: str = TICKET_ARGUMENTS, call_id: str = "call_1") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def tools_reply(*calls: dict, usage: dict | None = None, pieces: int = 0) -> Reply:
    return Reply(
        content=None,
        chunks=[],
        tool_calls=list(calls) or [call()],
        finish_reason="tool_calls",
        usage=usage or {"prompt_tokens": 11, "completion_tokens": 7},
        tool_call_pieces=pieces,
    )


def chat(http: httpx.Client, setup: Setup, **body) -> httpx.Response:
    return http.post(
        "/v1/chat/completions", json={"model": setup.model, "messages": [USER], **body}, headers=setup.headers
    )


def pause(http: httpx.Client, setup: Setup, upstream, *calls: dict, usage: dict | None = None) -> dict:
    """A completion whose brain asks for `calls` (default: one create_ticket call), paused for approval."""
    upstream.queue(tools_reply(*calls, usage=usage))
    response = chat(http, setup)
    assert response.status_code == 200, response.text
    paused = response.json()
    assert paused["choices"][0]["finish_reason"] == "tool_calls", paused
    return paused


def paused_ids(paused: dict) -> list[str]:
    return [c["id"] for c in paused["choices"][0]["message"]["tool_calls"]]


def resume(
    http: httpx.Client,
    setup: Setup,
    approval_id: str,
    *,
    approved: list[str] | tuple = (),
    denied: list[dict] | tuple = (),
    headers: dict | None = None,
    **body,
) -> httpx.Response:
    payload = {"model": setup.model, "approval_id": approval_id, **body}
    if approved:
        payload["approved_tool_execution_ids"] = list(approved)
    if denied:
        payload["denied_tools"] = list(denied)
    return http.post("/v1/chat/resume", json=payload, headers=headers or setup.headers)


def approve_all(http: httpx.Client, setup: Setup, paused: dict, **body) -> httpx.Response:
    return resume(http, setup, paused["kitemesh"]["approval_id"], approved=paused_ids(paused), **body)


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == type_
    assert error["code"] == code
    assert error["message"]
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def assert_still_pending(paused: dict, tool_server) -> None:
    """A refused resume consumed nothing: the approval waits and no tool ran."""
    assert Approval.objects.get(pk=paused["kitemesh"]["approval_id"]).status == Approval.Status.PENDING
    assert tool_server.requests == []


def tool_messages(messages: list[dict]) -> list[dict]:
    return [m for m in messages if m["role"] == "tool"]


def model_cost(prompt_tokens: int, completion_tokens: int) -> Decimal:
    return Decimal(prompt_tokens * INPUT_PER_1K + completion_tokens * OUTPUT_PER_1K) / 1000


def utc(value: str) -> datetime.datetime:
    moment = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert moment.utcoffset() == datetime.timedelta(0), value
    return moment


def user(name: str = "alice"):
    return get_user_model().objects.create_user(name, password="pw")


def ui_decide(paused: dict, index: int, *, approve: bool, reason: str = "", actor=None) -> None:
    """A decision taken on the approver page (the service the page calls)."""
    approval = Approval.objects.get(pk=paused["kitemesh"]["approval_id"])
    tool_execution = ToolExecution.objects.get(pk=paused_ids(paused)[index])
    approval_decide(
        approval=approval, tool_execution=tool_execution, approve=approve, reason=reason, actor=actor or user()
    )


@pytest.fixture
def ticket(group_tool):
    return group_tool(
        "create_ticket", parameters=TICKET_SCHEMA, requires_approval=True, price=TICKET_PRICE, path="/tickets"
    )


@pytest.fixture
def lookup(group_tool):
    """A tool that needs no approval."""
    return group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA, path="/orders")


# --- The pause ---------------------------------------------------------------------------------------


def test_pause_answer_has_the_spec_shape(live, http, setup: Setup, upstream, tool_server, ticket):
    Group.objects.filter(pk=setup.group.pk).update(approval_ttl_seconds=120)
    upstream.queue(tools_reply(usage={"prompt_tokens": 100, "completion_tokens": 20}))
    before = datetime.datetime.now(datetime.UTC)

    response = chat(http, setup)

    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "object", "created", "model", "choices", "usage", "kitemesh"}
    assert body["object"] == "chat.completion"
    assert body["model"] == setup.model
    [tool_execution] = ToolExecution.objects.filter(approval_id=body["kitemesh"]["approval_id"])
    assert body["choices"] == [
        {
            "index": 0,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": str(tool_execution.id),
                        "type": "function",
                        "function": {"name": "create_ticket", "arguments": TICKET_ARGUMENTS},
                    }
                ],
            },
            "finish_reason": "tool_calls",
        }
    ]
    assert tool_execution.call_id == "call_1"
    kitemesh = body["kitemesh"]
    assert set(kitemesh) == {"approval_id", "execution_id", "expires_at", "request_id", "credits_charged", "mode"}
    approval = Approval.objects.get(pk=kitemesh["approval_id"])
    assert str(approval.execution_id) == kitemesh["execution_id"] == str(tool_execution.execution_id)
    expires_at = utc(kitemesh["expires_at"])
    assert expires_at == approval.expires_at
    ttl = datetime.timedelta(seconds=120)
    assert before + ttl - datetime.timedelta(seconds=5) <= expires_at <= before + ttl + datetime.timedelta(seconds=30)
    assert kitemesh["request_id"] == response.headers["X-Request-ID"]
    assert kitemesh["credits_charged"] == math.ceil(model_cost(100, 20))
    assert body["usage"] == {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120}
    assert approval.status == Approval.Status.PENDING
    assert Execution.objects.get(pk=kitemesh["execution_id"]).status == Execution.Status.PAUSED
    assert tool_server.requests == []


def test_pause_read_through_the_openai_sdk(live, setup: Setup, upstream, tool_server, ticket):
    upstream.queue(tools_reply())

    completion = sdk(live, setup).chat.completions.create(model=setup.model, messages=[USER])

    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [tool_call] = choice.message.tool_calls
    assert uuid.UUID(tool_call.id)
    assert tool_call.type == "function"
    assert (tool_call.function.name, tool_call.function.arguments) == ("create_ticket", TICKET_ARGUMENTS)
    kitemesh = completion.model_extra["kitemesh"]
    assert ToolExecution.objects.get(pk=tool_call.id).approval_id == uuid.UUID(kitemesh["approval_id"])
    assert tool_server.requests == []


def test_stream_pause_sends_the_complete_calls_in_one_approval_chunk_then_done(
    live, http, setup: Setup, upstream, tool_server, ticket, group_tool
):
    group_tool("close_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    calls = [call(), call("close_ticket", '{"priority": "low"}', "call_2")]
    upstream.queue(tools_reply(*calls, pieces=4))
    payload = {"model": setup.model, "messages": [USER], "stream": True}

    with http.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response)

    with_calls = [c for c in chunks if c["choices"] and c["choices"][0]["delta"].get("tool_calls")]
    assert with_calls == [chunks[-1]]
    approval_chunk = chunks[-1]
    assert approval_chunk["object"] == "chat.completion.chunk"
    kitemesh = approval_chunk["kitemesh"]
    assert {"approval_id", "execution_id", "expires_at", "request_id"} <= set(kitemesh)
    executions = ToolExecution.objects.filter(approval_id=kitemesh["approval_id"]).order_by("position")
    assert approval_chunk["choices"] == [
        {
            "index": 0,
            "delta": {
                "tool_calls": [
                    {
                        "index": 0,
                        "id": str(executions[0].id),
                        "type": "function",
                        "function": {"name": "create_ticket", "arguments": TICKET_ARGUMENTS},
                    },
                    {
                        "index": 1,
                        "id": str(executions[1].id),
                        "type": "function",
                        "function": {"name": "close_ticket", "arguments": '{"priority": "low"}'},
                    },
                ]
            },
            "finish_reason": "tool_calls",
        }
    ]
    utc(kitemesh["expires_at"])
    assert kitemesh["request_id"] == response.headers["X-Request-ID"]
    assert str(Approval.objects.get(pk=kitemesh["approval_id"]).execution_id) == kitemesh["execution_id"]
    assert tool_server.requests == []


def test_openai_sdk_stream_reads_the_approval_chunk(live, setup: Setup, upstream, tool_server, ticket):
    upstream.queue(tools_reply(pieces=3))

    chunks = list(sdk(live, setup).chat.completions.create(model=setup.model, messages=[USER], stream=True))

    last = chunks[-1]
    assert last.choices[0].finish_reason == "tool_calls"
    [tool_call] = last.choices[0].delta.tool_calls
    assert (tool_call.index, tool_call.type, tool_call.function.name) == (0, "function", "create_ticket")
    assert tool_call.function.arguments == TICKET_ARGUMENTS
    assert ToolExecution.objects.get(pk=tool_call.id).approval_id == uuid.UUID(
        last.model_extra["kitemesh"]["approval_id"]
    )


# --- What a resume runs and tells the brain ------------------------------------------------------------


def test_approved_tool_runs_once_with_the_paused_arguments_and_the_run_continues(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    paused = pause(http, setup, upstream)
    upstream.queue(Reply(content="Ticket created."))
    appended = [{"role": "user", "content": "Also tell me its number."}]

    response = approve_all(http, setup, paused, messages=appended)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Ticket created."}, "finish_reason": "stop"}
    ]
    assert set(body["kitemesh"]) == {"execution_id", "credits_charged", "request_id", "mode"}
    assert body["kitemesh"]["execution_id"] == paused["kitemesh"]["execution_id"]
    assert body["kitemesh"]["request_id"] == response.headers["X-Request-ID"]
    [request] = tool_server.requests
    assert (request.method, request.path) == ("POST", "/tickets")
    assert request.json() == json.loads(TICKET_ARGUMENTS)
    assert len(upstream.received) == 2
    sent = upstream.received[1].body["messages"]
    assert sent[-3:] == [
        {"role": "assistant", "content": None, "tool_calls": [call()]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"status": 200, "body": '{"ok": true}'})},
        *appended,
    ]
    assert sent[:2] == [{"role": "system", "content": "You are the acme brain."}, USER]
    tool_execution = ToolExecution.objects.get(pk=paused_ids(paused)[0])
    assert tool_execution.status == ToolExecution.Status.SUCCEEDED
    assert (tool_execution.decided_via, tool_execution.decided_by) == ("api", "token:test")
    assert Approval.objects.get(pk=paused["kitemesh"]["approval_id"]).status == Approval.Status.RESUMED
    assert Execution.objects.get(pk=body["kitemesh"]["execution_id"]).status == Execution.Status.SUCCEEDED


def test_denied_tool_never_runs_and_the_brain_gets_the_reason(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    upstream.queue(Reply(content="Understood, no ticket."))
    [te_id] = paused_ids(paused)

    response = resume(
        http,
        setup,
        paused["kitemesh"]["approval_id"],
        denied=[{"tool_execution_id": te_id, "reason": "Change freeze until Monday"}],
    )

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "Understood, no ticket."
    assert tool_server.requests == []
    [message] = tool_messages(upstream.received[1].body["messages"])
    assert message["tool_call_id"] == "call_1"
    assert "denied" in message["content"]
    assert "Change freeze until Monday" in message["content"]
    tool_execution = ToolExecution.objects.get(pk=te_id)
    assert tool_execution.status == ToolExecution.Status.DENIED
    assert tool_execution.decision_reason == "Change freeze until Monday"


def test_tool_needing_no_approval_in_the_round_runs_with_the_approved_ones_at_resume(
    live, http, setup: Setup, upstream, tool_server, ticket, lookup
):
    paused = pause(http, setup, upstream, call(), call("lookup_order", '{"order_id": "A1"}', "call_2"))

    assert [c["function"]["name"] for c in paused["choices"][0]["message"]["tool_calls"]] == ["create_ticket"]
    assert tool_server.requests == []  # the lookup waits for the round's decisions
    waiting = ToolExecution.objects.get(call_id="call_2")
    assert (waiting.status, waiting.started_at) == (ToolExecution.Status.APPROVED, None)

    upstream.queue(Reply(content="Both done."))
    response = approve_all(http, setup, paused)

    assert response.status_code == 200, response.text
    assert sorted((r.method, r.path) for r in tool_server.requests) == [("GET", "/orders"), ("POST", "/tickets")]
    results = tool_messages(upstream.received[1].body["messages"])
    assert [m["tool_call_id"] for m in results] == ["call_1", "call_2"]
    assert all(json.loads(m["content"])["status"] == 200 for m in results)


def test_tool_needing_no_approval_still_runs_when_the_others_are_denied(
    live, http, setup: Setup, upstream, tool_server, ticket, lookup
):
    paused = pause(http, setup, upstream, call(), call("lookup_order", '{"order_id": "A1"}', "call_2"))
    [te_id] = paused_ids(paused)

    response = resume(
        http, setup, paused["kitemesh"]["approval_id"], denied=[{"tool_execution_id": te_id, "reason": "no"}]
    )

    assert response.status_code == 200, response.text
    assert [(r.method, r.path) for r in tool_server.requests] == [("GET", "/orders")]


def test_resumed_run_can_pause_again_with_a_new_approval_of_the_same_execution(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    first = pause(http, setup, upstream)
    upstream.queue(tools_reply(call(arguments='{"priority": "low", "title": "Follow-up"}', call_id="call_2")))

    second_response = approve_all(http, setup, first)

    assert second_response.status_code == 200, second_response.text
    second = second_response.json()
    assert second["choices"][0]["finish_reason"] == "tool_calls"
    assert second["choices"][0]["message"]["content"] is None
    assert second["kitemesh"]["approval_id"] != first["kitemesh"]["approval_id"]
    assert second["kitemesh"]["execution_id"] == first["kitemesh"]["execution_id"]
    assert set(paused_ids(second)).isdisjoint(paused_ids(first))
    assert len(tool_server.requests) == 1

    upstream.queue(Reply(content="Two tickets."))
    final = approve_all(http, setup, second)

    assert final.status_code == 200, final.text
    assert final.json()["choices"][0]["message"]["content"] == "Two tickets."
    assert final.json()["kitemesh"]["execution_id"] == first["kitemesh"]["execution_id"]
    assert [r.json()["title"] for r in tool_server.requests] == ["Printer on fire", "Follow-up"]
    results = tool_messages(upstream.received[2].body["messages"])
    assert [m["tool_call_id"] for m in results] == ["call_1", "call_2"]
    statuses = Approval.objects.filter(execution_id=first["kitemesh"]["execution_id"]).values_list("status", flat=True)
    assert sorted(statuses) == ["resumed", "resumed"]
    assert Execution.objects.get(pk=first["kitemesh"]["execution_id"]).status == Execution.Status.SUCCEEDED


def test_approved_call_with_invalid_arguments_is_not_sent_and_the_brain_is_told_why(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    paused = pause(http, setup, upstream, call(arguments='{"priority": "urgent"}'))
    upstream.queue(Reply(content="I will use a valid priority."))

    response = approve_all(http, setup, paused)

    assert response.status_code == 200, response.text
    assert tool_server.requests == []
    [message] = tool_messages(upstream.received[1].body["messages"])
    error = json.loads(message["content"])["error"]
    assert "not sent" in error
    assert "priority" in error
    # Not sent, not run: only the brain's call is charged (0.25 → 1), not the tool's price.
    assert response.json()["kitemesh"]["credits_charged"] == math.ceil(model_cost(11, 7))


def test_stream_pause_then_stream_resume_streams_the_answer(live, http, setup: Setup, upstream, tool_server, ticket):
    upstream.queue(tools_reply(pieces=3))
    payload = {"model": setup.model, "messages": [USER], "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response:
        paused_kitemesh = sse_chunks(response)[-1]["kitemesh"]
    [te_id] = ToolExecution.objects.filter(approval_id=paused_kitemesh["approval_id"]).values_list("id", flat=True)
    upstream.queue(
        Reply(chunks=["Ticket ", "created ", "for you."], usage={"prompt_tokens": 200, "completion_tokens": 30})
    )

    body = {
        "model": setup.model,
        "approval_id": paused_kitemesh["approval_id"],
        "approved_tool_execution_ids": [str(te_id)],
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/resume", json=body, headers=setup.headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = sse_chunks(response)

    assert upstream.received[1].body["stream"] is True
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == "Ticket created for you."
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop"
    assert final["kitemesh"]["execution_id"] == paused_kitemesh["execution_id"]
    assert final["kitemesh"]["request_id"] == response.headers["X-Request-ID"]
    assert final["kitemesh"]["credits_charged"] == math.ceil(model_cost(200, 30) + TICKET_PRICE)
    [request] = tool_server.requests
    assert request.json() == json.loads(TICKET_ARGUMENTS)


def test_openai_sdk_resumes_through_client_post(live, setup: Setup, upstream, tool_server, ticket):
    client = sdk(live, setup)
    upstream.queue(tools_reply())
    paused = client.chat.completions.create(model=setup.model, messages=[USER])
    upstream.queue(Reply(content="Ticket created."))

    completion = client.post(
        "/chat/resume",
        body={
            "model": setup.model,
            "approval_id": paused.model_extra["kitemesh"]["approval_id"],
            "approved_tool_execution_ids": [c.id for c in paused.choices[0].message.tool_calls],
            "messages": [{"role": "user", "content": "Thanks"}],
            "metadata": {"request_id": "req_resume_sdk_1"},
        },
        cast_to=openai.types.chat.ChatCompletion,
    )

    assert isinstance(completion, openai.types.chat.ChatCompletion)
    assert completion.choices[0].message.content == "Ticket created."
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model_extra["kitemesh"]["execution_id"] == paused.model_extra["kitemesh"]["execution_id"]
    assert completion.model_extra["kitemesh"]["request_id"] == "req_resume_sdk_1"
    assert len(tool_server.requests) == 1

    with pytest.raises(openai.ConflictError) as raised:
        client.post(
            "/chat/resume",
            body={"model": setup.model, "approval_id": paused.model_extra["kitemesh"]["approval_id"]},
            cast_to=openai.types.chat.ChatCompletion,
        )
    assert raised.value.status_code == 409
    assert len(tool_server.requests) == 1


# --- Errors ----------------------------------------------------------------------------------------


def test_resume_of_another_teams_approval_is_404_approval_not_found(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    paused = pause(http, setup, upstream)
    other = make_setup(upstream, team_name="globex")

    for model in (other.model, setup.model):
        response = resume(
            http,
            setup,
            paused["kitemesh"]["approval_id"],
            approved=paused_ids(paused),
            headers=other.headers,
            model=model,
        )
        assert_error(response, 404, "not_found_error", "approval_not_found")

    assert_still_pending(paused, tool_server)
    assert len(upstream.received) == 1


def test_resume_of_an_unknown_approval_is_404_approval_not_found(live, http, setup: Setup, upstream, ticket):
    response = resume(http, setup, str(uuid.uuid4()), approved=[str(uuid.uuid4())])

    assert_error(response, 404, "not_found_error", "approval_not_found")


def test_resume_naming_another_group_is_400_on_model(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    other_group = Group.objects.create(team=setup.team, name="sales", brain=setup.brain)

    response = resume(
        http, setup, paused["kitemesh"]["approval_id"], approved=paused_ids(paused), model=f"group:{other_group.id}"
    )

    error = assert_error(response, 400, "invalid_request_error", "invalid_request_error")
    assert error["param"] == "model"
    assert_still_pending(paused, tool_server)
    upstream.queue(Reply(content="ok"))
    assert approve_all(http, setup, paused).status_code == 200


@pytest.mark.parametrize("field", ["approved", "denied"])
@pytest.mark.parametrize("stranger", ["random", "other-approval"])
def test_resume_with_a_tool_execution_outside_the_approval_is_400_unknown_tool_execution(
    live, http, setup: Setup, upstream, tool_server, ticket, field, stranger
):
    paused = pause(http, setup, upstream)
    other = pause(http, setup, upstream)
    foreign = str(uuid.uuid4()) if stranger == "random" else paused_ids(other)[0]
    decisions = (
        {"approved": [*paused_ids(paused), foreign]}
        if field == "approved"
        else {"approved": paused_ids(paused), "denied": [{"tool_execution_id": foreign, "reason": "x"}]}
    )

    response = resume(http, setup, paused["kitemesh"]["approval_id"], **decisions)

    error = assert_error(response, 400, "invalid_request_error", "unknown_tool_execution")
    assert foreign in error["message"]
    assert_still_pending(paused, tool_server)
    assert Approval.objects.get(pk=other["kitemesh"]["approval_id"]).status == Approval.Status.PENDING
    assert len(upstream.received) == 2


def test_call_needing_no_approval_is_not_decidable_400_unknown_tool_execution(
    live, http, setup: Setup, upstream, tool_server, ticket, lookup
):
    paused = pause(http, setup, upstream, call(), call("lookup_order", '{"order_id": "A1"}', "call_2"))
    auto = str(ToolExecution.objects.get(call_id="call_2").id)

    response = resume(http, setup, paused["kitemesh"]["approval_id"], approved=[*paused_ids(paused), auto])

    assert_error(response, 400, "invalid_request_error", "unknown_tool_execution")
    assert_still_pending(paused, tool_server)


def test_one_tool_execution_both_approved_and_denied_is_400(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    [te_id] = paused_ids(paused)

    response = resume(
        http, setup, paused["kitemesh"]["approval_id"], approved=[te_id], denied=[{"tool_execution_id": te_id}]
    )

    assert_error(response, 400, "invalid_request_error", "invalid_request_error")
    assert_still_pending(paused, tool_server)
    assert ToolExecution.objects.get(pk=te_id).status == ToolExecution.Status.PENDING


def test_resume_without_a_decision_for_every_call_is_409_decision_required(
    live, http, setup: Setup, upstream, tool_server, ticket, group_tool
):
    group_tool("close_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    paused = pause(http, setup, upstream, call(), call("close_ticket", '{"priority": "low"}', "call_2"))
    first, second = paused_ids(paused)

    nothing = resume(http, setup, paused["kitemesh"]["approval_id"])
    partial = resume(http, setup, paused["kitemesh"]["approval_id"], approved=[first])

    assert_error(nothing, 409, "conflict_error", "decision_required")
    error = assert_error(partial, 409, "conflict_error", "decision_required")
    assert second in error["message"]
    assert_still_pending(paused, tool_server)
    assert ToolExecution.objects.get(pk=first).status == ToolExecution.Status.PENDING
    assert len(upstream.received) == 1


def test_ui_approval_is_used_when_the_api_sends_no_decision(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    ui_decide(paused, 0, approve=True, reason="Looks right", actor=user("alice"))
    upstream.queue(Reply(content="Created."))

    response = resume(http, setup, paused["kitemesh"]["approval_id"])

    assert response.status_code == 200, response.text
    [request] = tool_server.requests
    assert request.json() == json.loads(TICKET_ARGUMENTS)
    tool_execution = ToolExecution.objects.get(pk=paused_ids(paused)[0])
    assert (tool_execution.decided_via, tool_execution.decided_by) == ("ui", "alice")
    assert tool_execution.status == ToolExecution.Status.SUCCEEDED


def test_ui_denial_is_used_when_the_api_sends_no_decision(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    ui_decide(paused, 0, approve=False, reason="Duplicate of #42", actor=user("alice"))
    upstream.queue(Reply(content="Not created."))

    response = resume(http, setup, paused["kitemesh"]["approval_id"])

    assert response.status_code == 200, response.text
    assert tool_server.requests == []
    [message] = tool_messages(upstream.received[1].body["messages"])
    assert "Duplicate of #42" in message["content"]


def test_api_decision_contradicting_the_ui_is_409_decision_conflict(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    paused = pause(http, setup, upstream)
    [te_id] = paused_ids(paused)
    ui_decide(paused, 0, approve=False, reason="No")

    response = resume(http, setup, paused["kitemesh"]["approval_id"], approved=[te_id])

    assert_error(response, 409, "conflict_error", "decision_conflict")
    assert_still_pending(paused, tool_server)
    assert ToolExecution.objects.get(pk=te_id).status == ToolExecution.Status.DENIED


def test_api_decision_agreeing_with_the_ui_is_accepted(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    ui_decide(paused, 0, approve=True, actor=user("alice"))
    upstream.queue(Reply(content="Created."))

    response = approve_all(http, setup, paused)

    assert response.status_code == 200, response.text
    assert len(tool_server.requests) == 1
    assert ToolExecution.objects.get(pk=paused_ids(paused)[0]).decided_by == "alice"


def test_batch_group_refuses_mixed_decisions_and_accepts_approving_all(
    live, http, setup: Setup, upstream, tool_server, ticket, group_tool
):
    Group.objects.filter(pk=setup.group.pk).update(approval_style=Group.ApprovalStyle.BATCH)
    group_tool("close_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    paused = pause(http, setup, upstream, call(), call("close_ticket", '{"priority": "low"}', "call_2"))
    first, second = paused_ids(paused)
    approval_id = paused["kitemesh"]["approval_id"]

    mixed = resume(http, setup, approval_id, approved=[first], denied=[{"tool_execution_id": second, "reason": "no"}])

    assert_error(mixed, 400, "invalid_request_error", "invalid_request_error")
    assert_still_pending(paused, tool_server)

    upstream.queue(Reply(content="Both."))
    response = resume(http, setup, approval_id, approved=[first, second])

    assert response.status_code == 200, response.text
    assert sorted(r.path for r in tool_server.requests) == ["/close_ticket", "/tickets"]


def test_batch_group_refuses_an_api_decision_mixed_with_a_ui_one(
    live, http, setup: Setup, upstream, tool_server, ticket, group_tool
):
    Group.objects.filter(pk=setup.group.pk).update(approval_style=Group.ApprovalStyle.BATCH)
    group_tool("close_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    paused = pause(http, setup, upstream, call(), call("close_ticket", '{"priority": "low"}', "call_2"))
    ui_decide(paused, 0, approve=True)

    response = resume(
        http, setup, paused["kitemesh"]["approval_id"], denied=[{"tool_execution_id": paused_ids(paused)[1]}]
    )

    assert_error(response, 400, "invalid_request_error", "invalid_request_error")
    assert_still_pending(paused, tool_server)


def test_batch_group_accepts_denying_all(live, http, setup: Setup, upstream, tool_server, ticket, group_tool):
    Group.objects.filter(pk=setup.group.pk).update(approval_style=Group.ApprovalStyle.BATCH)
    group_tool("close_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    paused = pause(http, setup, upstream, call(), call("close_ticket", '{"priority": "low"}', "call_2"))
    upstream.queue(Reply(content="Nothing done."))

    response = resume(
        http,
        setup,
        paused["kitemesh"]["approval_id"],
        denied=[{"tool_execution_id": i, "reason": "all no"} for i in paused_ids(paused)],
    )

    assert response.status_code == 200, response.text
    assert tool_server.requests == []
    assert [m["tool_call_id"] for m in tool_messages(upstream.received[1].body["messages"])] == ["call_1", "call_2"]


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_human_approver_tool_decided_through_the_api_is_403(
    live, http, setup: Setup, upstream, tool_server, group_tool, decision
):
    group_tool("wire_money", parameters={"type": "object"}, requires_approval=True, approver="human")
    paused = pause(http, setup, upstream, call("wire_money", '{"amount": 100}'))
    [te_id] = paused_ids(paused)
    decisions = {"approved": [te_id]} if decision == "approve" else {"denied": [{"tool_execution_id": te_id}]}

    response = resume(http, setup, paused["kitemesh"]["approval_id"], **decisions)

    assert_error(response, 403, "permission_error", "permission_denied")
    assert_still_pending(paused, tool_server)
    assert ToolExecution.objects.get(pk=te_id).status == ToolExecution.Status.PENDING


def test_human_approver_tool_decided_in_the_ui_resumes_without_api_decisions(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("wire_money", parameters={"type": "object"}, requires_approval=True, approver="human")
    paused = pause(http, setup, upstream, call("wire_money", '{"amount": 100}'))
    ui_decide(paused, 0, approve=True, actor=user("treasurer"))
    upstream.queue(Reply(content="Wired."))

    response = resume(http, setup, paused["kitemesh"]["approval_id"])

    assert response.status_code == 200, response.text
    assert [r.json() for r in tool_server.requests] == [{"amount": 100}]


def test_expired_approval_is_410_its_hold_is_released_and_the_tool_never_runs(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    paused = pause(http, setup, upstream)
    approval_id = paused["kitemesh"]["approval_id"]
    assert credits(http, setup)["held"] == TICKET_PRICE
    Approval.objects.filter(pk=approval_id).update(
        expires_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    )

    response = approve_all(http, setup, paused)

    error = assert_error(response, 410, "approval_expired", "approval_expired")
    assert error["message"]
    assert tool_server.requests == []
    assert len(upstream.received) == 1
    assert credits(http, setup) == {
        "object": "credit_balance",
        "team": "acme",
        "balance": 1000 - paused["kitemesh"]["credits_charged"],
        "held": 0,
    }
    approval = Approval.objects.get(pk=approval_id)
    assert approval.status == Approval.Status.EXPIRED
    assert not Hold.objects.filter(execution_id=approval.execution_id, status=Hold.Status.ACTIVE).exists()
    last = LedgerEntry.objects.filter(team=setup.team).order_by("-id").first()
    assert (last.kind, last.amount, last.held_after) == (LedgerEntry.Kind.RELEASE, TICKET_PRICE, 0)
    assert str(last.execution_id) == paused["kitemesh"]["execution_id"]
    assert Execution.objects.get(pk=paused["kitemesh"]["execution_id"]).status == Execution.Status.EXPIRED
    # Expired stays expired, for a retry too.
    assert_error(approve_all(http, setup, paused), 410, "approval_expired", "approval_expired")
    assert tool_server.requests == []


def test_second_resume_is_409_approval_already_resumed_and_the_tool_ran_once(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    paused = pause(http, setup, upstream)
    upstream.queue(Reply(content="Created."))
    assert approve_all(http, setup, paused).status_code == 200

    again = approve_all(http, setup, paused)

    assert_error(again, 409, "conflict_error", "approval_already_resumed")
    assert len(tool_server.requests) == 1
    assert len(upstream.received) == 2
    assert credits(http, setup)["held"] == 0


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"approval_id": None}, "approval_id"),
        ({"approval_id": "not-a-uuid"}, "approval_id"),
        ({"approved_tool_execution_ids": "all"}, "approved_tool_execution_ids"),
        ({"approved_tool_execution_ids": ["nope"]}, "approved_tool_execution_ids.0"),
        ({"denied_tools": [{"tool_execution_id": "nope"}]}, "denied_tools.0.tool_execution_id"),
        ({"denied_tools": [{"tool_execution_id": "{id}", "reason": 5}]}, "denied_tools.0.reason"),
        ({"denied_tools": ["{id}"]}, "denied_tools.0"),
        ({"denied_tools": {"tool_execution_id": "{id}"}}, "denied_tools"),
        ({"model": "gpt-4o"}, "model"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"stream": "yes"}, "stream"),
    ],
)
def test_malformed_resume_body_is_400_naming_the_field(
    live, http, setup: Setup, upstream, tool_server, ticket, change, param
):
    paused = pause(http, setup, upstream)
    [te_id] = paused_ids(paused)
    body = {
        "model": setup.model,
        "approval_id": paused["kitemesh"]["approval_id"],
        "approved_tool_execution_ids": [te_id],
    }
    body |= json.loads(json.dumps(change).replace("{id}", te_id))
    body = {k: v for k, v in body.items() if v is not None}

    response = http.post("/v1/chat/resume", json=body, headers=setup.headers)

    error = assert_error(response, 400, "invalid_request_error", "invalid_request_error")
    assert error["param"] == param
    assert_still_pending(paused, tool_server)


# --- Credits ---------------------------------------------------------------------------------------


def test_pause_charges_the_brain_call_and_holds_the_tool_price_until_the_resume_charges_it(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    paused = pause(http, setup, upstream, usage={"prompt_tokens": 100, "completion_tokens": 20})

    pause_charge = math.ceil(model_cost(100, 20))
    assert paused["kitemesh"]["credits_charged"] == pause_charge == 2
    assert credits(http, setup) == {
        "object": "credit_balance",
        "team": "acme",
        "balance": 1000 - pause_charge,
        "held": TICKET_PRICE,
    }

    upstream.queue(Reply(content="Created.", usage={"prompt_tokens": 200, "completion_tokens": 30}))
    response = approve_all(http, setup, paused)

    assert response.status_code == 200, response.text
    resume_charge = math.ceil(model_cost(200, 30) + TICKET_PRICE)
    assert response.json()["kitemesh"]["credits_charged"] == resume_charge == 6
    assert credits(http, setup) == {
        "object": "credit_balance",
        "team": "acme",
        "balance": 1000 - pause_charge - resume_charge,
        "held": 0,
    }
    charges = LedgerEntry.objects.filter(execution_id=paused["kitemesh"]["execution_id"], kind=LedgerEntry.Kind.CHARGE)
    assert sorted(charges.values_list("amount", flat=True)) == sorted([-pause_charge, -resume_charge])
    execution = Execution.objects.get(pk=paused["kitemesh"]["execution_id"])
    assert execution.credits_charged == pause_charge + resume_charge


def test_denied_tool_price_is_not_charged(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    upstream.queue(Reply(content="Fine.", usage={"prompt_tokens": 200, "completion_tokens": 30}))

    response = resume(
        http, setup, paused["kitemesh"]["approval_id"], denied=[{"tool_execution_id": paused_ids(paused)[0]}]
    )

    assert response.status_code == 200, response.text
    assert response.json()["kitemesh"]["credits_charged"] == math.ceil(model_cost(200, 30))
    assert credits(http, setup)["held"] == 0


def balance_set(setup: Setup, balance: int) -> None:
    """Bring the team's balance to `balance` with an adjustment (holds stay as they are)."""
    current = CreditAccount.objects.get(team=setup.team).balance
    credits_grant(team=setup.team, amount=balance - current, reason="test: drain", kind=LedgerEntry.Kind.ADJUSTMENT)


@pytest.mark.parametrize("short_of", ["tool price", "brain call"])
def test_resume_the_team_cannot_cover_is_402_before_anything_runs_and_can_be_retried(
    live, http, setup: Setup, upstream, tool_server, ticket, short_of
):
    """SPEC §3: before any call a request holds its worst case, else 402 and nothing is called; a refused
    request records nothing, so the approval must still be there to resume after a grant."""
    paused = pause(http, setup, upstream)
    # Less than the tool's price, or the price but less than the brain call's worst case (~21 credits:
    # 1024 output tokens at 20 per 1k).
    balance_set(setup, TICKET_PRICE - 1 if short_of == "tool price" else TICKET_PRICE + 5)

    response = approve_all(http, setup, paused)

    assert_error(response, 402, "insufficient_credits", "insufficient_credits")
    assert tool_server.requests == []
    assert len(upstream.received) == 1
    assert Approval.objects.get(pk=paused["kitemesh"]["approval_id"]).status == Approval.Status.PENDING
    assert ToolExecution.objects.get(pk=paused_ids(paused)[0]).status == ToolExecution.Status.PENDING

    credits_grant(team=setup.team, amount=1000, reason="top-up")
    upstream.queue(Reply(content="Created."))
    retried = approve_all(http, setup, paused)

    assert retried.status_code == 200, retried.text
    assert len(tool_server.requests) == 1


def test_sweep_command_expires_due_approvals_and_releases_their_holds(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    due = pause(http, setup, upstream)
    waiting = pause(http, setup, upstream)
    assert credits(http, setup)["held"] == 2 * TICKET_PRICE
    Approval.objects.filter(pk=due["kitemesh"]["approval_id"]).update(
        expires_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    )
    out = io.StringIO()

    call_command("sweep", stdout=out)

    assert (
        out.getvalue().strip()
        == "recovered 0 run(s); expired 1 approval(s); requeued 0 webhook delivery(ies); recorded 0 credit alert(s)"
    )
    assert Approval.objects.get(pk=due["kitemesh"]["approval_id"]).status == Approval.Status.EXPIRED
    assert Approval.objects.get(pk=waiting["kitemesh"]["approval_id"]).status == Approval.Status.PENDING
    assert Execution.objects.get(pk=due["kitemesh"]["execution_id"]).status == Execution.Status.EXPIRED
    assert credits(http, setup)["held"] == TICKET_PRICE
    releases = LedgerEntry.objects.filter(execution_id=due["kitemesh"]["execution_id"], kind=LedgerEntry.Kind.RELEASE)
    assert TICKET_PRICE in releases.values_list("amount", flat=True)

    again = io.StringIO()
    call_command("sweep", stdout=again)
    assert (
        again.getvalue().strip()
        == "recovered 0 run(s); expired 0 approval(s); requeued 0 webhook delivery(ies); recorded 0 credit alert(s)"
    )
    assert credits(http, setup)["held"] == TICKET_PRICE
    assert_error(approve_all(http, setup, due), 410, "approval_expired", "approval_expired")
    upstream.queue(Reply(content="ok"))
    assert approve_all(http, setup, waiting).status_code == 200
    assert len(tool_server.requests) == 1
