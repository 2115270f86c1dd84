"""Edit, then approve (SPEC §6): a resume's `edited_tool_executions` (and the decision page's edit) approve a
call with other arguments. The edit is checked (a JSON object, the tool's schema, its approval rules) before
anything is decided; the tool runs once, with the edited arguments; the model is told; the approval, the
history and webhooks show the original and the edit, redacted, and who made it."""

import json

import openai
import pytest

from core.models import Approval, ToolExecution
from tests.approvals.test_pages import person, signed_in
from tests.approvals.test_resume import (
    TICKET_ARGUMENTS,
    TICKET_SCHEMA,
    assert_error,
    assert_still_pending,
    call,
    pause,
    paused_ids,
    resume,
    sdk,
    tools_reply,
    ui_decide,
)
from tests.conftest import Setup
from tests.support.upstream import Reply

EDITED = {"priority": "low", "title": "Printer jammed"}


@pytest.fixture
def ticket(group_tool):
    return group_tool(
        "create_ticket",
        parameters={**TICKET_SCHEMA, "properties": {**TICKET_SCHEMA["properties"], "api_token": {"type": "string"}}},
        requires_approval=True,
        price=3,
        path="/tickets",
        approval_rules=[
            {
                "name": "no-urgent-printers",
                "when": {"properties": {"title": {"pattern": "URGENT"}}, "required": ["title"]},
                "then": "deny",
                "reason": "Urgent tickets go to the phone line",
            }
        ],
    )


def edit(http, setup: Setup, paused: dict, arguments: str, **body):
    [te_id] = paused_ids(paused)
    return resume(
        http,
        setup,
        paused["kitemesh"]["approval_id"],
        edited_tool_executions=[{"tool_execution_id": te_id, "arguments": arguments}],
        **body,
    )


def test_the_edited_arguments_run_once_and_the_model_is_told(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    upstream.queue(Reply(content="Ticket created."))

    response = edit(http, setup, paused, json.dumps(EDITED))

    assert response.status_code == 200, response.text
    [request] = tool_server.requests
    assert request.json() == EDITED
    tool_message = upstream.received[1].body["messages"][-1]
    content = json.loads(tool_message["content"])
    assert content["status"] == 200
    assert content["edited_arguments"] == EDITED
    assert "changed the arguments" in content["note"]
    te = ToolExecution.objects.get(pk=paused_ids(paused)[0])
    assert (te.status, te.decided_via, te.decided_by) == ("succeeded", "api", "token:test")
    assert json.loads(te.arguments) == EDITED and te.original_arguments == TICKET_ARGUMENTS


def test_the_approval_shows_the_original_and_the_edit_redacted(live, http, setup: Setup, upstream, tool_server, ticket):
    upstream.queue(tools_reply(call(arguments=json.dumps({"priority": "high", "api_token": "tok-original-1"}))))
    paused = http.post(
        "/v1/chat/completions",
        json={"model": setup.model, "messages": [{"role": "user", "content": "Go"}]},
        headers=setup.headers,
    ).json()
    assert paused["choices"][0]["finish_reason"] == "tool_calls"
    upstream.queue(Reply(content="Done."))
    edited = {"priority": "low", "api_token": "tok-edited-2"}
    assert edit(http, setup, paused, json.dumps(edited)).status_code == 200

    body = http.get(f"/v1/approvals/{paused['kitemesh']['approval_id']}", headers=setup.headers).json()

    [shown] = body["tool_executions"]
    assert shown["edited"] is True
    assert shown["arguments"] == {"priority": "low", "api_token": "[redacted]"}
    assert shown["original_arguments"] == {"priority": "high", "api_token": "[redacted]"}
    assert (shown["decided_by"], shown["decided_via"]) == ("token:test", "api")
    assert "tok-edited-2" not in json.dumps(body) and "tok-original-1" not in json.dumps(body)
    history = signed_in(person("ada", setup.team)).get("/approvals/history/").content.decode()
    assert "Edited" in history and "tok-edited-2" not in history and "tok-original-1" not in history


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ("not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"priority": "urgent"}', "priority"),
        ('{"title": "no priority"}', "'priority' is a required property"),
    ],
    ids=["not-json", "not-an-object", "fails-the-schema", "misses-a-required-field"],
)
def test_an_invalid_edit_is_400_and_decides_nothing(
    live, http, setup: Setup, upstream, tool_server, ticket, arguments: str, message: str
):
    paused = pause(http, setup, upstream)

    error = assert_error(edit(http, setup, paused, arguments), 400, "invalid_request_error", "invalid_tool_arguments")

    assert error["param"] == "edited_tool_executions.0.arguments"
    assert message in error["message"]
    assert_still_pending(paused, tool_server)


def test_an_edit_a_rule_would_deny_is_403_naming_the_rule(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)

    error = assert_error(
        edit(http, setup, paused, json.dumps({"priority": "high", "title": "URGENT printer"})),
        403,
        "permission_error",
        "permission_denied",
    )

    assert "no-urgent-printers" in error["message"]
    assert_still_pending(paused, tool_server)


def test_one_id_in_two_decisions_is_400(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    [te_id] = paused_ids(paused)

    response = edit(http, setup, paused, json.dumps(EDITED), approved_tool_execution_ids=[te_id])

    error = assert_error(response, 400, "invalid_request_error", "invalid_request_error")
    assert error["param"] == "edited_tool_executions"
    assert_still_pending(paused, tool_server)


def test_an_edit_of_a_call_of_another_approval_is_400(live, http, setup: Setup, upstream, tool_server, ticket):
    first, second = pause(http, setup, upstream), pause(http, setup, upstream)

    response = resume(
        http,
        setup,
        first["kitemesh"]["approval_id"],
        edited_tool_executions=[{"tool_execution_id": paused_ids(second)[0], "arguments": json.dumps(EDITED)}],
    )

    assert_error(response, 400, "invalid_request_error", "unknown_tool_execution")
    assert_still_pending(first, tool_server)


def test_a_call_a_person_must_decide_cannot_be_edited_by_the_api(
    live, http, setup: Setup, upstream, tool_server, group_tool
):
    group_tool("create_ticket", parameters=TICKET_SCHEMA, requires_approval=True, approver="human")
    paused = pause(http, setup, upstream)

    assert_error(edit(http, setup, paused, json.dumps(EDITED)), 403, "permission_error", "permission_denied")
    assert_still_pending(paused, tool_server)


def test_an_edit_through_the_openai_sdk(live, setup: Setup, upstream, tool_server, ticket):
    client = sdk(live, setup)
    upstream.queue(tools_reply())
    paused = client.chat.completions.create(model=setup.model, messages=[{"role": "user", "content": "Go"}])
    [tool_call] = paused.choices[0].message.tool_calls
    upstream.queue(Reply(content="Created."))

    answer = client.post(
        "/chat/resume",
        body={
            "model": setup.model,
            "approval_id": paused.model_extra["kitemesh"]["approval_id"],
            "edited_tool_executions": [{"tool_execution_id": tool_call.id, "arguments": json.dumps(EDITED)}],
        },
        cast_to=openai.types.chat.ChatCompletion,
    )

    assert answer.choices[0].message.content == "Created."
    assert [r.json() for r in tool_server.requests] == [EDITED]


def test_the_decision_page_edits_then_approves(live, http, setup: Setup, upstream, tool_server, ticket):
    ada = person("ada", setup.team)
    paused = pause(http, setup, upstream)
    approval_id, [te_id] = paused["kitemesh"]["approval_id"], paused_ids(paused)
    page = signed_in(ada)

    bad = page.post(
        f"/approvals/{approval_id}/decide/",
        {"tool_execution": te_id, "decision": "approve", "arguments": '{"priority": "urgent"}'},
    )
    assert bad.status_code == 400
    text = bad.content.decode()
    assert "priority" in text and "is not one of" in text and "&quot;urgent&quot;" in text  # in place, kept
    assert ToolExecution.objects.get(pk=te_id).status == "pending"

    good = page.post(
        f"/approvals/{approval_id}/decide/",
        {"tool_execution": te_id, "decision": "approve", "arguments": json.dumps(EDITED)},
    )
    assert good.status_code == 302
    te = ToolExecution.objects.get(pk=te_id)
    assert (te.status, te.decided_by, json.loads(te.arguments)) == ("approved", "ada", EDITED)
    upstream.queue(Reply(content="Created."))
    assert resume(http, setup, approval_id).status_code == 200
    assert [r.json() for r in tool_server.requests] == [EDITED]
    assert Approval.objects.get(pk=approval_id).status == "resumed"


def test_an_edit_contradicting_a_page_decision_is_409(live, http, setup: Setup, upstream, tool_server, ticket):
    paused = pause(http, setup, upstream)
    ui_decide(paused, 0, approve=False, reason="no", actor=person("ada", setup.team))

    response = edit(http, setup, paused, json.dumps(EDITED))

    assert_error(response, 409, "conflict_error", "decision_conflict")
    te = ToolExecution.objects.get(pk=paused_ids(paused)[0])
    assert (te.status, te.original_arguments) == ("denied", None)
    assert tool_server.requests == []
