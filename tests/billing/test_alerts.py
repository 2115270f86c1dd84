"""Credit alerts (SPEC §6, Alerts): a team's `alert_below` sends `credits.low` once per crossing (armed again
when its credits are back at the line), a limited token sends `token.credit_limit` at 80 % and 100 % of its
limit, once each per period; both are signed and delivered to the team's webhook by the worker, as approval
events are (recorded by the sweep); the finance page shows teams under their line and tokens near their
limit."""

import datetime
import io
import json
from pathlib import Path

import httpx
import pytest
from django.core.management import call_command
from django.test import Client

from billing.alerts import credit_alerts_check
from billing.ledger import credits_grant
from billing.models import LedgerEntry
from chat.services.config import ConfigError, config_apply
from chat.services.tokens import token_create
from chat.services.vault import secret_set
from core.models import ApiToken, Team, WebhookDelivery
from tests.approvals.test_webhooks import WEBHOOK_SECRET, fast_webhooks, receiver, signed  # noqa: F401
from tests.billing.test_pages import person
from tests.conftest import Setup
from tests.support.tool_server import ToolServer
from tests.support.upstream import Reply
from tests.support.worker import tasks_run_until


@pytest.fixture
def alerting(setup: Setup, receiver: ToolServer, fast_webhooks) -> Setup:  # noqa: F811
    """acme (1,000 credits) with its own webhook, signed with its vault secret."""
    team = setup.team
    team.webhook_url = f"{receiver.url}/hooks/credits"
    team.webhook_secret = secret_set(team=team, name="team-hook", value=WEBHOOK_SECRET)
    team.save(update_fields=["webhook_url", "webhook_secret"])
    return setup


def delivered(event_type: str) -> list[dict]:
    """The worker's queue run until every recorded event of `event_type` is delivered; their bodies."""
    deliveries = WebhookDelivery.objects.filter(event_type=event_type)
    tasks_run_until(lambda: not deliveries.filter(status=WebhookDelivery.Status.PENDING).exists() or None)
    assert set(deliveries.values_list("status", flat=True)) <= {"delivered"}
    return [json.loads(body) for body in deliveries.order_by("created_at").values_list("body", flat=True)]


def adjust(team: Team, amount: int) -> None:
    credits_grant(team=team, amount=amount, reason="test", kind=LedgerEntry.Kind.ADJUSTMENT)


def test_credits_low_is_sent_once_per_crossing(alerting: Setup, receiver: ToolServer):  # noqa: F811
    team = alerting.team
    Team.objects.filter(pk=team.pk).update(alert_below=500)

    assert credit_alerts_check() == 0  # 1,000 available
    adjust(team, -600)  # 400 available: below
    assert credit_alerts_check() == 1
    adjust(team, -100)
    assert credit_alerts_check() == 0  # still below: not again
    adjust(team, +300)  # 600: above, armed again
    assert credit_alerts_check() == 0
    adjust(team, -200)  # 400: below again
    assert credit_alerts_check() == 1

    events = delivered("credits.low")
    assert [(e["type"], e["team"], e["alert_below"], e["available"]) for e in events] == [
        ("credits.low", "acme", 500, 400),
        ("credits.low", "acme", 500, 400),
    ]
    assert len(receiver.requests) == 2 and all(signed(r) for r in receiver.requests)
    assert {r.headers["x-kitemesh-event"] for r in receiver.requests} == {"credits.low"}


def test_a_token_sends_its_80_then_100_percent_once_each_per_period(
    live,
    alerting: Setup,
    upstream,
    receiver: ToolServer,  # noqa: F811
):
    token, raw = token_create(team=alerting.team, name="ci", credit_limit=10, credit_period="month")
    # The upstream ignores max_tokens: the run is charged ceil(0.1 + 8) = 9 credits, 90 % of the limit.
    upstream.queue(Reply(content="Long.", usage={"prompt_tokens": 10, "completion_tokens": 400}))
    response = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": alerting.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100},
        headers={"Authorization": f"Bearer {raw}"},
        timeout=30,
    )
    assert response.json()["kitemesh"]["credits_charged"] == 9

    assert credit_alerts_check() == 1  # 80 %
    assert credit_alerts_check() == 0
    ApiToken.objects.filter(pk=token.pk).update(credit_limit=9)  # 9 of 9: 100 %
    assert credit_alerts_check() == 1
    assert credit_alerts_check() == 0
    last_month = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)
    ApiToken.objects.filter(pk=token.pk).update(credit_alert_period_start=last_month)  # a new period
    assert credit_alerts_check() == 1

    events = delivered("token.credit_limit")
    assert [(e["token"], e["percent"], e["spent"], e["credit_limit"]) for e in events] == [
        ("ci", 80, 9, 10),
        ("ci", 100, 9, 9),
        ("ci", 100, 9, 9),
    ]
    assert all(signed(r) for r in receiver.requests)


def test_the_sweep_records_them(alerting: Setup):
    Team.objects.filter(pk=alerting.team.pk).update(alert_below=2000)
    out = io.StringIO()

    call_command("sweep", stdout=out)

    assert out.getvalue().strip().endswith("recorded 1 credit alert(s)")
    assert WebhookDelivery.objects.filter(event_type="credits.low").count() == 1


def test_a_team_without_a_webhook_moves_its_state_and_sends_nothing(setup: Setup):
    Team.objects.filter(pk=setup.team.pk).update(alert_below=2000)

    assert credit_alerts_check() == 0
    assert Team.objects.get(pk=setup.team.pk).credits_low_alerted is True
    assert not WebhookDelivery.objects.exists()


def test_the_finance_page_shows_teams_under_their_line_and_tokens_near_their_limit(live, alerting: Setup, upstream):
    Team.objects.filter(pk=alerting.team.pk).update(alert_below=2000)
    _, raw = token_create(team=alerting.team, name="near", credit_limit=10, credit_period="day")
    upstream.queue(Reply(content="Long.", usage={"prompt_tokens": 10, "completion_tokens": 400}))
    httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": alerting.model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 100},
        headers={"Authorization": f"Bearer {raw}"},
        timeout=30,
    )
    client = Client()
    client.force_login(person("fin", alerting.team))

    page = client.get("/billing/").content.decode()

    assert "below the line" in page and "9 of 10" in page and "near its limit" in page


CONFIG = """
teams: [{name: acme, credits: 10, alert_below: 5, webhook_url: "https://hooks.example/kitemesh",
         webhook_secret: hook-key}]
secrets: [{team: acme, name: hook-key, value: "s3cret"}]
"""


def test_config_sets_a_teams_alert_line_and_webhook(db, tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(CONFIG)

    config_apply(path)
    config_apply(path)  # again: nothing changes

    team = Team.objects.get(name="acme")
    assert (team.alert_below, team.webhook_url, team.webhook_secret.name) == (
        5,
        "https://hooks.example/kitemesh",
        "hook-key",
    )
    path.write_text(CONFIG.replace("webhook_secret: hook-key", "credits: 1"))
    with pytest.raises(ConfigError, match="webhook_secret"):
        config_apply(path)
