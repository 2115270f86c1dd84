"""Approvals beyond yes and no (SPEC §6) in headless Chromium, with two logged-in approvers: one fixes a call's
arguments on the decision page (a bad edit is shown in place first), a call of a two-person tool waits at
"1 of 2" until the second person approves it, and a rule's decision shows in the decision history. The
README's screenshot docs/img/approval-edit.png is taken here."""

import json
import re

import httpx
import pytest
from playwright.sync_api import Browser, Page, expect

from core.models import ToolExecution
from tests.approvals.test_pages import make_tool, person
from tests.approvals.test_pages_browser import IMAGES, log_in, pause
from tests.conftest import Setup, make_setup
from tests.support.tool_server import ToolServer
from tests.support.upstream import FakeUpstream, Reply

SECRET = "tok-live-0987654321"
TICKET = {"title": "Printer on fire", "priority": "asap", "api_token": SECRET}  # "asap" fails the schema
TICKET_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "priority": {"enum": ["low", "high"]},
        "api_token": {"type": "string"},
    },
    "required": ["title", "priority"],
}


@pytest.fixture
def scene(live, upstream: FakeUpstream, tool_server: ToolServer, settings) -> Setup:
    settings.KITEMESH_TOOL_HOST_ALLOWLIST = ["127.0.0.1"]
    setup = make_setup(upstream)
    setup.group.tools.add(
        make_tool(setup.team, "create_ticket", url=f"{tool_server.url}/tickets", parameters=TICKET_SCHEMA),
        make_tool(setup.team, "wire_money", url=f"{tool_server.url}/wires", approvals_required=2, price="1"),
        make_tool(
            setup.team,
            "refund",
            url=f"{tool_server.url}/refunds",
            approval_rules=[{"name": "never-prod", "when": {"required": ["prod"]}, "then": "deny", "reason": "No"}],
        ),
    )
    for name in ("ada", "bob"):
        person(name, setup.team)
    return setup


def approver(browser: Browser, live, name: str) -> Page:
    page = browser.new_context(base_url=live.url, viewport={"width": 1280, "height": 1000}).new_page()
    log_in(page, name)
    return page


def test_two_approvers_edit_a_call_and_approve_a_two_person_call(
    browser: Browser, live, scene: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    paused = pause(
        live, scene, upstream, [("create_ticket", json.dumps(TICKET)), ("wire_money", '{"amount": 900}')], "Fix it"
    )
    approval_id = paused["kitemesh"]["approval_id"]
    ticket_id, wire_id = (c["id"] for c in paused["choices"][0]["message"]["tool_calls"])
    ada, bob = approver(browser, live, "ada"), approver(browser, live, "bob")

    ada.goto(f"/approvals/{approval_id}/")
    expect(ada.get_by_text("0 of 2 approvals")).to_be_visible()
    ada.get_by_role("button", name="Approve wire_money").click()
    expect(ada.get_by_text("1 of 2 approvals")).to_be_visible()
    expect(ada.get_by_role("button", name="You approved this call: it needs another person")).to_be_disabled()

    # A bad edit is refused in place, the text kept; nothing is decided.
    ada.get_by_text("Edit the arguments, then approve").first.click()
    box = ada.get_by_label(re.compile("Arguments for create_ticket"))
    assert SECRET not in box.input_value() and "[redacted]" in box.input_value()
    box.fill(box.input_value().replace('"asap"', '"urgent"'))
    ada.get_by_role("button", name="Approve with these arguments for create_ticket").click()
    expect(ada.get_by_role("alert")).to_contain_text("is not one of ['low', 'high']")
    expect(ada.get_by_label(re.compile("Arguments for create_ticket"))).to_have_value(re.compile('"urgent"'))
    assert ToolExecution.objects.get(pk=ticket_id).status == "pending"
    IMAGES.mkdir(parents=True, exist_ok=True)
    ada.screenshot(path=IMAGES / "approval-edit.png", full_page=True)

    box = ada.get_by_label(re.compile("Arguments for create_ticket"))
    box.fill(box.input_value().replace('"urgent"', '"high"'))
    ada.get_by_role("button", name="Approve with these arguments for create_ticket").click()
    expect(ada.get_by_role("status")).to_contain_text("Approved create_ticket with edited arguments.")
    expect(ada.get_by_text("The arguments below are the approver's.")).to_be_visible()

    # The second person: the queue says 1 of 2; approving makes it 2 of 2, and the approval leaves the queue.
    bob.goto("/approvals/")
    expect(bob.locator(f"#approval-{approval_id}")).to_contain_text("wire_money: 1 of 2 approvals")
    bob.goto(f"/approvals/{approval_id}/")
    bob.get_by_role("button", name="Approve wire_money").click()
    expect(bob.get_by_role("status")).to_contain_text("Approved wire_money.")
    bob.goto("/approvals/")
    expect(bob.locator(f"#approval-{approval_id}")).to_have_count(0)

    upstream.queue(Reply(content="Done."))
    resumed = httpx.post(
        f"{live.url}/v1/chat/resume",
        json={"model": scene.model, "approval_id": approval_id},
        headers=scene.headers,
        timeout=30,
    )
    assert resumed.status_code == 200, resumed.text
    sent = {r.path: r.json() for r in tool_server.requests}
    assert sent["/tickets"] == {**TICKET, "priority": "high"}  # the secret the page hid went to the tool
    assert sent["/wires"] == {"amount": 900}
    assert ToolExecution.objects.get(pk=wire_id).decided_by == "ada, bob"


def test_a_rule_decision_shows_in_the_decision_history(
    page: Page, live, scene: Setup, upstream: FakeUpstream, tool_server: ToolServer
):
    upstream.queue(
        Reply(
            content=None,
            finish_reason="tool_calls",
            tool_calls=[{"id": "c1", "type": "function", "function": {"name": "refund", "arguments": '{"prod": 1}'}}],
        ),
        Reply(content="Not refunded."),
    )
    response = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": scene.model, "messages": [{"role": "user", "content": "Refund"}]},
        headers=scene.headers,
        timeout=30,
    )
    assert response.status_code == 200, response.text

    log_in(page, "ada")
    page.goto("/approvals/history/")

    row = page.get_by_role("row", name=re.compile("refund"))
    expect(row).to_contain_text("Rule “never-prod”")
    expect(row).to_contain_text("approval rule")
    expect(row).to_contain_text("Denied")
    assert tool_server.requests == []
