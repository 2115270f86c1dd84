"""Approval webhooks (README "Approver pages"): a group's optional `webhook_url` receives a signed JSON event
when an approval is created, decided, resumed or expires. Each event is recorded in the transaction of the
change it announces and delivered by the worker (django-tasks in the database): retried with backoff and
across restarts with the same event id, through the SSRF guard, never delaying a request; failures are
logged without secrets and kept for the admin."""

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from approvals.services import approval_decide, approval_expire
from chat.services.config import ConfigError, config_apply
from chat.services.vault import secret_set
from core.errors import Conflict
from core.models import Approval, Group, WebhookDelivery
from tests.approvals.test_pages import (
    TICKET_ARGUMENTS,
    make_tool,
    pause_through_the_api,
    paused_approval,
    person,
    signed_in,
    waiting_calls,
)
from tests.conftest import Setup, make_setup
from tests.support.helpers import wait_for
from tests.support.server_process import ServerProcess
from tests.support.tool_server import ToolRequest, ToolResponse, ToolServer
from tests.support.upstream import FakeUpstream
from tests.support.worker import WorkerThread, tasks_run_until

WEBHOOK_SECRET = "whsec-signing-key-never-shown"
RECEIVER_TOKEN = "receiver-own-token-in-query"


@pytest.fixture
def receiver() -> Iterator[ToolServer]:
    """A webhook receiver on loopback that records what it gets."""
    server = ToolServer().start()
    yield server
    server.stop()


@pytest.fixture
def fast_webhooks(settings) -> None:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    settings.KITEMESH_WEBHOOK_BACKOFF_SECONDS = 0.05
    settings.KITEMESH_WEBHOOK_TIMEOUT_SECONDS = 2


def hook_up(group: Group, receiver: ToolServer) -> None:
    group.webhook_url = f"{receiver.url}/hooks/kitemesh?token={RECEIVER_TOKEN}"
    group.webhook_secret = secret_set(team=group.team, name="webhook-signing", value=WEBHOOK_SECRET)
    group.save(update_fields=["webhook_url", "webhook_secret"])


def signed(request: ToolRequest) -> bool:
    expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), request.body, hashlib.sha256).hexdigest()
    return hmac.compare_digest(request.headers["x-kitemesh-signature"], expected)


def received(receiver: ToolServer, count: int, timeout: float = 10) -> list[ToolRequest]:
    deadline = time.monotonic() + timeout
    while len(receiver.requests) < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(receiver.requests) >= count, [r.json()["type"] for r in receiver.requests]
    return receiver.requests


# --- Configuration --------------------------------------------------------------------------------

CONFIG = """
teams: [{name: acme, credits: 10}]
secrets: [{team: acme, name: hook-key, value: "s3cret"}]
models: [{name: brain, team: acme, provider: scripted, model: scripted-1}]
groups:
  - id: 123e4567-e89b-12d3-a456-426614174000
    name: support
    team: acme
    brain: brain
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


def test_config_sets_a_groups_webhook_and_applying_it_again_changes_nothing(db, tmp_path):
    path = write(
        tmp_path, CONFIG + '    webhook_url: "https://hooks.example.com/kitemesh"\n    webhook_secret: hook-key\n'
    )

    config_apply(path)
    again = config_apply(path)

    group = Group.objects.get(name="support")
    assert group.webhook_url == "https://hooks.example.com/kitemesh"
    assert group.webhook_secret.name == "hook-key"
    assert again.updated == [] and again.created == []


def test_config_refuses_a_webhook_url_without_the_secret_that_signs_it(db, tmp_path):
    with pytest.raises(ConfigError, match=r"groups\[0\] \(support\).*webhook_secret"):
        config_apply(write(tmp_path, CONFIG + '    webhook_url: "https://hooks.example.com/kitemesh"\n'))


def test_config_refuses_a_webhook_secret_the_team_does_not_have(db, tmp_path):
    text = CONFIG + '    webhook_url: "https://hooks.example.com/k"\n    webhook_secret: nope\n'
    with pytest.raises(ConfigError, match=r"field webhook_secret: no vault secret named 'nope'"):
        config_apply(write(tmp_path, text))


# --- Delivery, end to end -------------------------------------------------------------------------


@pytest.fixture
def hooked(live, upstream: FakeUpstream, tool_server: ToolServer, receiver: ToolServer, fast_webhooks) -> Setup:
    setup = make_setup(upstream, input_per_1k="0", output_per_1k="0")
    setup.group.tools.add(
        make_tool(setup.team, "create_ticket", url=f"{tool_server.url}/tickets"),
        make_tool(setup.team, "delete_account", method="DELETE", url=f"{tool_server.url}/accounts"),
    )
    hook_up(setup.group, receiver)
    with WorkerThread():
        yield setup


def test_the_receiver_gets_signed_events_when_an_approval_is_created_decided_and_resumed(
    live, hooked: Setup, upstream: FakeUpstream, receiver: ToolServer
):
    paused = pause_through_the_api(live.url, hooked, upstream)
    approval_id = paused["kitemesh"]["approval_id"]
    create_id, delete_id = (c["id"] for c in paused["choices"][0]["message"]["tool_calls"])
    [created] = received(receiver, 1)
    page = signed_in(person("ada", hooked.team))
    page.post(f"/approvals/{approval_id}/decide/", {"tool_execution": delete_id, "decision": "deny", "reason": "x"})
    page.post(f"/approvals/{approval_id}/decide/", {"tool_execution": create_id, "decision": "approve"})
    received(receiver, 3)
    resumed = httpx.post(
        f"{live.url}/v1/chat/resume",
        json={"model": hooked.model, "approval_id": approval_id, "messages": []},
        headers=hooked.headers,
        timeout=30,
    )
    assert resumed.status_code == 200, resumed.text
    requests = received(receiver, 4)

    assert [r.json()["type"] for r in requests] == [
        "approval.created",
        "approval.decided",
        "approval.decided",
        "approval.resumed",
    ]
    for request in requests:
        assert request.method == "POST" and request.path == "/hooks/kitemesh"
        assert request.query == {"token": [RECEIVER_TOKEN]}
        assert request.headers["content-type"] == "application/json"
        assert request.headers["x-kitemesh-event"] == request.json()["type"]
        assert request.headers["x-kitemesh-delivery"] == request.json()["id"]
        assert signed(request)
        assert WEBHOOK_SECRET.encode() not in request.body
    event = created.json()
    assert event["approval_id"] == approval_id
    assert event["execution_id"] == paused["kitemesh"]["execution_id"]
    assert event["group"] == {"id": str(hooked.group.id), "name": "support", "model": hooked.model}
    assert event["status"] == "pending" and event["team"] == "acme"
    assert [(t["id"], t["tool"], t["decision"]) for t in event["tool_executions"]] == [
        (create_id, "create_ticket", None),
        (delete_id, "delete_account", None),
    ]
    assert "arguments" not in created.body.decode()
    last = requests[3].json()
    assert last["status"] == "resumed"
    assert [(t["decision"], t["decided_by"], t["decided_via"]) for t in last["tool_executions"]] == [
        ("approved", "ada", "ui"),
        ("denied", "ada", "ui"),
    ]


def test_a_slow_receiver_never_delays_the_request(live, hooked: Setup, upstream: FakeUpstream, receiver: ToolServer):
    receiver.queue(ToolResponse(delay=1.5))

    started = time.monotonic()
    pause_through_the_api(live.url, hooked, upstream)
    elapsed = time.monotonic() - started

    assert elapsed < 1.0
    assert received(receiver, 1)[0].json()["type"] == "approval.created"


def test_an_expiry_is_sent_too(hooked: Setup, receiver: ToolServer):
    approval = paused_approval(hooked.group, [(hooked.group.tools.get(name="create_ticket"), TICKET_ARGUMENTS)])
    Approval.objects.filter(pk=approval.pk).update(expires_at=approval.created_at)

    assert approval_expire(approval=Approval.objects.select_related("group").get(pk=approval.pk))

    assert sorted(r.json()["type"] for r in received(receiver, 2)) == ["approval.created", "approval.expired"]


# --- Retries, refusals and logs -------------------------------------------------------------------


@pytest.fixture
def approval(setup: Setup, receiver: ToolServer, fast_webhooks) -> Approval:
    hook_up(setup.group, receiver)
    tool = make_tool(setup.team, "create_ticket")
    return paused_approval(setup.group, [(tool, TICKET_ARGUMENTS)])  # its approval.created, queued


def delivered(approval: Approval, event_type: str = "approval.created") -> WebhookDelivery:
    """Run the worker's queue until the approval's event is delivered or given up."""
    deliveries = WebhookDelivery.objects.filter(event_type=event_type, body__contains=str(approval.id))
    return tasks_run_until(lambda: deliveries.exclude(status=WebhookDelivery.Status.PENDING).first())


def test_the_event_is_recorded_and_queued_in_the_transaction_of_the_change(approval, receiver):
    [delivery] = WebhookDelivery.objects.all()

    assert (delivery.event_type, delivery.status, delivery.attempts) == ("approval.created", "pending", 0)
    assert json.loads(delivery.body)["id"] == delivery.id
    assert receiver.requests == []  # nothing is sent by the process that made the change
    [call] = waiting_calls(approval)
    approval_decide(approval=approval, tool_execution=call, approve=True, reason="", actor=person("ada"))
    with pytest.raises(Conflict):  # decided already: the transaction is rolled back
        approval_decide(approval=approval, tool_execution=call, approve=False, reason="", actor=person("bob"))
    assert list(WebhookDelivery.objects.order_by("created_at").values_list("event_type", flat=True)) == [
        "approval.created",
        "approval.decided",
    ]


def test_a_failing_receiver_is_retried_with_the_same_event_until_it_accepts(approval, receiver):
    receiver.queue(ToolResponse(status=500), ToolResponse(status=503), ToolResponse(status=204))

    delivery = delivered(approval)

    assert (delivery.status, delivery.attempts, delivery.last_error) == ("delivered", 3, "")
    assert len(receiver.requests) == 3
    assert len({r.body for r in receiver.requests}) == 1  # same body, same event id, same signature
    assert {r.headers["x-kitemesh-delivery"] for r in receiver.requests} == {delivery.id}
    assert all(signed(r) for r in receiver.requests)


def test_a_receiver_that_times_out_is_tried_again(approval, receiver, settings):
    settings.KITEMESH_WEBHOOK_TIMEOUT_SECONDS = 0.3
    receiver.queue(ToolResponse(delay=1.0), ToolResponse(status=200))

    delivery = delivered(approval)

    assert delivery.status == "delivered" and len(receiver.requests) == 2


def test_a_receiver_that_keeps_failing_is_given_up_and_logged_without_secrets(approval, receiver, settings, caplog):
    settings.KITEMESH_WEBHOOK_ATTEMPTS = 3
    receiver.queue(*[ToolResponse(status=502)] * 3)

    with caplog.at_level(logging.WARNING, logger="core.webhooks"):
        delivery = delivered(approval)

    assert (delivery.status, delivery.attempts, delivery.last_error) == ("failed", 3, "HTTP 502")
    assert len(receiver.requests) == 3
    [record] = [r for r in caplog.records if r.name == "core.webhooks"]
    message = record.getMessage()
    assert "not delivered to 127.0.0.1 after 3 attempt(s): HTTP 502" in message
    assert "acme/support" in message
    assert WEBHOOK_SECRET not in message and RECEIVER_TOKEN not in message and "sha256=" not in message


def test_a_refusal_by_the_receiver_is_not_retried(approval, receiver):
    receiver.queue(ToolResponse(status=401))

    delivery = delivered(approval)

    assert (delivery.status, delivery.attempts) == ("failed", 1) and len(receiver.requests) == 1


def test_a_loopback_receiver_is_refused_by_the_ssrf_guard_unless_allowlisted(approval, receiver, settings, caplog):
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = []

    with caplog.at_level(logging.WARNING, logger="core.webhooks"):
        delivery = delivered(approval)

    assert delivery.status == "failed" and receiver.requests == []
    assert delivery.last_error.startswith("blocked destination: host '127.0.0.1' is a loopback address")
    assert "after 1 attempt(s)" in caplog.text  # a refusal is final, not retried


def test_a_group_without_a_signing_secret_records_nothing(approval, receiver, caplog):
    Group.objects.filter(pk=approval.group_id).update(webhook_secret=None)
    [call] = waiting_calls(approval)

    with caplog.at_level(logging.WARNING, logger="core.webhooks"):
        approval_decide(
            approval=Approval.objects.get(pk=approval.pk),
            tool_execution=call,
            approve=True,
            reason="",
            actor=person("ada"),
        )

    assert not WebhookDelivery.objects.filter(event_type="approval.decided").exists()
    assert "the group has no usable webhook_secret" in caplog.text


def test_a_signing_secret_of_another_team_is_not_used(approval, receiver, upstream):
    other = make_setup(upstream, team_name="globex")
    Group.objects.filter(pk=approval.group_id).update(
        webhook_secret=secret_set(team=other.team, name="theirs", value="their-secret")
    )
    [call] = waiting_calls(approval)

    approval_decide(
        approval=Approval.objects.get(pk=approval.pk), tool_execution=call, approve=True, reason="", actor=person("ada")
    )

    assert not WebhookDelivery.objects.filter(event_type="approval.decided").exists()


def test_events_of_a_decision_carry_who_decided(approval, receiver):
    [call] = waiting_calls(approval)
    approval_decide(approval=approval, tool_execution=call, approve=False, reason="no", actor=person("ada"))

    delivered(approval, "approval.decided")

    [request] = [r for r in receiver.requests if r.json()["type"] == "approval.decided"]
    [te] = request.json()["tool_executions"]
    assert (te["decision"], te["decided_by"], te["decided_via"]) == ("denied", "ada", "ui")
    assert "reason" not in te


def test_api_decisions_at_resume_are_sent_as_a_decision_then_the_resume(
    live, hooked: Setup, upstream: FakeUpstream, receiver: ToolServer
):
    paused = pause_through_the_api(live.url, hooked, upstream)
    ids = [c["id"] for c in paused["choices"][0]["message"]["tool_calls"]]
    received(receiver, 1)

    resumed = httpx.post(
        f"{live.url}/v1/chat/resume",
        json={
            "model": hooked.model,
            "approval_id": paused["kitemesh"]["approval_id"],
            "approved_tool_execution_ids": ids[:1],
            "denied_tools": [{"tool_execution_id": ids[1], "reason": "no"}],
            "messages": [],
        },
        headers=hooked.headers,
        timeout=30,
    )

    assert resumed.status_code == 200, resumed.text
    events = {r.json()["type"]: r.json() for r in received(receiver, 3)}  # delivered concurrently: any order
    assert sorted(events) == ["approval.created", "approval.decided", "approval.resumed"]
    decided = events["approval.decided"]["tool_executions"]
    assert [(t["decision"], t["decided_via"], t["decided_by"]) for t in decided] == [
        ("approved", "api", "token:test"),
        ("denied", "api", "token:test"),
    ]


def test_an_edit_at_resume_is_sent_with_both_arguments_redacted_and_who_made_it(
    live, hooked: Setup, upstream: FakeUpstream, receiver: ToolServer
):
    paused = pause_through_the_api(live.url, hooked, upstream)
    ids = [c["id"] for c in paused["choices"][0]["message"]["tool_calls"]]
    received(receiver, 1)

    resumed = httpx.post(
        f"{live.url}/v1/chat/resume",
        json={
            "model": hooked.model,
            "approval_id": paused["kitemesh"]["approval_id"],
            "edited_tool_executions": [{"tool_execution_id": ids[0], "arguments": '{"t": "y", "password": "pw-9"}'}],
            "denied_tools": [{"tool_execution_id": ids[1]}],
        },
        headers=hooked.headers,
        timeout=30,
    )

    assert resumed.status_code == 200, resumed.text
    events = {r.json()["type"]: r.json() for r in received(receiver, 3)}
    edited, denied = events["approval.decided"]["tool_executions"]
    assert (edited["edited"], edited["decided_by"]) == (True, "token:test")
    assert (edited["original_arguments"], edited["arguments"]) == ({"t": "x"}, {"t": "y", "password": "[redacted]"})
    assert denied["edited"] is False and "arguments" not in denied
    assert "pw-9" not in json.dumps(events)


def test_a_delivery_cut_by_a_killed_worker_is_delivered_by_the_next_one_with_the_same_event(
    transactional_db, upstream: FakeUpstream, receiver: ToolServer
):
    """Two worker PROCESSES on the run's database: the first is killed (SIGKILL) while the receiver holds
    the event's POST; the second, started afterwards, sends the same event again (same id, same body)."""
    setup = make_setup(upstream)
    hook_up(setup.group, receiver)
    approval = paused_approval(setup.group, [(make_tool(setup.team, "create_ticket"), TICKET_ARGUMENTS)])
    receiver.queue(ToolResponse(status=204, delay=30), ToolResponse(status=204))
    env = {"KITEMESH_WEBHOOK_TIMEOUT_SECONDS": "2", "KITEMESH_SWEEP_SECONDS": "0.5"}
    worker_a = ServerProcess(env=env, command=["manage.py", "worker"]).start()
    try:
        received(receiver, 1, timeout=20)
        worker_a.kill()
        worker_b = ServerProcess(env=env, command=["manage.py", "worker"]).start()
        try:
            requests = received(receiver, 2, timeout=30)
            delivery = wait_for(
                lambda: WebhookDelivery.objects.filter(status="delivered").first(), 10, "the delivery to be recorded"
            )
        finally:
            worker_b.close()
    finally:
        worker_a.close()

    assert [r.json()["approval_id"] for r in requests] == [str(approval.id)] * 2
    assert requests[0].body == requests[1].body
    assert {r.headers["x-kitemesh-delivery"] for r in requests} == {delivery.id}
    assert all(signed(r) for r in requests)
    assert delivery.attempts == 1  # the killed attempt never got to record itself
