"""Credit alerts (SPEC §6, Alerts), to a team's own webhook (`webhook_url`, signed with `webhook_secret`) and
delivered as approval events are (core.webhooks):

- `credits.low` once when the team's available credits (balance − held) fall below its `alert_below`; armed
  again when they are back at or above it;
- `token.credit_limit` when a limited token's charges in its period reach 80 %, then 100 %, of its limit
  (once each per period; a token that jumps past both gets the 100 % one).

The worker's sweep checks them (every KITEMESH_SWEEP_SECONDS): the request path pays nothing for alerts, and
an alert is recorded in the transaction that moves its state, so it is sent once, whatever crashes."""

import secrets

from django.db import transaction
from django.utils import timezone

from billing.models import CreditAccount
from billing.token_limits import EVER, period_start, token_spend
from core.models import ApiToken, Team
from core.timestamps import iso
from core.webhooks import signing_secret, webhook_record

CREDITS_LOW = "credits.low"
TOKEN_CREDIT_LIMIT = "token.credit_limit"
_LEVELS = (100, 80)  # percent of a token's limit that sends an alert


def credit_alerts_check() -> int:
    """Record the alerts whose line was crossed since the last check; how many."""
    sent = 0
    for team in Team.objects.filter(alert_below__isnull=False).select_related("webhook_secret"):
        sent += _team_check(team)
    watched = ApiToken.objects.filter(credit_limit__isnull=False, revoked_at=None, team__webhook_url__gt="")
    for token in watched.select_related("team__webhook_secret"):
        sent += _token_check(token)
    return sent


@transaction.atomic
def _team_check(team: Team) -> int:
    account = CreditAccount.objects.filter(team=team).first()
    available = account.available if account else 0
    low = available < team.alert_below
    moved = Team.objects.filter(pk=team.pk, credits_low_alerted=not low).update(credits_low_alerted=low)
    if not (moved and low):
        return 0
    payload = _event(CREDITS_LOW, team) | {
        "alert_below": team.alert_below,
        "balance": account.balance if account else 0,
        "held": account.held if account else 0,
        "available": available,
    }
    return _send(team, payload)


@transaction.atomic
def _token_check(token: ApiToken) -> int:
    spend = token_spend(token)
    if spend.credit_limit is None:
        return 0
    percent = 100 if spend.credit_limit == 0 else spend.spent * 100 // spend.credit_limit
    level = next((level for level in _LEVELS if percent >= level), 0)
    start = period_start(spend.credit_period, timezone.now()) or EVER
    reached = token.credit_alert_percent if token.credit_alert_period_start == start else 0
    if level <= reached:
        return 0
    moved = ApiToken.objects.filter(
        pk=token.pk,
        credit_alert_percent=token.credit_alert_percent,
        credit_alert_period_start=token.credit_alert_period_start,
    ).update(credit_alert_percent=level, credit_alert_period_start=start)
    if not moved:
        return 0
    payload = _event(TOKEN_CREDIT_LIMIT, token.team) | {
        "token": token.name,
        "percent": level,
        "credit_limit": spend.credit_limit,
        "credit_period": spend.credit_period,
        "spent": spend.spent,
        "resets_at": iso(spend.resets_at),
    }
    return _send(token.team, payload)


def _event(event_type: str, team: Team) -> dict:
    return {
        "id": "evt_" + secrets.token_hex(12),
        "type": event_type,
        "created_at": iso(timezone.now()),
        "team": team.name,
    }


def _send(team: Team, payload: dict) -> int:
    """Record the event for the team's webhook (nothing without one or a usable secret: the state still
    moves, so a team that adds a webhook later is not flooded with old crossings)."""
    secret = signing_secret(team.webhook_secret, team.pk)
    if not team.webhook_url or secret is None:
        return 0
    webhook_record(payload=payload, url=team.webhook_url, secret=secret, label=f"{team.name} (team)")
    return 1
