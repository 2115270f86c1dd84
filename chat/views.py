"""The chat pages (SPEC §8): a member's conversations with the groups of their teams. Pages render on the
server and work without JavaScript (a form posts; the page it redirects to holds the answer). The page's
script asks the same endpoints for a stream (`Accept: text/event-stream`) and shows the turn as it runs;
refusals then come in the API's error shape, with its status. Thin: who may, one service, answer."""

import datetime
import json
import uuid
from collections.abc import AsyncIterator

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.models import AbstractBaseUser
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseBase, StreamingHttpResponse
from django.shortcuts import redirect, render
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils.dateparse import parse_datetime
from django.views.decorators.http import require_GET, require_http_methods, require_POST

from approvals.forms import ApprovalDecisionForm
from approvals.recovery import execution_recover_if_lapsed
from approvals.services import approval_decide, approval_decide_all
from chat.engine.run import Progress
from chat.forms import MODES, MessageForm, NewChatForm, RenameForm, first_error
from chat.models import Conversation
from chat.selectors import (
    approval_card_get,
    conversation_for_user_get,
    conversations_for_user_list,
    member_group_get,
    member_groups_list,
)
from chat.services.conversations import conversation_delete, conversation_rename
from chat.services.members import member_caller
from chat.services.turns import WAITING, Turn, TurnEnd, turn_complete, turn_continue, turn_events, turn_send
from core.db import in_db_thread
from core.envelope import error_body, error_response, http_status, request_id_of
from core.errors import Conflict, InvalidRequest, KiteMeshError, NotFound, PermissionDenied
from core.models import Group
from core.selectors import team_list_for_user

STREAM = "text/event-stream"


def _streams(request: HttpRequest) -> bool:
    return STREAM in request.headers.get("Accept", "")


def _conversation(user: AbstractBaseUser, conversation_id: uuid.UUID, *, reasoning: bool = False) -> Conversation:
    try:
        return conversation_for_user_get(user=user, conversation_id=conversation_id, reasoning=reasoning)
    except NotFound:
        raise Http404("No such conversation.") from None


# --- Pages --------------------------------------------------------------------------------------------------


@require_GET
@login_required
def conversation_list_view(request: HttpRequest) -> HttpResponse:
    conversations, more = conversations_for_user_list(user=request.user, before=_before(request.GET.get("before", "")))
    context = {
        "conversations": conversations,
        "next_before": conversations[-1].updated_at.isoformat() if more else "",
        "no_groups": _no_groups_reason(request.user, member_groups_list(user=request.user)),
    }
    return render(request, "chat/list.html", context)


def _before(value: str) -> datetime.datetime | None:
    """The "load more" link's moment; None (the newest) for anything else."""
    try:
        return parse_datetime(value.replace(" ", "+"))  # a "+" of the offset may arrive decoded as a space
    except ValueError:
        return None


@require_GET
@login_required
def conversation_new_view(request: HttpRequest) -> HttpResponse:
    return _conversation_page(request, None)


@require_GET
@login_required
def conversation_view(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    return _conversation_page(request, _conversation(request.user, conversation_id, reasoning=True))


@require_GET
@login_required
def conversation_card_view(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """The approval card alone: what the page's script swaps in when the approval's event says it changed."""
    return HttpResponse(_card_html(request, conversation_id))


def _conversation_page(
    request: HttpRequest,
    conversation: Conversation | None,
    *,
    data: dict | None = None,
    error: KiteMeshError | None = None,
) -> HttpResponse:
    """The conversation (None: a new chat, with the group and mode pickers) and its message box; a refused
    message is kept in the box, its reason shown beside it."""
    if conversation is not None and _last_turn_recovered(conversation):
        conversation = _conversation(request.user, conversation.id, reasoning=True)
    groups = member_groups_list(user=request.user) if conversation is None else []
    data = data or {}
    context = {
        "conversation": conversation,
        "groups": groups,
        "several_teams": len({g.team_id for g in groups}) > 1,
        "modes": MODES,
        "picked": _picked(groups, data),
        "no_groups": _no_groups_reason(request.user, groups) if conversation is None else "",
        "card": approval_card_get(user=request.user, conversation=conversation) if conversation else None,
        "data": data,
        "error": error.message if error else "",
        "error_param": (error.param or "message") if error else "",
    }
    return render(request, "chat/conversation.html", context, status=http_status(error)[0] if error else 200)


def _picked(groups: list[Group], data: dict) -> dict:
    """The new chat's group and mode as the pickers show them: what was posted, else the first group with its
    own mode (the page's script follows the group's mode when another group is picked)."""
    group = next((g for g in groups if str(g.id) == data.get("group")), groups[0] if groups else None)
    return {"group": str(group.id) if group else "", "mode": data.get("mode") or (group.mode if group else "")}


def _last_turn_recovered(conversation: Conversation) -> bool:
    """A last turn whose run's process died is recovered on sight (approvals.recovery), as /approvals/ does."""
    last = next((m for m in reversed(conversation.messages.all()) if m.execution is not None), None)
    return last is not None and execution_recover_if_lapsed(execution=last.execution)


def _no_groups_reason(user: AbstractBaseUser, groups: list[Group]) -> str:
    """Why a person has no group to chat with, or "" when they have one (`groups`: member_groups_list's)."""
    if groups:
        return ""
    teams = [team.name for team in team_list_for_user(user=user, every_team=False)]
    if not teams:
        return (
            "You are not a member of any team yet, so there is no group to chat with: ask an administrator to add you."
        )
    if len(teams) == 1:
        return f"Your team {teams[0]} has no groups yet: ask an administrator to create one."
    return f"Your teams ({', '.join(teams)}) have no groups yet: ask an administrator to create one."


@require_POST
@login_required
def conversation_rename_view(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    conversation = _conversation(request.user, conversation_id)
    form = RenameForm(request.POST)
    try:
        if not form.is_valid():
            raise InvalidRequest(first_error(form)[1], param="title")
        conversation_rename(conversation=conversation, title=form.cleaned_data["title"])
        messages.success(request, f"Renamed to “{conversation.title}”.")
    except InvalidRequest as error:
        messages.error(request, error.message)
    return redirect("chat:list")


@require_http_methods(["GET", "POST"])
@login_required
def conversation_delete_view(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    """GET asks to confirm; POST deletes (its executions and their charges stay on record)."""
    conversation = _conversation(request.user, conversation_id)
    if request.method == "GET":
        return render(request, "chat/delete.html", {"conversation": conversation})
    conversation_delete(conversation=conversation)
    messages.success(request, f"Deleted “{conversation.title}”.")
    return redirect("chat:list")


# --- Turns: a message sent, an approval decided in place, a decided turn continued ---------------------------


@require_POST
@login_required
async def conversation_send_view(request: HttpRequest, conversation_id: uuid.UUID | None = None) -> HttpResponseBase:
    user = await request.auser()
    try:
        send = await in_db_thread(_send_checked, user=user, conversation_id=conversation_id, data=request.POST)
        turn = await turn_send(stream=_streams(request), **send)
    except KiteMeshError as error:
        return await _refused(request, conversation_id, error)
    return await _turn_answer(request, turn)


def _send_checked(*, user: AbstractBaseUser, conversation_id: uuid.UUID | None, data: dict) -> dict:
    """turn_send's arguments for a posted message: the user's conversation (404), the message (400), the
    group of one of their teams (404) and its mode (400), the user as a member of its team (403)."""
    conversation = conversation_for_user_get(user=user, conversation_id=conversation_id) if conversation_id else None
    form = NewChatForm(data) if conversation is None else MessageForm(data)
    if not form.is_valid():
        field, message = first_error(form)
        raise InvalidRequest(message, param=field)
    if conversation is None:
        group = member_group_get(user=user, group_id=form.cleaned_data["group"])
        mode = form.cleaned_data["mode"]
    elif conversation.group is None:
        raise InvalidRequest("This conversation's group was deleted: start a new chat.", param="message")
    else:
        group, mode = conversation.group, conversation.mode
    caller = member_caller(user=user, team_id=group.team_id)
    text = form.cleaned_data["message"]
    return {"caller": caller, "conversation": conversation, "group": group, "mode": mode, "text": text}


@require_POST
@login_required
async def conversation_decide_view(
    request: HttpRequest, conversation_id: uuid.UUID, approval_id: uuid.UUID
) -> HttpResponseBase:
    """An approver's decision in the conversation (the approver page's form and services); once every call
    is decided the turn continues in the same answer."""
    user = await request.auser()
    try:
        decided = await in_db_thread(
            _decided, user=user, conversation_id=conversation_id, approval_id=approval_id, data=request.POST
        )
        if decided is None:  # it still waits for other people's decisions
            return await _card_answer(request, conversation_id)
        turn = await turn_continue(stream=_streams(request), **decided)
    except KiteMeshError as error:
        return await _refused(request, conversation_id, error)
    return await _turn_answer(request, turn)


def _decided(*, user: AbstractBaseUser, conversation_id: uuid.UUID, approval_id: uuid.UUID, data: dict) -> dict | None:
    """Record the decision posted on the card of `approval_id`; turn_continue's arguments when nothing more
    waits, else None."""
    conversation = conversation_for_user_get(user=user, conversation_id=conversation_id)
    card = approval_card_get(user=user, conversation=conversation)
    if card is None or card.detail.approval.id != approval_id:
        raise NotFound("This conversation waits on no such approval.", code="approval_not_found")
    if not card.can_decide:
        who = ", ".join(card.approvers) or "an administrator"
        raise PermissionDenied(f"Only an approver of this team can decide: {who}.")
    form = ApprovalDecisionForm(data, detail=card.detail)
    if not form.is_valid():
        field, message = first_error(form)
        raise InvalidRequest(message, param=field)
    call, reason, approve = form.cleaned_data["tool_execution"], form.cleaned_data["reason"], form.approve
    if call is None:
        approval_decide_all(approval=card.detail.approval, approve=approve, reason=reason, actor=user)
    else:
        edit = form.cleaned_data["arguments"]
        approval = card.detail.approval
        approval_decide(
            approval=approval, tool_execution=call, approve=approve, reason=reason, actor=user, arguments=edit
        )
    return _continue_checked(user=user, conversation_id=conversation_id, quiet=True)


@require_POST
@login_required
async def conversation_continue_view(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponseBase:
    """Continue a turn whose approval was decided elsewhere (on /approvals/), or whose resumed run was
    interrupted."""
    user = await request.auser()
    try:
        decided = await in_db_thread(_continue_checked, user=user, conversation_id=conversation_id)
        turn = await turn_continue(stream=_streams(request), **decided)
    except KiteMeshError as error:
        return await _refused(request, conversation_id, error)
    return await _turn_answer(request, turn)


def _continue_checked(*, user: AbstractBaseUser, conversation_id: uuid.UUID, quiet: bool = False) -> dict | None:
    """turn_continue's arguments for the conversation's decided approval; 409 (None when `quiet`) when its
    last turn waits on no decided approval."""
    conversation = conversation_for_user_get(user=user, conversation_id=conversation_id)
    card = approval_card_get(user=user, conversation=conversation)
    if card is None or not card.ready:
        if quiet:
            return None
        message = "Nothing to continue: the approval is not decided yet, or its turn already went on."
        raise Conflict(message, code="decision_required")
    caller = member_caller(user=user, team_id=conversation.team_id)
    return {"caller": caller, "conversation": conversation, "approval_id": card.detail.approval.id}


# --- Answers ------------------------------------------------------------------------------------------------


async def _turn_answer(request: HttpRequest, turn: Turn) -> HttpResponseBase:
    """The turn as a stream for the page's script; without it, the turn run to its end, then the page."""
    if _streams(request):
        response = StreamingHttpResponse(_page_events(request, turn), content_type=STREAM)
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    await turn_complete(turn)
    return redirect("chat:conversation", conversation_id=turn.conversation.id)


async def _page_events(request: HttpRequest, turn: Turn) -> AsyncIterator[bytes]:
    """The page's events: `run` (the conversation, the mode), `text` deltas, `progress` of agents and tool
    calls, and `end` (the state, the credits charged, the error, or the approval card)."""
    conversation = turn.conversation
    url = reverse("chat:conversation", kwargs={"conversation_id": conversation.id})
    about = {"id": str(conversation.id), "url": url, "title": conversation.title}
    yield _sse({"type": "run", "mode": turn.run.mode, "conversation": about})
    async for event in turn_events(turn):
        if isinstance(event, str):
            yield _sse({"type": "text", "text": event})
        elif isinstance(event, Progress):
            yield _sse({"type": "progress", **event.body()})
        else:
            yield _sse(await in_db_thread(_end_body, request=request, turn=turn, end=event))


def _end_body(*, request: HttpRequest, turn: Turn, end: TurnEnd) -> dict:
    body = {"type": "end", "state": end.state, "credits_charged": end.credits_charged}
    if end.error is not None:
        body["error"] = error_body(end.error, request_id_of(request))["error"]
    if end.state == WAITING:
        body["card"] = _card_html(request, turn.conversation.id)
    return body


def _sse(data: dict) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


def _card_html(request: HttpRequest, conversation_id: uuid.UUID) -> str:
    conversation = _conversation(request.user, conversation_id)
    card = approval_card_get(user=request.user, conversation=conversation)
    return render_to_string("chat/_approval_card.html", {"card": card, "conversation": conversation}, request=request)


async def _card_answer(request: HttpRequest, conversation_id: uuid.UUID) -> HttpResponse:
    if _streams(request):
        card = await in_db_thread(_card_html, request=request, conversation_id=conversation_id)
        return HttpResponse(json.dumps({"card": card}), content_type="application/json")
    return redirect("chat:conversation", conversation_id=conversation_id)


async def _refused(request: HttpRequest, conversation_id: uuid.UUID | None, error: KiteMeshError) -> HttpResponse:
    """A refusal: in the API's error shape for the script, else the page again with the reason beside the
    message box (the message kept)."""
    if _streams(request):
        return error_response(error, request)
    if error.code == "conversation_not_found":
        raise Http404(error.message)
    return await in_db_thread(_refused_page, request=request, conversation_id=conversation_id, error=error)


def _refused_page(*, request: HttpRequest, conversation_id: uuid.UUID | None, error: KiteMeshError) -> HttpResponse:
    conversation = _conversation(request.user, conversation_id, reasoning=True) if conversation_id else None
    return _conversation_page(request, conversation, data=request.POST, error=error)
