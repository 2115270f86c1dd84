"""The two-person rule (SPEC §6): a call of a tool with `approvals_required: N` is approved once N different
people approved it on the approver page; one deny denies it; a person counts once (also when two approve at
the same instant, on PostgreSQL's row locks); API decisions on it are 403. The pages show "1 of 2"."""

import threading

import pytest
from django.db import connection, connections

from approvals.services import approval_decide, approval_decide_all
from core.errors import Conflict
from core.models import Approval, CallApproval, ToolExecution
from tests.approvals.test_pages import person, signed_in
from tests.approvals.test_resume import (
    TICKET_SCHEMA,
    approve_all,
    assert_error,
    pause,
    paused_ids,
    resume,
)
from tests.conftest import Setup
from tests.support.upstream import Reply


@pytest.fixture
def ticket(group_tool):
    """create_ticket needs the approval of two different people."""
    return group_tool(
        "create_ticket", parameters=TICKET_SCHEMA, requires_approval=True, approvals_required=2, path="/tickets"
    )


def decide(paused: dict, user, *, approve: bool = True, reason: str = "") -> None:
    approval = Approval.objects.get(pk=paused["kitemesh"]["approval_id"])
    call = ToolExecution.objects.get(pk=paused_ids(paused)[0])
    approval_decide(approval=approval, tool_execution=call, approve=approve, reason=reason, actor=user)


def call_of(paused: dict) -> ToolExecution:
    return ToolExecution.objects.get(pk=paused_ids(paused)[0])


def test_a_call_runs_once_two_different_people_approved_it(live, http, setup: Setup, upstream, tool_server, ticket):
    ada, bob = person("ada", setup.team), person("bob", setup.team)
    paused = pause(http, setup, upstream)

    decide(paused, ada, reason="looks right")
    first = http.get(f"/v1/approvals/{paused['kitemesh']['approval_id']}", headers=setup.headers).json()
    [shown] = first["tool_executions"]
    assert (shown["status"], shown["approvals_required"], shown["approved_by"]) == ("pending", 2, ["ada"])
    assert_error(resume(http, setup, paused["kitemesh"]["approval_id"]), 409, "conflict_error", "decision_required")

    decide(paused, bob)
    call = call_of(paused)
    assert (call.status, call.decided_via, call.decided_by) == ("approved", "ui", "ada, bob")
    upstream.queue(Reply(content="Ticket created."))
    response = resume(http, setup, paused["kitemesh"]["approval_id"])
    assert response.status_code == 200, response.text
    assert len(tool_server.requests) == 1


def test_the_same_person_cannot_count_twice(live, http, setup: Setup, upstream, tool_server, ticket):
    ada = person("ada", setup.team)
    paused = pause(http, setup, upstream)
    decide(paused, ada)

    with pytest.raises(Conflict, match="You already approved create_ticket"):
        decide(paused, ada)

    assert call_of(paused).status == "pending"
    assert CallApproval.objects.filter(tool_execution=call_of(paused)).count() == 1


def test_one_deny_denies(live, http, setup: Setup, upstream, tool_server, ticket):
    ada, bob = person("ada", setup.team), person("bob", setup.team)
    paused = pause(http, setup, upstream)
    decide(paused, ada)

    decide(paused, bob, approve=False, reason="wrong customer")

    call = call_of(paused)
    assert (call.status, call.decided_by, call.decision_reason) == ("denied", "bob", "wrong customer")
    upstream.queue(Reply(content="Not created."))
    assert resume(http, setup, paused["kitemesh"]["approval_id"]).status_code == 200
    assert tool_server.requests == []


@pytest.mark.parametrize("decision", ["approve", "deny"])
def test_an_api_decision_on_it_is_403_and_decides_nothing(
    live, http, setup: Setup, upstream, tool_server, ticket, decision
):
    paused = pause(http, setup, upstream)
    [te_id] = paused_ids(paused)
    if decision == "approve":
        response = approve_all(http, setup, paused)
    else:
        response = resume(http, setup, paused["kitemesh"]["approval_id"], denied=[{"tool_execution_id": te_id}])

    error = assert_error(response, 403, "permission_error", "permission_denied")
    assert "2 different people" in error["message"]
    assert call_of(paused).status == "pending"
    assert Approval.objects.get(pk=paused["kitemesh"]["approval_id"]).status == "pending"
    assert tool_server.requests == []


def test_approve_all_counts_one_approval_per_person(live, http, setup: Setup, upstream, tool_server, ticket):
    ada, bob = person("ada", setup.team), person("bob", setup.team)
    paused = pause(http, setup, upstream)
    approval = Approval.objects.get(pk=paused["kitemesh"]["approval_id"])

    assert approval_decide_all(approval=approval, approve=True, reason="", actor=ada) == 1
    assert call_of(paused).status == "pending"
    with pytest.raises(Conflict):
        approval_decide_all(approval=approval, approve=True, reason="", actor=ada)
    assert approval_decide_all(approval=approval, approve=True, reason="", actor=bob) == 1
    assert call_of(paused).status == "approved"


def test_the_pages_show_the_count_and_who_gave_it(live, http, setup: Setup, upstream, tool_server, ticket):
    ada, bob = person("ada", setup.team), person("bob", setup.team)
    paused = pause(http, setup, upstream)
    approval_id = paused["kitemesh"]["approval_id"]
    decide(paused, ada)

    queue = signed_in(bob).get("/approvals/").content.decode()
    assert "create_ticket: 1 of 2 approvals" in queue
    as_ada = signed_in(ada).get(f"/approvals/{approval_id}/").content.decode()
    assert "1 of 2 approvals</span>: ada" in as_ada
    assert "You approved this call: it needs another person" in as_ada
    as_bob = signed_in(bob).get(f"/approvals/{approval_id}/").content.decode()
    assert "You approved this call" not in as_bob and 'value="approve">Approve<' in as_bob

    response = signed_in(bob).post(
        f"/approvals/{approval_id}/decide/", {"tool_execution": paused_ids(paused)[0], "decision": "approve"}
    )
    assert response.status_code == 302
    assert call_of(paused).status == "approved"
    assert "create_ticket" not in signed_in(bob).get("/approvals/").content.decode()  # off the live queue


def test_two_people_approving_at_the_same_instant_count_once_each(
    live, http, setup: Setup, upstream, tool_server, ticket
):
    if connection.vendor != "postgresql":
        pytest.skip("row-lock races need PostgreSQL (SQLite serialises every writer)")
    people = [person(name, setup.team) for name in ("ada", "bob", "ada2")]
    paused = pause(http, setup, upstream)
    barrier, outcomes = threading.Barrier(4), {}

    def approve(name: str, user) -> None:
        try:
            barrier.wait()
            decide(paused, user)
            outcomes[name] = "counted"
        except Conflict as exc:
            outcomes[name] = exc.code
        finally:
            connections.close_all()

    # ada twice, bob and ada2 at the same instant: two different people count, the call is approved once;
    # the others find their own approval there already, or the call decided.
    threads = [
        threading.Thread(target=approve, args=(key, user))
        for key, user in [("ada", people[0]), ("ada again", people[0]), ("bob", people[1]), ("ada2", people[2])]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    call = call_of(paused)
    assert call.status == "approved"
    given = sorted(CallApproval.objects.filter(tool_execution=call).values_list("username", flat=True))
    assert len(given) == 2 and len(set(given)) == 2, given
    assert sorted(outcomes.values()) == ["counted", "counted", "decision_conflict", "decision_conflict"], outcomes
