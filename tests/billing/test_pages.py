"""The finance pages (SPEC §5 /billing/): who may see what, the ledger and its filters, the execution a
ledger line leads to, the CSV exports (parsed, streamed, carrying the ids of the chain), and grants or
adjustments with a mandatory reason recorded with the person who made them."""

import csv
import io
import json
import re
from datetime import timedelta

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.contrib.auth.models import Permission, User
from django.test import AsyncClient, Client
from django.utils import timezone

from approvals.services import approval_decide
from billing.exports import LEDGER_HEADER, USAGE_HEADER
from billing.ledger import credits_grant
from billing.models import CreditAccount, LedgerEntry
from core.models import Approval, Execution, Team, ToolExecution
from tests.billing.test_finance_selectors import model_call, record_run
from tests.conftest import Setup, make_setup
from tests.support.tool_server import ToolResponse, ToolServer
from tests.support.upstream import FakeUpstream, Reply

PASSWORD = "correct horse battery"


def person(username: str, *teams: Team, staff: bool = False, superuser: bool = False, finance: bool = True) -> User:
    """A user who is a member of `teams`, with the billing permission unless `finance=False`."""
    user = User.objects.create_user(username, password=PASSWORD, is_staff=staff, is_superuser=superuser)
    if finance:
        user.user_permissions.add(Permission.objects.get(content_type__app_label="billing", codename="use_billing"))
    for team in teams:
        team.members.add(user)
    return user


def csv_rows(response) -> list[dict]:
    assert response.streaming is True
    assert response["Content-Type"].startswith("text/csv")
    text = b"".join(response.streaming_content).decode()
    return list(csv.DictReader(io.StringIO(text)))


def balance_cell(html: str, team: str) -> int:
    """The balance shown on the team's row of the overview."""
    row = re.search(rf'<tr data-team="{team}">(.*?)</tr>', html, re.S)
    assert row, f"no balance row for {team}"
    return int(re.search(r'data-testid="balance">(-?\d+)<', row.group(1)).group(1))


@pytest.fixture
def acme(upstream: FakeUpstream, db) -> Setup:
    return make_setup(upstream, credits=1000)


@pytest.fixture
def globex(upstream: FakeUpstream, db) -> Setup:
    return make_setup(upstream, team_name="globex", credits=700)


def acme_run(acme: Setup) -> Execution:
    return record_run(acme, lambda e: [model_call(acme.brain, 1000, 500)])  # 20 credits


def globex_run(globex: Setup) -> Execution:
    return record_run(globex, lambda e: [model_call(globex.brain, 100, 50)])  # 2 credits


PAGES = ["/billing/", "/billing/ledger/", "/billing/ledger.csv", "/billing/usage.csv", "/billing/grants/"]


# --- Who may see what -----------------------------------------------------------------------------


@pytest.mark.parametrize("url", PAGES)
def test_anonymous_visitors_are_sent_to_log_in(client, db, url: str):
    response = client.get(url)

    assert response.status_code == 302
    assert response["Location"].startswith(f"/accounts/login/?next={url}")


def test_anonymous_execution_page_and_grant_post_are_sent_to_log_in(client, acme: Setup):
    run = acme_run(acme)

    page = client.get(f"/billing/executions/{run.id}/")
    post = client.post("/billing/grants/", {"team": acme.team.pk, "kind": "grant", "amount": 5, "reason": "x"})

    assert page.status_code == 302 and page["Location"].startswith("/accounts/login/")
    assert post.status_code == 302
    assert LedgerEntry.objects.filter(kind="grant").count() == 1  # only make_setup's


@pytest.mark.parametrize("staff", [False, True])
@pytest.mark.parametrize("url", PAGES)
def test_people_without_the_billing_permission_get_403(client, acme: Setup, url: str, staff: bool):
    client.force_login(person("eve", acme.team, staff=staff, finance=False))

    assert client.get(url).status_code == 403


def test_without_the_permission_no_grant_is_recorded(client, acme: Setup):
    client.force_login(person("eve", acme.team, finance=False))

    response = client.post("/billing/grants/", {"team": acme.team.pk, "kind": "grant", "amount": 5, "reason": "x"})

    assert response.status_code == 403
    assert CreditAccount.objects.get(team=acme.team).balance == 1000


def test_a_member_sees_only_the_teams_they_belong_to(client, acme: Setup, globex: Setup):
    acme_run(acme)
    globex_run(globex)
    client.force_login(person("ada", acme.team))

    html = client.get("/billing/").content.decode()
    ledger = client.get("/billing/ledger/").content.decode()
    usage = csv_rows(client.get("/billing/usage.csv"))
    entries = csv_rows(client.get("/billing/ledger.csv"))

    assert balance_cell(html, "acme") == 980
    assert "globex" not in html and "globex" not in ledger
    assert {r["team"] for r in usage} == {"acme"}
    assert {r["team"] for r in entries} == {"acme"}
    assert f'<option value="{globex.team.pk}"' not in html  # not offered in the team choices either


def test_a_member_cannot_filter_their_way_into_another_team(client, acme: Setup, globex: Setup):
    globex_run(globex)
    client.force_login(person("ada", acme.team))

    ledger = client.get(f"/billing/ledger/?team={globex.team.pk}").content.decode()
    overview = client.get(f"/billing/?team={globex.team.pk}").content.decode()
    ledger_csv = client.get(f"/billing/ledger.csv?team={globex.team.pk}")
    usage_csv = client.get(f"/billing/usage.csv?team={globex.team.pk}")

    assert "Select a valid choice" in ledger and "Select a valid choice" in overview
    assert "globex" not in ledger and "globex" not in overview
    assert ledger_csv.status_code == usage_csv.status_code == 400
    assert ledger_csv.content.decode().startswith("team: Select a valid choice")


@pytest.mark.parametrize("kind", ["staff", "superuser"])
def test_staff_and_superusers_see_every_team(client, acme: Setup, globex: Setup, kind: str):
    acme_run(acme)
    globex_run(globex)
    client.force_login(person("root", staff=kind == "staff", superuser=kind == "superuser"))

    html = client.get("/billing/").content.decode()
    entries = csv_rows(client.get("/billing/ledger.csv"))

    assert (balance_cell(html, "acme"), balance_cell(html, "globex")) == (980, 698)
    assert {r["team"] for r in entries} == {"acme", "globex"}


def test_another_teams_execution_is_404_for_a_member_and_shown_to_staff(client, acme: Setup, globex: Setup):
    theirs = globex_run(globex)
    mine = acme_run(acme)
    client.force_login(person("ada", acme.team))

    assert client.get(f"/billing/executions/{theirs.id}/").status_code == 404
    assert client.get(f"/billing/executions/{mine.id}/").status_code == 200
    assert client.get(f"/billing/ledger/?execution={theirs.id}").context["page"].paginator.count == 0

    client.force_login(person("root", staff=True))
    assert client.get(f"/billing/executions/{theirs.id}/").status_code == 200


# --- Overview -------------------------------------------------------------------------------------


def test_overview_shows_balances_chart_and_breakdowns(client, acme: Setup):
    run = acme_run(acme)
    client.force_login(person("ada", acme.team))

    response = client.get("/billing/")
    html = response.content.decode()

    assert response.status_code == 200
    assert balance_cell(html, "acme") == 1000 - run.credits_charged
    assert '<svg class="chart" role="img"' in html and '<title id="chart-title">Credits charged per day' in html
    today = timezone.localdate().isoformat()
    assert f'<th scope="row">{today}</th><td class="num">{run.credits_charged}</td>' in html
    by_group = response.context["by_group"]
    assert [(r["group__name"], r["executions"], r["credits"]) for r in by_group] == [("support", 1, 20)]
    assert [(r["model_name"], r["prompt_tokens"]) for r in response.context["by_model"]] == [("up-model", 1000)]


def test_overview_query_count_does_not_grow_with_teams_or_runs(client, upstream, db, django_assert_max_num_queries):
    def load(count: int) -> None:
        for n in range(count):
            setup = make_setup(upstream, team_name=f"team-{len(Team.objects.all())}-{n}", credits=100)
            record_run(setup, lambda e, s=setup: [model_call(s.brain, 100, 10)], hold=10)

    client.force_login(person("root", staff=True))
    load(1)
    with django_assert_max_num_queries(13) as small:  # (the 13th: the tokens with a credit limit, in one query)
        client.get("/billing/")
    load(6)
    with django_assert_max_num_queries(len(small.captured_queries)):
        response = client.get("/billing/")
    assert len(response.context["credits"]) == 7


def test_overview_reports_an_inverted_period_and_falls_back_to_the_default(client, acme: Setup):
    client.force_login(person("ada", acme.team))
    day = timezone.localdate()

    response = client.get(f"/billing/?since={day.isoformat()}&until={(day - timedelta(days=3)).isoformat()}")

    assert "The start date is after the end date." in response.content.decode()
    assert len(response.context["daily"]) == 30


def test_overview_period_defaults_to_the_30_days_up_to_until(client, acme: Setup):
    client.force_login(person("ada", acme.team))

    response = client.get("/billing/?until=2026-03-10")

    assert response.context["period"].since.isoformat() == "2026-02-09"
    assert [p.day.isoformat() for p in response.context["daily"]][-1] == "2026-03-10"
    assert 'value="2026-02-09"' in response.content.decode()  # the form shows the period in use


def test_a_period_longer_than_a_year_is_refused(client, acme: Setup):
    client.force_login(person("ada", acme.team))

    page = client.get("/billing/?since=2024-01-01&until=2025-06-30")
    export = client.get("/billing/usage.csv?since=2024-01-01&until=2025-06-30")

    assert "Choose at most 366 days." in page.content.decode()
    assert export.status_code == 400 and "Choose at most 366 days." in export.content.decode()


# --- The ledger -----------------------------------------------------------------------------------


def test_ledger_filters_by_kind_team_execution_and_dates(client, acme: Setup, globex: Setup):
    run = acme_run(acme)
    globex_run(globex)
    client.force_login(person("root", staff=True))

    def shown(query: str) -> list[tuple[str, str, int]]:
        page = client.get(f"/billing/ledger/?{query}").context["page"]
        return [(e.team.name, e.kind, e.amount) for e in page.object_list]

    assert shown("kind=charge") == [("globex", "charge", -2), ("acme", "charge", -20)]
    assert shown(f"team={acme.team.pk}&kind=grant") == [("acme", "grant", 1000)]
    assert shown(f"execution={run.id}") == [("acme", "charge", -20), ("acme", "release", 500), ("acme", "hold", 500)]
    tomorrow = (timezone.localdate() + timedelta(days=1)).isoformat()
    today = timezone.localdate().isoformat()
    assert shown(f"since={tomorrow}") == []
    assert len(shown(f"since={today}&until={today}")) == 8
    html = client.get(f"/billing/ledger/?execution={run.id}").content.decode()
    assert html.count(f'href="/billing/executions/{run.id}/"') == 3
    assert run.request_id in html


def test_ledger_is_paginated_and_keeps_its_filters(client, acme: Setup):
    for n in range(55):
        credits_grant(team=acme.team, amount=1, reason=f"top-up {n}")
    client.force_login(person("ada", acme.team))

    first = client.get("/billing/ledger/?kind=grant")
    second = client.get("/billing/ledger/?kind=grant&page=2")

    assert len(first.context["page"].object_list) == 50
    assert 'href="?kind=grant&amp;page=2"' in first.content.decode()
    assert [e.reason for e in second.context["page"].object_list][-1] == "test grant"
    assert len(second.context["page"].object_list) == 6


def test_execution_page_shows_steps_tokens_cost_and_its_ledger(client, acme: Setup):
    run = acme_run(acme)
    client.force_login(person("ada", acme.team))

    html = client.get(f"/billing/executions/{run.id}/").content.decode()

    assert run.request_id in html and "up-model" in html
    assert "1000 prompt, 500 completion" in html
    for kind in ("hold", "release", "charge"):
        assert f"<td>{kind}</td>" in html


# --- CSV exports ----------------------------------------------------------------------------------


def test_ledger_csv_has_a_header_and_one_row_per_entry_with_ids(client, acme: Setup):
    run = acme_run(acme)
    ada = person("ada", acme.team)
    credits_grant(team=acme.team, amount=50, reason="=cmd|' /C calc'!A0", actor=ada)
    client.force_login(ada)

    response = client.get("/billing/ledger.csv")
    rows = csv_rows(response)

    assert 'filename="kitemesh-ledger.csv"' in response["Content-Disposition"]
    assert list(rows[0].keys()) == LEDGER_HEADER
    assert [(r["kind"], r["amount"], r["balance_after"], r["held_after"]) for r in rows] == [
        ("grant", "1000", "1000", "0"),
        ("hold", "500", "1000", "500"),
        ("release", "500", "1000", "0"),
        ("charge", "-20", "980", "0"),
        ("grant", "50", "1030", "0"),
    ]
    assert [r["execution_id"] for r in rows[1:4]] == [str(run.id)] * 3
    assert {r["request_id"] for r in rows[1:4]} == {run.request_id}
    assert rows[4]["actor"] == "ada"
    assert rows[4]["reason"] == "'=cmd|' /C calc'!A0"  # a formula is defused for spreadsheets
    assert rows[0]["entry_id"] == str(LedgerEntry.objects.order_by("id").first().id)


def test_ledger_csv_applies_the_ledger_filters(client, acme: Setup):
    run = acme_run(acme)
    acme_run(acme)
    client.force_login(person("ada", acme.team))

    rows = csv_rows(client.get(f"/billing/ledger.csv?execution={run.id}&kind=charge"))

    assert [(r["execution_id"], r["kind"]) for r in rows] == [(str(run.id), "charge")]


def test_usage_csv_has_one_row_per_execution_of_the_period(client, acme: Setup, globex: Setup):
    first, second = acme_run(acme), acme_run(acme)
    globex_run(globex)
    client.force_login(person("ada", acme.team))
    today = timezone.localdate().isoformat()

    response = client.get(f"/billing/usage.csv?since={today}&until={today}")
    rows = csv_rows(response)

    assert f'filename="kitemesh-usage-{today}-{today}.csv"' in response["Content-Disposition"]
    assert list(rows[0].keys()) == USAGE_HEADER
    assert [r["execution_id"] for r in rows] == [str(first.id), str(second.id)]
    assert rows[0] | {"created_at": "", "finished_at": ""} == {
        "execution_id": str(first.id),
        "request_id": first.request_id,
        "created_at": "",
        "finished_at": "",
        "team": "acme",
        "group_id": str(acme.group.id),
        "group": "support",
        "token": "test",
        "mode": "normal",
        "status": "succeeded",
        "prompt_tokens": "1000",
        "completion_tokens": "500",
        "credits_charged": "20",
        "approval_ids": "",
    }
    tomorrow = (timezone.localdate() + timedelta(days=1)).isoformat()
    assert csv_rows(client.get(f"/billing/usage.csv?since={tomorrow}&until={tomorrow}")) == []


def test_ledger_csv_reads_links_once_per_batch_not_per_row(
    client, acme: Setup, monkeypatch, django_assert_max_num_queries
):
    monkeypatch.setattr("billing.exports.BATCH", 50)
    for _ in range(30):  # 90 entries, 30 of them charges, plus make_setup's grant
        record_run(acme, lambda e: [model_call(acme.brain, 1000, 500)], hold=25)
    client.force_login(person("ada", acme.team))
    batches = 2  # 91 entries in batches of 50

    # session, user, 2 permission queries, the entries, then 2 link queries per batch
    with django_assert_max_num_queries(4 + 1 + 2 * batches):
        rows = csv_rows(client.get("/billing/ledger.csv"))

    assert len(rows) == 91
    assert len({r["execution_id"] for r in rows if r["execution_id"]}) == 30


def test_under_asgi_the_export_is_streamed_in_pieces_as_it_is_read(acme: Setup, monkeypatch):
    """Django buffers a sync iterator whole before sending it under ASGI; the export hands it an async one."""
    for n in range(1200):
        LedgerEntry.objects.create(
            team=acme.team, kind="grant", amount=0, balance_after=1000, held_after=0, reason=f"{n}"
        )
    user = person("ada", acme.team)

    async def download() -> tuple[bool, list[bytes]]:
        client = AsyncClient()
        await client.aforce_login(user)
        response = await client.get("/billing/ledger.csv")
        return response.is_async, [chunk async for chunk in response.streaming_content]

    is_async, chunks = async_to_sync(download)()

    assert is_async is True
    assert len(chunks) >= 3  # 1201 rows, pulled 500 lines at a time
    assert len(list(csv.DictReader(io.StringIO(b"".join(chunks).decode())))) == 1201


# --- Grants and adjustments -----------------------------------------------------------------------


def grant(client, team: Team, amount: int, reason: str, kind: str = "grant"):
    return client.post("/billing/grants/", {"team": team.pk, "kind": kind, "amount": amount, "reason": reason})


def test_a_grant_is_recorded_with_the_person_and_reason(client, acme: Setup):
    ada = person("ada", acme.team)
    client.force_login(ada)
    before = LedgerEntry.objects.count()

    response = grant(client, acme.team, 250, "Q3 top-up")

    assert response.status_code == 302 and response["Location"] == f"/billing/?team={acme.team.pk}"
    assert LedgerEntry.objects.count() == before + 1
    entry = LedgerEntry.objects.order_by("-id").first()
    assert (entry.kind, entry.amount, entry.balance_after, entry.actor, entry.reason) == (
        "grant",
        250,
        1250,
        ada,
        "Q3 top-up",
    )
    page = client.get(response["Location"]).content.decode()
    assert "Recorded grant of 250 credits for acme; balance now 1250." in page
    assert balance_cell(page, "acme") == 1250


@pytest.mark.parametrize("reason", ["", "   "])
def test_a_grant_without_a_reason_records_nothing(client, acme: Setup, reason: str):
    client.force_login(person("ada", acme.team))
    before = LedgerEntry.objects.count()

    response = grant(client, acme.team, 250, reason)

    assert response.status_code == 400
    assert "This field is required." in response.content.decode()
    assert "Nothing was recorded" in response.content.decode()
    assert LedgerEntry.objects.count() == before


def test_an_adjustment_below_zero_is_refused_with_a_message(client, acme: Setup):
    client.force_login(person("ada", acme.team))
    before = LedgerEntry.objects.count()

    response = grant(client, acme.team, -1001, "clawback", kind="adjustment")

    html = response.content.decode()
    assert response.status_code == 400
    assert "The adjustment would take the balance below zero (1000)." in html
    assert LedgerEntry.objects.count() == before
    assert CreditAccount.objects.get(team=acme.team).balance == 1000


def test_a_negative_adjustment_with_a_reason_is_recorded(client, acme: Setup):
    ada = person("ada", acme.team)
    client.force_login(ada)

    grant(client, acme.team, -400, "duplicate grant in March", kind="adjustment")

    entry = LedgerEntry.objects.order_by("-id").first()
    assert (entry.kind, entry.amount, entry.balance_after, entry.actor, entry.reason) == (
        "adjustment",
        -400,
        600,
        ada,
        "duplicate grant in March",
    )


@pytest.mark.parametrize(("amount", "message"), [(-5, "A grant must be positive"), (0, "Enter a non-zero number")])
def test_a_grant_must_be_a_positive_number(client, acme: Setup, amount: int, message: str):
    client.force_login(person("ada", acme.team))
    before = LedgerEntry.objects.count()

    response = grant(client, acme.team, amount, "oops")

    assert response.status_code == 400 and message in response.content.decode()
    assert LedgerEntry.objects.count() == before


def test_a_member_cannot_grant_to_another_team(client, acme: Setup, globex: Setup):
    client.force_login(person("ada", acme.team))

    response = grant(client, globex.team, 100, "for my friends")

    assert response.status_code == 400
    assert CreditAccount.objects.get(team=globex.team).balance == 700


def test_the_grant_form_needs_the_csrf_token(acme: Setup):
    browser = Client(enforce_csrf_checks=True)
    browser.force_login(person("ada", acme.team))

    assert grant(browser, acme.team, 100, "no token").status_code == 403
    assert CreditAccount.objects.get(team=acme.team).balance == 1000


# --- The chain, end to end on the live server -----------------------------------------------------


def live_login(http: httpx.Client, username: str) -> None:
    http.get("/accounts/login/")
    response = http.post(
        "/accounts/login/",
        data={"username": username, "password": PASSWORD, "csrfmiddlewaretoken": http.cookies["csrftoken"]},
    )
    assert response.status_code == 302, response.text


def test_from_a_ledger_line_finance_reaches_the_run_its_tools_approval_and_decision(
    live, http: httpx.Client, setup: Setup, upstream: FakeUpstream, tool_server: ToolServer, group_tool
):
    """A real run pauses for approval, a person approves it on the approver side, the API resumes it; the
    charge for the tool links to its tool execution and approval in the ledger, the CSV export and the
    execution page, which shows the decision with who, when and why."""
    group_tool("create_ticket", requires_approval=True, price=2)
    tool_call = {"id": "up_1", "type": "function", "function": {"name": "create_ticket", "arguments": "{}"}}
    upstream.queue(
        Reply(content=None, chunks=[], tool_calls=[tool_call], finish_reason="tool_calls"),
        Reply(content="Ticket T-1 is open."),
    )
    tool_server.queue(ToolResponse(status=201, body='{"ticket": "T-1"}'))
    body = {"model": setup.model, "messages": [{"role": "user", "content": "Open a ticket"}]}

    paused = http.post("/v1/chat/completions", json=body, headers=setup.headers).json()
    km = paused["kitemesh"]
    [te_id] = [c["id"] for c in paused["choices"][0]["message"]["tool_calls"]]
    approver = person("grace", setup.team)
    approval = Approval.objects.get(pk=km["approval_id"])
    approval_decide(
        approval=approval,
        tool_execution=ToolExecution.objects.get(pk=te_id),
        approve=True,
        reason="customer asked for it",
        actor=approver,
    )
    resumed = http.post(
        "/v1/chat/resume", json={"model": setup.model, "approval_id": km["approval_id"], "messages": []},
        headers=setup.headers,
    )  # fmt: skip
    assert resumed.status_code == 200, resumed.text
    execution_id = km["execution_id"]

    person("finn", setup.team)
    live_login(http, "finn")
    with http.stream("GET", f"/billing/ledger.csv?execution={execution_id}") as response:
        assert response.status_code == 200
        assert "content-length" not in response.headers  # streamed in chunks, not built whole
        text = response.read().decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    charges = [r for r in rows if r["kind"] == "charge"]
    assert {r["execution_id"] for r in rows} == {execution_id}
    assert {r["request_id"] for r in rows} == {km["request_id"]}
    assert [r["tool_execution_ids"] for r in charges] == ["", te_id]
    assert [r["approval_ids"] for r in charges] == ["", km["approval_id"]]

    ledger = http.get(f"/billing/ledger/?execution={execution_id}&kind=charge").text
    assert f'href="/billing/executions/{execution_id}/"' in ledger
    assert f'href="/billing/executions/{execution_id}/#tool-execution-{te_id}"' in ledger
    detail = http.get(f"/billing/executions/{execution_id}/").text
    assert f'id="tool-execution-{te_id}"' in detail and f'id="approval-{km["approval_id"]}"' in detail
    decision = re.search(rf'<tr id="tool-execution-{te_id}">(.*?)</tr>', detail, re.S).group(1)
    assert "approved" in decision and "grace" in decision and "customer asked for it" in decision
    assert "create_ticket" in detail and "up-model" in detail
    usage = list(csv.DictReader(io.StringIO(http.get("/billing/usage.csv").text)))
    assert [(r["execution_id"], r["approval_ids"]) for r in usage] == [(execution_id, km["approval_id"])]
    execution = Execution.objects.get(pk=execution_id)
    assert execution.credits_charged == sum(-int(r["amount"]) for r in charges)
    assert json.loads(resumed.text)["kitemesh"]["execution_id"] == execution_id
