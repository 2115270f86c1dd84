"""Credits under real parallelism: many threads, each with its own PostgreSQL connection, race for one
team's account. Row locks must let exactly what the balance covers through."""

import threading
from collections import Counter
from decimal import Decimal

import pytest
from django.db import connection, connections, transaction

from billing.ledger import hold_settle, ledger
from billing.models import CreditAccount, Hold, LedgerEntry
from core.models import Execution
from tests.conftest import make_setup


def _postgres_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("row-lock races need PostgreSQL (SQLite serialises every writer)")


def _in_threads(count: int, work) -> list:
    """Run `work(i)` in `count` threads released together, each in its own transaction (as the services'
    callers do) on its own connection."""
    barrier, results = threading.Barrier(count), [None] * count

    def run(i: int) -> None:
        try:
            barrier.wait()
            with transaction.atomic():
                results[i] = work(i)
        except Exception as exc:  # kept as a result: the test asserts on what each thread got
            results[i] = exc
        finally:
            connections.close_all()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_forty_parallel_holds_take_exactly_what_the_balance_covers(transactional_db, upstream):
    _postgres_only()
    setup = make_setup(upstream, credits=50)
    executions = [
        Execution.objects.create(team=setup.team, group=setup.group, request_id=f"req_race_{i}", mode="normal")
        for i in range(40)
    ]

    results = _in_threads(40, lambda i: ledger().hold_open(execution=executions[i], amount=10))

    outcomes = Counter(type(r).__name__ for r in results)
    assert outcomes == {"Hold": 5, "InsufficientCredits": 35}
    account = CreditAccount.objects.get(team=setup.team)
    assert (account.balance, account.held) == (50, 50)
    assert LedgerEntry.objects.filter(team=setup.team, kind="hold").count() == 5


def test_parallel_settles_never_take_the_balance_below_zero(transactional_db, upstream):
    _postgres_only()
    setup = make_setup(upstream, credits=100)
    holds = []
    for i in range(10):
        execution = Execution.objects.create(team=setup.team, group=setup.group, request_id=f"req_s_{i}", mode="normal")
        with transaction.atomic():
            holds.append(ledger().hold_open(execution=execution, amount=10))

    # Each run costs more than it held (an upstream that ignored max_tokens): the caps must hold under races.
    charged = _in_threads(10, lambda i: hold_settle(hold=holds[i], cost=Decimal("17.5")))

    assert all(isinstance(c, int) for c in charged), charged
    account = CreditAccount.objects.get(team=setup.team)
    assert account.balance >= 0 and account.held == 0
    assert sum(charged) == 100 - account.balance
    assert not Hold.objects.filter(team=setup.team, status=Hold.Status.ACTIVE).exists()


def test_a_hold_settled_twice_in_parallel_is_charged_once(transactional_db, upstream):
    _postgres_only()
    setup = make_setup(upstream, credits=100)
    execution = Execution.objects.create(team=setup.team, group=setup.group, request_id="req_twice", mode="normal")
    with transaction.atomic():
        hold = ledger().hold_open(execution=execution, amount=30)

    charged = _in_threads(8, lambda i: hold_settle(hold=hold, cost=Decimal(12)))

    assert sorted(charged) == [0] * 7 + [12]
    account = CreditAccount.objects.get(team=setup.team)
    assert (account.balance, account.held) == (88, 0)
