"""The finance pages (SPEC §5 /billing/): balances, usage chart and breakdowns, the ledger, an execution
as finance sees it, CSV exports, and grants. Every page needs `billing.use_billing`; staff and superusers
see every team, others the teams they are members of."""

import uuid
from collections.abc import Callable

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.paginator import Paginator
from django.db.models import QuerySet
from django.forms import Form
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import redirect, render
from django.urls import reverse
from django.views.decorators.http import require_GET, require_http_methods

from billing import selectors
from billing.charts import bar_chart
from billing.exports import LEDGER_HEADER, USAGE_HEADER, csv_response, ledger_csv_rows, usage_csv_rows
from billing.forms import CreditGrantForm, LedgerFilterForm, Period, PeriodForm
from billing.ledger import credits_grant
from core.errors import KiteMeshError
from core.models import Team
from core.selectors import team_list_for_user

LEDGER_PAGE_SIZE = 50


def finance_page(view: Callable) -> Callable:
    """Anonymous → the login page; logged in without the permission → 403."""
    return login_required(permission_required("billing.use_billing", raise_exception=True)(view))


def _teams(request: HttpRequest) -> QuerySet[Team]:
    user = request.user
    return team_list_for_user(user=user, every_team=user.is_staff or user.is_superuser)


@require_GET
@finance_page
def credit_overview_view(request: HttpRequest) -> HttpResponse:
    teams = _teams(request)
    form = PeriodForm.from_query(request.GET, teams=teams)
    period, selected = form.period(), form.selected_team()
    span = {"teams": form.team_scope(teams), "since": period.start, "until": period.end}
    daily = selectors.ledger_charges_by_day(**span)
    return render(
        request,
        "billing/overview.html",
        {
            "form": form,
            "period": period,
            "credits": selectors.team_credits_list(teams=span["teams"]),
            "token_limits": selectors.token_limits_list(teams=span["teams"]),
            "daily": daily,
            "chart": bar_chart(daily),
            "by_group": selectors.usage_by_group(**span),
            "by_model": selectors.usage_by_model(**span),
            "by_token": selectors.usage_by_token(**span),
            "by_tool": selectors.usage_by_tool(**span),
            "grant_form": CreditGrantForm(teams=teams, initial={"team": selected}),
            "export_query": _period_query(period, selected),
        },
    )


def _period_query(period: Period, team: Team | None) -> str:
    query = f"since={period.since.isoformat()}&until={period.until.isoformat()}"
    return f"{query}&team={team.pk}" if team else query


@require_GET
@finance_page
def ledger_list_view(request: HttpRequest) -> HttpResponse:
    teams = _teams(request)
    form = LedgerFilterForm(request.GET, teams=teams)
    entries = selectors.ledger_entry_list(**form.filters(teams))
    page = Paginator(entries, LEDGER_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(
        request,
        "billing/ledger.html",
        {"form": form, "page": page, "lines": selectors.ledger_line_list(entries=page.object_list)},
    )


def _invalid_filters(form: Form) -> HttpResponse:
    """An export has no page to show errors on: refuse it rather than export something else."""
    lines = [f"{field}: {' '.join(errors)}" for field, errors in form.errors.items()]
    return HttpResponseBadRequest("\n".join(lines) + "\n", content_type="text/plain; charset=utf-8")


@require_GET
@finance_page
def ledger_export_view(request: HttpRequest) -> HttpResponse:
    teams = _teams(request)
    form = LedgerFilterForm(request.GET, teams=teams)
    if not form.is_valid():
        return _invalid_filters(form)
    entries = selectors.ledger_entry_list(**form.filters(teams))
    return csv_response(request, filename="kitemesh-ledger.csv", header=LEDGER_HEADER, rows=ledger_csv_rows(entries))


@require_GET
@finance_page
def usage_export_view(request: HttpRequest) -> HttpResponse:
    teams = _teams(request)
    form = PeriodForm.from_query(request.GET, teams=teams)
    if not form.is_valid():
        return _invalid_filters(form)
    period = form.period()
    executions = selectors.execution_usage_list(teams=form.team_scope(teams), since=period.start, until=period.end)
    filename = f"kitemesh-usage-{period.since.isoformat()}-{period.until.isoformat()}.csv"
    return csv_response(request, filename=filename, header=USAGE_HEADER, rows=usage_csv_rows(executions))


@require_GET
@finance_page
def execution_detail_view(request: HttpRequest, execution_id: uuid.UUID) -> HttpResponse:
    execution = selectors.execution_for_finance_get(teams=_teams(request), execution_id=execution_id)
    if execution is None:
        raise Http404("No such execution.")
    return render(
        request,
        "billing/execution.html",
        {"execution": execution, "lines": selectors.ledger_line_list(entries=execution.ledger_entries.all())},
    )


@require_http_methods(["GET", "POST"])
@finance_page
def credit_grant_view(request: HttpRequest) -> HttpResponse:
    teams = _teams(request)
    data = request.POST if request.method == "POST" else None
    form = CreditGrantForm(data, teams=teams, initial={"team": request.GET.get("team")})
    if request.method == "POST":
        if form.is_valid():
            data = form.cleaned_data
            try:
                entry = credits_grant(
                    team=data["team"],
                    amount=data["amount"],
                    reason=data["reason"],
                    actor=request.user,
                    kind=data["kind"],
                )
            except KiteMeshError as error:  # the ledger's own refusals: below zero, a missing reason
                form.add_error("amount" if error.param != "reason" else "reason", error.message)
            else:
                messages.success(
                    request,
                    f"Recorded {entry.get_kind_display().lower()} of {entry.amount} credits for {data['team'].name}; "
                    f"balance now {entry.balance_after}.",
                )
                return redirect(f"{reverse('billing:overview')}?team={data['team'].pk}")
        messages.error(request, "Nothing was recorded: correct the form below.")
    return render(request, "billing/grant.html", {"form": form}, status=400 if form.is_bound else 200)
