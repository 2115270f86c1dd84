"""Credit limits per token (SPEC §6): what a token's runs were charged in its period (a UTC day, a UTC month,
or ever) plus what they hold now never goes past the token's `credit_limit`. The ledger checks it inside the
transaction that takes a hold, under the token's row lock, so concurrent requests of one token never spend
together more than the limit. A token without a limit costs no statement."""

import datetime
from dataclasses import dataclass

from django.utils import timezone

from billing.models import Hold, LedgerEntry
from core.errors import InsufficientCredits
from core.models import ApiToken, Execution
from core.sql import db_value, for_update, sql_rows, table

EVER = datetime.datetime(2000, 1, 1, tzinfo=datetime.UTC)  # before any charge: the start of a `total` period
LIMIT_REFUSAL = (
    "This request may cost up to {amount} credits; the API token {name!r} has {left} of its {limit} credits"
    " ({period}) left."
)


@dataclass
class TokenSpend:
    """A token's use of its limit (without one: `credit_limit` and `credit_period` None, everything it
    was ever charged)."""

    name: str
    credit_limit: int | None
    credit_period: str | None
    spent: int  # charged to its runs in the current period
    held: int  # held by its runs now
    resets_at: datetime.datetime | None  # when the period starts again (never, for `total`)

    @property
    def near_limit(self) -> bool:
        """At 80 % of its limit or more (token.credit_limit alerts are sent from there)."""
        return self.credit_limit is not None and self.spent * 100 >= 80 * self.credit_limit

    @property
    def left(self) -> int:
        return max((self.credit_limit or 0) - self.spent - self.held, 0)


def period_start(period: str, now: datetime.datetime) -> datetime.datetime | None:
    """The start of the period that contains `now` (UTC calendar days and months); None for `total`."""
    now = now.astimezone(datetime.UTC)
    if period == ApiToken.CreditPeriod.DAY:
        return now.replace(hour=0, minute=0, second=0, microsecond=0)
    if period == ApiToken.CreditPeriod.MONTH:
        return now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    return None


def period_end(period: str, now: datetime.datetime) -> datetime.datetime | None:
    start = period_start(period, now)
    if start is None:
        return None
    if period == ApiToken.CreditPeriod.DAY:
        return start + datetime.timedelta(days=1)
    return (start + datetime.timedelta(days=32)).replace(day=1)


def token_spend(token: ApiToken, *, lock: bool = False) -> TokenSpend:
    """The token's limit and its use now, read from its row (locked for the caller's transaction with
    `lock`)."""
    name, limit, period = sql_rows(
        f"SELECT name, credit_limit, credit_period FROM {table(ApiToken)} WHERE id = %s"
        + (for_update() if lock else ""),
        [token.pk],
    )[0]
    if limit is None:
        period = None
    now = timezone.now()
    start = period_start(period, now) if period else None
    since = [db_value(LedgerEntry, "created_at", start)] if start else []
    spent, held = sql_rows(_use_statement(since=start is not None), [token.pk, *since, token.pk])[0]
    # PostgreSQL sums integers as numeric: ints here, for JSON and arithmetic alike.
    spent, held = -int(spent or 0), int(held or 0)
    return TokenSpend(name, limit, period, spent, held, period_end(period, now) if period else None)


def _use_statement(*, since: bool) -> str:
    """(charges of the token's runs, in the period when `since`; the token's active holds)."""
    runs = f"SELECT id FROM {table(Execution)} WHERE token_id = %s"
    period = " AND created_at >= %s" if since else ""
    return (
        f"SELECT (SELECT SUM(amount) FROM {table(LedgerEntry)} WHERE kind = '{LedgerEntry.Kind.CHARGE}'"
        f" AND execution_id IN ({runs}){period}),"
        f" (SELECT SUM(amount) FROM {table(Hold)} WHERE status = '{Hold.Status.ACTIVE}'"
        f" AND execution_id IN ({runs}))"
    )


def token_limited(execution: Execution) -> bool:
    """Whether the run's token has a credit limit (from the token the run was started with, when it is at
    hand; else its row)."""
    if execution.token_id is None:
        return False
    if Execution.token.is_cached(execution):
        return execution.token.credit_limit is not None
    return bool(
        sql_rows(f"SELECT 1 FROM {table(ApiToken)} WHERE id = %s AND credit_limit IS NOT NULL", [execution.token_id])
    )


def token_limit_check(execution: Execution, amount: int) -> None:
    """Before a hold of `amount` more for the run: lock its token's row and refuse (402 `token_credit_limit`)
    when the token's charges in its period plus its holds plus `amount` would pass its limit. Runs inside the
    caller's transaction, before the account is locked (lock order: token, then account)."""
    if amount <= 0 or not token_limited(execution):
        return
    spend = token_spend(ApiToken(pk=execution.token_id), lock=True)
    if spend.credit_limit is None or spend.spent + spend.held + amount <= spend.credit_limit:
        return
    raise InsufficientCredits(
        LIMIT_REFUSAL.format(
            amount=amount, name=spend.name, left=spend.left, limit=spend.credit_limit, period=spend.credit_period
        ),
        code="token_credit_limit",
    )
