"""Finance aggregates (SPEC §5 /billing/): balances, credits charged per day, the breakdowns by group, model,
token and tool, and the link from a charge to the tool executions and approvals it paid for. Runs are
recorded through the real services (execution_start / execution_finish / approval_pause / resume claim),
and every expected number is recomputed here from the SPEC's formula."""

import itertools
import math
import uuid
from datetime import timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.utils import timezone

from approvals.resume import ApiDecisions, approval_resume_claim
from approvals.services import approval_decide, approval_pause
from billing import selectors
from billing.charts import bar_chart
from billing.forms import Period
from billing.ledger import credits_grant, ledger
from billing.models import LedgerEntry
from chat.services.executions import execution_finish, execution_start
from chat.services.tokens import token_create
from core.callers import Caller
from core.models import ApiToken, CustomModel, Execution, Group, Step, Team, Tool, ToolExecution
from tests.conftest import Setup, make_setup

_request_ids = itertools.count(1)


def model_call(model: CustomModel, prompt: int, completion: int, execution: Execution | None = None) -> Step:
    """A model call priced as SPEC §3 says: tokens × price per 1,000."""
    cost = (prompt * model.input_per_1k + completion * model.output_per_1k) / 1000
    return Step(
        execution=execution,
        kind=Step.Kind.MODEL_CALL,
        custom_model=model,
        model_name=model.model,
        status=Step.Status.SUCCEEDED,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cost=cost,
    )


def tool_call(execution: Execution, tool: Tool, *, ok: bool = True, approval=None) -> Step:
    te = ToolExecution.objects.create(
        execution=execution,
        approval=approval,
        tool=tool,
        tool_name=tool.name,
        call_id=f"call_{uuid.uuid4().hex[:6]}",
        arguments="{}",
        arguments_hash="-",
        risk="medium",
        status=ToolExecution.Status.SUCCEEDED if ok else ToolExecution.Status.FAILED,
    )
    return Step(
        kind=Step.Kind.TOOL_CALL,
        tool_execution=te,
        model_name=tool.name,
        status=Step.Status.SUCCEEDED if ok else Step.Status.FAILED,
        cost=tool.price,
    )


def record_run(
    setup: Setup,
    steps_for,
    *,
    group: Group | None = None,
    token: ApiToken | None = None,
    hold: int = 500,
) -> Execution:
    """One request through the real services: start (hold), then finish (steps, release, one charge)."""
    start = execution_start(
        caller=Caller(setup.team, 0, token=token or setup.token),
        group=group or setup.group,
        mode="normal",
        request_id=f"req_fin{next(_request_ids)}",
        client_request_id=False,
        body_hash="",
        stream=False,
        metadata={},
        hold_amount=hold,
    )
    steps = steps_for(start.execution)
    for step in steps:
        step.execution = start.execution
    execution_finish(execution=start.execution, hold=start.hold, steps=steps, status=Execution.Status.SUCCEEDED)
    start.execution.refresh_from_db()
    return start.execution


def expected_charge(steps: list[Step]) -> int:
    return math.ceil(sum((s.cost for s in steps), Decimal(0)))


def today() -> Period:
    day = timezone.localdate()
    return Period(since=day, until=day)


@pytest.fixture
def acme(upstream, db) -> Setup:
    return make_setup(upstream, credits=10_000)


@pytest.fixture
def globex(upstream, db) -> Setup:
    return make_setup(upstream, team_name="globex", credits=10_000, input_per_1k="1", output_per_1k="1")


def span(period: Period, *teams: Team) -> dict:
    return {"teams": Team.objects.filter(pk__in=[t.pk for t in teams]), "since": period.start, "until": period.end}


def test_team_credits_show_balance_held_available_and_active_holds(acme: Setup, globex: Setup):
    execution = Execution.objects.create(team=acme.team, group=acme.group, request_id="req_held", mode="normal")
    ledger().hold_open(execution=execution, amount=120)
    credits_grant(team=acme.team, amount=-500, reason="correction", kind=LedgerEntry.Kind.ADJUSTMENT)
    nobody = Team.objects.create(name="empty")

    rows = selectors.team_credits_list(teams=Team.objects.all())

    by_name = {r.team_name: r for r in rows}
    assert [r.team_name for r in rows] == ["acme", "empty", "globex"]
    assert (by_name["acme"].balance, by_name["acme"].held, by_name["acme"].available) == (9500, 120, 9380)
    assert by_name["acme"].active_holds == 1
    assert (by_name["globex"].balance, by_name["globex"].held, by_name["globex"].active_holds) == (10_000, 0, 0)
    assert (by_name["empty"].balance, by_name["empty"].held) == (0, 0)
    assert nobody.pk == by_name["empty"].team_id


def test_breakdowns_equal_the_spec_formula_over_the_runs(acme: Setup, globex: Setup):
    researcher = CustomModel.objects.create(
        team=acme.team, name="researcher", model="research-model", input_per_1k=Decimal("2.5"), output_per_1k=7
    )
    billing = Group.objects.create(team=acme.team, name="billing", brain=acme.brain)
    ci_token, _ = token_create(team=acme.team, name="ci")
    lookup = Tool.objects.create(team=acme.team, name="lookup", url="https://t.example/l", price=Decimal("1.5"))
    ticket = Tool.objects.create(team=acme.team, name="ticket", url="https://t.example/t", price=2)

    plans = [
        (acme.group, acme.token, lambda e: [model_call(acme.brain, 120, 40), tool_call(e, lookup)]),
        (acme.group, ci_token, lambda e: [model_call(acme.brain, 333, 77), model_call(researcher, 50, 900)]),
        (billing, ci_token, lambda e: [model_call(researcher, 10, 10), tool_call(e, ticket, ok=False)]),
        (billing, acme.token, lambda e: [model_call(acme.brain, 1, 1), tool_call(e, lookup), tool_call(e, ticket)]),
    ]
    runs = []
    for group, token, steps_for in plans:
        execution = record_run(acme, steps_for, group=group, token=token)
        runs.append((group, token, execution, list(execution.steps.all())))
    record_run(globex, lambda e: [model_call(globex.brain, 1000, 1000)])  # another team: never counted

    period = today()
    by_group = {r["group__name"]: r for r in selectors.usage_by_group(**span(period, acme.team))}
    by_token = {r["token__name"]: r for r in selectors.usage_by_token(**span(period, acme.team))}
    by_model = {r["model_name"]: r for r in selectors.usage_by_model(**span(period, acme.team))}
    by_tool = {r["model_name"]: r for r in selectors.usage_by_tool(**span(period, acme.team))}

    for _, _, execution, steps in runs:
        assert execution.credits_charged == expected_charge(steps)
    for group in (acme.group, billing):
        mine = [r for r in runs if r[0] == group]
        row = by_group[group.name]
        assert row["executions"] == len(mine)
        assert row["credits"] == sum(expected_charge(r[3]) for r in mine)
        assert row["prompt_tokens"] == sum(s.prompt_tokens for r in mine for s in r[3])
    for token in (acme.token, ci_token):
        mine = [r for r in runs if r[1] == token]
        assert by_token[token.name]["executions"] == len(mine)
        assert by_token[token.name]["credits"] == sum(expected_charge(r[3]) for r in mine)
    all_steps = [s for r in runs for s in r[3]]
    for model in (acme.brain, researcher):
        calls = [s for s in all_steps if s.kind == "model_call" and s.model_name == model.model]
        row = by_model[model.model]
        assert row["calls"] == len(calls)
        assert row["prompt_tokens"] == sum(s.prompt_tokens for s in calls)
        assert row["completion_tokens"] == sum(s.completion_tokens for s in calls)
        assert row["cost"] == sum(s.cost for s in calls)
    assert set(by_model) == {"up-model", "research-model"}
    assert (by_tool["lookup"]["runs"], by_tool["lookup"]["failed"], by_tool["lookup"]["cost"]) == (2, 0, 3)
    assert (by_tool["ticket"]["runs"], by_tool["ticket"]["failed"], by_tool["ticket"]["cost"]) == (2, 1, 4)


def test_breakdowns_leave_out_runs_outside_the_period(acme: Setup):
    old = record_run(acme, lambda e: [model_call(acme.brain, 100, 100)])
    new = record_run(acme, lambda e: [model_call(acme.brain, 10, 10)])
    # Age the first run's records by ten days (auto_now_add leaves no other way to date them in the past).
    past = timezone.now() - timedelta(days=10)
    Execution.objects.filter(pk=old.pk).update(created_at=past)
    Step.objects.filter(execution=old).update(created_at=past)

    [row] = selectors.usage_by_group(**span(today(), acme.team))
    [model] = selectors.usage_by_model(**span(today(), acme.team))

    assert (row["executions"], row["credits"]) == (1, new.credits_charged)
    assert model["prompt_tokens"] == 10


def test_credits_per_day_sum_the_charges_of_each_day_and_fill_empty_days(acme: Setup, globex: Setup):
    first = record_run(acme, lambda e: [model_call(acme.brain, 1000, 500)])  # 10 + 10 = 20 credits
    second = record_run(acme, lambda e: [model_call(acme.brain, 150, 0)])  # ceil(1.5) = 2 credits
    record_run(globex, lambda e: [model_call(globex.brain, 5000, 0)])
    three_days_ago = timezone.now() - timedelta(days=3)
    LedgerEntry.objects.filter(execution=first).update(created_at=three_days_ago)
    day = timezone.localdate()
    period = Period(since=day - timedelta(days=4), until=day)

    points = selectors.ledger_charges_by_day(**span(period, acme.team))

    assert [p.day for p in points] == [day - timedelta(days=n) for n in (4, 3, 2, 1, 0)]
    assert [p.credits for p in points] == [0, first.credits_charged, 0, 0, second.credits_charged]
    assert (first.credits_charged, second.credits_charged) == (20, 2)
    chart = bar_chart(points)
    assert chart.total == 22 and chart.peak.credits == 20
    assert len(chart.bars) == 5 and chart.bars[0].height == 0
    assert chart.bars[1].height > chart.bars[4].height > 0


def test_a_charge_links_to_the_tool_executions_and_approval_it_paid_for(acme: Setup):
    ticket = Tool.objects.create(
        team=acme.team, name="ticket", url="https://t.example/t", price=3, requires_approval=True
    )
    ada = User.objects.create_user("ada")
    start = execution_start(
        caller=Caller(acme.team, 0, token=acme.token),
        group=acme.group,
        mode="normal",
        request_id="req_chain",
        client_request_id=False,
        body_hash="",
        stream=False,
        metadata={},
        hold_amount=200,
    )
    execution = start.execution
    pending = ToolExecution(
        execution=execution, tool=ticket, tool_name="ticket", call_id="c1", arguments="{}", arguments_hash="-",
        requires_approval=True, risk="medium",
    )  # fmt: skip
    paused = approval_pause(
        execution=execution,
        group=acme.group,
        hold=start.hold,
        steps=[model_call(acme.brain, 100, 20, execution)],
        tool_executions=[pending],
        state={},
        hold_amount=3,
        response={"kitemesh": {}},
    )
    approval_decide(approval=paused.approval, tool_execution=pending, approve=True, reason="looks fine", actor=ada)
    claim = approval_resume_claim(
        caller=Caller(acme.team, 0, token=acme.token),
        approval=paused.approval,
        tools={tool.pk: tool for tool in Tool.objects.all()},
        decisions=ApiDecisions(),
        hold_amount_for=lambda calls: 50,
    )
    resumed_steps = [
        Step(execution=execution, kind=Step.Kind.TOOL_CALL, tool_execution=pending, model_name="ticket",
             status=Step.Status.SUCCEEDED, cost=Decimal(3)),
        model_call(acme.brain, 200, 30, execution),
    ]  # fmt: skip
    execution_finish(execution=execution, hold=claim.hold, steps=resumed_steps, status=Execution.Status.SUCCEEDED)

    entries = list(selectors.ledger_entry_list(teams=Team.objects.all(), execution_id=execution.id))
    lines = {line.entry.id: line for line in selectors.ledger_line_list(entries=entries)}
    pause_charge, resume_charge = sorted((e for e in entries if e.kind == "charge"), key=lambda e: e.id)

    assert lines[pause_charge.id].links.tool_execution_ids == []
    assert lines[resume_charge.id].links.tool_execution_ids == [pending.id]
    assert lines[resume_charge.id].links.approval_ids == [paused.approval.id]
    assert all(line.links is None for line in lines.values() if line.entry.kind != "charge")
    assert -resume_charge.amount == math.ceil(Decimal(3) + resumed_steps[1].cost)


def test_ledger_entry_list_filters_by_team_kind_period_and_execution(acme: Setup, globex: Setup):
    run = record_run(acme, lambda e: [model_call(acme.brain, 10, 10)])
    record_run(globex, lambda e: [model_call(globex.brain, 10, 10)])
    everyone = Team.objects.all()

    assert {e.team_id for e in selectors.ledger_entry_list(teams=everyone)} == {acme.team.pk, globex.team.pk}
    only_acme = selectors.ledger_entry_list(teams=Team.objects.filter(pk=acme.team.pk))
    assert {e.team_id for e in only_acme} == {acme.team.pk}
    grants = selectors.ledger_entry_list(teams=everyone, kind="grant")
    assert [(e.kind, e.amount) for e in grants] == [("grant", 10_000), ("grant", 10_000)]
    by_run = selectors.ledger_entry_list(teams=everyone, execution_id=run.id)
    assert [e.kind for e in by_run] == ["charge", "release", "hold"]
    tomorrow = timezone.now() + timedelta(days=1)
    assert not selectors.ledger_entry_list(teams=everyone, since=tomorrow).exists()
    assert selectors.ledger_entry_list(teams=everyone, until=tomorrow).count() == 8


def test_execution_for_finance_is_none_for_a_team_not_in_scope(acme: Setup, globex: Setup):
    run = record_run(globex, lambda e: [model_call(globex.brain, 10, 10)])

    assert selectors.execution_for_finance_get(teams=Team.objects.filter(pk=acme.team.pk), execution_id=run.id) is None
    found = selectors.execution_for_finance_get(teams=Team.objects.all(), execution_id=run.id)
    assert found == run and [s.model_name for s in found.steps.all()] == ["up-model"]
