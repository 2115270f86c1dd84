"""The approver pages: the live queue, one approval to decide, the history of decisions, and the event
stream that keeps the queue live. Thin: access check, one selector or service call, render or redirect."""

import uuid

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, HttpResponseForbidden
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils.http import urlencode
from django.views.decorators.http import require_GET, require_POST
from django_eventstream.views import events as eventstream_events

from approvals.events import channels_readable, page_channels
from approvals.forms import ApprovalDecisionForm
from approvals.recovery import execution_recover_if_lapsed
from approvals.selectors import (
    DECIDE_PERMISSION,
    ApprovalDetail,
    approval_detail_get,
    approval_queue_list,
    approver_team_ids,
    approver_teams_list,
    decision_rows,
    tool_execution_decided_list,
)
from approvals.services import approval_decide, approval_decide_all
from core.errors import KiteMeshError, NotFound
from core.models import ToolExecution

HISTORY_PAGE_SIZE = 50
# django-eventstream accepts at most 10 channels per stream: a member of many teams gets several streams.
CHANNELS_PER_STREAM = 10


def _team_ids(request: HttpRequest) -> list[int]:
    """The teams the user approves for; 403 for a user without the permission (a member of none gets an
    empty list: the pages then show nothing, never another team's approvals)."""
    if not request.user.has_perm(DECIDE_PERMISSION):
        raise PermissionDenied("You are not an approver.")
    return approver_team_ids(user=request.user)


def _detail(request: HttpRequest, approval_id: uuid.UUID) -> ApprovalDetail:
    team_ids = _team_ids(request)
    try:
        detail = approval_detail_get(team_ids=team_ids, approval_id=approval_id)
        if execution_recover_if_lapsed(execution=detail.approval.execution):  # its run's process died
            detail = approval_detail_get(team_ids=team_ids, approval_id=approval_id)
    except NotFound:
        raise Http404("No such approval among your teams.") from None
    return detail


def _event_urls(request: HttpRequest, team_ids: list[int]) -> list[str]:
    channels = page_channels(user=request.user, team_ids=team_ids)
    chunks = [channels[i : i + CHANNELS_PER_STREAM] for i in range(0, len(channels), CHANNELS_PER_STREAM)]
    return [reverse("events") + "?" + urlencode([("channel", c) for c in chunk]) for chunk in chunks]


@require_GET
@login_required
def approval_queue_view(request: HttpRequest) -> HttpResponse:
    teams = approver_teams_list(user=request.user)
    team_ids = [team.id for team in teams]
    context = {
        "items": approval_queue_list(team_ids=team_ids),
        "teams": teams,
        "show_team": len(teams) > 1,
        "is_approver": request.user.has_perm(DECIDE_PERMISSION),
        "event_urls": _event_urls(request, team_ids),
    }
    return render(request, "approvals/queue.html", context)


@require_GET
@login_required
def approval_queue_rows_view(request: HttpRequest) -> HttpResponse:
    """The queue's rows alone: what the page's script swaps in when an event says the queue changed."""
    team_ids = _team_ids(request)
    context = {"items": approval_queue_list(team_ids=team_ids), "show_team": len(team_ids) > 1}
    return render(request, "approvals/_queue_rows.html", context)


@require_GET
@login_required
def approval_detail_view(request: HttpRequest, approval_id: uuid.UUID) -> HttpResponse:
    return render(request, "approvals/detail.html", {"detail": _detail(request, approval_id)})


@require_POST
@login_required
def approval_decide_view(request: HttpRequest, approval_id: uuid.UUID) -> HttpResponse:
    detail = _detail(request, approval_id)
    form = ApprovalDecisionForm(request.POST, detail=detail)
    if not form.is_valid():
        for errors in form.errors.values():
            for error in errors:
                messages.error(request, error)
        return redirect("approvals:detail", approval_id=approval_id)
    tool_execution, reason = form.cleaned_data["tool_execution"], form.cleaned_data["reason"]
    edit = form.cleaned_data["arguments"] if tool_execution is not None else None
    verb = "Approved" if form.approve else "Denied"
    try:
        if tool_execution is None:
            count = approval_decide_all(
                approval=detail.approval, approve=form.approve, reason=reason, actor=request.user
            )
            messages.success(request, f"{verb} all {count} remaining tool call(s).")
        else:
            approval_decide(
                approval=detail.approval,
                tool_execution=tool_execution,
                approve=form.approve,
                reason=reason,
                actor=request.user,
                arguments=edit,
            )
            messages.success(request, f"{verb} {tool_execution.tool_name}{' with edited arguments' if edit else ''}.")
    except KiteMeshError as exc:
        if edit is not None:  # shown in place, the edit kept for the approver to fix
            return _edit_refused(request, detail, tool_execution, edit, exc.message)
        messages.error(request, exc.message)
    return redirect("approvals:detail", approval_id=approval_id)


def _edit_refused(
    request: HttpRequest, detail: ApprovalDetail, tool_execution: ToolExecution, edit: str, error: str
) -> HttpResponse:
    for call in detail.calls:
        if call.tool_execution.id == tool_execution.id:
            call.edit_text, call.edit_error = edit, error
    return render(request, "approvals/detail.html", {"detail": detail}, status=400)


@require_GET
@login_required
def approval_history_view(request: HttpRequest) -> HttpResponse:
    decisions = tool_execution_decided_list(team_ids=_team_ids(request))
    page = Paginator(decisions, HISTORY_PAGE_SIZE).get_page(request.GET.get("page"))
    return render(request, "approvals/history.html", {"page": page, "rows": decision_rows(page.object_list)})


@require_GET
def approval_events_view(request: HttpRequest) -> HttpResponseBase:
    """The SSE stream of the `channel`s asked for: `team-<id>` of teams the user approves for, or
    `approval-<id>` of an approval the user's chat waits on (approvals.events.channels_readable). Refused
    with a plain 403 here (django-eventstream alone would answer 200 and an error event); its channel
    manager checks the same rule again when the stream opens."""
    channels = request.GET.getlist("channel")
    if not request.user.is_authenticated or not channels:
        return HttpResponseForbidden("Log in and name the channels to follow.")
    if not channels_readable(user=request.user, channels=channels):
        return HttpResponseForbidden("You may follow only the teams you approve for and your own approvals.")
    return eventstream_events(request)
