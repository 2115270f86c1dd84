"""The money path on PostgreSQL, each unit one statement (billing.ledger chooses it there): a data-modifying
WITH runs its writes in one round trip, as one transaction, with no BEGIN and COMMIT of its own. Same rules,
rows and refusals as TransactionLedger (the ledger tests run against both); the run's own rows (the
execution, its steps) are written from the instances the caller built, columns from their models' _meta.

Measured (`python bench/floors.py --rounds 3 --seconds 2 --count 1000`, a start and a settlement back to back,
2-vCPU VM): 2.9 ms of wall time and 1.3 ms of CPU, against 5.3 ms and 2.9 ms for TransactionLedger's
statements. An approval's pause and resume: 5 + 12 statements against 7 + 16, and 7.4 against 8.0 ms of the
worker's CPU per round trip (tests/chat/test_query_counts.py counts them)."""

import functools

from django.utils import timezone

from billing.ledger import (
    HOLD_REFUSAL,
    SETTLED_FIELDS,
    Settlement,
    TransactionLedger,
    credits_round,
    refused,
    reserve_statement,
    usage_add,
)
from billing.models import CreditAccount, Hold, LedgerEntry
from billing.token_limits import token_limited
from core.models import Execution, Step
from core.sql import (
    Guard,
    db_value,
    for_update,
    insert_derived,
    insert_select,
    insert_values,
    saved,
    sql_rows,
    table,
    update_statement,
)

# synchronous_commit off for the transaction of the statement that selects it, and for nothing after it.
_COMMIT_WITHOUT_FLUSH = "SELECT set_config('synchronous_commit', 'off', true)"
_HOLD_RETURNING = "id, team_id, execution_id, amount, created_at"
# What the settlement charged, for the writes that run in its statement.
_SETTLED_CHARGE = "COALESCE((SELECT charge FROM settled), 0)"
# The release entry, then the charge entry when there is a charge, from the account as settled.
_SETTLED_ENTRIES = (
    "settled CROSS JOIN LATERAL (VALUES (1, 'release', settled.amount, settled.balance + settled.charge),"
    " (2, 'charge', -settled.charge, settled.balance)) AS e(n, kind, amount, balance_after)"
    " WHERE e.n = 1 OR settled.charge > 0 ORDER BY e.n"
)


class StatementLedger(TransactionLedger):
    """The money path in single statements (PostgreSQL)."""

    def run_open(self, *, execution: Execution, amount: int, guard: Guard | None = None) -> Hold | None:
        """One statement: the guard checked, the hold reserved (locking the account row), the execution, the
        hold and its entry inserted — all or nothing. Its commit does not wait for the WAL flush (for this
        transaction alone): every other transaction sees it at once, and the settlement's flush makes it
        durable too; a database crash in between loses a run that was in flight, with its hold, charging
        nothing."""
        if amount <= 0 or token_limited(execution):  # a token's limit is checked under its row lock
            return super().run_open(execution=execution, amount=amount, guard=guard)
        hold = Hold(team_id=execution.team_id, execution=execution, amount=amount)
        guard_sql, guard_params = guard.sql() if guard is not None else ("SELECT 1", [])
        execution_sql, execution_params = insert_select(execution, "account")
        hold_sql, hold_params = insert_select(hold, "account")
        rows = sql_rows(
            f"WITH guard AS ({guard_sql}),"
            f" account AS ({reserve_statement(returning=False)} AND EXISTS (SELECT FROM guard)"
            " RETURNING balance, held),"
            f" execution AS ({execution_sql}), hold AS ({hold_sql} RETURNING {_HOLD_RETURNING}),"
            f" entry AS ({_hold_entry_sql()})"
            f" SELECT EXISTS (SELECT FROM guard), (SELECT id FROM hold) FROM ({_COMMIT_WITHOUT_FLUSH}) AS commit_mode",
            [*guard_params, amount, execution.team_id, amount, *execution_params, *hold_params],
        )
        opened, hold.pk = rows[0]
        if not opened:
            return None
        if hold.pk is None:
            raise refused(execution.team_id, amount, HOLD_REFUSAL)
        saved([execution, hold])
        return hold

    def run_settle(self, settlement: Settlement) -> int:
        """One statement: the hold closed, the account locked and charged (capped as hold_settle caps it),
        the release and charge entries, the steps, and the execution's outcome with the charge added."""
        if settlement.hold is None:
            return super().run_settle(settlement)
        execution, hold = settlement.execution, settlement.hold
        usage_add(execution, settlement.steps)
        writes = []
        if len(settlement.steps) > settlement.written:
            writes.append(insert_values(settlement.steps[settlement.written :]))
        if settlement.written:
            writes.append(_steps_settled_statement(execution))
        writes.append(
            update_statement(
                execution, [*SETTLED_FIELDS, *settlement.fields], credits_charged=f"%s + {_SETTLED_CHARGE}"
            )
        )
        settled_at = db_value(Hold, "settled_at", timezone.now())
        params = [Hold.Status.SETTLED, settled_at, hold.pk, Hold.Status.ACTIVE, hold.team_id]
        params += [
            credits_round(settlement.cost),
            hold.team_id,
            *(p for _, write_params in writes for p in write_params),
        ]
        statement = _settle_head() + "".join(f", write{i} AS ({sql})" for i, (sql, _) in enumerate(writes))
        rows = sql_rows(statement + " SELECT charge FROM settled", params)
        charged = rows[0][0] if rows else 0  # no row: the hold was settled already (nothing charged twice)
        execution.credits_charged += charged
        return charged

    def hold_open(self, *, execution: Execution, amount: int, refusal: str = HOLD_REFUSAL) -> Hold:
        """One statement: the hold reserved (locking the account row), inserted, and its entry."""
        if token_limited(execution):
            return super().hold_open(execution=execution, amount=amount, refusal=refusal)
        hold = Hold(team_id=execution.team_id, execution=execution, amount=amount)
        hold_sql, hold_params = insert_select(hold, "account")
        rows = sql_rows(
            f"WITH account AS ({reserve_statement()}), hold AS ({hold_sql} RETURNING {_HOLD_RETURNING}),"
            f" entry AS ({_hold_entry_sql()}) SELECT id FROM hold",
            [amount, execution.team_id, amount, *hold_params],
        )
        if not rows:
            raise refused(execution.team_id, amount, refusal)
        hold.pk = rows[0][0]
        saved([hold])
        return hold

    def hold_resize(self, *, execution: Execution, amount: int) -> Hold | None:
        """One statement when the execution has an active hold and `amount` is not 0: the hold locked,
        the difference reserved or released on the account, its entry, the hold's new amount."""
        if amount <= 0 or token_limited(execution):
            return super().hold_resize(execution=execution, amount=amount)
        now = db_value(LedgerEntry, "created_at", timezone.now())
        execution_id = db_value(Hold, "execution_id", execution.pk)
        rows = sql_rows(_resize_statement(), [amount, now, execution_id, Hold.Status.ACTIVE, amount])
        if not rows:  # no active hold
            return super().hold_resize(execution=execution, amount=amount)
        hold_id, change, resized = rows[0]
        if not resized:
            raise refused(execution.team_id, change, HOLD_REFUSAL)
        hold = Hold(id=hold_id, team_id=execution.team_id, execution=execution, amount=amount)
        saved([hold])
        return hold


@functools.cache
def _settle_head() -> str:
    """The settlement's WITH up to its ledger entries; the caller's writes follow."""
    return (
        f"WITH closed AS (UPDATE {table(Hold)} SET status = %s, settled_at = %s WHERE id = %s AND status = %s"
        " RETURNING amount, execution_id, settled_at),"
        f" locked AS (SELECT balance, held FROM {table(CreditAccount)} WHERE team_id = %s{for_update()}),"
        " priced AS (SELECT closed.amount, closed.execution_id, closed.settled_at,"
        " GREATEST(LEAST(%s, locked.balance - locked.held + closed.amount), 0) AS charge FROM closed, locked),"
        f" settled AS (UPDATE {table(CreditAccount)} SET balance = balance - priced.charge,"
        " held = held - priced.amount FROM priced WHERE team_id = %s RETURNING team_id, balance, held,"
        " priced.amount, priced.charge, priced.execution_id, priced.settled_at AS created_at),"
        f" entries AS ({_settled_entries_sql()})"
    )


def _steps_settled_statement(execution: Execution) -> tuple[str, list]:
    """billing.ledger.steps_settled as a write of the settlement's statement."""
    return f"UPDATE {table(Step)} SET settled = %s WHERE execution_id = %s AND NOT settled", [True, execution.pk]


@functools.cache
def _hold_entry_sql() -> str:
    """The hold's ledger entry, made from the hold and account rows of run_open's statement."""
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


@functools.cache
def _settled_entries_sql() -> str:
    return insert_derived(
        LedgerEntry,
        _SETTLED_ENTRIES,
        _entry_columns(
            kind="e.kind", amount="e.amount", balance_after="e.balance_after", held_after="settled.held", row="settled"
        ),
    )


def _entry_columns(
    *, kind: str, amount: str, balance_after: str, held_after: str, row: str
) -> tuple[tuple[str, str], ...]:
    """A run's ledger entry as SQL expressions, for insert_derived: its team, execution and time from the
    team_id, execution_id and created_at of the WITH query `row`; no reason, no actor (as the ORM writes an
    entry that names none)."""
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


@functools.cache
def _resize_statement() -> str:
    """hold_resize's statement: (amount, now, execution, active, amount) → (hold id, change, resized)."""
    entry = insert_derived(
        LedgerEntry,
        "account WHERE account.change <> 0",
        _entry_columns(
            kind=f"CASE WHEN account.change > 0 THEN '{LedgerEntry.Kind.HOLD}' ELSE '{LedgerEntry.Kind.RELEASE}' END",
            amount="abs(account.change)",
            balance_after="account.balance",
            held_after="account.held",
            row="account",
        ),
    )
    return (
        f"WITH hold AS (SELECT id, team_id, execution_id, %s - amount AS change, %s::timestamptz AS created_at"
        f" FROM {table(Hold)} WHERE execution_id = %s AND status = %s FOR UPDATE),"
        f" account AS (UPDATE {table(CreditAccount)} AS a SET held = a.held + hold.change FROM hold"
        " WHERE a.team_id = hold.team_id AND (hold.change <= 0 OR a.balance - a.held >= hold.change)"
        " RETURNING a.balance, a.held, hold.*),"
        f" resized AS (UPDATE {table(Hold)} SET amount = %s WHERE id = (SELECT id FROM account)),"
        f" entry AS ({entry})"
        " SELECT hold.id, hold.change, EXISTS (SELECT FROM account) FROM hold"
    )
