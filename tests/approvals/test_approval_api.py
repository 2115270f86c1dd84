"""GET /v1/approvals/{id} and GET /v1/executions/{id} (SPEC §2 "Other endpoints", §5 risk labels and redaction),
through the live server: their shapes before and after decisions, redacted arguments, risk labels, lazy expiry,
and 404 for other teams and malformed ids."""

import datetime
import json
import math
import uuid
from decimal import Decimal

import httpx
import pytest
from django.contrib.auth import get_user_model

from approvals.services import approval_decide
from core.models import Approval, ToolExecution
from tests.conftest import Setup, make_setup
from tests.support.helpers import credits
from tests.support.tool_server import ToolResponse
from tests.support.upstream import Reply

INPUT_PER_1K = 10
OUTPUT_PER_1K = 20
USER = {"role": "user", "content": "Handle the customer"}
TICKET_SCHEMA = {
    "type": "object",
    "properties": {
        "priority": {"type": "string"},
        "card": {"type": "string", "x-redact": True},
        "customer": {
            "type": "object",
            "properties": {"email": {"type": "string"}, "pin": {"type": "string", "x-redact": True}},
        },
        "people": {
            "type": "array",
            "items": {"type": "object", "properties": {"name": {"type": "string"}, "ssn": {"x-redact": True}}},
        },
    },
    "required": ["priority"],
}
SECRET_ARGUMENTS = {
    "priority": "high",
    "password": "hunter2-pw",
    "api_key": "sk-live-abc123",
    "token": "tok-secret-9",
    "client_secret": "shh-client-secret",
    "Authorization": "Bearer xyz-auth-value",
    "card": "4111111111111111",
    "customer": {"email": "ann@example.com", "pin": "987654"},
    "people": [{"name": "Bo", "ssn": "078-05-1120"}],
    "contacts": [{"name": "Cy", "db_password": "listed-pw"}],
    "x-api-key": "dash-key-value",
}
REDACTED_ARGUMENTS = {
    "priority": "high",
    "password": "[redacted]",
    "api_key": "[redacted]",
    "token": "[redacted]",
    "client_secret": "[redacted]",
    "Authorization": "[redacted]",
    "card": "[redacted]",
    "customer": {"email": "ann@example.com", "pin": "[redacted]"},
    "people": [{"name": "Bo", "ssn": "[redacted]"}],
    "contacts": [{"name": "Cy", "db_password": "[redacted]"}],
    "x-api-key": "[redacted]",
}
SECRET_VALUES = [
    "hunter2-pw",
    "sk-live-abc123",
    "tok-secret-9",
    "shh-client-secret",
    "xyz-auth-value",
    "4111111111111111",  # whole values: a short one ("4111") also turns up in random ids and timestamps
    "987654",
    "078-05-1120",
    "listed-pw",
    "dash-key-value",
]


def call(name: str, arguments: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def tools_reply(*calls: dict, usage: dict | None = None) -> Reply:
    return Reply(
        content=None,
        chunks=[],
        tool_calls=list(calls),
        finish_reason="tool_calls",
        usage=usage or {"prompt_tokens": 11, "completion_tokens": 7},
    )


def pause(http: httpx.Client, setup: Setup, upstream, *calls: dict) -> dict:
    upstream.queue(tools_reply(*calls))
    response = http.post("/v1/chat/completions", json={"model": setup.model, "messages": [USER]}, headers=setup.headers)
    assert response.status_code == 200, response.text
    paused = response.json()
    assert paused["choices"][0]["finish_reason"] == "tool_calls", paused
    return paused


def paused_ids(paused: dict) -> list[str]:
    return [c["id"] for c in paused["choices"][0]["message"]["tool_calls"]]


def get_approval(http: httpx.Client, setup: Setup, approval_id: str) -> dict:
    response = http.get(f"/v1/approvals/{approval_id}", headers=setup.headers)
    assert response.status_code == 200, response.text
    return response.json()


def get_execution(http: httpx.Client, setup: Setup, execution_id: str) -> dict:
    response = http.get(f"/v1/executions/{execution_id}", headers=setup.headers)
    assert response.status_code == 200, response.text
    return response.json()


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (type_, code)
    assert error["request_id"] == response.headers["X-Request-ID"]
    return error


def model_cost(prompt_tokens: int, completion_tokens: int) -> Decimal:
    return Decimal(prompt_tokens * INPUT_PER_1K + completion_tokens * OUTPUT_PER_1K) / 1000


# --- GET /v1/approvals/{id} --------------------------------------------------------------------------


def test_pending_approval_shows_each_tool_execution_with_where_it_goes(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True, path="/api/tickets")
    group_tool("delete_customer", method="DELETE", requires_approval=True, path="/api/customers")
    paused = pause(
        http,
        setup,
        upstream,
        call("create_ticket", {"priority": "low"}, "call_1"),
        call("delete_customer", {"id": "c-1"}, "call_2"),
    )

    body = get_approval(http, setup, paused["kitemesh"]["approval_id"])

    assert body["id"] == paused["kitemesh"]["approval_id"]
    assert body["status"] == "pending"
    assert body["expires_at"] == paused["kitemesh"]["expires_at"]
    moment = datetime.datetime.fromisoformat(body["expires_at"].replace("Z", "+00:00"))
    assert moment.utcoffset() == datetime.timedelta(0)
    assert body["execution_id"] == paused["kitemesh"]["execution_id"]
    executions = body["tool_executions"]
    assert [te["id"] for te in executions] == paused_ids(paused)
    first, second = executions
    assert {k: first[k] for k in ("tool", "method", "host", "path", "arguments", "risk", "decision", "decided_by")} == {
        "tool": "create_ticket",
        "method": "POST",
        "host": "127.0.0.1",
        "path": "/api/tickets",
        "arguments": {"priority": "low"},
        "risk": "medium",
        "decision": None,
        "decided_by": None,
    }
    assert not first["reason"]
    assert (second["tool"], second["method"], second["path"], second["risk"]) == (
        "delete_customer",
        "DELETE",
        "/api/customers",
        "high",
    )
    assert second["arguments"] == {"id": "c-1"}


def test_arguments_are_redacted_for_display_but_the_tool_receives_them_whole(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    paused = pause(http, setup, upstream, call("create_ticket", SECRET_ARGUMENTS, "call_1"))
    approval_id = paused["kitemesh"]["approval_id"]

    response = http.get(f"/v1/approvals/{approval_id}", headers=setup.headers)

    assert response.status_code == 200, response.text
    [shown] = response.json()["tool_executions"]
    assert shown["arguments"] == REDACTED_ARGUMENTS
    for secret in SECRET_VALUES:
        assert secret not in response.text

    upstream.queue(Reply(content="Done."))
    resumed = http.post(
        "/v1/chat/resume",
        json={"model": setup.model, "approval_id": approval_id, "approved_tool_execution_ids": paused_ids(paused)},
        headers=setup.headers,
    )
    assert resumed.status_code == 200, resumed.text
    [request] = tool_server.requests
    assert request.json() == SECRET_ARGUMENTS
    [after] = get_approval(http, setup, approval_id)["tool_executions"]
    assert after["arguments"] == REDACTED_ARGUMENTS


@pytest.mark.parametrize(
    ("method", "override", "expected"),
    [
        ("GET", "", "low"),
        ("HEAD", "", "low"),
        ("POST", "", "medium"),
        ("PUT", "", "medium"),
        ("PATCH", "", "medium"),
        ("DELETE", "", "high"),
        ("GET", "high", "high"),
        ("DELETE", "low", "low"),
    ],
)
def test_risk_label_follows_the_method_unless_the_tool_overrides_it(
    live, http, setup: Setup, upstream, tool_server, group_tool, method, override, expected
):
    group_tool("act", method=method, risk=override, requires_approval=True)
    paused = pause(http, setup, upstream, call("act", {}, "call_1"))

    [shown] = get_approval(http, setup, paused["kitemesh"]["approval_id"])["tool_executions"]

    assert (shown["method"], shown["risk"]) == (method, expected)


def test_decisions_show_the_decision_the_reason_and_who_decided(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    group_tool("delete_customer", method="DELETE", requires_approval=True)
    paused = pause(
        http,
        setup,
        upstream,
        call("create_ticket", {"priority": "low"}, "call_1"),
        call("delete_customer", {"id": "c-1"}, "call_2"),
    )
    approval_id = paused["kitemesh"]["approval_id"]
    ticket_id, delete_id = paused_ids(paused)
    alice = get_user_model().objects.create_user("alice", password="pw")
    approval_decide(
        approval=Approval.objects.get(pk=approval_id),
        tool_execution=ToolExecution.objects.get(pk=delete_id),
        approve=False,
        reason="Never delete customers",
        actor=alice,
    )

    midway = {te["id"]: te for te in get_approval(http, setup, approval_id)["tool_executions"]}
    assert midway[delete_id]["decision"] == "denied"
    assert midway[delete_id]["reason"] == "Never delete customers"
    assert midway[delete_id]["decided_by"] == "alice"
    assert midway[ticket_id]["decision"] is None

    upstream.queue(Reply(content="Ticket only."))
    resumed = http.post(
        "/v1/chat/resume",
        json={"model": setup.model, "approval_id": approval_id, "approved_tool_execution_ids": [ticket_id]},
        headers=setup.headers,
    )
    assert resumed.status_code == 200, resumed.text

    body = get_approval(http, setup, approval_id)
    assert body["status"] == "resumed"
    shown = {te["id"]: te for te in body["tool_executions"]}
    assert (shown[ticket_id]["decision"], shown[ticket_id]["decided_by"]) == ("approved", "token:test")
    assert (shown[delete_id]["decision"], shown[delete_id]["decided_by"]) == ("denied", "alice")
    assert shown[delete_id]["reason"] == "Never delete customers"
    assert [r.path for r in tool_server.requests] == ["/create_ticket"]


def test_approval_past_its_time_reads_as_expired_and_its_hold_is_released(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True, price=4)
    paused = pause(http, setup, upstream, call("create_ticket", {"priority": "low"}, "call_1"))
    approval_id = paused["kitemesh"]["approval_id"]
    assert credits(http, setup)["held"] == 4
    Approval.objects.filter(pk=approval_id).update(
        expires_at=datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    )

    body = get_approval(http, setup, approval_id)

    assert body["status"] == "expired"
    assert credits(http, setup)["held"] == 0
    assert get_execution(http, setup, paused["kitemesh"]["execution_id"])["status"] == "expired"
    assert tool_server.requests == []


def test_approval_of_another_team_is_404(live, http, setup: Setup, upstream, tool_server, group_tool):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    paused = pause(http, setup, upstream, call("create_ticket", {"priority": "low"}, "call_1"))
    other = make_setup(upstream, team_name="globex")

    response = http.get(f"/v1/approvals/{paused['kitemesh']['approval_id']}", headers=other.headers)

    assert_error(response, 404, "not_found_error", "approval_not_found")
    assert "create_ticket" not in response.text


@pytest.mark.parametrize("approval_id", ["not-a-uuid", "12345", str(uuid.uuid4())])
def test_malformed_or_unknown_approval_id_is_404(live, http, setup: Setup, approval_id):
    response = http.get(f"/v1/approvals/{approval_id}", headers=setup.headers)

    assert_error(response, 404, "not_found_error", "approval_not_found")


def test_approval_detail_needs_a_token(live, http, setup: Setup, upstream, tool_server, group_tool):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True)
    paused = pause(http, setup, upstream, call("create_ticket", {"priority": "low"}, "call_1"))

    response = http.get(f"/v1/approvals/{paused['kitemesh']['approval_id']}")

    assert_error(response, 401, "authentication_error", "authentication_error")


# --- GET /v1/executions/{id} -------------------------------------------------------------------------


def test_execution_of_a_tool_loop_lists_every_model_call_and_tool_run(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("lookup_order", method="GET", price="0.5")
    group_tool("create_ticket", parameters=TICKET_SCHEMA)
    tool_server.queue(ToolResponse(status=200), ToolResponse(status=500, body="boom"))
    upstream.queue(
        tools_reply(
            call("lookup_order", {"order_id": "A1"}, "call_1"), usage={"prompt_tokens": 100, "completion_tokens": 10}
        ),
        tools_reply(
            call("create_ticket", {"priority": "low"}, "call_2"), usage={"prompt_tokens": 120, "completion_tokens": 12}
        ),
        Reply(content="Done.", usage={"prompt_tokens": 150, "completion_tokens": 20}),
    )
    completion = http.post(
        "/v1/chat/completions", json={"model": setup.model, "messages": [USER]}, headers=setup.headers
    )
    assert completion.status_code == 200, completion.text
    kitemesh = completion.json()["kitemesh"]

    body = get_execution(http, setup, kitemesh["execution_id"])

    assert body["id"] == kitemesh["execution_id"]
    assert body["status"] == "succeeded"
    assert body["group"] == "support"
    assert body["model"] == setup.model
    assert body["mode"] == "normal"
    assert body["request_id"] == kitemesh["request_id"]
    assert body["usage"] == {"prompt_tokens": 370, "completion_tokens": 42, "total_tokens": 412}
    expected = math.ceil(model_cost(100, 10) + model_cost(120, 12) + model_cost(150, 20) + Decimal("0.5"))
    assert body["credits_charged"] == kitemesh["credits_charged"] == expected
    steps = [
        {k: s.get(k) for k in ("kind", "model", "tool", "prompt_tokens", "completion_tokens", "status")}
        for s in body["steps"]
    ]
    assert steps == [
        {
            "kind": "model_call",
            "model": "up-model",
            "tool": None,
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "status": "succeeded",
        },
        {
            "kind": "tool_call",
            "model": None,
            "tool": "lookup_order",
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "status": "succeeded",
        },
        {
            "kind": "model_call",
            "model": "up-model",
            "tool": None,
            "prompt_tokens": 120,
            "completion_tokens": 12,
            "status": "succeeded",
        },
        {
            "kind": "tool_call",
            "model": None,
            "tool": "create_ticket",
            "prompt_tokens": 0,
            "completion_tokens": 0,
            "status": "failed",
        },
        {
            "kind": "model_call",
            "model": "up-model",
            "tool": None,
            "prompt_tokens": 150,
            "completion_tokens": 20,
            "status": "succeeded",
        },
    ]


def test_execution_across_a_pause_and_its_resume(live, http, setup: Setup, upstream, tool_server, group_tool):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True, price=3)
    paused = pause(http, setup, upstream, call("create_ticket", {"priority": "low"}, "call_1"))
    execution_id, approval_id = paused["kitemesh"]["execution_id"], paused["kitemesh"]["approval_id"]

    during = get_execution(http, setup, execution_id)

    assert during["status"] == "paused"
    assert [(s["kind"], s["status"]) for s in during["steps"]] == [("model_call", "succeeded")]
    assert during["approvals"] == [{"id": approval_id, "status": "pending"}]
    assert during["credits_charged"] == paused["kitemesh"]["credits_charged"]

    upstream.queue(Reply(content="Created.", usage={"prompt_tokens": 200, "completion_tokens": 30}))
    resumed = http.post(
        "/v1/chat/resume",
        json={"model": setup.model, "approval_id": approval_id, "approved_tool_execution_ids": paused_ids(paused)},
        headers=setup.headers,
    )
    assert resumed.status_code == 200, resumed.text

    after = get_execution(http, setup, execution_id)
    assert after["status"] == "succeeded"
    assert [(s["kind"], s.get("model") or s.get("tool")) for s in after["steps"]] == [
        ("model_call", "up-model"),
        ("tool_call", "create_ticket"),
        ("model_call", "up-model"),
    ]
    assert after["usage"] == {"prompt_tokens": 211, "completion_tokens": 37, "total_tokens": 248}
    assert (
        after["credits_charged"]
        == paused["kitemesh"]["credits_charged"] + resumed.json()["kitemesh"]["credits_charged"]
    )
    assert after["approvals"] == [{"id": approval_id, "status": "resumed"}]


def test_execution_of_another_team_is_404(live, http, setup: Setup, upstream):
    completion = http.post(
        "/v1/chat/completions", json={"model": setup.model, "messages": [USER]}, headers=setup.headers
    )
    assert completion.status_code == 200, completion.text
    other = make_setup(upstream, team_name="globex")

    response = http.get(f"/v1/executions/{completion.json()['kitemesh']['execution_id']}", headers=other.headers)

    assert_error(response, 404, "not_found_error", "execution_not_found")


@pytest.mark.parametrize("execution_id", ["not-a-uuid", str(uuid.uuid4())])
def test_malformed_or_unknown_execution_id_is_404(live, http, setup: Setup, execution_id):
    response = http.get(f"/v1/executions/{execution_id}", headers=setup.headers)

    assert_error(response, 404, "not_found_error", "execution_not_found")
