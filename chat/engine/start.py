"""How a run begins: a new request (its mode, conversation, parameters and first hold, sized from its group's
configuration as this worker keeps it and recorded only while that configuration is current), a replay of a
client's request_id, or a resume that continues a paused run from its decided round."""

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass

from django.conf import settings

from approvals.resume import (
    ApiDecisions,
    ResumeClaim,
    approval_for_resume_get,
    approval_not_found,
    approval_resume_claim,
)
from chat.engine.agents import agents_of
from chat.engine.holds import first_hold, resume_hold
from chat.engine.modes.auto import mode_resolve
from chat.engine.providers import ModelEndpoint
from chat.engine.rounds import tool_specs
from chat.engine.run import Run
from chat.selectors import GroupForRun, group_for_run_cached, group_for_run_get, model_endpoint_get
from chat.services.executions import ExecutionStart, execution_finish, execution_start
from chat.services.members import caller_reload
from chat.wire.requests import ChatRequest, ResumeRequest
from core.callers import Caller
from core.config_version import config_guard
from core.db import db_future, in_db_thread
from core.errors import Conflict, InvalidRequest, NotFound, PermissionDenied
from core.models import Approval, CustomModel, Execution, Group, Mode

_ATTEMPTS = 4  # starts refused because the configuration changed meanwhile, before the client is told to retry


@dataclass
class Replay:
    """An earlier execution with the same request_id and body: its result is answered again."""

    execution: Execution

    def body(self) -> dict:
        return self.execution.response  # a run that never answered does not keep its request_id


async def run_start(*, caller: Caller, request: ChatRequest, request_id: str) -> Run | Replay:
    """Start the request's run, or find the earlier one its request_id names. When the configuration changed
    since this worker read it (a token revoked, a group edited), nothing is written: the caller and the group
    are read again and the run sized again."""
    for _ in range(_ATTEMPTS):
        version, parts = await _group_for_run(caller, request.group_id)
        run = _run_sized(caller, parts, request, request_id)
        started = await _started(
            execution_start,
            caller=caller,
            group=parts.group,
            mode=run.mode,
            request_id=request_id,
            client_request_id=request.request_id is not None,
            body_hash=request.body_hash,
            stream=request.stream,
            metadata={**request.metadata, "requested_mode": request.mode or parts.group.mode},
            hold_amount=_first_hold(run),
            guard=config_guard(min(version, caller.version)),
        )
        if started is None:
            caller = await in_db_thread(caller_reload, caller=caller)
            continue
        if started.replayed:
            return Replay(started.execution)
        run.execution, run.hold = started.execution, started.hold
        return run
    raise Conflict("The group's configuration kept changing while the request started; retry.", code="config_changed")


async def _group_for_run(caller: Caller, group_id: uuid.UUID) -> tuple[int, GroupForRun]:
    """What the caller may run of the group, and the configuration version it was read at: as this worker
    keeps it (no query), else read."""
    kept = group_for_run_cached(caller=caller, group_id=group_id)
    return kept or await in_db_thread(group_for_run_get, caller=caller, group_id=group_id)


def _run_sized(caller: Caller, parts: GroupForRun, request: ChatRequest, request_id: str) -> Run:
    """The run a request asks for, before its execution is recorded."""
    group, brain = parts.group, parts.group.brain
    mode = mode_resolve(group, request.mode, has_agents=bool(parts.agents), has_tools=bool(parts.tools))
    return Run(
        execution=Execution(token=caller.token, user=caller.user, group=group),  # until execution_start records it
        hold=None,
        group=group,
        request=request,
        request_id=request_id,
        brains=_brains(brain, parts.fallbacks),
        messages=([{"role": "system", "content": brain.system}] if brain.system else []) + request.messages,
        params={**request.upstream_params(), "max_tokens": _max_tokens(group, request)},
        tools={t.name: t for t in parts.tools},
        mode=mode,
        agents=agents_of(parts.agents) if mode != Mode.NORMAL else {},
    )


def _first_hold(run: Run) -> int:
    return first_hold(
        brain=run.group.brain,
        messages=run.messages,
        conversation=run.request.messages,
        specs=tool_specs(run.tools.values(), run.mode, run.agents),
        max_tokens=run.params["max_tokens"],
        agents=run.agents,
        mode=run.mode,
    )


def _max_tokens(group: Group, request: ChatRequest) -> int:
    return request.max_tokens or group.max_output_tokens or settings.KITEMESH_DEFAULT_MAX_OUTPUT_TOKENS


def _brains(brain: CustomModel, fallbacks: list[CustomModel]) -> list[tuple[CustomModel, ModelEndpoint]]:
    return [(model, model_endpoint_get(model)) for model in [brain, *fallbacks]]


async def _started(start: Callable[..., ExecutionStart | None], **kwargs) -> ExecutionStart | None:
    """`start(**kwargs)` in a database thread, seen through when the client goes away meanwhile: the
    execution it records is then settled as cancelled at once, its hold released, rather than left running
    for the stale-hold sweep."""
    recording = db_future(start, **kwargs)
    try:
        return await asyncio.shield(recording)
    except asyncio.CancelledError:
        started = None
        with contextlib.suppress(Exception):  # refused or failed: nothing was recorded
            started = await recording
        if started is not None and not started.replayed:
            cancelled = Execution.Status.CANCELLED
            await in_db_thread(
                execution_finish, execution=started.execution, hold=started.hold, steps=[], status=cancelled
            )
        raise


async def run_resume(*, caller: Caller, resume: ResumeRequest, request_id: str) -> Run:
    """Claim the paused run for this resume (approvals.resume: its decisions applied, its hold taken, 402
    leaving the approval waiting) and continue it: the round's decided calls run first, then the resume's
    messages follow and the loop goes on. The group as the caller's configuration version has it."""
    approval = await in_db_thread(approval_for_resume_get, team_id=caller.team.pk, approval_id=resume.approval_id)
    parts = await _group_for_resume(caller, approval)
    if approval.group_id != resume.chat.group_id:
        raise InvalidRequest(f"This approval belongs to 'group:{approval.group_id}'.", param="model")
    approval.group = parts.group
    state, chat = approval.state, resume.chat
    mode = state.get("mode", Mode.NORMAL)
    agents = agents_of(parts.agents) if mode != Mode.NORMAL else {}
    max_tokens = chat.max_tokens or state["params"]["max_tokens"]
    claim: ResumeClaim = await in_db_thread(
        approval_resume_claim,
        caller=caller,
        approval=approval,
        tools={tool.pk: tool for tool in parts.tools},
        decisions=ApiDecisions(approved=resume.approved, denied=resume.denied, edited=resume.edited),
        hold_amount_for=resume_hold(
            brain=parts.group.brain,
            messages=state["messages"] + chat.messages,
            specs=tool_specs(parts.tools, mode, agents),
            max_tokens=max_tokens,
            agents=agents if mode == Mode.ORCHESTRATION else {},
        ),
    )
    return Run(
        execution=claim.execution,
        hold=claim.hold,
        group=parts.group,
        request=chat,
        request_id=request_id,
        brains=_brains(parts.group.brain, parts.fallbacks),
        messages=state["messages"],
        params={**state["params"], **chat.upstream_params(), "max_tokens": max_tokens},
        tools={t.name: t for t in parts.tools},
        mode=mode,
        agents=agents,
        resumed_round=claim.tool_executions,
    )


async def _group_for_resume(caller: Caller, approval: Approval) -> GroupForRun:
    """The approval's group as the caller may run it (read again when this worker keeps it at another
    version than the caller's); 404 for the approval when a token's scope leaves the group out."""
    try:
        version, parts = await _group_for_run(caller, approval.group_id)
        if version != caller.version:
            _, parts = await in_db_thread(group_for_run_get, caller=caller, group_id=approval.group_id)
    except (NotFound, PermissionDenied):
        raise approval_not_found(approval.pk) from None
    return parts
