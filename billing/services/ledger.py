"""Every change to a team's credits: lock the account row, check, write the ledger entry, update the
account — in one transaction. Nothing else writes CreditAccount."""

import functools
import math
import uuid
from dataclasses import dataclass
from decimal import Decimal

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from billing.models import CreditAccount, Hold, LedgerEntry
from chat.errors import InsufficientCredits, InvalidRequest
from core.models import Execution, Team
from kitemesh_site.sql import (
    db_value,
    for_update,
    insert_derived,
    insert_select,
    saved,
    sql_count,
    sql_insert,
    sql_rows,
)


def credits_round(exact: Decimal) -> int:
    """The SPEC's single rounding: a request's exact cost, rounded up once."""
    return math.ceil(exact)


@dataclass
class _Account:
    """A locked CreditAccount's figures, without building the model (this runs on every request)."""

    team_id: int
    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


def _account_lock(team_id: int) -> _Account:
    """Lock the team's account row for the rest of the caller's transaction (the only lock billing takes)."""
    rows = sql_rows(f"SELECT balance, held FROM billing_creditaccount WHERE team_id = %s{for_update()}", [team_id])
    if not rows:
        CreditAccount.objects.get_or_create(team_id=team_id)  # a team made outside apply_config
        return _account_lock(team_id)
    return _Account(team_id, *rows[0])


# Moves `amount` into `held` when the team has it available, locking the row; (amount, team, amount).
_RESERVE_WHERE = "UPDATE billing_creditaccount SET held = held + %s WHERE team_id = %s AND balance - held >= %s"
_RESERVE_RETURNING = " RETURNING balance, held"
_RESERVE = _RESERVE_WHERE + _RESERVE_RETURNING
HOLD_REFUSAL = "This request may cost up to {amount} credits; the team has {available} available."


def _account_reserve(team_id: int, amount: int, refusal: str) -> _Account:
    """Move `amount` into `held` when the team has it available, in one statement that also locks the
    row for the rest of the caller's transaction; the account after it. InsufficientCredits otherwise."""
    rows = sql_rows(_RESERVE, [amount, team_id, amount])
    if not rows:
        raise _refused(team_id, amount, refusal)
    return _Account(team_id, *rows[0])


def _refused(team_id: int, amount: int, refusal: str) -> InsufficientCredits:
    """`refusal` formatted with the amount and what is available."""
    available = max(_account_lock(team_id).available, 0)  # (creating a missing account)
    return InsufficientCredits(refusal.format(amount=amount, available=available))


def _hold_entry(account: _Account, execution: Execution, amount: int) -> None:
    """Record a reservation `_account_reserve` has applied to `account`."""
    kind, after = LedgerEntry.Kind.HOLD, {"balance_after": account.balance, "held_after": account.held}
    _entry_insert(LedgerEntry(team_id=account.team_id, kind=kind, amount=amount, execution=execution, **after))


def _account_move(team_id: int, *, balance: int = 0, held: int = 0) -> _Account:
    """Apply `balance`/`held` deltas to the team's account, locking its row for the rest of the caller's
    transaction; the account after them (the caller records them in the ledger)."""
    rows = sql_rows(
        "UPDATE billing_creditaccount SET balance = balance + %s, held = held + %s WHERE team_id = %s"
        " RETURNING balance, held",
        [balance, held, team_id],
    )
    return _Account(team_id, *rows[0])


def _account_charge(team_id: int, charge: int, hold_amount: int) -> _Account | None:
    """Release a hold of `hold_amount` and take `charge`, when what other holds leave covers it (as it does
    when the hold covered the charge): one statement that locks the row; the account after it, or None."""
    rows = sql_rows(
        "UPDATE billing_creditaccount SET balance = balance - %s, held = held - %s"
        " WHERE team_id = %s AND balance - held + %s >= %s RETURNING balance, held",
        [charge, hold_amount, team_id, hold_amount, charge],
    )
    return _Account(team_id, *rows[0]) if rows else None


def _entry_insert(entry: LedgerEntry) -> LedgerEntry:
    sql_insert([entry])
    return entry


def _entry_write(team_id: int, *, kind: str, amount: int, balance: int = 0, held: int = 0, **fields) -> LedgerEntry:
    """Apply `balance`/`held` deltas to the team's account and record them."""
    account = _account_move(team_id, balance=balance, held=held)
    entry = LedgerEntry(
        team_id=team_id,
        kind=kind,
        amount=amount,
        balance_after=account.balance,
        held_after=account.held,
        **fields,
    )
    return _entry_insert(entry)


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
    return _entry_write(team.pk, kind=kind, amount=amount, balance=amount, reason=reason, actor=actor)


def hold_create(*, execution: Execution, amount: int) -> Hold:
    """Reserve `amount` for the execution, or raise InsufficientCredits. Runs inside the caller's
    transaction (the one that creates the execution), taking the account lock."""
    account = _account_reserve(execution.team_id, amount, HOLD_REFUSAL)
    hold = Hold(team_id=execution.team_id, execution=execution, amount=amount)
    sql_insert([hold])
    _hold_entry(account, execution, amount)
    return hold


def hold_settle(*, hold: Hold, cost: Decimal) -> int:
    """Release the hold and charge the execution's cost, rounded up once; returns the credits charged.
    Runs inside the caller's transaction. The charge is capped at what other holds leave available, so
    the balance never goes below zero and never eats another request's reservation (the hold covered
    the worst case, so a cap only bites when an upstream ignored max_tokens)."""
    if not _hold_close(hold):
        return 0  # settled already: a second settle must not charge twice
    charge = credits_round(cost)
    account = _account_charge(hold.team_id, charge, hold.amount)
    if account is None:  # an upstream ignored max_tokens, or an adjustment took what the hold counted on
        charge = max(min(charge, _account_lock(hold.team_id).available + hold.amount), 0)
        account = _account_move(hold.team_id, balance=-charge, held=-hold.amount)
    common = {"team_id": hold.team_id, "held_after": account.held, "execution_id": hold.execution_id}
    kinds = LedgerEntry.Kind
    entries = [LedgerEntry(kind=kinds.RELEASE, amount=hold.amount, balance_after=account.balance + charge, **common)]
    if charge:
        entries.append(LedgerEntry(kind=kinds.CHARGE, amount=-charge, balance_after=account.balance, **common))
    sql_insert(entries)  # one statement for both
    return charge


def _hold_close(hold: Hold) -> bool:
    """active → settled, once: False when it was settled already."""
    return bool(
        sql_count(
            "UPDATE billing_hold SET status = %s, settled_at = %s WHERE id = %s AND status = %s",
            [Hold.Status.SETTLED, db_value(Hold, "settled_at", timezone.now()), hold.pk, Hold.Status.ACTIVE],
        )
    )


def hold_reserve(*, execution: Execution, hold: Hold | None, amount: int) -> Hold:
    """Reserve `amount` more for a running execution: extend its hold, or open one. Raises
    InsufficientCredits when the team cannot cover it. Owns its transaction (one step of a run)."""
    with transaction.atomic(durable=True):
        if hold is None:
            return hold_create(execution=execution, amount=amount)
        refusal = "The next step may cost up to {amount} credits; the team has {available} available."
        account = _account_reserve(execution.team_id, amount, refusal)
        sql_count("UPDATE billing_hold SET amount = amount + %s WHERE id = %s", [amount, hold.pk])
        hold.amount += amount
        _hold_entry(account, execution, amount)
        return hold


def hold_release(*, hold: Hold) -> bool:
    """Release a hold without charging; False when it was settled already. Runs inside the caller's
    transaction, taking the account lock."""
    updated = _hold_close(hold)
    if updated:
        _entry_write(
            hold.team_id,
            kind=LedgerEntry.Kind.RELEASE,
            amount=hold.amount,
            held=-hold.amount,
            execution_id=hold.execution_id,
        )
    return bool(updated)


def holds_release(*, execution_id: uuid.UUID) -> int:
    """Release the execution's active holds (a paused run's: what its approval's tools would cost);
    how many. Runs inside the caller's transaction."""
    active = Hold.objects.filter(execution_id=execution_id, status=Hold.Status.ACTIVE)
    return sum(hold_release(hold=hold) for hold in active)


# --- The request path on PostgreSQL: each of its transactions one statement (kitemesh_site.sql) -----


def execution_insert_with_hold(*, execution: Execution, amount: int, gate: tuple[str, list]) -> Hold | None:
    """Insert a new execution and reserve its hold, as sql_insert and hold_create would, in one statement,
    when the query `gate` (SQL, parameters) returns a row: None, and nothing written, when it returns none.
    Nothing is written either when the team cannot cover `amount` (InsufficientCredits).

    Its commit does not wait for the WAL flush (synchronous_commit off for this transaction alone): it is
    seen by every other transaction at once, as any commit, and the request's settlement, which waits for
    its own flush, makes it durable too. A server crash in between loses a request that was in flight, with
    its hold: what the stale-hold sweep would have done with it (release it, charge nothing)."""
    team_id = execution.team_id
    hold = Hold(team_id=team_id, execution=execution, amount=amount)
    gate_sql, gate_params = gate
    execution_sql, execution_params = insert_select(execution, "account")
    hold_sql, hold_params = insert_select(hold, "account")
    rows = sql_rows(
        f"WITH gate AS ({gate_sql}), account AS ({_RESERVE_WHERE} AND EXISTS (SELECT FROM gate){_RESERVE_RETURNING}),"
        f" execution AS ({execution_sql}), hold AS ({hold_sql} RETURNING {_HOLD_RETURNING}),"
        f" entry AS ({_hold_entry_sql()})"
        f" SELECT EXISTS (SELECT FROM gate), (SELECT id FROM hold) FROM ({_COMMIT_WITHOUT_FLUSH}) AS commit_mode",
        [*gate_params, amount, team_id, amount, *execution_params, *hold_params],
    )
    opened, hold.pk = rows[0]
    if not opened:
        return None
    if hold.pk is None:
        raise _refused(team_id, amount, HOLD_REFUSAL)
    saved([execution, hold])
    return hold


_HOLD_RETURNING = "id, team_id, execution_id, amount, created_at"


@functools.cache
def _hold_entry_sql() -> str:
    """The hold's ledger entry, made from the hold and account rows of execution_insert_with_hold."""
    return insert_derived(
        LedgerEntry,
        "hold, account",
        _entry_columns(
            kind=f"'{LedgerEntry.Kind.HOLD}'",
            amount="hold.amount",
            balance_after="account.balance",
            held_after="account.held",
            row="hold",
        ),
    )


def _entry_columns(
    *, kind: str, amount: str, balance_after: str, held_after: str, row: str
) -> tuple[tuple[str, str], ...]:
    """A request's ledger entry as SQL expressions, for insert_derived: its team, execution and time from
    the team_id, execution_id and created_at of the WITH query `row`; no reason, no actor (as the ORM
    writes an entry that names none)."""
    return (
        ("team_id", f"{row}.team_id"),
        ("kind", kind),
        ("amount", amount),
        ("balance_after", balance_after),
        ("held_after", held_after),
        ("execution_id", f"{row}.execution_id"),
        ("reason", "''"),
        ("actor_id", "NULL"),
        ("created_at", f"{row}.created_at"),
    )


# synchronous_commit off for the transaction of the statement that selects it, and for nothing after it.
_COMMIT_WITHOUT_FLUSH = "SELECT set_config('synchronous_commit', 'off', true)"

# What the settlement of hold_settle_with charged, for the writes that run in its statement.
SETTLED_CHARGE = "COALESCE((SELECT charge FROM settled), 0)"
# The release entry, then the charge entry when there is a charge, from the account as settled.
_SETTLED_ENTRIES = (
    "settled CROSS JOIN LATERAL (VALUES (1, 'release', settled.amount, settled.balance + settled.charge),"
    " (2, 'charge', -settled.charge, settled.balance)) AS e(n, kind, amount, balance_after)"
    " WHERE e.n = 1 OR settled.charge > 0 ORDER BY e.n"
)


@functools.cache
def _settled_entries_sql() -> str:
    return insert_derived(
        LedgerEntry,
        _SETTLED_ENTRIES,
        _entry_columns(
            kind="e.kind", amount="e.amount", balance_after="e.balance_after", held_after="settled.held", row="settled"
        ),
    )


def hold_settle_with(*, hold: Hold, cost: Decimal, writes: list[tuple[str, list]]) -> int:
    """hold_settle in one statement that also runs the caller's `writes` (SQL and parameters), which may
    read the credits charged as SETTLED_CHARGE. The charge is capped as hold_settle caps it; a hold
    settled already is charged nothing. Returns the credits charged."""
    settled_at = db_value(Hold, "settled_at", timezone.now())
    statement = (
        "WITH closed AS (UPDATE billing_hold SET status = %s, settled_at = %s WHERE id = %s AND status = %s"
        " RETURNING amount, execution_id, settled_at),"
        f" locked AS (SELECT balance, held FROM billing_creditaccount WHERE team_id = %s{for_update()}),"
        " priced AS (SELECT closed.amount, closed.execution_id, closed.settled_at,"
        " GREATEST(LEAST(%s, locked.balance - locked.held + closed.amount), 0) AS charge FROM closed, locked),"
        " settled AS (UPDATE billing_creditaccount SET balance = balance - priced.charge,"
        " held = held - priced.amount FROM priced WHERE team_id = %s RETURNING team_id, balance, held,"
        " priced.amount, priced.charge, priced.execution_id, priced.settled_at AS created_at),"
        f" entries AS ({_settled_entries_sql()})"
        + "".join(f", write{i} AS ({sql})" for i, (sql, _) in enumerate(writes))
        + " SELECT charge FROM settled"
    )
    params = [Hold.Status.SETTLED, settled_at, hold.pk, Hold.Status.ACTIVE, hold.team_id, credits_round(cost)]
    params += [hold.team_id, *(p for _, write_params in writes for p in write_params)]
    rows = sql_rows(statement, params)
    return rows[0][0] if rows else 0
