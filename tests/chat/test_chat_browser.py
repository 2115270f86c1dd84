"""Chat for people (SPEC §8) in headless Chromium against the live server, with a member (mia) and an
approver (abe) of the demo team on the scripted model: every mode, the answer arriving in pieces, live
reasoning, reload, rename and delete; a turn approved in place, and one approved on /approvals/ continuing
the member's open page; another team's member gets 404; a turn the team cannot pay for says so. README's
screenshot docs/img/chat.png is taken here."""

import re

import pytest
from playwright.sync_api import Browser, Page, expect

from billing.ledger import credits_grant
from billing.models import CreditAccount, LedgerEntry
from chat.models import Conversation
from core.models import Execution
from tests.approvals.test_pages_browser import IMAGES, log_in
from tests.support.chat import ChatScene, chat_scene

DELEGATE = '!tool delegate_to_agent {"agent": "researcher", "task": "Find the facts"}'

# Records, in order, each piece of text added to an answer and the moment a turn's end is shown.
WATCH = """() => {
  window.turnLog = [];
  window.turnObserver = new MutationObserver(function (records) {  // held, or it may be collected
    records.forEach(function (record) {
      record.addedNodes.forEach(function (node) {  // (a node replaced since has no parent: use the target)
        if (node.nodeType === 3 && record.target.classList.contains("bubble")) { window.turnLog.push("text"); }
        else if (node.nodeType === 3 && /charged$/.test(node.textContent)) { window.turnLog.push("end"); }
      });
    });
  });
  window.turnObserver.observe(document.getElementById("turns"), { childList: true, subtree: true });
}"""


@pytest.fixture
def scene(live, settings) -> ChatScene:
    return chat_scene(live, settings)


def person_page(browser: Browser, live, name: str, *, width: int = 1280) -> Page:
    page = browser.new_context(base_url=live.url, viewport={"width": width, "height": 900}).new_page()
    log_in(page, name)
    return page


def new_chat(page: Page, group: str, mode: str, message: str) -> None:
    page.goto("/chat/new/")
    page.get_by_label("Group").select_option(label=group)
    page.get_by_label("Mode").select_option(label=mode)
    page.get_by_label("Message").fill(message)
    page.evaluate(WATCH)
    page.get_by_role("button", name="Send").click()


def last_turn(page: Page):
    return page.locator("li.turn.assistant").last


@pytest.mark.parametrize(
    ("group", "mode", "message", "answer", "reasoning"),
    [
        ("demo-synthesis", "Auto", "Hello", "Synthesis: researcher: Scripted reply: Hello", "Synthesis run: completed"),
        ("demo-synthesis", "Normal", "Hello", "Scripted reply: Hello", "Normal run: completed"),
        ("demo-synthesis", "Synthesis", "Hi all", "| critic: Scripted reply: Hi all", "Agent critic: done"),
        (
            "demo",
            "Orchestration",
            DELEGATE,
            "Tool results: Scripted reply: Find the facts",
            "Orchestration run: completed",
        ),
    ],
)
def test_a_member_chats_in_each_mode_and_sees_the_answer_arrive_in_pieces(
    browser: Browser, live, scene: ChatScene, group, mode, message, answer, reasoning
):
    page = person_page(browser, live, "mia")
    new_chat(page, group, mode, message)

    turn = last_turn(page)
    expect(turn.locator(".bubble")).to_contain_text(answer)
    expect(turn.locator(".reasoning")).to_contain_text(reasoning)
    expect(turn.locator(".reasoning")).to_contain_text(re.compile(r"\d+ credits? charged"))
    log = page.evaluate("window.turnLog")
    assert log.count("text") >= 3 and log.index("end") == len(log) - 1, log  # pieces, each shown before the end
    conversation = Conversation.objects.get()
    page.wait_for_url(f"**/chat/{conversation.id}/")
    expect(page.get_by_role("heading", level=1)).to_have_text(message[:200])

    page.reload()  # the conversation is found again, with its reasoning
    expect(last_turn(page).locator(".bubble")).to_contain_text(answer)
    expect(last_turn(page).locator(".reasoning")).to_contain_text(reasoning)


def test_live_reasoning_of_a_synthesis_turn_is_announced_as_the_agents_work(browser: Browser, live, scene: ChatScene):
    page = person_page(browser, live, "mia")
    new_chat(page, "demo-synthesis", "Synthesis", "What do you think?")

    reasoning = last_turn(page).locator(".reasoning ul")
    expect(reasoning).to_have_attribute("aria-live", "polite")
    for line in ("Agent researcher: done", "Agent critic: done", "Synthesis run: completed"):
        expect(reasoning.get_by_text(line)).to_be_visible()
    charged = Execution.objects.get().credits_charged
    expect(reasoning).to_contain_text(f"{charged} credit")


def test_an_approver_approves_in_place_and_the_answer_continues_in_the_same_turn(
    browser: Browser, live, scene: ChatScene
):
    page = person_page(browser, live, "abe")
    new_chat(page, "demo", "Auto", DELEGATE)
    expect(last_turn(page).locator(".reasoning")).to_contain_text("Orchestration run: completed")
    page.get_by_label("Message").fill('!tool health_check {"verbose": true}')
    page.get_by_role("button", name="Send").click()

    card = page.locator("#approval-card")
    expect(card).to_contain_text("Approval needed")
    expect(card).to_contain_text("GET 127.0.0.1/healthz")
    expect(card.locator(".risk")).to_have_text("low risk")
    expect(last_turn(page).locator(".reasoning")).to_contain_text("Orchestration run: waiting for approval")
    IMAGES.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=IMAGES / "chat.png", full_page=True)

    card.get_by_role("button", name="Approve health_check").click()

    turn = last_turn(page)
    expect(turn.locator(".bubble")).to_contain_text('Tool results: {"status": 200')
    expect(turn.locator(".reasoning")).to_contain_text("Tool health_check: succeeded")
    expect(turn.locator(".reasoning")).to_contain_text("Orchestration run: completed")
    expect(page.locator("#approval-card")).to_have_count(0)
    assert page.locator("li.turn.assistant").count() == 2  # the answer continued the paused turn


def test_a_decision_on_the_approvals_page_continues_the_members_open_page(browser: Browser, live, scene: ChatScene):
    mia = person_page(browser, live, "mia")
    new_chat(mia, "demo", "Normal", "!tool health_check {}")
    card = mia.locator("#approval-card")
    expect(card).to_contain_text("Waiting for an approver of team demo")
    expect(card).to_contain_text("abe")
    expect(card.get_by_role("button", name=re.compile("Approve"))).to_have_count(0)
    approval_id = card.get_attribute("data-approval-id")

    abe = person_page(browser, live, "abe")
    abe.goto(f"/approvals/{approval_id}/")
    abe.get_by_role("button", name="Approve health_check").click()
    expect(abe.get_by_role("status")).to_contain_text("Approved health_check.")

    turn = last_turn(mia)
    expect(turn.locator(".bubble")).to_contain_text("Tool results:", timeout=10_000)
    expect(turn.locator(".reasoning")).to_contain_text("Normal run: completed")


def test_another_teams_member_gets_404_for_the_conversation_and_its_endpoints(browser: Browser, live, scene: ChatScene):
    mia = person_page(browser, live, "mia")
    new_chat(mia, "demo-synthesis", "Normal", "Private")
    expect(last_turn(mia).locator(".bubble")).to_contain_text("Scripted reply: Private")
    url = f"/chat/{Conversation.objects.get().id}/"

    otto = person_page(browser, live, "otto")
    assert otto.goto(url).status == 404
    statuses = otto.evaluate(
        """async (url) => {
          const token = document.cookie.match(/csrftoken=([^;]+)/)[1];
          const post = (path) => fetch(url + path, {method: "POST", headers: {"X-CSRFToken": token,
            "Accept": "text/event-stream"}, body: new URLSearchParams({message: "mine"})});
          return [(await fetch(url + "card/")).status, (await post("send/")).status, (await post("continue/")).status];
        }""",
        url,
    )
    assert statuses == [404, 404, 404]


def test_a_turn_the_team_cannot_pay_for_shows_the_402_message_in_the_conversation(
    browser: Browser, live, scene: ChatScene
):
    available = CreditAccount.objects.get(team=scene.team).available
    credits_grant(team=scene.team, amount=-available, reason="spent", kind=LedgerEntry.Kind.ADJUSTMENT)
    page = person_page(browser, live, "mia")
    new_chat(page, "demo", "Normal", "Anything?")

    expect(page.get_by_role("alert")).to_contain_text("This request may cost up to")
    expect(page.get_by_label("Message")).to_have_value("Anything?")
    assert Conversation.objects.count() == 0 and Execution.objects.count() == 0


def test_rename_and_delete_from_the_list(browser: Browser, live, scene: ChatScene):
    page = person_page(browser, live, "mia")
    new_chat(page, "demo-synthesis", "Normal", "First topic")
    expect(last_turn(page).locator(".bubble")).to_contain_text("Scripted reply: First topic")

    page.get_by_role("link", name="Chat", exact=True).click()
    page.get_by_label("New title for “First topic”").fill("Budget questions")
    page.get_by_role("button", name="Rename “First topic”").click()
    expect(page.get_by_role("status")).to_contain_text("Renamed to “Budget questions”.")
    page.get_by_role("link", name="Delete “Budget questions”").click()
    expect(page.get_by_role("heading", name="Delete “Budget questions”?")).to_be_visible()
    page.get_by_role("button", name="Delete").click()
    expect(page.get_by_role("status")).to_contain_text("Deleted “Budget questions”.")
    expect(page.get_by_text("No conversations yet.")).to_be_visible()
    assert Execution.objects.count() == 1  # its run and charge stay


def test_at_phone_width_the_keyboard_alone_sends_a_message(browser: Browser, live, scene: ChatScene):
    page = person_page(browser, live, "mia", width=375)
    page.goto("/chat/new/")
    page.get_by_label("Group").focus()
    page.keyboard.press("Tab")  # to Mode
    page.keyboard.press("Tab")  # to Message
    page.keyboard.type("From my phone")
    page.keyboard.press("Control+Enter")

    expect(last_turn(page).locator(".bubble")).to_contain_text("Scripted reply: From my phone")
    assert page.evaluate("document.scrollingElement.scrollWidth <= window.innerWidth")
