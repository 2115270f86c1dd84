"""The approver pages (SPEC §5 `/approvals/`; README "Approver pages"): who may see and decide (team
membership and the `core.decide_approval` permission), the queue, the decision view with the costs,
decisions recorded with who, when and why, the history, and the live event stream (per team, and across
worker processes through Redis)."""

import contextlib
import hashlib
import json
import os
import queue
import socket
import threading
import time
import uuid
from datetime import timedelta
from decimal import Decimal

import httpx
import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.utils import timezone

from approvals import events
from approvals.events import ALL_TEAMS_CHANNEL, ApprovalChannelManager, approval_channel, team_channel
from approvals.services import approval_decide, approval_pause
from billing.ledger import ledger
from billing.models import Hold
from chat.engine.tools import tool_risk
from core.models import Approval, Execution, Group, Team, Tool, ToolExecution
from tests.conftest import Setup, make_setup
from tests.support.server_process import ServerProcess
from tests.support.tool_server import ToolServer
from tests.support.upstream import FakeUpstream, Reply

USER_MESSAGE = "Open a ticket for the broken printer, and delete the spam account."
SECRET_ARGUMENT = "tok-very-secret-123"

# --- Helpers (also used by test_webhooks and test_pages_browser) ----------------------------------


def person(name: str, *teams: Team, approver: bool = True, **flags: bool) -> User:
    """A user in `teams`, with the decide permission unless `approver=False`."""
    user = User.objects.create_user(name, password=f"pw-{name}-123456", **flags)
    for team in teams:
        team.members.add(user)
    if approver:
        user.user_permissions.add(Permission.objects.get(codename="decide_approval"))
    return User.objects.get(pk=user.pk)  # a fresh instance: no stale permission cache


def signed_in(user: User) -> Client:
    client = Client()
    client.force_login(user)
    return client


def make_tool(team: Team, name: str, *, method: str = "POST", price: str = "0", url: str = "", **fields) -> Tool:
    return Tool.objects.create(
        team=team,
        name=name,
        method=method,
        url=url or f"https://crm.example.com/api/{name}",
        parameters=fields.pop("parameters", {"type": "object", "properties": {}}),
        requires_approval=fields.pop("requires_approval", True),
        price=Decimal(price),
        **fields,
    )


def paused_approval(
    group: Group, calls: list[tuple[Tool, dict]], *, message: str = USER_MESSAGE, hold: int = 0
) -> Approval:
    """A run of `group` paused on `calls`, as the runner pauses it (approval_pause), without a model."""
    execution = Execution.objects.create(
        team=group.team, group=group, request_id=f"req_{uuid.uuid4().hex[:8]}", mode="normal", credits_charged=4
    )
    tool_executions = []
    for position, (tool, arguments) in enumerate(calls):
        text = json.dumps(arguments)
        tool_executions.append(
            ToolExecution(
                execution=execution,
                tool=tool,
                tool_name=tool.name,
                call_id=f"call_{position}",
                arguments=text,
                arguments_hash=hashlib.sha256(text.encode()).hexdigest(),
                requires_approval=tool.requires_approval,
                risk=tool_risk(tool),
                status=ToolExecution.Status.PENDING if tool.requires_approval else ToolExecution.Status.APPROVED,
                decided_via="" if tool.requires_approval else ToolExecution.DecidedVia.AUTO,
            )
        )
    state = {"messages": [{"role": "user", "content": message}], "params": {"max_tokens": 100}}
    paused = approval_pause(
        execution=execution,
        group=group,
        hold=None,
        steps=[],
        tool_executions=tool_executions,
        state=state,
        hold_amount=hold,
        response={"kitemesh": {}},
    )
    return paused.approval


def waiting_calls(approval: Approval) -> list[ToolExecution]:
    return list(approval.tool_executions.filter(requires_approval=True).order_by("position"))


@pytest.fixture
def acme(setup: Setup) -> Setup:
    return setup


@pytest.fixture
def globex(upstream: FakeUpstream, db) -> Setup:
    return make_setup(upstream, team_name="globex")


@pytest.fixture
def ticket(acme: Setup) -> Tool:
    parameters = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "api_token": {"type": "string"}, "note": {"x-redact": True}},
    }
    tool = make_tool(acme.team, "create_ticket", price="2", parameters=parameters)
    acme.group.tools.add(tool)
    return tool


@pytest.fixture
def purge(acme: Setup) -> Tool:
    tool = make_tool(acme.team, "delete_account", method="DELETE", price="1.5")
    acme.group.tools.add(tool)
    return tool


TICKET_ARGUMENTS = {"title": "Printer on fire", "api_token": SECRET_ARGUMENT, "note": "call 555-0100"}


# --- Who may see and decide -----------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/approvals/", "/approvals/history/", "/approvals/rows/"])
def test_anonymous_visitors_are_sent_to_the_login_page(client, path):
    response = client.get(path)
    assert response.status_code == 302
    assert response["Location"].startswith(f"/accounts/login/?next={path}")


def test_anonymous_visitors_can_neither_open_nor_decide_an_approval(client, acme, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    [call] = waiting_calls(approval)

    assert client.get(f"/approvals/{approval.id}/").status_code == 302
    response = client.post(f"/approvals/{approval.id}/decide/", {"tool_execution": call.id, "decision": "approve"})

    assert response.status_code == 302 and response["Location"].startswith("/accounts/login/")
    assert ToolExecution.objects.get(pk=call.pk).status == ToolExecution.Status.PENDING
    assert client.get("/events/", {"channel": team_channel(acme.team.id)}).status_code == 403


def test_the_queue_shows_only_the_users_teams_approvals(acme, globex, ticket):
    other_tool = make_tool(globex.team, "wire_money")
    mine = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    theirs = paused_approval(globex.group, [(other_tool, {})])
    ada = person("ada", acme.team)

    page = signed_in(ada).get("/approvals/").content.decode()

    assert f"approval-{mine.id}" in page
    assert f"approval-{theirs.id}" not in page and "wire_money" not in page


def test_an_approver_of_another_team_gets_404_and_changes_nothing(acme, globex, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    [call] = waiting_calls(approval)
    eve = signed_in(person("eve", globex.team))

    assert eve.get(f"/approvals/{approval.id}/").status_code == 404
    response = eve.post(f"/approvals/{approval.id}/decide/", {"tool_execution": call.id, "decision": "approve"})

    assert response.status_code == 404
    assert ToolExecution.objects.get(pk=call.pk).status == ToolExecution.Status.PENDING
    assert str(approval.id) not in eve.get("/approvals/rows/").content.decode()
    assert "create_ticket" not in eve.get("/approvals/history/").content.decode()


def test_a_member_without_the_permission_sees_nothing_and_cannot_decide(acme, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    [call] = waiting_calls(approval)
    bob = signed_in(person("bob", acme.team, approver=False))

    queue_page = bob.get("/approvals/")
    assert queue_page.status_code == 200
    assert "You are not an approver" in queue_page.content.decode()
    assert str(approval.id) not in queue_page.content.decode()
    assert bob.get(f"/approvals/{approval.id}/").status_code == 403
    assert bob.get("/approvals/rows/").status_code == 403
    assert bob.get("/approvals/history/").status_code == 403
    response = bob.post(f"/approvals/{approval.id}/decide/", {"tool_execution": call.id, "decision": "deny"})
    assert response.status_code == 403
    assert ToolExecution.objects.get(pk=call.pk).status == ToolExecution.Status.PENDING


def test_the_permission_can_come_from_a_django_auth_group(acme, ticket):
    from django.contrib.auth.models import Group as AuthGroup

    approvers = AuthGroup.objects.create(name="approvers")
    approvers.permissions.add(Permission.objects.get(codename="decide_approval"))
    cy = person("cy", acme.team, approver=False)
    cy.groups.add(approvers)
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])

    assert signed_in(User.objects.get(pk=cy.pk)).get(f"/approvals/{approval.id}/").status_code == 200


def test_a_superuser_sees_every_team(acme, globex, ticket):
    other_tool = make_tool(globex.team, "wire_money")
    mine = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    theirs = paused_approval(globex.group, [(other_tool, {})])
    root = signed_in(User.objects.create_superuser("root", password="pw-root-123456"))

    page = root.get("/approvals/").content.decode()

    assert f"approval-{mine.id}" in page and f"approval-{theirs.id}" in page
    assert '<th scope="col">Team</th>' in page  # several teams: each row says whose it is
    assert '["/events/?channel=all-teams"]' in page  # one stream, whatever the number of teams
    assert root.get(f"/approvals/{theirs.id}/").status_code == 200


def test_the_event_channel_is_readable_only_by_the_teams_approvers(acme, globex):
    manager = ApprovalChannelManager()
    ada = person("ada", acme.team)
    bob = person("bob", acme.team, approver=False)
    root = User.objects.create_superuser("root", password="pw-root-123456")
    channel = team_channel(acme.team.id)

    assert manager.can_read_channel(ada, channel)
    assert manager.can_read_channel(root, team_channel(globex.team.id))
    assert manager.can_read_channel(root, ALL_TEAMS_CHANNEL)
    assert not manager.can_read_channel(ada, ALL_TEAMS_CHANNEL)
    assert not manager.can_read_channel(ada, team_channel(globex.team.id))
    assert not manager.can_read_channel(bob, channel)
    assert not manager.can_read_channel(None, channel)
    assert not manager.can_read_channel(ada, "team-x")
    assert not manager.can_read_channel(ada, f"{channel}-other")


def test_the_event_view_refuses_channels_of_other_teams_with_403(acme, globex):
    ada = signed_in(person("ada", acme.team))

    assert ada.get("/events/", {"channel": team_channel(globex.team.id)}).status_code == 403
    both = [team_channel(acme.team.id), team_channel(globex.team.id)]
    assert ada.get("/events/", {"channel": both}).status_code == 403
    assert ada.get("/events/").status_code == 403
    assert ada.get("/events/", {"channel": ALL_TEAMS_CHANNEL}).status_code == 403


# --- The queue ------------------------------------------------------------------------------------


def test_the_queue_lists_pending_approvals_newest_first_with_group_tools_risk_and_time_left(acme, ticket, purge):
    older = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    Approval.objects.filter(pk=older.pk).update(created_at=timezone.now() - timedelta(minutes=5))
    newer = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS), (purge, {"id": 7})])
    ada = signed_in(person("ada", acme.team))

    page = ada.get("/approvals/").content.decode()

    assert page.index(f"approval-{newer.id}") < page.index(f"approval-{older.id}")
    row = page[page.index(f'id="approval-{newer.id}"') :]
    row = row[: row.index("</tr>")]
    assert "support" in row
    assert "create_ticket, delete_account" in row
    assert "high risk" in row  # the highest of medium (POST) and high (DELETE)
    assert "14 min" in row  # the group's default TTL of 900 s, just started
    assert f'href="/approvals/{newer.id}/"' in row


def test_the_queue_leaves_out_expired_resumed_and_fully_decided_approvals(acme, ticket, purge):
    expired = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    Approval.objects.filter(pk=expired.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    resumed = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    Approval.objects.filter(pk=resumed.pk).update(status=Approval.Status.RESUMED)
    decided = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    half = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS), (purge, {})])
    ada = person("ada", acme.team)
    for call in waiting_calls(decided) + waiting_calls(half)[:1]:
        approval_decide(approval=call.approval, tool_execution=call, approve=True, reason="", actor=ada)

    rows = signed_in(ada).get("/approvals/rows/").content.decode()

    assert str(expired.id) not in rows and str(resumed.id) not in rows and str(decided.id) not in rows
    assert f"approval-{half.id}" in rows
    assert "1 of 2 still to decide" in rows


def test_an_approver_of_no_team_is_told_so(db):
    ada = signed_in(person("ada"))
    assert "You are not a member of any team" in ada.get("/approvals/").content.decode()


# --- The decision view ----------------------------------------------------------------------------


def test_the_detail_shows_each_call_redacted_as_the_api_does_with_the_last_user_message_and_costs(acme, ticket, purge):
    automatic = make_tool(acme.team, "lookup", method="GET", price="0.25", requires_approval=False)
    approval = paused_approval(
        acme.group, [(ticket, TICKET_ARGUMENTS), (purge, {"id": 7}), (automatic, {"q": "printer"})], hold=4
    )
    ada = signed_in(person("ada", acme.team))

    page = ada.get(f"/approvals/{approval.id}/").content.decode()

    assert "POST crm.example.com/api/create_ticket" in page
    assert "DELETE crm.example.com/api/delete_account" in page
    assert "medium risk" in page and "high risk" in page
    assert "[redacted]" in page and SECRET_ARGUMENT not in page and "555-0100" not in page
    assert "Printer on fire" in page
    assert USER_MESSAGE.replace(",", "") in page.replace(",", "")
    assert "4 credits charged" in page  # the run so far
    assert "4 credits if they run" in page  # ceil(2 + 1.5 + 0.25)
    # The grant of 1000, of which the approval holds 4: what the team can still spend.
    assert "1000 credits, 4 held, <strong>996 available</strong>" in page
    assert "Also in this round, without a person's decision" in page and "lookup" in page
    assert page.count('name="decision" value="deny"') == 3  # two calls and "deny all"
    assert 'for="reason-' in page  # every reason field has its label


def test_a_value_redacted_in_the_arguments_is_redacted_in_the_last_user_message_too(acme, ticket):
    message = f"Use the token {SECRET_ARGUMENT} and note: call 555-0100 about the printer."
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)], message=message)

    page = signed_in(person("ada", acme.team)).get(f"/approvals/{approval.id}/").content.decode()

    assert SECRET_ARGUMENT not in page and "555-0100" not in page
    assert "Use the token [redacted] and note: [redacted] about the printer." in page


def test_the_detail_tells_which_calls_only_a_person_may_decide(acme):
    tool = make_tool(acme.team, "refund", approver=Tool.Approver.HUMAN)
    approval = paused_approval(acme.group, [(tool, {})])
    page = signed_in(person("ada", acme.team)).get(f"/approvals/{approval.id}/").content.decode()
    assert "A person only" in page


def test_deciding_records_who_when_and_why_and_redirects_with_a_message(acme, ticket, purge):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS), (purge, {"id": 7})])
    create, delete = waiting_calls(approval)
    ada = person("ada", acme.team)
    client = signed_in(ada)
    before = timezone.now()

    denied = client.post(
        f"/approvals/{approval.id}/decide/",
        {"tool_execution": delete.id, "decision": "deny", "reason": "Never delete accounts from chat."},
        follow=True,
    )
    approved = client.post(
        f"/approvals/{approval.id}/decide/", {"tool_execution": create.id, "decision": "approve"}, follow=True
    )

    assert denied.redirect_chain == [(f"/approvals/{approval.id}/", 302)]
    assert "Denied delete_account." in denied.content.decode()
    assert "Approved create_ticket." in approved.content.decode()
    delete.refresh_from_db()
    create.refresh_from_db()
    assert delete.status == ToolExecution.Status.DENIED
    assert (delete.decided_via, delete.decided_by, delete.decided_by_user) == ("ui", "ada", ada)
    assert delete.decision_reason == "Never delete accounts from chat."
    assert before <= delete.decided_at <= timezone.now()
    assert create.status == ToolExecution.Status.APPROVED and create.decision_reason == ""
    page = approved.content.decode()
    assert "Every tool call has a decision" in page
    assert "Never delete accounts from chat." in page


def test_decisions_need_the_csrf_token(acme, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    [call] = waiting_calls(approval)
    client = Client(enforce_csrf_checks=True)
    client.force_login(person("ada", acme.team))

    response = client.post(f"/approvals/{approval.id}/decide/", {"tool_execution": call.id, "decision": "approve"})

    assert response.status_code == 403
    assert ToolExecution.objects.get(pk=call.pk).status == ToolExecution.Status.PENDING


def test_a_decision_on_an_expired_approval_changes_nothing_says_so_and_releases_the_hold(acme, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    hold = ledger().hold_open(execution=approval.execution, amount=2)  # the paused run's, as the pause takes it
    Approval.objects.filter(pk=approval.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    [call] = waiting_calls(approval)

    response = signed_in(person("ada", acme.team)).post(
        f"/approvals/{approval.id}/decide/", {"tool_execution": call.id, "decision": "approve"}, follow=True
    )

    assert "This approval has expired; nothing was changed." in response.content.decode()
    assert ToolExecution.objects.get(pk=call.pk).status == ToolExecution.Status.PENDING
    assert Approval.objects.get(pk=approval.pk).status == Approval.Status.EXPIRED
    assert Hold.objects.get(pk=hold.pk).status == Hold.Status.SETTLED
    assert 'name="decision"' not in response.content.decode()  # no more buttons


def test_a_decision_on_a_resumed_approval_changes_nothing_and_says_so(acme, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    Approval.objects.filter(pk=approval.pk).update(status=Approval.Status.RESUMED)
    [call] = waiting_calls(approval)

    response = signed_in(person("ada", acme.team)).post(
        f"/approvals/{approval.id}/decide/", {"tool_execution": call.id, "decision": "deny"}, follow=True
    )

    assert "already resumed by the API client; nothing was changed" in response.content.decode()
    assert ToolExecution.objects.get(pk=call.pk).status == ToolExecution.Status.PENDING


def test_a_call_decided_twice_keeps_the_first_decision(acme, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    [call] = waiting_calls(approval)
    ada, bob = person("ada", acme.team), person("bob", acme.team)
    approval_decide(approval=approval, tool_execution=call, approve=True, reason="fine", actor=ada)

    response = signed_in(bob).post(
        f"/approvals/{approval.id}/decide/",
        {"tool_execution": call.id, "decision": "deny", "reason": "no"},
        follow=True,
    )

    call.refresh_from_db()
    assert (call.status, call.decided_by, call.decision_reason) == (ToolExecution.Status.APPROVED, "ada", "fine")
    assert "create_ticket was already decided; nothing was changed." in response.content.decode()


def test_a_batch_group_is_decided_all_at_once_only(acme, ticket, purge):
    Group.objects.filter(pk=acme.group.pk).update(approval_style=Group.ApprovalStyle.BATCH)
    acme.group.refresh_from_db()
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS), (purge, {})])
    create, delete = waiting_calls(approval)
    client = signed_in(person("ada", acme.team))

    page = client.get(f"/approvals/{approval.id}/").content.decode()
    one = client.post(
        f"/approvals/{approval.id}/decide/", {"tool_execution": create.id, "decision": "approve"}, follow=True
    )
    everything = client.post(
        f"/approvals/{approval.id}/decide/",
        {"tool_execution": "all", "decision": "deny", "reason": "Not today."},
        follow=True,
    )

    assert "Decide the batch" in page and page.count('name="decision" value="approve"') == 1
    assert "This group decides in batch: approve all or deny all." in one.content.decode()
    assert "Denied all 2 remaining tool call(s)." in everything.content.decode()
    for call in (create, delete):
        call.refresh_from_db()
        assert (call.status, call.decision_reason, call.decided_by) == (
            ToolExecution.Status.DENIED,
            "Not today.",
            "ada",
        )


def test_approve_all_decides_only_the_calls_still_waiting(acme, ticket, purge):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS), (purge, {})])
    create, delete = waiting_calls(approval)
    ada = person("ada", acme.team)
    approval_decide(approval=approval, tool_execution=delete, approve=False, reason="no", actor=ada)

    signed_in(ada).post(f"/approvals/{approval.id}/decide/", {"tool_execution": "all", "decision": "approve"})

    create.refresh_from_db()
    delete.refresh_from_db()
    assert (create.status, delete.status) == (ToolExecution.Status.APPROVED, ToolExecution.Status.DENIED)


def test_an_unknown_tool_execution_is_refused(acme, ticket):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    response = signed_in(person("ada", acme.team)).post(
        f"/approvals/{approval.id}/decide/", {"tool_execution": str(uuid.uuid4()), "decision": "approve"}, follow=True
    )
    assert "Not a tool call of this approval." in response.content.decode()


# --- History --------------------------------------------------------------------------------------


def test_the_history_lists_the_teams_decisions_with_who_when_and_why(acme, globex, ticket, purge):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS), (purge, {})])
    create, delete = waiting_calls(approval)
    ada = person("ada", acme.team)
    approval_decide(approval=approval, tool_execution=delete, approve=False, reason="Too risky.", actor=ada)
    ToolExecution.objects.filter(pk=create.pk).update(
        status=ToolExecution.Status.APPROVED, decided_via="api", decided_by="token:ci", decided_at=timezone.now()
    )
    other = paused_approval(globex.group, [(make_tool(globex.team, "wire_money"), {})])
    [wire] = waiting_calls(other)
    approval_decide(approval=other, tool_execution=wire, approve=True, reason="", actor=person("eve", globex.team))

    page = signed_in(ada).get("/approvals/history/").content.decode()

    assert page.index("create_ticket") < page.index("delete_account")  # newest first
    assert "Too risky." in page and ">ada <" in page and "approver page" in page
    assert "token:ci" in page and "api client" in page
    assert "wire_money" not in page
    assert f"/approvals/{approval.id}/" in page


# --- Events ---------------------------------------------------------------------------------------


@pytest.fixture
def sent(monkeypatch) -> list[tuple[str, str, dict]]:
    """What approvals.events hands to django-eventstream."""
    calls: list[tuple[str, str, dict]] = []
    monkeypatch.setattr(events, "send_event", lambda channel, kind, data: calls.append((channel, kind, data)))
    return calls


def test_events_are_sent_after_commit_with_ids_and_labels_only(acme, ticket, sent, django_capture_on_commit_callbacks):
    ada = person("ada", acme.team)
    with django_capture_on_commit_callbacks(execute=True):
        approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    [call] = waiting_calls(approval)
    with django_capture_on_commit_callbacks(execute=True):
        approval_decide(approval=approval, tool_execution=call, approve=True, reason="ok", actor=ada)

    created = {"approval_id": str(approval.id), "group": "support", "waiting": 1}
    decided = {**created, "waiting": 0}
    own = approval_channel(approval.id)  # what the page of the chat that waits on it listens to
    assert sent == [
        (team_channel(acme.team.id), "approval.created", created),
        (ALL_TEAMS_CHANNEL, "approval.created", created),  # what superusers' pages listen to
        (own, "approval.created", created),
        (team_channel(acme.team.id), "approval.decided", decided),
        (ALL_TEAMS_CHANNEL, "approval.decided", decided),
        (own, "approval.decided", decided),
    ]
    assert SECRET_ARGUMENT not in json.dumps(sent) and "Printer" not in json.dumps(sent)


def test_a_refused_decision_sends_no_event(acme, ticket, sent, django_capture_on_commit_callbacks):
    approval = paused_approval(acme.group, [(ticket, TICKET_ARGUMENTS)])
    Approval.objects.filter(pk=approval.pk).update(status=Approval.Status.RESUMED)
    [call] = waiting_calls(approval)

    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        signed_in(person("ada", acme.team)).post(
            f"/approvals/{approval.id}/decide/", {"tool_execution": call.id, "decision": "approve"}
        )

    assert callbacks == [] and sent == []


# --- Live: the event stream and the API, against a running server ---------------------------------


def session_cookies(user: User) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    return {"sessionid": client.cookies["sessionid"].value}


class EventReader:
    """Reads an SSE stream in a thread; `next(type)` waits for the next event of that type."""

    def __init__(self, url: str, cookies: dict[str, str]) -> None:
        self.events: queue.Queue[tuple[str, str]] = queue.Queue()
        self.status: int | None = None
        self.socket: socket.socket | None = None
        self.opened = threading.Event()
        self.client = httpx.Client(cookies=cookies, timeout=httpx.Timeout(5, read=None))
        self.thread = threading.Thread(target=self._read, args=(url,), daemon=True)
        self.thread.start()

    def _read(self, url: str) -> None:
        try:
            with self.client.stream("GET", url) as response:
                self.status = response.status_code
                self.socket = response.extensions["network_stream"].get_extra_info("socket")
                kind = ""
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line[len("event: ") :]
                    elif line.startswith("data:"):
                        if kind == "stream-open":
                            self.opened.set()
                        self.events.put((kind, line[len("data:") :].strip()))
        except httpx.HTTPError:
            pass
        finally:
            self.opened.set()

    def next(self, kind: str, timeout: float = 10) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            got, data = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            if got == kind:
                return json.loads(data)

    def close(self) -> None:
        """End the stream now (closing the client from this thread would not wake the reading one), so a
        server being stopped has no open response to wait for."""
        if self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)
        self.thread.join(timeout=5)
        self.client.close()


@pytest.fixture
def live_setup(live, upstream: FakeUpstream, tool_server: ToolServer, settings) -> Setup:
    """Committed configuration for the live server: a tool that needs approval on the loopback tool server."""
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    setup = make_setup(upstream, input_per_1k="0", output_per_1k="0")
    tool = make_tool(setup.team, "create_ticket", price="3", url=f"{tool_server.url}/tickets")
    deny_me = make_tool(setup.team, "delete_account", method="DELETE", url=f"{tool_server.url}/accounts")
    setup.group.tools.add(tool, deny_me)
    return setup


def pause_through_the_api(base_url: str, setup: Setup, upstream: FakeUpstream, *, final: str = "Done.") -> dict:
    upstream.queue(
        Reply(
            content=None,
            finish_reason="tool_calls",
            tool_calls=[
                {"id": "c1", "type": "function", "function": {"name": "create_ticket", "arguments": '{"t": "x"}'}},
                {"id": "c2", "type": "function", "function": {"name": "delete_account", "arguments": '{"id": 7}'}},
            ],
        ),
        Reply(content=final),
    )
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        json={"model": setup.model, "messages": [{"role": "user", "content": USER_MESSAGE}]},
        headers=setup.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_the_event_stream_tells_the_teams_approvers_of_a_pause_and_refuses_others(
    live, live_setup: Setup, upstream: FakeUpstream
):
    ada = person("ada", live_setup.team)
    outsider = person("eve", make_setup(upstream, team_name="globex").team)
    url = f"{live.url}/events/?channel={team_channel(live_setup.team.id)}"

    refused = httpx.get(url, cookies=session_cookies(outsider), timeout=10)
    reader = EventReader(url, session_cookies(ada))
    try:
        assert reader.opened.wait(10) and reader.status == 200
        paused = pause_through_the_api(live.url, live_setup, upstream)
        created = reader.next("approval.created")
    finally:
        reader.close()

    assert refused.status_code == 403
    assert created == {"approval_id": paused["kitemesh"]["approval_id"], "group": "support", "waiting": 2}


def test_page_decisions_are_what_a_resume_without_decisions_uses_and_what_the_api_shows(
    live, live_setup: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    paused = pause_through_the_api(live.url, live_setup, upstream, final="Ticket opened; deletion refused.")
    approval_id = paused["kitemesh"]["approval_id"]
    create_id, delete_id = (c["id"] for c in paused["choices"][0]["message"]["tool_calls"])
    client = signed_in(person("ada", live_setup.team))
    client.post(f"/approvals/{approval_id}/decide/", {"tool_execution": delete_id, "decision": "deny", "reason": "No."})
    client.post(f"/approvals/{approval_id}/decide/", {"tool_execution": create_id, "decision": "approve"})

    shown = httpx.get(f"{live.url}/v1/approvals/{approval_id}", headers=live_setup.headers).json()
    resumed = httpx.post(
        f"{live.url}/v1/chat/resume",
        json={"model": live_setup.model, "approval_id": approval_id, "messages": []},
        headers=live_setup.headers,
        timeout=30,
    )

    decisions = {
        te["id"]: (te["decision"], te["reason"], te["decided_by"], te["decided_via"]) for te in shown["tool_executions"]
    }
    assert decisions == {create_id: ("approved", "", "ada", "ui"), delete_id: ("denied", "No.", "ada", "ui")}
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["choices"][0]["message"]["content"] == "Ticket opened; deletion refused."
    assert [(r.method, r.path) for r in tool_server.requests] == [("POST", "/tickets")]
    tool_messages = [m for m in upstream.received[-1].body["messages"] if m["role"] == "tool"]
    assert "denied by ada: No." in tool_messages[1]["content"]


# --- Several worker processes: events through Redis -----------------------------------------------


def redis_or_skip() -> str:
    import redis

    url = os.environ.get("KITEMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
    try:
        redis.Redis.from_url(url, socket_connect_timeout=1).ping()
    except redis.RedisError:
        if os.environ.get("KITEMESH_REQUIRE_SERVICES") == "1":
            pytest.fail(f"Redis at {url} is unreachable (.ci/run starts it)")
        pytest.skip(f"Redis at {url} is unreachable")
    return url


def subscribers(url: str) -> int:
    import redis

    [(_, count)] = redis.Redis.from_url(url).pubsub_numsub("events_channel")
    return count


def test_with_redis_an_event_from_one_worker_process_reaches_a_browser_on_another_which_resumes_it(
    transactional_db, upstream: FakeUpstream, tool_server: ToolServer
):
    redis_url = redis_or_skip()
    setup = make_setup(upstream, input_per_1k="0", output_per_1k="0")
    setup.group.tools.add(
        make_tool(setup.team, "create_ticket", url=f"{tool_server.url}/tickets"),
        make_tool(setup.team, "delete_account", method="DELETE", url=f"{tool_server.url}/accounts"),
    )
    cookies = session_cookies(person("ada", setup.team))
    workers = [ServerProcess(), ServerProcess()]
    for worker in workers:
        worker.env["REDIS_URL"] = redis_url  # ServerProcess leaves Redis out unless told
    try:
        watched, paused_on = (worker.start() for worker in workers)
        before = subscribers(redis_url)
        reader = EventReader(f"{watched.url}/events/?channel={team_channel(setup.team.id)}", cookies)
        try:
            assert reader.opened.wait(15) and reader.status == 200
            deadline = time.monotonic() + 10
            while subscribers(redis_url) <= before and time.monotonic() < deadline:
                time.sleep(0.05)  # the watched worker subscribes to Redis when its first stream opens

            paused = pause_through_the_api(paused_on.url, setup, upstream)
            created = reader.next("approval.created", timeout=15)
            calls = paused["choices"][0]["message"]["tool_calls"]
            resumed = httpx.post(  # through the other worker, both running
                f"{watched.url}/v1/chat/resume",
                json={
                    "model": setup.model,
                    "approval_id": paused["kitemesh"]["approval_id"],
                    "approved_tool_execution_ids": [c["id"] for c in calls],
                },
                headers=setup.headers,
                timeout=30,
            )
        finally:
            reader.close()
    finally:
        for worker in workers:
            worker.close()

    assert created["approval_id"] == paused["kitemesh"]["approval_id"]
    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["kitemesh"]["execution_id"] == paused["kitemesh"]["execution_id"]
    assert resumed.json()["choices"][0]["message"]["content"] == "Done."
    assert len(tool_server.requests) == 2  # both approved calls ran once, on the resuming worker
