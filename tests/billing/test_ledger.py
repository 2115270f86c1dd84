"""The credit ledger (SPEC §3): grants, holds for a request's worst case, one rounded-up charge at
settlement, an append-only ledger that always matches the account, and a balance that never goes below
zero."""

import io
import itertools
from datetime import timedelta
from decimal import Decimal

import pytest
from django.core.management import call_command
from django.db import IntegrityError, connection, transaction
from django.utils import timezone

from billing.ledger import Ledger, Settlement, TransactionLedger, credits_grant, credits_round, ledger
from billing.ledger_postgresql import StatementLedger
from billing.models import CreditAccount, Hold, LedgerEntry
from core.errors import InsufficientCredits, InvalidRequest
from core.models import Execution, Step, Team
from core.sql import Guard
from tests.conftest import Setup, make_setup

_request_ids = itertools.count(1)
# A run's money path has two backends (billing.ledger): statements in a transaction, and on PostgreSQL
# single statements. Every test here that holds or settles runs against both.
_backend: Ledger = TransactionLedger()  # the one hold() and settle() use: set by the `acme` fixture


def postgresql_only() -> None:
    if connection.vendor != "postgresql":
        pytest.skip("the single-statement ledger is PostgreSQL's (the second CI pass runs it)")


@pytest.fixture(params=[TransactionLedger, StatementLedger])
def acme(request, upstream, db, monkeypatch) -> Setup:
    """A team with a group and no credits yet (each test grants what it needs)."""
    if request.param is StatementLedger:
        postgresql_only()
    monkeypatch.setattr(f"{__name__}._backend", request.param())
    return make_setup(upstream, credits=0)


def execution_new(setup: Setup) -> Execution:
    return Execution(team=setup.team, group=setup.group, request_id=f"req_x{next(_request_ids)}", mode="normal")


def hold(setup: Setup, amount: int) -> Hold:
    """A run opened with a hold of `amount`."""
    return _backend.run_open(execution=execution_new(setup), amount=amount)


def settle(h: Hold, cost: Decimal) -> int:
    """The run of hold `h` settled with one step of `cost`."""
    execution = Execution.objects.get(pk=h.execution_id)
    step = Step(execution=execution, kind=Step.Kind.MODEL_CALL, model_name="m", status="succeeded", cost=cost)
    return _backend.run_settle(Settlement(execution, h, [step], 0, []))


def account(team: Team) -> CreditAccount:
    return CreditAccount.objects.get(team=team)


def last_entry(team: Team) -> LedgerEntry:
    return LedgerEntry.objects.filter(team=team).order_by("-id").first()


def assert_ledger_matches_account(team: Team) -> None:
    """Replaying the entries gives every balance_after/held_after, and the last one is the account."""
    balance = held = 0
    for entry in LedgerEntry.objects.filter(team=team).order_by("id"):
        if entry.kind in ("grant", "charge", "refund", "adjustment"):
            balance += entry.amount
        elif entry.kind == "hold":
            held += entry.amount
        elif entry.kind == "release":
            held -= entry.amount
        assert (entry.balance_after, entry.held_after) == (balance, held), entry
    acc = account(team)
    assert (acc.balance, acc.held) == (balance, held)
    assert acc.held == sum(Hold.objects.filter(team=team, status="active").values_list("amount", flat=True))


def paused_run(setup: Setup, amount: int) -> Execution:
    """A paused run whose hold (if `amount`) waits for its resume, opened by the backend under test."""
    execution = execution_new(setup)
    execution.status = Execution.Status.PAUSED
    execution.save()
    if amount:
        with transaction.atomic():
            _backend.hold_open(execution=execution, amount=amount)
    return execution


def resized(execution: Execution, amount: int) -> Hold | None:
    with transaction.atomic():
        return _backend.hold_resize(execution=execution, amount=amount)


def test_hold_open_reserves_and_records_or_refuses_with_nothing_written(acme: Setup):
    credits_grant(team=acme.team, amount=50, reason="start")
    execution = paused_run(acme, 30)

    assert (account(acme.team).balance, account(acme.team).held) == (50, 30)
    with pytest.raises(InsufficientCredits, match="up to 21 credits; the team has 20 available"):
        _backend.hold_open(execution=execution, amount=21)
    assert Hold.objects.filter(execution=execution).count() == 1
    assert_ledger_matches_account(acme.team)


@pytest.mark.parametrize(
    ("before", "after", "entry"),
    [(10, 25, ("hold", 15)), (25, 10, ("release", 15)), (10, 10, None), (0, 12, ("hold", 12))],
    ids=["grow", "shrink", "same", "open"],
)
def test_hold_resize_moves_the_difference_and_records_it(acme: Setup, before: int, after: int, entry):
    credits_grant(team=acme.team, amount=100, reason="start")
    execution = paused_run(acme, before)
    entries = LedgerEntry.objects.filter(team=acme.team).count()

    hold = resized(execution, after)

    assert hold is not None and hold.amount == after
    assert Hold.objects.get(execution=execution, status="active").pk == hold.pk
    assert Hold.objects.get(pk=hold.pk).amount == after
    assert (account(acme.team).balance, account(acme.team).held) == (100, after)
    written = LedgerEntry.objects.filter(team=acme.team).count() - entries
    assert written == (0 if entry is None else 1)
    if entry is not None:
        assert (last_entry(acme.team).kind, last_entry(acme.team).amount) == entry
        assert last_entry(acme.team).execution_id == execution.pk
    assert_ledger_matches_account(acme.team)


def test_hold_resize_to_zero_releases_the_hold(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")
    execution = paused_run(acme, 10)

    assert resized(execution, 0) is None
    assert not Hold.objects.filter(execution=execution, status="active").exists()
    assert account(acme.team).held == 0
    assert_ledger_matches_account(acme.team)


def test_hold_resize_beyond_what_is_available_refuses_and_changes_nothing(acme: Setup):
    credits_grant(team=acme.team, amount=30, reason="start")
    execution = paused_run(acme, 10)

    with pytest.raises(InsufficientCredits, match="up to 25 credits; the team has 20 available"):
        resized(execution, 35)

    assert Hold.objects.get(execution=execution, status="active").amount == 10
    assert (account(acme.team).balance, account(acme.team).held) == (30, 10)
    assert_ledger_matches_account(acme.team)


def test_grant_adds_credits_and_writes_a_grant_entry(acme: Setup):
    entry = credits_grant(team=acme.team, amount=500, reason="welcome")

    assert (entry.kind, entry.amount, entry.reason) == ("grant", 500, "welcome")
    assert (entry.balance_after, entry.held_after) == (500, 0)
    assert (account(acme.team).balance, account(acme.team).held) == (500, 0)
    credits_grant(team=acme.team, amount=250, reason="top-up")
    assert account(acme.team).balance == 750
    assert_ledger_matches_account(acme.team)


@pytest.mark.parametrize("amount", [0, -1])
def test_grant_must_be_positive(acme: Setup, amount: int):
    with pytest.raises(InvalidRequest):
        credits_grant(team=acme.team, amount=amount, reason="oops")

    assert not LedgerEntry.objects.filter(team=acme.team).exists()


def test_refund_adds_credits_as_a_refund_entry(acme: Setup):
    credits_grant(team=acme.team, amount=10, reason="start")

    entry = credits_grant(team=acme.team, amount=3, reason="failed request", kind=LedgerEntry.Kind.REFUND)

    assert (entry.kind, entry.amount, entry.balance_after) == ("refund", 3, 13)


@pytest.mark.parametrize("reason", ["", "   "])
def test_adjustment_needs_a_reason(acme: Setup, reason: str):
    credits_grant(team=acme.team, amount=100, reason="start")

    with pytest.raises(InvalidRequest) as excinfo:
        credits_grant(team=acme.team, amount=-10, reason=reason, kind=LedgerEntry.Kind.ADJUSTMENT)

    assert excinfo.value.param == "reason"
    assert account(acme.team).balance == 100
    assert LedgerEntry.objects.filter(team=acme.team).count() == 1


def test_adjustment_with_a_reason_moves_credits_either_way(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")

    down = credits_grant(team=acme.team, amount=-30, reason="double grant", kind=LedgerEntry.Kind.ADJUSTMENT)
    up = credits_grant(team=acme.team, amount=5, reason="goodwill", kind=LedgerEntry.Kind.ADJUSTMENT)

    assert (down.kind, down.amount, down.balance_after, down.reason) == ("adjustment", -30, 70, "double grant")
    assert up.balance_after == 75
    assert_ledger_matches_account(acme.team)


def test_adjustment_cannot_take_the_balance_below_zero(acme: Setup):
    credits_grant(team=acme.team, amount=20, reason="start")

    with pytest.raises(InsufficientCredits):
        credits_grant(team=acme.team, amount=-21, reason="too much", kind=LedgerEntry.Kind.ADJUSTMENT)

    assert account(acme.team).balance == 20


def test_hold_reserves_credits_and_writes_a_hold_entry(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")

    h = hold(acme, 40)

    assert (h.amount, h.status, h.team_id) == (40, "active", acme.team.pk)
    acc = account(acme.team)
    assert (acc.balance, acc.held, acc.available) == (100, 40, 60)
    entry = last_entry(acme.team)
    assert (entry.kind, entry.amount, entry.execution_id) == ("hold", 40, h.execution_id)
    assert (entry.balance_after, entry.held_after) == (100, 40)
    assert (entry.reason, entry.actor_id) == ("", None)
    assert timedelta(0) <= entry.created_at - Hold.objects.get(pk=h.pk).created_at < timedelta(seconds=5)


def test_hold_may_use_exactly_what_is_available(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")
    hold(acme, 60)

    hold(acme, 40)

    assert account(acme.team).available == 0


def test_hold_beyond_what_is_available_is_refused_and_writes_nothing(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")
    hold(acme, 70)
    entries = LedgerEntry.objects.count()

    with pytest.raises(InsufficientCredits):
        hold(acme, 31)

    assert LedgerEntry.objects.count() == entries
    assert Hold.objects.count() == 1
    assert account(acme.team).held == 70


def test_a_guard_that_no_longer_holds_writes_nothing_and_refuses_nothing(acme: Setup):
    """A run's start is guarded (its configuration still current): checked before any write."""
    credits_grant(team=acme.team, amount=100, reason="start")
    entries = LedgerEntry.objects.count()
    stale = Guard(Team, acme.team.pk, "name", "a name it no longer has")

    assert _backend.run_open(execution=execution_new(acme), amount=10, guard=stale) is None
    # It says so even when the team could not have covered the hold.
    assert _backend.run_open(execution=execution_new(acme), amount=999, guard=stale) is None

    assert LedgerEntry.objects.count() == entries
    assert not Hold.objects.exists() and not Execution.objects.exists()
    assert (account(acme.team).balance, account(acme.team).held) == (100, 0)
    current = Guard(Team, acme.team.pk, "name", acme.team.name)
    assert _backend.run_open(execution=execution_new(acme), amount=10, guard=current).amount == 10


def test_hold_without_any_credits_is_refused(acme: Setup):
    with pytest.raises(InsufficientCredits):
        hold(acme, 1)

    assert not Hold.objects.exists()


@pytest.mark.parametrize(
    ("exact", "credits"),
    [
        (Decimal("0"), 0),
        (Decimal("0.0001"), 1),
        (Decimal("0.99"), 1),
        (Decimal("1"), 1),
        (Decimal("2.000001"), 3),
        (Decimal("41.5"), 42),
    ],
)
def test_credits_round_rounds_up_once(exact: Decimal, credits: int):
    assert credits_round(exact) == credits


def test_settle_releases_the_hold_and_charges_the_cost_rounded_up(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")
    h = hold(acme, 40)
    # Three model calls of 0.33 credits each: one charge of ceil(0.99) = 1, not three of 1.
    cost = Decimal("0.33") * 3 + Decimal("12")

    charged = settle(h, cost)

    assert charged == 13
    acc = account(acme.team)
    assert (acc.balance, acc.held) == (87, 0)
    release, charge = LedgerEntry.objects.filter(team=acme.team).order_by("-id")[:2][::-1]
    assert (release.kind, release.amount, release.execution_id) == ("release", 40, h.execution_id)
    assert (release.balance_after, release.held_after) == (100, 0)
    assert (charge.kind, charge.amount, charge.execution_id) == ("charge", -13, h.execution_id)
    assert (charge.balance_after, charge.held_after) == (87, 0)
    h.refresh_from_db()
    assert h.status == "settled" and h.settled_at is not None
    for entry in (release, charge):
        assert (entry.reason, entry.actor_id) == ("", None)
        assert abs(entry.created_at - h.settled_at) < timedelta(seconds=5)
    assert_ledger_matches_account(acme.team)


def test_settle_with_no_cost_only_releases(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")
    h = hold(acme, 40)

    assert settle(h, Decimal("0")) == 0

    assert last_entry(acme.team).kind == "release"
    assert not LedgerEntry.objects.filter(kind="charge").exists()
    assert (account(acme.team).balance, account(acme.team).held) == (100, 0)


def test_settling_twice_charges_once(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")
    h = hold(acme, 40)
    settle(h, Decimal("10"))
    entries = LedgerEntry.objects.count()

    assert settle(h, Decimal("10")) == 0

    assert LedgerEntry.objects.count() == entries
    assert account(acme.team).balance == 90


def test_charge_is_capped_so_it_never_eats_another_hold(acme: Setup):
    credits_grant(team=acme.team, amount=100, reason="start")
    first = hold(acme, 30)
    second = hold(acme, 60)

    # The first request overran its hold (an upstream ignored max_tokens): it may take what is free
    # (100 - 60 held by the second), not the second request's reservation.
    charged = settle(first, Decimal("80.5"))

    assert charged == 40
    acc = account(acme.team)
    assert (acc.balance, acc.held, acc.available) == (60, 60, 0)
    assert settle(second, Decimal("59.2")) == 60
    assert_ledger_matches_account(acme.team)


def test_charge_never_takes_the_balance_below_zero(acme: Setup):
    credits_grant(team=acme.team, amount=10, reason="start")
    h = hold(acme, 10)

    charged = settle(h, Decimal("1000"))

    assert charged == 10
    assert (account(acme.team).balance, account(acme.team).held) == (0, 0)
    assert_ledger_matches_account(acme.team)


def test_charge_within_its_hold_is_capped_when_an_adjustment_took_the_credits_it_counted_on(acme: Setup):
    credits_grant(team=acme.team, amount=10, reason="start")
    h = hold(acme, 10)
    credits_grant(team=acme.team, amount=-5, reason="correction", kind=LedgerEntry.Kind.ADJUSTMENT)

    charged = settle(h, Decimal("8"))  # within the hold, but only 5 credits are left

    assert charged == 5
    assert (account(acme.team).balance, account(acme.team).held) == (0, 0)
    assert_ledger_matches_account(acme.team)


def test_every_change_writes_an_entry_matching_the_account(acme: Setup):
    credits_grant(team=acme.team, amount=300, reason="start")
    a = hold(acme, 50)
    b = hold(acme, 120)
    settle(a, Decimal("12.4"))
    credits_grant(team=acme.team, amount=-20, reason="correction", kind=LedgerEntry.Kind.ADJUSTMENT)
    c = hold(acme, 15)
    settle(b, Decimal("119.01"))
    credits_grant(team=acme.team, amount=4, reason="refund", kind=LedgerEntry.Kind.REFUND)

    kinds = list(LedgerEntry.objects.filter(team=acme.team).order_by("id").values_list("kind", flat=True))
    assert kinds == [
        "grant",
        "hold",
        "hold",
        "release",
        "charge",
        "adjustment",
        "hold",
        "release",
        "charge",
        "refund",
    ]
    assert_ledger_matches_account(acme.team)
    acc = account(acme.team)
    assert (acc.balance, acc.held) == (300 - 13 - 20 - 120 + 4, c.amount)


def test_ledger_is_per_team(acme: Setup, upstream):
    other = make_setup(upstream, team_name="globex", credits=0)
    credits_grant(team=acme.team, amount=100, reason="start")
    credits_grant(team=other.team, amount=7, reason="start")
    hold(other, 7)

    assert (account(acme.team).balance, account(acme.team).held) == (100, 0)
    with pytest.raises(InsufficientCredits):
        hold(other, 1)
    assert_ledger_matches_account(acme.team)
    assert_ledger_matches_account(other.team)


@pytest.mark.parametrize("field", ["balance", "held"])
def test_database_refuses_a_negative_balance_or_hold(acme: Setup, field: str):
    credits_grant(team=acme.team, amount=5, reason="start")

    with pytest.raises(IntegrityError), transaction.atomic():
        CreditAccount.objects.filter(team=acme.team).update(**{field: -1})

    assert (account(acme.team).balance, account(acme.team).held) == (5, 0)


def test_database_refuses_a_non_positive_hold(acme: Setup):
    credits_grant(team=acme.team, amount=5, reason="start")

    execution = execution_new(acme)
    execution.save()
    with pytest.raises(IntegrityError), transaction.atomic():
        Hold.objects.create(team=acme.team, execution=execution, amount=0)


def test_the_sweep_settles_runs_whose_lease_lapsed_and_leaves_live_and_paused_ones(db, upstream):
    setup = make_setup(upstream, credits=100)
    runs = {}
    now = timezone.now()
    for name, status, lease in [
        ("dead", "running", now - timedelta(seconds=1)),
        ("live", "running", now + timedelta(seconds=30)),
        ("paused", "paused", None),
    ]:
        execution = Execution.objects.create(
            team=setup.team, group=setup.group, request_id=f"req_{name}", mode="normal", status=status
        )
        Execution.objects.filter(pk=execution.pk).update(lease_expires_at=lease)
        with transaction.atomic():
            runs[name] = ledger().hold_open(execution=execution, amount=10)
    out = io.StringIO()

    call_command("sweep", stdout=out)

    assert (
        out.getvalue().strip()
        == "recovered 1 run(s); expired 0 approval(s); requeued 0 webhook delivery(ies); recorded 0 credit alert(s)"
    )
    assert Hold.objects.get(pk=runs["dead"].pk).status == Hold.Status.SETTLED
    dead = Execution.objects.get(pk=runs["dead"].execution_id)
    assert (dead.status, dead.error["code"]) == ("failed", "run_interrupted")
    assert {Hold.objects.get(pk=runs[n].pk).status for n in ("live", "paused")} == {Hold.Status.ACTIVE}
    account = CreditAccount.objects.get(team=setup.team)
    assert (account.balance, account.held) == (100, 20)
    assert LedgerEntry.objects.filter(team=setup.team, kind="release", execution=runs["dead"].execution).count() == 1


def _synchronous_commit() -> str:
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        return cursor.fetchone()[0]


@pytest.mark.django_db(transaction=True)
def test_the_single_statement_start_skips_the_flush_for_its_own_transaction_only(upstream):
    """The start's commit does not wait for the WAL flush (its settlement's does); the setting must not
    reach the connection's next transactions."""
    postgresql_only()
    backend = StatementLedger()
    setup = make_setup(upstream, credits=100)
    assert _synchronous_commit() == "on"

    hold_ = backend.run_open(execution=execution_new(setup), amount=10)
    assert _synchronous_commit() == "on"  # the statement was its own transaction
    with transaction.atomic():  # inside a transaction, it applies to that transaction
        backend.run_open(execution=execution_new(setup), amount=10)
        assert _synchronous_commit() == "off"
    assert _synchronous_commit() == "on"

    execution = Execution.objects.get(pk=hold_.execution_id)
    step = Step(execution=execution, kind=Step.Kind.MODEL_CALL, model_name="m", status="succeeded", cost=Decimal(3))
    assert backend.run_settle(Settlement(execution, hold_, [step], 0, [])) == 3
    assert _synchronous_commit() == "on"
