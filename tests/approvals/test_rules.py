"""Approval rules (SPEC §6, Rules) through the live server: the first rule whose `when` the arguments satisfy
decides (approve runs without a pause, deny never sends and tells the model why, ask pauses a tool that needs
no approval), no match leaves it to `requires_approval`, and every rule decision is on the record: the
execution's steps, the approval of a round that pauses for other calls, the decision history page."""

import json

import httpx
import pytest
from django import forms

from chat.admin import ToolForm
from core.models import Tool, ToolExecution
from tests.approvals.test_pages import person, signed_in
from tests.approvals.test_resume import USER, approve_all, call, chat, paused_ids, sdk, tools_reply
from tests.conftest import Setup
from tests.support.upstream import Reply

REFUND_SCHEMA = {
    "type": "object",
    "properties": {"amount": {"type": "number"}, "env": {"type": "string"}},
    "required": ["amount"],
}
REFUND_RULES = [
    {"name": "small-refunds", "when": {"properties": {"amount": {"maximum": 50}}}, "then": "approve"},
    {
        "name": "never-prod",
        "when": {"properties": {"env": {"const": "prod"}}, "required": ["env"]},
        "then": "deny",
        "reason": "Refunds on prod need a ticket",
    },
    {"name": "big-refunds", "when": {"properties": {"amount": {"minimum": 1000}}}, "then": "ask"},
]


@pytest.fixture
def refund(group_tool) -> Tool:
    """Needs approval unless a rule decides; its rules as in SPEC §6's example, plus an `ask`."""
    return group_tool(
        "refund", parameters=REFUND_SCHEMA, requires_approval=True, approval_rules=REFUND_RULES, path="/refunds"
    )


def refund_call(arguments: dict, call_id: str = "call_1") -> dict:
    return call("refund", json.dumps(arguments), call_id)


def run_round(http: httpx.Client, setup: Setup, upstream, *calls: dict, answer: str = "Done.") -> dict:
    """A completion whose brain asks for `calls`, then (when nothing pauses) answers `answer`."""
    upstream.queue(tools_reply(*calls), Reply(content=answer))
    response = chat(http, setup)
    assert response.status_code == 200, response.text
    return response.json()


def tool_steps(http: httpx.Client, setup: Setup, execution_id: str) -> list[dict]:
    response = http.get(f"/v1/executions/{execution_id}", headers=setup.headers)
    assert response.status_code == 200, response.text
    return [s for s in response.json()["steps"] if s["kind"] == "tool_call"]


def test_an_approving_rule_runs_the_call_without_a_pause(live, http, setup: Setup, upstream, tool_server, refund):
    body = run_round(http, setup, upstream, refund_call({"amount": 20}))

    assert body["choices"][0]["message"]["content"] == "Done."
    [request] = tool_server.requests
    assert request.json() == {"amount": 20}
    te = ToolExecution.objects.get(execution_id=body["kitemesh"]["execution_id"])
    assert (te.status, te.decided_via, te.decided_by) == ("succeeded", "rule", "small-refunds")
    assert te.decided_at is not None
    [step] = tool_steps(http, setup, body["kitemesh"]["execution_id"])
    assert (step["tool"], step["status"], step["decided_via"], step["decided_by"]) == (
        "refund",
        "succeeded",
        "rule",
        "small-refunds",
    )


def test_a_denying_rule_never_sends_the_call_and_the_model_gets_its_reason(
    live, http, setup: Setup, upstream, tool_server, refund
):
    body = run_round(http, setup, upstream, refund_call({"amount": 500, "env": "prod"}))

    assert tool_server.requests == []
    sent = upstream.received[1].body["messages"]
    assert sent[-1] == {
        "role": "tool",
        "tool_call_id": "call_1",
        "content": json.dumps(
            {"error": "The tool call was denied by the approval rule 'never-prod': Refunds on prod need a ticket"}
        ),
    }
    te = ToolExecution.objects.get(execution_id=body["kitemesh"]["execution_id"])
    assert (te.status, te.decided_via, te.decided_by, te.decision_reason) == (
        "denied",
        "rule",
        "never-prod",
        "Refunds on prod need a ticket",
    )
    [step] = tool_steps(http, setup, body["kitemesh"]["execution_id"])
    assert (step["status"], step["decided_via"], step["decided_by"]) == ("denied", "rule", "never-prod")
    assert body["kitemesh"]["credits_charged"] >= 0 and not te.response_status


def test_the_first_matching_rule_wins(live, http, setup: Setup, upstream, tool_server, refund):
    """20 on prod matches both small-refunds (first) and never-prod: it runs."""
    body = run_round(http, setup, upstream, refund_call({"amount": 20, "env": "prod"}))

    assert len(tool_server.requests) == 1
    te = ToolExecution.objects.get(execution_id=body["kitemesh"]["execution_id"])
    assert te.decided_by == "small-refunds"


def test_no_matching_rule_leaves_it_to_requires_approval(live, http, setup: Setup, upstream, tool_server, refund):
    upstream.queue(tools_reply(refund_call({"amount": 300})))
    paused = chat(http, setup).json()

    assert paused["choices"][0]["finish_reason"] == "tool_calls"
    assert tool_server.requests == []
    te = ToolExecution.objects.get(pk=paused_ids(paused)[0])
    assert (te.status, te.decided_via, te.requires_approval) == ("pending", "", True)


def test_an_ask_rule_pauses_a_tool_that_needs_no_approval(live, http, setup: Setup, upstream, tool_server, group_tool):
    group_tool(
        "refund",
        parameters=REFUND_SCHEMA,
        requires_approval=False,
        approval_rules=[{"name": "big-refunds", "when": {"properties": {"amount": {"minimum": 1000}}}, "then": "ask"}],
        path="/refunds",
    )
    small = run_round(http, setup, upstream, refund_call({"amount": 5}))
    assert len(tool_server.requests) == 1  # no rule matched: it needs no approval
    assert ToolExecution.objects.get(execution_id=small["kitemesh"]["execution_id"]).decided_via == "auto"

    upstream.queue(tools_reply(refund_call({"amount": 5000})))
    paused = chat(http, setup).json()

    assert paused["choices"][0]["finish_reason"] == "tool_calls"
    assert len(tool_server.requests) == 1
    upstream.queue(Reply(content="Refunded."))
    assert approve_all(http, setup, paused).status_code == 200
    assert [r.json() for r in tool_server.requests] == [{"amount": 5}, {"amount": 5000}]


def test_a_round_paused_for_another_call_shows_the_rule_decision_on_its_approval(
    live, http, setup: Setup, upstream, tool_server, refund
):
    upstream.queue(tools_reply(refund_call({"amount": 10}, "call_1"), refund_call({"amount": 400}, "call_2")))
    paused = chat(http, setup).json()
    [waiting] = paused_ids(paused)

    approval = http.get(f"/v1/approvals/{paused['kitemesh']['approval_id']}", headers=setup.headers).json()

    decisions = {te["id"]: (te["status"], te["decided_via"], te["decided_by"]) for te in approval["tool_executions"]}
    ruled = next(i for i in decisions if i != waiting)
    assert decisions == {ruled: ("approved", "rule", "small-refunds"), waiting: ("pending", None, None)}
    assert tool_server.requests == []  # nothing of a paused round runs before its resume
    upstream.queue(Reply(content="Both refunded."))
    response = approve_all(http, setup, paused)
    assert response.status_code == 200, response.text
    assert sorted(r.json()["amount"] for r in tool_server.requests) == [10, 400]


def test_rules_decide_for_openai_sdk_clients_too(live, setup: Setup, upstream, tool_server, refund):
    upstream.queue(tools_reply(refund_call({"amount": 7, "env": "prod"})), Reply(content="Done."))

    completion = sdk(live, setup).chat.completions.create(model=setup.model, messages=[USER])

    assert completion.choices[0].message.content == "Done."
    assert completion.choices[0].finish_reason == "stop"
    assert len(tool_server.requests) == 1


def test_the_decision_history_lists_rule_decisions(live, http, setup: Setup, upstream, tool_server, refund):
    run_round(http, setup, upstream, refund_call({"amount": 500, "env": "prod"}))
    run_round(http, setup, upstream, refund_call({"amount": 3}))

    page = signed_in(person("ada", setup.team)).get("/approvals/history/").content.decode()

    assert "Rule “never-prod”" in page and "Refunds on prod need a ticket" in page
    assert "Rule “small-refunds”" in page
    assert page.count("approval rule") >= 2 and page.count("no pause") == 2


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ([{"name": "r", "when": {"type": "strng"}, "then": "deny"}], "approval_rules[0].when: not a valid JSON Schema"),
        ([{"name": "r", "when": {}, "then": "later"}], "approval_rules[0].then"),
        ("approve", "approval_rules: 'approve' is not of type 'array'"),
    ],
    ids=["when-not-a-schema", "unknown-then", "not-a-list"],
)
def test_the_admin_refuses_invalid_rules(db, rules, message):
    form = ToolForm(data={"approval_rules": json.dumps(rules)})
    form.is_valid()

    assert message in " ".join(form.errors.get("approval_rules", [])), form.errors
    field = form.fields["approval_rules"]
    assert isinstance(field, forms.JSONField)
