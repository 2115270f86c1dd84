"""Read queries for credits and the finance pages: balances, usage over time, breakdowns, the ledger and
the links from a ledger line to what it paid for. Each list is one aggregate query (Sum/Count), never a
query per row; callers pass the teams a person may see, so scoping lives in one place."""

import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from django.db.models import Case, Count, DateTimeField, F, OuterRef, Prefetch, Q, QuerySet, Subquery, Sum, Value, When
from django.db.models.functions import Coalesce, TruncDate
from django.utils import timezone

from billing.models import Balance, CreditAccount, Hold, LedgerEntry
from billing.token_limits import EVER, TokenSpend, period_end, period_start
from core.models import ApiToken, Approval, Execution, Step, Team, ToolExecution


def credit_account_get(*, team: Team) -> CreditAccount:
    """The team's account; a team that never had credits reads as an empty account."""
    return CreditAccount.objects.filter(team=team).first() or CreditAccount(team=team)


# --- Balances -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TeamCredits(Balance):
    team_id: int
    team_name: str
    balance: int
    held: int
    active_holds: int
    alert_below: int | None  # the team's credits.low line

    @property
    def below_line(self) -> bool:
        return self.alert_below is not None and self.available < self.alert_below


def team_credits_list(*, teams: QuerySet[Team]) -> list[TeamCredits]:
    """Balance, held credits and the number of active holds of each team, in one query (a team without
    an account reads as zero)."""
    rows = (
        teams.order_by("name")
        .annotate(
            balance=Coalesce(F("credit_account__balance"), Value(0)),
            held=Coalesce(F("credit_account__held"), Value(0)),
            active_holds=Count("holds", filter=Q(holds__status=Hold.Status.ACTIVE)),
        )
        .values_list("id", "name", "balance", "held", "active_holds", "alert_below")
    )
    return [TeamCredits(*row) for row in rows]


# --- Usage over time and breakdowns ---------------------------------------------------------------


@dataclass(frozen=True)
class DailyCredits:
    day: date
    credits: int


def ledger_charges_by_day(*, teams: QuerySet[Team], since: datetime, until: datetime) -> list[DailyCredits]:
    """Credits charged per UTC day in [since, until), every day present (zero when nothing was charged).
    Charges come from the ledger, dated when they were charged (a resumed run is charged on each resume)."""
    totals = dict(
        LedgerEntry.objects.filter(
            team__in=teams, kind=LedgerEntry.Kind.CHARGE, created_at__gte=since, created_at__lt=until
        )
        .annotate(day=TruncDate("created_at"))
        .values("day")
        .annotate(credits=Sum("amount"))
        .values_list("day", "credits")
    )
    first, last = since.date(), (until - timedelta(microseconds=1)).date()
    days = (first + timedelta(days=n) for n in range((last - first).days + 1))
    # Charges are stored negative (they take credits away); the chart shows what was spent.
    return [DailyCredits(day=day, credits=-(totals.get(day) or 0)) for day in days]


def _execution_usage(teams: QuerySet[Team], since: datetime, until: datetime, *by: str) -> list[dict]:
    """Executions started in [since, until) grouped by `by` (team name first, then an id and a name):
    how many, their tokens and credits (Execution totals)."""
    return list(
        Execution.objects.filter(team__in=teams, created_at__gte=since, created_at__lt=until)
        .values("team__name", *by)
        .annotate(
            executions=Count("id"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            credits=Sum("credits_charged"),
        )
        .order_by("-credits", "team__name", by[-1])
    )


def usage_by_group(*, teams: QuerySet[Team], since: datetime, until: datetime) -> list[dict]:
    """Per group: executions started in [since, until), their tokens and credits."""
    return _execution_usage(teams, since, until, "group_id", "group__name")


def usage_by_token(*, teams: QuerySet[Team], since: datetime, until: datetime) -> list[dict]:
    """Per API token: executions started in [since, until), their tokens and credits."""
    return _execution_usage(teams, since, until, "token_id", "token__name")


def usage_by_model(*, teams: QuerySet[Team], since: datetime, until: datetime) -> list[dict]:
    """Per upstream model: model calls made in [since, until), their tokens and exact cost (before the
    per-request rounding, so these sum to slightly less than the credits charged)."""
    return list(
        Step.objects.filter(
            execution__team__in=teams, kind=Step.Kind.MODEL_CALL, created_at__gte=since, created_at__lt=until
        )
        .values("execution__team__name", "model_name")
        .annotate(
            calls=Count("id"),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            cost=Sum("cost"),
        )
        .order_by("-cost", "execution__team__name", "model_name")
    )


def usage_by_tool(*, teams: QuerySet[Team], since: datetime, until: datetime) -> list[dict]:
    """Per tool: runs in [since, until), how many failed, and their cost (a call refused before sending
    costs nothing)."""
    return list(
        Step.objects.filter(
            execution__team__in=teams, kind=Step.Kind.TOOL_CALL, created_at__gte=since, created_at__lt=until
        )
        .values("execution__team__name", "model_name")
        .annotate(
            runs=Count("id"),
            failed=Count("id", filter=Q(status=Step.Status.FAILED)),
            cost=Sum("cost"),
        )
        .order_by("-cost", "execution__team__name", "model_name")
    )


# --- The ledger -----------------------------------------------------------------------------------


def ledger_entry_list(
    *,
    teams: QuerySet[Team],
    kind: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    execution_id: uuid.UUID | None = None,
) -> QuerySet[LedgerEntry]:
    """The ledger, newest first, with what each line shows loaded up front."""
    entries = LedgerEntry.objects.filter(team__in=teams).select_related("team", "execution", "actor")
    if kind:
        entries = entries.filter(kind=kind)
    if since:
        entries = entries.filter(created_at__gte=since)
    if until:
        entries = entries.filter(created_at__lt=until)
    if execution_id:
        entries = entries.filter(execution_id=execution_id)
    return entries.order_by("-id")


@dataclass
class ChargeLinks:
    """What a charge paid for beyond model calls: the tool executions it settled and their approvals."""

    tool_execution_ids: list[uuid.UUID] = field(default_factory=list)
    approval_ids: list[uuid.UUID] = field(default_factory=list)


def ledger_charge_links(*, entries: Iterable[LedgerEntry]) -> dict[int, ChargeLinks]:
    """Tool executions and approvals behind each charge of `entries` (two queries for the whole batch).

    A charge has no column naming its tool runs: one request's release/charge entries are written by its
    settlement (chat.services.executions.execution_settle), and its steps after the release that came
    before it (the previous request's settlement, or the release of the approval's hold when it resumed)
    and no later than its own release. So the steps of a charge are those of its execution created in
    that window."""
    charges = [e for e in entries if e.kind == LedgerEntry.Kind.CHARGE and e.execution_id]
    if not charges:
        return {}
    execution_ids = {c.execution_id for c in charges}
    timeline: dict[uuid.UUID, list[tuple[int, str, datetime]]] = defaultdict(list)
    for entry_id, execution_id, kind, created_at in (
        LedgerEntry.objects.filter(execution_id__in=execution_ids)
        .order_by("id")
        .values_list("id", "execution_id", "kind", "created_at")
    ):
        timeline[execution_id].append((entry_id, kind, created_at))
    tool_steps: dict[uuid.UUID, list[tuple[datetime, uuid.UUID, uuid.UUID | None]]] = defaultdict(list)
    for execution_id, created_at, tool_execution_id, approval_id in (
        Step.objects.filter(execution_id__in=execution_ids, kind=Step.Kind.TOOL_CALL, tool_execution__isnull=False)
        .order_by("id")
        .values_list("execution_id", "created_at", "tool_execution_id", "tool_execution__approval_id")
    ):
        tool_steps[execution_id].append((created_at, tool_execution_id, approval_id))

    links: dict[int, ChargeLinks] = {}
    for charge in charges:
        window = _settle_window(timeline[charge.execution_id], charge.id)
        if window is None:
            continue
        after, until = window
        found = ChargeLinks()
        for created_at, tool_execution_id, approval_id in tool_steps[charge.execution_id]:
            if (after is None or created_at > after) and created_at <= until:
                found.tool_execution_ids.append(tool_execution_id)
                if approval_id and approval_id not in found.approval_ids:
                    found.approval_ids.append(approval_id)
        links[charge.id] = found
    return links


@dataclass(frozen=True)
class LedgerLine:
    entry: LedgerEntry
    links: ChargeLinks | None


def ledger_line_list(*, entries: Iterable[LedgerEntry]) -> list[LedgerLine]:
    """`entries` with the tool executions and approvals behind each charge, for showing them."""
    entries = list(entries)
    links = ledger_charge_links(entries=entries)
    return [LedgerLine(entry=entry, links=links.get(entry.id)) for entry in entries]


def _settle_window(
    timeline: list[tuple[int, str, datetime]], charge_id: int
) -> tuple[datetime | None, datetime] | None:
    """(after, until] of the settle that wrote `charge_id`, from its execution's entries in id order."""
    releases = [row[2] for row in timeline if row[0] < charge_id and row[1] == LedgerEntry.Kind.RELEASE]
    if not releases:
        return None
    return (releases[-2] if len(releases) > 1 else None), releases[-1]


def batched(items: Iterator, size: int) -> Iterator[list]:
    """Lists of up to `size` items (itertools.batched arrives with Python 3.12)."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# --- Executions -----------------------------------------------------------------------------------


def execution_for_finance_get(*, teams: QuerySet[Team], execution_id: uuid.UUID) -> Execution | None:
    """An execution of one of `teams` with its steps, approvals, tool executions (with decisions) and
    ledger entries loaded; None when it is not theirs."""
    return (
        Execution.objects.filter(pk=execution_id, team__in=teams)
        .select_related("team", "group", "token")
        .prefetch_related(
            Prefetch("steps", queryset=Step.objects.select_related("tool_execution").order_by("id")),
            Prefetch("approvals", queryset=Approval.objects.order_by("created_at")),
            Prefetch("tool_executions", queryset=ToolExecution.objects.order_by("created_at", "position")),
            Prefetch("ledger_entries", queryset=LedgerEntry.objects.select_related("actor").order_by("id")),
        )
        .first()
    )


def execution_usage_list(
    *, teams: QuerySet[Team], since: datetime | None = None, until: datetime | None = None
) -> QuerySet[Execution]:
    """Executions started in [since, until), oldest first, for the usage export."""
    executions = Execution.objects.filter(team__in=teams).select_related("team", "group", "token")
    if since:
        executions = executions.filter(created_at__gte=since)
    if until:
        executions = executions.filter(created_at__lt=until)
    return executions.order_by("created_at", "id")


def execution_approval_ids(*, execution_ids: Iterable[uuid.UUID]) -> dict[uuid.UUID, list[uuid.UUID]]:
    """The approvals of each execution, oldest first (one query for a batch)."""
    found: dict[uuid.UUID, list[uuid.UUID]] = defaultdict(list)
    for execution_id, approval_id in (
        Approval.objects.filter(execution_id__in=list(execution_ids))
        .order_by("created_at")
        .values_list("execution_id", "id")
    ):
        found[execution_id].append(approval_id)
    return found


def token_limits_list(*, teams: Iterable[Team]) -> list[TokenSpend]:
    """The live tokens with a credit limit of these teams, each with its use of it, by team and name (one
    query, whatever the number of tokens)."""
    now = timezone.now()
    since = Case(
        *(When(credit_period=p, then=Value(period_start(p, now))) for p in (ApiToken.CreditPeriod.DAY, "month")),
        default=Value(EVER),
        output_field=DateTimeField(),
    )
    charged = LedgerEntry.objects.filter(
        kind=LedgerEntry.Kind.CHARGE, execution__token=OuterRef("pk"), created_at__gte=OuterRef("since")
    )
    holding = Hold.objects.filter(status=Hold.Status.ACTIVE, execution__token=OuterRef("pk"))
    tokens = (
        ApiToken.objects.filter(team__in=teams, credit_limit__isnull=False, revoked_at=None)
        .annotate(since=since, charged=_total(charged), holding=_total(holding))
        .order_by("team__name", "name")
    )
    return [
        TokenSpend(t.name, t.credit_limit, t.credit_period, -t.charged, t.holding, period_end(t.credit_period, now))
        for t in tokens
    ]


def _total(rows: QuerySet) -> Coalesce:
    """The sum of `rows`' amounts, as a subquery (0 without rows)."""
    return Coalesce(Subquery(rows.values("team_id").annotate(total=Sum("amount")).values("total")), Value(0))
