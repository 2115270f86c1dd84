"""The approver pages in headless Chromium against the live server (README "Approver pages"): a person logs
in, sees a pause appear in the queue without reloading, opens it, denies one call with a reason and
approves the other, and the API client's resume without decisions uses those decisions. The README's
screenshots are taken here (docs/img/approvals-queue.png, docs/img/approval-detail.png)."""

import json
import re
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from playwright.sync_api import Page, expect

from approvals.services import approval_decide
from core.models import Approval, Group, Team, ToolExecution
from tests.approvals.test_pages import make_tool, person
from tests.conftest import Setup, make_setup
from tests.support.tool_server import ToolServer
from tests.support.upstream import FakeUpstream, Reply

IMAGES = Path(settings.BASE_DIR) / "docs" / "img"
PASSWORD = "pw-ada-123456"  # person() gives each user "pw-<name>-123456"
SECRET_ARGUMENT = "tok-live-1234567890"
MESSAGE = "The printer on floor 3 is on fire: open an urgent ticket, and remove the spam account 7."
TICKET_ARGUMENTS = json.dumps(
    {"title": "Printer on fire (floor 3)", "priority": "urgent", "api_token": SECRET_ARGUMENT}
)
ANSWER = "Ticket T-42 is open. I did not remove the account: the approver refused."


@pytest.fixture
def scene(live, upstream: FakeUpstream, tool_server: ToolServer, settings) -> Setup:
    """acme's support group with two tools that need approval: a ticket (POST, medium risk, 2 credits)
    and an account removal (DELETE, high risk); prices of the brain are real, so the run costs something."""
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    setup = make_setup(upstream)
    parameters = {
        "type": "object",
        "properties": {"title": {"type": "string"}, "priority": {"type": "string"}, "api_token": {"type": "string"}},
    }
    ticket = make_tool(setup.team, "create_ticket", price="2", url=f"{tool_server.url}/tickets", parameters=parameters)
    purge = make_tool(setup.team, "delete_account", method="DELETE", price="1", url=f"{tool_server.url}/accounts")
    setup.group.tools.add(ticket, purge)
    return setup


def log_in(page: Page, name: str) -> None:
    page.goto("/approvals/")
    page.get_by_label("User name").fill(name)
    page.get_by_label("Password").fill(f"pw-{name}-123456")
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url("**/approvals/")


def live_queue(page: Page) -> None:
    """Wait until the queue listens to its team's events."""
    expect(page.locator("#live-state")).to_have_attribute("data-live", "connected", timeout=10_000)


def pause(live, setup: Setup, upstream: FakeUpstream, calls: list[tuple[str, str]], message: str = MESSAGE) -> dict:
    upstream.queue(
        Reply(
            content=None,
            finish_reason="tool_calls",
            tool_calls=[
                {"id": f"c{i}", "type": "function", "function": {"name": name, "arguments": arguments}}
                for i, (name, arguments) in enumerate(calls)
            ],
        )
    )
    response = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": setup.model, "messages": [{"role": "user", "content": message}]},
        headers=setup.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_an_approver_sees_a_pause_live_decides_and_the_api_client_resumes_with_those_decisions(
    page: Page, live, scene: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    person("ada", scene.team)
    earlier = pause(live, scene, upstream, [("create_ticket", '{"title": "Toner low", "priority": "low"}')], "Toner?")
    log_in(page, "ada")
    live_queue(page)
    page.evaluate("window.notReloaded = true")

    paused = pause(live, scene, upstream, [("create_ticket", TICKET_ARGUMENTS), ("delete_account", '{"id": 7}')])
    approval_id = paused["kitemesh"]["approval_id"]
    create_id, delete_id = (c["id"] for c in paused["choices"][0]["message"]["tool_calls"])

    # The new pause appears on top, without a reload, and is announced to screen readers.
    row = page.locator(f"#approval-{approval_id}")
    expect(row).to_be_visible(timeout=10_000)
    assert page.evaluate("window.notReloaded") is True
    expect(page.locator("#queue-rows tr").first).to_have_id(f"approval-{approval_id}")
    expect(page.locator(f"#approval-{earlier['kitemesh']['approval_id']}")).to_be_visible()
    expect(row).to_contain_text("create_ticket, delete_account")
    expect(row).to_contain_text("high risk")
    expect(row).to_contain_text(re.compile(r"1[45] min"))
    expect(page.get_by_role("status").filter(has_text="New approval")).to_contain_text("support")
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=IMAGES / "approvals-queue.png")

    # The decision view: where each call goes, redacted arguments, the message, the money.
    watcher = page.context.new_page()  # a second approver's queue, to see the approval leave it
    watcher.goto("/approvals/")
    live_queue(watcher)
    row.get_by_role("link", name=re.compile("Review")).click()
    page.wait_for_url(f"**/approvals/{approval_id}/")
    expect(page.get_by_role("heading", name="Approval for group support")).to_be_visible()
    expect(page.get_by_text("POST 127.0.0.1/tickets")).to_be_visible()
    expect(page.get_by_text("DELETE 127.0.0.1/accounts")).to_be_visible()
    expect(page.locator("blockquote")).to_have_text(MESSAGE)
    content = page.content()
    assert "[redacted]" in content and SECRET_ARGUMENT not in content
    expect(page.get_by_text("3 credits if they run")).to_be_visible()
    expect(page.get_by_text(re.compile(r"^\d+ credits? charged$"))).to_be_visible()
    expect(page.get_by_text(re.compile(r"available"))).to_be_visible()
    page.get_by_label("Reason for delete_account (optional)").fill("Accounts are never removed from chat.")
    page.screenshot(path=IMAGES / "approval-detail.png", full_page=True)

    page.get_by_role("button", name="Deny delete_account").click()
    expect(page.get_by_role("status")).to_contain_text("Denied delete_account.")
    page.get_by_role("button", name="Approve create_ticket").click()
    expect(page.get_by_role("status")).to_contain_text("Approved create_ticket.")
    expect(page.get_by_text("Every tool call has a decision")).to_be_visible()
    expect(watcher.locator(f"#approval-{approval_id}")).to_have_count(0, timeout=10_000)  # it left the queue

    # The API client resumes without decisions: the page's decisions are used.
    upstream.queue(Reply(content=ANSWER))
    shown = httpx.get(f"{live.url}/v1/approvals/{approval_id}", headers=scene.headers).json()
    resumed = httpx.post(
        f"{live.url}/v1/chat/resume",
        json={"model": scene.model, "approval_id": approval_id, "messages": []},
        headers=scene.headers,
        timeout=30,
    )

    assert resumed.status_code == 200, resumed.text
    assert resumed.json()["choices"][0]["message"]["content"] == ANSWER
    assert [(r.method, r.path) for r in tool_server.requests] == [("POST", "/tickets")]
    assert tool_server.requests[0].json()["api_token"] == SECRET_ARGUMENT  # the real value went to the tool
    decisions = {t["id"]: (t["decision"], t["decided_by"], t["reason"]) for t in shown["tool_executions"]}
    assert decisions == {
        create_id: ("approved", "ada", ""),
        delete_id: ("denied", "ada", "Accounts are never removed from chat."),
    }
    denied = ToolExecution.objects.get(pk=delete_id)
    assert denied.decided_by_user == User.objects.get(username="ada") and denied.decided_at is not None
    page.goto("/approvals/history/")
    expect(page.get_by_role("row", name=re.compile("delete_account"))).to_contain_text(
        "Accounts are never removed from chat."
    )


def test_an_approval_leaves_the_queue_when_it_is_decided_elsewhere_or_expires(
    page: Page, live, scene: Setup, upstream: FakeUpstream
):
    Group.objects.filter(pk=scene.group.pk).update(approval_ttl_seconds=3)
    ada = person("ada", scene.team)
    log_in(page, "ada")
    live_queue(page)

    decided = pause(live, scene, upstream, [("create_ticket", '{"title": "a"}')])
    expiring = pause(live, scene, upstream, [("delete_account", '{"id": 1}')])
    expect(page.locator("#queue-rows tr")).to_have_count(2, timeout=10_000)
    approval = Approval.objects.select_related("group").get(pk=decided["kitemesh"]["approval_id"])
    approval_decide(
        approval=approval, tool_execution=approval.tool_executions.get(), approve=True, reason="", actor=ada
    )

    expect(page.locator(f"#approval-{decided['kitemesh']['approval_id']}")).to_have_count(0, timeout=10_000)
    expect(page.locator(f"#approval-{expiring['kitemesh']['approval_id']}")).to_have_count(0, timeout=10_000)
    expect(page.get_by_text("Nothing is waiting for a decision")).to_be_visible()


def test_a_batch_approval_is_decided_with_the_keyboard(page: Page, live, scene: Setup, upstream: FakeUpstream):
    Group.objects.filter(pk=scene.group.pk).update(approval_style=Group.ApprovalStyle.BATCH)
    person("ada", scene.team)
    paused = pause(live, scene, upstream, [("create_ticket", '{"title": "a"}'), ("delete_account", '{"id": 1}')])
    log_in(page, "ada")
    page.goto(f"/approvals/{paused['kitemesh']['approval_id']}/")

    expect(page.get_by_role("button", name="Approve create_ticket")).to_have_count(0)
    page.get_by_label("Reason for all (optional)").focus()
    page.keyboard.type("Both fine.")
    page.keyboard.press("Tab")
    expect(page.get_by_role("button", name="Approve all")).to_be_focused()
    page.keyboard.press("Enter")

    expect(page.get_by_role("status")).to_contain_text("Approved all 2 remaining tool call(s).")
    reasons = set(
        ToolExecution.objects.filter(approval_id=paused["kitemesh"]["approval_id"]).values_list(
            "decision_reason", "status"
        )
    )
    assert reasons == {("Both fine.", "approved")}


@pytest.mark.parametrize("path", ["queue", "detail", "history"])
def test_the_pages_fit_a_phone_screen(browser, live, scene: Setup, upstream: FakeUpstream, path):
    person("ada", scene.team)
    paused = pause(live, scene, upstream, [("create_ticket", TICKET_ARGUMENTS), ("delete_account", '{"id": 7}')])
    context = browser.new_context(base_url=live.url, viewport={"width": 360, "height": 740}, is_mobile=True)
    phone = context.new_page()
    try:
        log_in(phone, "ada")
        url = {"queue": "/approvals/", "detail": f"/approvals/{paused['kitemesh']['approval_id']}/"}
        phone.goto(url.get(path, "/approvals/history/"))
        overflow = phone.evaluate("document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"{path} is {overflow}px wider than the phone"
    finally:
        context.close()


def test_another_teams_approver_never_sees_the_approval(page: Page, live, scene: Setup, upstream: FakeUpstream):
    globex = make_setup(upstream, team_name="globex")
    person("eve", globex.team)
    log_in(page, "eve")
    live_queue(page)

    paused = pause(live, scene, upstream, [("create_ticket", '{"title": "a"}')])
    response = page.goto(f"/approvals/{paused['kitemesh']['approval_id']}/")

    assert response is not None and response.status == 404
    page.goto("/approvals/")
    expect(page.get_by_text("Nothing is waiting for a decision")).to_be_visible()
    assert Team.objects.count() == 2
