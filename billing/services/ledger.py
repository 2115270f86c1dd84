"""Every change to a team's credits: lock the account row, check, write the ledger entry, update the
account — in one transaction. Nothing else writes CreditAccount."""

import math
from datetime import timedelta
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from billing.models import CreditAccount, Hold, LedgerEntry
from chat.errors import InsufficientCredits, InvalidRequest
from chat.models import Execution, Team


def credits_round(exact: Decimal) -> int:
    """The SPEC's single rounding: a request's exact cost, rounded up once."""
    return math.ceil(exact)


def _account_lock(team_id: int) -> CreditAccount:
    """Lock the team's account row for the rest of the caller's transaction (the only lock billing takes)."""
    try:
        return CreditAccount.objects.select_for_update().get(team_id=team_id)
    except CreditAccount.DoesNotExist:
        CreditAccount.objects.get_or_create(team_id=team_id)  # a team made outside apply_config
        return CreditAccount.objects.select_for_update().get(team_id=team_id)


def _entry_write(
    account: CreditAccount, *, kind: str, amount: int, balance: int = 0, held: int = 0, **fields
) -> LedgerEntry:
    """Apply `balance`/`held` deltas to a locked account and record them. Assumes _account_lock."""
    CreditAccount.objects.filter(pk=account.pk).update(balance=F("balance") + balance, held=F("held") + held)
    account.balance += balance
    account.held += held
    return LedgerEntry.objects.create(
        team_id=account.team_id,
        kind=kind,
        amount=amount,
        balance_after=account.balance,
        held_after=account.held,
        **fields,
    )


@transaction.atomic
def credits_grant(
    *, team: Team, amount: int, reason: str, actor: AbstractBaseUser | None = None, kind: str = LedgerEntry.Kind.GRANT
) -> LedgerEntry:
    """Add credits (grant, refund) or move them either way (adjustment, which needs a reason)."""
    if kind == LedgerEntry.Kind.ADJUSTMENT:
        if not reason.strip():
            raise InvalidRequest("An adjustment needs a reason.", param="reason")
    elif amount <= 0:
        raise InvalidRequest("A grant must be a positive number of credits.", param="amount")
    account = _account_lock(team.pk)
    if account.balance + amount < 0:
        raise InsufficientCredits(f"The adjustment would take the balance below zero ({account.balance}).")
    return _entry_write(account, kind=kind, amount=amount, balance=amount, reason=reason, actor=actor)


def hold_create(*, execution: Execution, amount: int) -> Hold:
    """Reserve `amount` for the execution, or raise InsufficientCredits. Runs inside the caller's
    transaction (the one that creates the execution), taking the account lock."""
    account = _account_lock(execution.team_id)
    if account.available < amount:
        raise InsufficientCredits(
            f"This request may cost up to {amount} credits; the team has {max(account.available, 0)} available."
        )
    hold = Hold.objects.create(team_id=execution.team_id, execution=execution, amount=amount)
    _entry_write(account, kind=LedgerEntry.Kind.HOLD, amount=amount, held=amount, execution=execution)
    return hold


def hold_settle(*, hold: Hold, cost: Decimal) -> int:
    """Release the hold and charge the execution's cost, rounded up once; returns the credits charged.
    Runs inside the caller's transaction. The charge is capped at what other holds leave available, so
    the balance never goes below zero and never eats another request's reservation (the hold covered
    the worst case, so a cap only bites when an upstream ignored max_tokens)."""
    updated = Hold.objects.filter(pk=hold.pk, status=Hold.Status.ACTIVE).update(
        status=Hold.Status.SETTLED, settled_at=timezone.now()
    )
    if not updated:
        return 0  # settled already: a second settle must not charge twice
    account = _account_lock(hold.team_id)
    charge = max(min(credits_round(cost), account.available + hold.amount), 0)
    CreditAccount.objects.filter(pk=account.pk).update(balance=F("balance") - charge, held=F("held") - hold.amount)
    released_held = account.held - hold.amount
    entries = [
        LedgerEntry(
            team_id=hold.team_id,
            kind=LedgerEntry.Kind.RELEASE,
            amount=hold.amount,
            balance_after=account.balance,
            held_after=released_held,
            execution_id=hold.execution_id,
        )
    ]
    if charge:
        entries.append(
            LedgerEntry(
                team_id=hold.team_id,
                kind=LedgerEntry.Kind.CHARGE,
                amount=-charge,
                balance_after=account.balance - charge,
                held_after=released_held,
                execution_id=hold.execution_id,
            )
        )
    LedgerEntry.objects.bulk_create(entries)
    return charge


def hold_reserve(*, execution: Execution, hold: Hold | None, amount: int) -> Hold:
    """Reserve `amount` more for a running execution: extend its hold, or open one. Raises
    InsufficientCredits when the team cannot cover it. Owns its transaction (one step of a run)."""
    with transaction.atomic(durable=True):
        if hold is None:
            return hold_create(execution=execution, amount=amount)
        account = _account_lock(execution.team_id)
        if account.available < amount:
            raise InsufficientCredits(
                f"The next step may cost up to {amount} credits; the team has {max(account.available, 0)} available."
            )
        Hold.objects.filter(pk=hold.pk).update(amount=F("amount") + amount)
        hold.amount += amount
        _entry_write(account, kind=LedgerEntry.Kind.HOLD, amount=amount, held=amount, execution=execution)
        return hold


def hold_release(*, hold: Hold) -> bool:
    """Release a hold without charging; False when it was settled already. Runs inside the caller's
    transaction, taking the account lock."""
    updated = Hold.objects.filter(pk=hold.pk, status=Hold.Status.ACTIVE).update(
        status=Hold.Status.SETTLED, settled_at=timezone.now()
    )
    if updated:
        account = _account_lock(hold.team_id)
        _entry_write(
            account,
            kind=LedgerEntry.Kind.RELEASE,
            amount=hold.amount,
            held=-hold.amount,
            execution_id=hold.execution_id,
        )
    return bool(updated)


def holds_release_stale(*, older_than_seconds: int) -> int:
    """Release the holds of runs that died without settling (a worker killed mid-request, a failed final
    write): active holds older than any request can last, whose execution is still marked running.
    Paused runs keep theirs until their approval expires. Returns how many were released."""
    cutoff = timezone.now() - timedelta(seconds=older_than_seconds)
    stale = Hold.objects.filter(status=Hold.Status.ACTIVE, created_at__lt=cutoff, execution__status="running")
    released = 0
    for hold in stale.iterator():
        with transaction.atomic(durable=True):
            released += hold_release(hold=hold)
    return released
