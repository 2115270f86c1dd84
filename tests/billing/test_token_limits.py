"""Credit limits per token (SPEC §6): `issue_token --credit-limit N --credit-period day|month|total`; a request
whose hold would take the token's charges in the period plus its holds past the limit is 402
`token_credit_limit` with nothing called or held; parallel requests never spend more than the limit
together (PostgreSQL); GET /v1/credits and the finance page show the token's use."""

import datetime
import io
import threading

import httpx
import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection
from django.test import Client
from django.utils import timezone

from billing.models import Hold, LedgerEntry
from billing.token_limits import period_end, period_start
from chat.services.tokens import token_create
from core.models import ApiToken, Execution
from tests.billing.test_pages import person
from tests.conftest import Setup
from tests.support.helpers import credits

BODY = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100}


def limited(setup: Setup, limit: int, period: str = "total") -> dict[str, str]:
    """The headers of a new token of setup's team limited to `limit` credits per `period`."""
    _, raw = token_create(team=setup.team, name=f"limited-{period}-{limit}", credit_limit=limit, credit_period=period)
    return {"Authorization": f"Bearer {raw}"}


def complete(http: httpx.Client, setup: Setup, headers: dict) -> httpx.Response:
    return http.post("/v1/chat/completions", json={"model": setup.model, **BODY}, headers=headers)


def hold_size(http: httpx.Client, setup: Setup) -> int:
    """What one request of BODY holds (its worst case), read from the ledger of an unlimited token's run."""
    assert complete(http, setup, setup.headers).status_code == 200
    return LedgerEntry.objects.filter(team=setup.team, kind="hold").latest("id").amount


def test_issue_token_sets_the_limit_and_refuses_a_negative_one(db, setup: Setup):
    out = io.StringIO()
    call_command(
        "issue_token", "--team", "acme", "--name", "ci", "--credit-limit", "500", "--credit-period", "month", stdout=out
    )
    token = ApiToken.objects.get(name="ci")
    assert (token.credit_limit, token.credit_period) == (500, "month")
    with pytest.raises(CommandError, match="--credit-limit"):
        call_command("issue_token", "--team", "acme", "--name", "neg", "--credit-limit", "-1", stdout=out)


def test_a_request_past_the_limit_is_402_and_nothing_is_called_or_held(live, http, setup: Setup, upstream):
    hold = hold_size(http, setup)
    headers = limited(setup, hold - 1)
    calls, before = len(upstream.received), credits(http, setup)

    response = complete(http, setup, headers)

    assert response.status_code == 402, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == ("insufficient_credits", "token_credit_limit")
    assert f"{hold - 1} credits" in error["message"]
    assert len(upstream.received) == calls
    assert credits(http, setup) == before
    assert complete(http, setup, setup.headers).status_code == 200  # the team's other tokens go on


def test_charges_count_against_the_limit_until_the_period_ends(live, http, setup: Setup, upstream):
    hold = hold_size(http, setup)
    headers = limited(setup, hold, "day")
    first = complete(http, setup, headers)
    assert first.status_code == 200, first.text
    charged = first.json()["kitemesh"]["credits_charged"]
    assert charged >= 1

    # What is left (hold - charged) no longer covers another worst case…
    assert complete(http, setup, headers).json()["error"]["code"] == "token_credit_limit"
    # …until the charge belongs to an earlier day.
    yesterday = timezone.now() - datetime.timedelta(days=1)
    LedgerEntry.objects.filter(execution_id=first.json()["kitemesh"]["execution_id"]).update(created_at=yesterday)
    assert complete(http, setup, headers).status_code == 200


def test_get_credits_shows_the_tokens_use_of_its_limit(live, http, setup: Setup, upstream):
    headers = limited(setup, 400, "month")
    charged = complete(http, setup, headers).json()["kitemesh"]["credits_charged"]

    body = http.get("/v1/credits", headers=headers).json()

    now = timezone.now()
    assert body["token"] == {
        "name": "limited-month-400",
        "credit_limit": 400,
        "credit_period": "month",
        "spent": charged,
        "held": 0,
        "resets_at": period_end("month", now).isoformat().replace("+00:00", "Z"),
    }
    unlimited = http.get("/v1/credits", headers=setup.headers).json()["token"]
    assert (unlimited["name"], unlimited["credit_limit"], unlimited["credit_period"], unlimited["resets_at"]) == (
        "test",
        None,
        None,
        None,
    )


def test_the_finance_page_shows_each_limited_tokens_use(live, http, setup: Setup, upstream):
    headers = limited(setup, 300, "day")
    charged = complete(http, setup, headers).json()["kitemesh"]["credits_charged"]

    client = Client()
    client.force_login(person("fin", setup.team))
    page = client.get("/billing/").content.decode()

    assert "limited-day-300" in page and f"{charged} of 300" in page


def test_periods_are_utc_calendar_days_and_months():
    moment = datetime.datetime(2026, 12, 31, 23, 30, tzinfo=datetime.UTC)
    assert period_start("day", moment) == datetime.datetime(2026, 12, 31, tzinfo=datetime.UTC)
    assert period_end("day", moment) == datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)
    assert period_start("month", moment) == datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC)
    assert period_end("month", moment) == datetime.datetime(2027, 1, 1, tzinfo=datetime.UTC)
    assert period_start("total", moment) is None and period_end("total", moment) is None


def test_twenty_parallel_requests_never_spend_more_than_the_limit(live, setup: Setup, upstream):
    if connection.vendor != "postgresql":
        pytest.skip("row-lock races need PostgreSQL (SQLite serialises every writer)")
    with httpx.Client(base_url=live.url, timeout=30) as http:
        hold = hold_size(http, setup)
    limit = 3 * hold
    headers = limited(setup, limit)
    barrier, statuses = threading.Barrier(20), []

    def request() -> None:
        with httpx.Client(base_url=live.url, timeout=60) as client:
            barrier.wait()
            statuses.append(complete(client, setup, headers).status_code)

    threads = [threading.Thread(target=request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    token = ApiToken.objects.get(name=f"limited-total-{limit}")
    runs = Execution.objects.filter(token=token)
    spent = -sum(LedgerEntry.objects.filter(execution__in=runs, kind="charge").values_list("amount", flat=True))
    assert spent <= limit
    assert not Hold.objects.filter(execution__in=runs, status="active").exists()
    assert statuses.count(200) >= 3 and statuses.count(402) >= 1, statuses
    assert sorted(set(statuses)) == [200, 402]
