"""Chat for people (SPEC §8) over HTTP against the live server: a member's turn is the API's run (every mode
on the scripted demo model, its holds and charges, the user recorded as its caller), streamed to the page
or posted without JavaScript; approvals decided in the conversation or on /approvals/ continue it; bad input
is refused in the API's error shape with nothing written, held or charged; nobody sees another's chat."""

import pytest
from django.contrib.auth.models import User
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

from billing.ledger import credits_grant
from billing.models import CreditAccount, Hold, LedgerEntry
from chat.models import Conversation, ConversationMessage
from chat.services.conversations import conversation_start
from core.models import Approval, Execution, Group, Step
from tests.approvals.test_pages import person
from tests.support.chat import PagePerson, answer_of, chat_scene

DELEGATE = '!tool delegate_to_agent {"agent": "researcher", "task": "Find the facts"}'


@pytest.fixture
def scene(live, settings):
    return chat_scene(live, settings)


@pytest.fixture
def mia(live, scene):
    someone = PagePerson(live, "mia")
    yield someone
    someone.close()


@pytest.fixture
def abe(live, scene):
    someone = PagePerson(live, "abe")
    yield someone
    someone.close()


def _money(team) -> tuple[int, int, int]:
    account = CreditAccount.objects.get(team=team)
    return account.balance, account.held, Hold.objects.filter(status=Hold.Status.ACTIVE).count()


@pytest.mark.parametrize(
    ("mode", "message", "ran", "expected"),
    [
        ("auto", "Hello", "synthesis", "Synthesis: researcher: Scripted reply: Hello | critic: Scripted reply: Hello"),
        ("normal", "Hello", "normal", "Scripted reply: Hello"),
        (
            "synthesis",
            "Hi all",
            "synthesis",
            "Synthesis: researcher: Scripted reply: Hi all | critic: Scripted reply: Hi all",
        ),
        ("orchestration", DELEGATE, "orchestration", "Tool results: Scripted reply: Find the facts"),
    ],
)
def test_a_turn_in_each_mode_streams_and_is_billed_as_the_api_runs_it(scene, mia, mode, message, ran, expected):
    balance_before = _money(scene.team)[0]

    events = mia.start(scene.synthesis, mode, message)

    first, last = events[0], events[-1]
    assert first["type"] == "run" and first["mode"] == ran
    assert len([e for e in events if e["type"] == "text"]) >= 3, "the answer came in one piece"
    assert answer_of(events) == expected
    assert last["type"] == "end" and last["state"] == "completed" and last["credits_charged"] >= 1
    conversation = Conversation.objects.get(pk=first["conversation"]["id"])
    assert conversation.user.username == "mia" and conversation.group == scene.synthesis
    assert first["conversation"]["url"] == f"/chat/{conversation.id}/"
    user_turn, answer = conversation.messages.all()
    assert (user_turn.role, user_turn.content) == ("user", message)
    assert (answer.role, answer.content, answer.error) == ("assistant", expected, "")
    execution = answer.execution
    assert (execution.user.username, execution.token, execution.status) == ("mia", None, Execution.Status.SUCCEEDED)
    assert execution.mode == ran and execution.credits_charged == last["credits_charged"]
    charge = LedgerEntry.objects.get(execution=execution, kind=LedgerEntry.Kind.CHARGE)
    assert charge.amount == -last["credits_charged"]
    assert _money(scene.team) == (balance_before - last["credits_charged"], 0, 0)


def test_live_reasoning_reports_agents_before_the_answer_and_delegations_in_orchestration(scene, mia):
    synthesis = mia.start(scene.synthesis, "synthesis", "Hello")
    kinds = [(e.get("agent"), e["status"]) for e in synthesis if e["type"] == "progress"]
    assert sorted(kinds) == [
        ("critic", "done"),
        ("critic", "started"),
        ("researcher", "done"),
        ("researcher", "started"),
    ]
    last_progress = max(i for i, e in enumerate(synthesis) if e["type"] == "progress")
    assert last_progress < next(i for i, e in enumerate(synthesis) if e["type"] == "text")

    orchestration = mia.start(scene.group, "orchestration", DELEGATE)
    assert [(e.get("agent"), e["status"]) for e in orchestration if e["type"] == "progress"] == [
        ("researcher", "started"),
        ("researcher", "done"),
    ]


def test_the_conversation_goes_on_with_its_history_and_reloads_with_its_reasoning(scene, mia):
    first = mia.start(scene.synthesis, "normal", "Hello")
    url = first[0]["conversation"]["url"]

    second = mia.send(f"{url}send/", {"message": "And again"})

    assert answer_of(second) == "Scripted reply: And again"
    execution = Execution.objects.filter(user__username="mia").latest("created_at")
    assert execution.metadata["requested_mode"] == "normal"
    page = mia.http.get(url)
    assert page.status_code == 200
    for text in ("Hello", "Scripted reply: Hello", "And again", "Scripted reply: And again", "Normal run: completed"):
        assert text in page.text
    assert f"{execution.credits_charged} credit" in page.text
    listing = mia.http.get("/chat/")
    assert url in listing.text and "Hello" in listing.text


def test_without_javascript_a_message_posts_and_the_answer_is_on_the_page_it_redirects_to(scene, mia):
    posted = mia.post("/chat/send/", {"group": str(scene.synthesis.id), "mode": "synthesis", "message": "Plain form"})

    assert posted.status_code == 302
    page = mia.http.get(posted.headers["location"])
    assert "Synthesis: researcher: Scripted reply: Plain form" in page.text
    assert "Agent researcher: done" in page.text and "Synthesis run: completed" in page.text


def test_a_member_sees_why_when_no_group_can_be_used(live, scene):
    Group.objects.filter(team=scene.team).delete()
    mia = PagePerson(live, "mia")
    assert "Your team demo has no groups yet" in mia.http.get("/chat/").text
    assert "Your team demo has no groups yet" in mia.http.get("/chat/new/").text
    person("nomad")
    nomad = PagePerson(live, "nomad")
    assert "You are not a member of any team yet" in nomad.http.get("/chat/new/").text


# --- Bad input: a clear error in the API's shape, nothing written, held or charged ----------------------------


def _refused(someone: PagePerson, url: str, data: dict) -> dict:
    response = someone.post(url, data, stream=True)
    assert response.headers["content-type"] == "application/json", response.text
    error = response.json()["error"]
    return {"status": response.status_code, **error}


@pytest.mark.parametrize(
    ("data", "status", "param", "says"),
    [
        ({"mode": "normal", "message": "   "}, 400, "message", "Write a message first."),
        ({"mode": "normal", "message": "x" * 32_001}, 400, "message", "at most 32000 characters"),
        ({"mode": "turbo", "message": "Hi"}, 400, "mode", "Choose a mode."),
        ({"group": "not-a-group", "mode": "normal", "message": "Hi"}, 400, "group", "Choose a group."),
        (
            {"group": "00000000-0000-4000-8000-00000000dead", "mode": "normal", "message": "Hi"},
            404,
            "group",
            "no such group",
        ),
        ({"group": "plain", "mode": "synthesis", "message": "Hi"}, 400, "metadata.mode", "needs a group with agents"),
    ],
)
def test_a_bad_message_is_refused_with_nothing_written_or_held(scene, mia, data, status, param, says):
    plain = Group.objects.create(team=scene.team, name="plain", brain=scene.group.brain)
    group = {"plain": str(plain.id)}.get(data.get("group"), data.get("group", str(scene.synthesis.id)))
    before = _money(scene.team)

    error = _refused(mia, "/chat/send/", {**data, "group": group})

    assert (error["status"], error.get("param")) == (status, param)
    assert says in error["message"]
    assert Conversation.objects.count() == 0 and Execution.objects.count() == 0
    assert _money(scene.team) == before


def test_without_javascript_a_refused_message_is_shown_beside_the_box_which_keeps_it(scene, mia):
    page = mia.post("/chat/send/", {"group": str(scene.group.id), "mode": "synthesis", "message": "x" * 32_001})
    assert page.status_code == 400
    assert "A message has at most 32000 characters" in page.text and "x" * 32_001 in page.text
    assert Conversation.objects.count() == 0


def test_a_group_of_another_team_is_not_found_and_a_body_over_the_limit_is_413(scene, mia, settings):
    otto_group = Group.objects.create(team=_team_of("otto"), name="theirs", brain=scene.group.brain)
    error = _refused(mia, "/chat/send/", {"group": str(otto_group.id), "mode": "normal", "message": "Hi"})
    assert (error["status"], error["code"]) == (404, "model_not_found")

    too_big = mia.post(
        "/chat/send/", {"group": str(scene.group.id), "message": "x" * (settings.KITEMESH_MAX_BODY_BYTES + 1)}
    )
    assert too_big.status_code == 413
    assert Execution.objects.count() == 0


def _team_of(username: str):
    return User.objects.get(username=username).teams.get()


@hypothesis_settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    group=st.one_of(st.text(max_size=40), st.just("00000000-0000-4000-8000-000000000002")),
    mode=st.text(max_size=20).filter(lambda m: m not in ("auto", "normal", "orchestration", "synthesis")),
    message=st.text(max_size=300),
)
def test_hostile_forms_get_a_clear_400_or_404_and_change_nothing(scene, mia, group, mode, message):
    before = _money(scene.team)
    error = _refused(mia, "/chat/send/", {"group": group, "mode": mode, "message": message})
    assert error["status"] in (400, 404) and error["message"]
    assert Conversation.objects.count() == 0 and Execution.objects.count() == 0
    assert _money(scene.team) == before


def test_a_turn_the_team_cannot_pay_for_is_402_and_nothing_is_kept(live, scene, mia):
    adjustment = LedgerEntry.Kind.ADJUSTMENT
    credits_grant(team=scene.team, amount=-_money(scene.team)[0], reason="empty for the test", kind=adjustment)
    error = _refused(mia, "/chat/send/", {"group": str(scene.group.id), "mode": "normal", "message": "Hello"})
    assert (error["status"], error["code"]) == (402, "insufficient_credits")
    assert Conversation.objects.count() == 0 and Execution.objects.count() == 0

    page = mia.post("/chat/send/", {"group": str(scene.group.id), "mode": "normal", "message": "Hello"})
    assert page.status_code == 402 and "credits" in page.text


def test_a_person_over_their_requests_per_minute_gets_429(scene, mia, settings):
    settings.KITEMESH_CHAT_REQUESTS_PER_MINUTE = 2
    for _ in range(2):
        mia.start(scene.synthesis, "normal", "Hello")
    response = mia.post(
        "/chat/send/", {"group": str(scene.synthesis.id), "mode": "normal", "message": "Hi"}, stream=True
    )
    assert response.status_code == 429 and int(response.headers["Retry-After"]) >= 1
    assert response.json()["error"]["message"] == "Rate limit of 2 requests per minute reached for this user."
    assert Execution.objects.count() == 2


# --- Nobody else's conversation ------------------------------------------------------------------------------


def test_another_persons_conversation_and_its_endpoints_are_404(live, scene, mia):
    events = mia.start(scene.group, "normal", '!tool health_check {"verbose": true}')
    url = events[0]["conversation"]["url"]
    approval = Approval.objects.get()
    otto, abe = PagePerson(live, "otto"), PagePerson(live, "abe")

    for someone in (otto, abe):  # abe is in mia's team, and an approver: still not his conversation
        assert someone.http.get(url).status_code == 404
        assert someone.http.get(f"{url}card/").status_code == 404
        assert someone.http.get(f"{url}delete/").status_code == 404
        for action, data in [
            ("send/", {"message": "Mine now"}),
            ("continue/", {}),
            (f"approvals/{approval.id}/decide/", {"tool_execution": "all", "decision": "approve"}),
            ("rename/", {"title": "Taken"}),
            ("delete/", {}),
        ]:
            assert someone.post(f"{url}{action}", data).status_code == 404, action
            assert someone.post(f"{url}{action}", data, stream=True).status_code == 404, action
    conversation = Conversation.objects.get()
    assert conversation.title.startswith("!tool health_check") and conversation.messages.count() == 2
    assert Approval.objects.get().status == Approval.Status.PENDING


# --- Approvals in the conversation -----------------------------------------------------------------------


def test_an_approver_decides_in_the_conversation_and_the_answer_continues_in_the_same_turn(scene, abe):
    paused = abe.start(scene.group, "normal", '!tool health_check {"verbose": true}')

    end = paused[-1]
    assert (end["state"], end["type"]) == ("waiting", "end")
    card = end["card"]
    assert "Approval needed" in card and "health_check" in card and "GET 127.0.0.1/healthz" in card
    assert "Approve" in card and "Deny" in card and "Edit the arguments, then approve" in card
    approval = Approval.objects.get()
    call = approval.tool_executions.get()
    url = paused[0]["conversation"]["url"]

    resumed = abe.send(f"{url}approvals/{approval.id}/decide/", {"tool_execution": str(call.id), "decision": "approve"})

    assert [(e.get("tool"), e["status"]) for e in resumed if e["type"] == "progress"] == [
        ("health_check", "running"),
        ("health_check", "succeeded"),
    ]
    assert answer_of(resumed).startswith("Tool results: ")
    assert resumed[-1]["state"] == "completed"
    answer = ConversationMessage.objects.get(role="assistant")  # one answer for the turn, paused then completed
    assert answer.content == answer_of(resumed) and answer.execution_id == approval.execution_id
    call.refresh_from_db()
    assert (call.decided_by, call.decided_via, call.status) == ("abe", "ui", "succeeded")


def test_an_approver_denies_with_a_reason_without_javascript(scene, abe):
    paused = abe.start(scene.group, "normal", "!tool health_check {}")
    url, approval = paused[0]["conversation"]["url"], Approval.objects.get()
    call = approval.tool_executions.get()

    decided = abe.post(
        f"{url}approvals/{approval.id}/decide/",
        {"tool_execution": str(call.id), "decision": "deny", "reason": "Not now"},
    )

    assert decided.status_code == 302
    page = abe.http.get(url).text
    assert "The tool call was denied by abe: Not now" in page and "Tool health_check: denied" in page


def test_a_member_sees_who_can_decide_and_the_page_continues_after_a_decision_on_approvals(live, scene, mia, abe):
    paused = mia.start(scene.group, "normal", "!tool health_check {}")
    url, approval = paused[0]["conversation"]["url"], Approval.objects.get()
    card = paused[-1]["card"]
    assert "Waiting for an approver of team demo" in card and "abe" in card
    assert "Approve" not in card

    refused = mia.post(
        f"{url}approvals/{approval.id}/decide/", {"tool_execution": "all", "decision": "approve"}, stream=True
    )
    assert refused.status_code == 403 and "abe" in refused.json()["error"]["message"]
    early = mia.post(f"{url}continue/", {}, stream=True)
    assert (early.status_code, early.json()["error"]["code"]) == (409, "decision_required")
    # mia's page follows the approval's own channel; other people cannot.
    assert _events_status(mia, approval) == 200
    assert _events_status(PagePerson(live, "otto"), approval) == 403

    decided = abe.post(f"/approvals/{approval.id}/decide/", {"tool_execution": "all", "decision": "approve"})
    assert decided.status_code == 302
    continued = mia.send(f"{url}continue/", {})

    assert answer_of(continued).startswith("Tool results: ") and continued[-1]["state"] == "completed"
    again = mia.post(f"{url}continue/", {}, stream=True)
    assert again.status_code == 409


def _events_status(someone: PagePerson, approval: Approval) -> int:
    with someone.http.stream("GET", f"/events/?channel=approval-{approval.id}") as response:
        return response.status_code


def test_a_two_person_call_waits_in_the_card_until_a_second_approver(live, scene, abe):
    from core.models import Tool

    Tool.objects.filter(name="health_check").update(approvals_required=2)
    person("ada", scene.team)
    paused = abe.start(scene.group, "normal", "!tool health_check {}")
    url, approval = paused[0]["conversation"]["url"], Approval.objects.get()

    first = abe.post(
        f"{url}approvals/{approval.id}/decide/", {"tool_execution": "all", "decision": "approve"}, stream=True
    )

    assert first.status_code == 200 and "1 of 2 approvals" in first.json()["card"]
    PagePerson(live, "ada").post(f"/approvals/{approval.id}/decide/", {"tool_execution": "all", "decision": "approve"})
    assert answer_of(abe.send(f"{url}continue/", {})).startswith("Tool results: ")


# --- The list: load more, rename, delete ---------------------------------------------------------------------


def test_the_list_loads_more_beyond_20_and_renames_and_deletes_with_a_confirmation(scene, mia):
    user = User.objects.get(username="mia")
    for n in range(21):
        conversation_start(user=user, group=scene.group, mode="normal", first_message=f"Topic {n}")
    first_page = mia.http.get("/chat/").text
    assert "Topic 20" in first_page and "Topic 1<" in first_page and "Topic 0<" not in first_page
    more = first_page.split('href="?before=')[1].split('"')[0]
    assert "Topic 0" in mia.http.get(f"/chat/?before={more}").text

    events = mia.start(scene.synthesis, "normal", "Keep my charges")
    target = Conversation.objects.get(pk=events[0]["conversation"]["id"])
    assert mia.post(f"/chat/{target.id}/rename/", {"title": "  Renamed   chat "}).status_code == 302
    target.refresh_from_db()
    assert target.title == "Renamed chat"
    confirm = mia.http.get(f"/chat/{target.id}/delete/")
    assert "Delete “Renamed chat”?" in confirm.text
    charged = Execution.objects.get(user=user)
    assert mia.post(f"/chat/{target.id}/delete/", {}).status_code == 302
    assert not Conversation.objects.filter(pk=target.pk).exists()
    assert Execution.objects.filter(pk=charged.pk).exists() and LedgerEntry.objects.filter(execution=charged).exists()
    assert Step.objects.filter(execution=charged).exists()


def test_a_batch_groups_card_decides_all_calls_at_once(scene, abe):
    Group.objects.filter(pk=scene.group.pk).update(approval_style=Group.ApprovalStyle.BATCH)
    paused = abe.start(scene.group, "normal", '!tool health_check {}\n!tool health_check {"verbose": true}')
    card, url = paused[-1]["card"], paused[0]["conversation"]["url"]
    assert "Approve all" in card and "Deny all" in card and 'name="tool_execution" value="all"' in card
    assert card.count('name="tool_execution"') == 1  # no per-call forms in batch

    one = Approval.objects.get().tool_executions.first()
    refused = abe.post(
        f"{url}approvals/{Approval.objects.get().id}/decide/",
        {"tool_execution": str(one.id), "decision": "approve"},
        stream=True,
    )
    assert refused.status_code == 400 and "approve all or deny all" in refused.json()["error"]["message"]
    resumed = abe.send(
        f"{url}approvals/{Approval.objects.get().id}/decide/", {"tool_execution": "all", "decision": "approve"}
    )
    assert [(e.get("tool"), e["status"]) for e in resumed if e["type"] == "progress"].count(
        ("health_check", "succeeded")
    ) == 2


@pytest.mark.parametrize("before", ["2026-13-45T99:00:00", "yesterday", "9999-99-99", ""])
def test_a_malformed_load_more_moment_shows_the_newest(scene, mia, before):
    conversation_start(user=User.objects.get(username="mia"), group=scene.group, mode="normal", first_message="Latest")
    page = mia.http.get("/chat/", params={"before": before})
    assert page.status_code == 200 and "Latest" in page.text


def test_an_approver_edits_the_arguments_in_the_card_then_the_edited_call_runs(scene, abe):
    paused = abe.start(scene.group, "normal", '!tool health_check {"verbose": true}')
    url, approval = paused[0]["conversation"]["url"], Approval.objects.get()
    call = approval.tool_executions.get()
    decide = f"{url}approvals/{approval.id}/decide/"

    bad = abe.post(
        decide, {"tool_execution": str(call.id), "decision": "approve", "arguments": '{"verbose": "loud"}'}, stream=True
    )
    assert bad.status_code == 400 and "verbose" in bad.json()["error"]["message"]
    call.refresh_from_db()
    assert call.status == "pending" and call.arguments == '{"verbose": true}'

    edited = '{"verbose": false}'
    resumed = abe.send(decide, {"tool_execution": str(call.id), "decision": "approve", "arguments": edited})

    assert resumed[-1]["state"] == "completed"
    call.refresh_from_db()
    assert (call.arguments, call.original_arguments, call.status) == (edited, '{"verbose": true}', "succeeded")
    assert "edited_arguments" in answer_of(resumed)  # the model is told the approver changed them


@hypothesis_settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    tool_execution=st.text(max_size=40),
    decision=st.text(max_size=12).filter(lambda d: d not in ("approve", "deny")),  # never a valid decision
    reason=st.text(max_size=600),
    arguments=st.text(max_size=200),
)
def test_hostile_decisions_in_the_card_get_a_clear_error_and_decide_nothing(
    scene, abe, tool_execution, decision, reason, arguments
):
    if not Approval.objects.exists():
        abe.start(scene.group, "normal", "!tool health_check {}")
    approval = Approval.objects.get()
    url = f"/chat/{Conversation.objects.get().id}/approvals/{approval.id}/decide/"
    data = {"tool_execution": tool_execution, "decision": decision, "reason": reason, "arguments": arguments}

    error = _refused(abe, url, data)

    assert error["status"] == 400 and error["message"]
    assert approval.tool_executions.get().status == "pending" and Execution.objects.count() == 1
