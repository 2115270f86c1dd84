"""One request's run: what it sends, what it holds, the steps it has taken, and its end — settled once,
whichever way it leaves (an answer, a pause, an error, a client that leaves, an exception nobody planned).
While it works, its process renews the lease on its execution (SPEC §7)."""

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, TypeVar

from django.conf import settings

from billing.ledger import hold_reserve
from billing.models import Hold
from billing.pricing import model_cost, prompt_length, tokens_estimate
from chat.engine.providers import ModelEndpoint, ModelReply, Usage
from chat.engine.tools import ToolResult
from chat.metrics import tool_run_count, upstream_call_observe
from chat.services.executions import execution_finish
from chat.wire.requests import ChatRequest
from chat.wire.responses import completion_body
from core.db import db_future, in_db_thread
from core.envelope import random_hex
from core.errors import InternalError, KiteMeshError
from core.models import Approval, CustomModel, Execution, Group, Mode, Step, Tool, ToolExecution
from core.runs import execution_lease_renew, steps_write

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class Answer:
    reply: ModelReply


@dataclass
class Answered:
    """The run's answer, settled: `body` is the final answer with its credits charged."""

    reply: ModelReply
    body: dict


@dataclass
class Pause:
    approval: Approval
    response: dict  # the pause answer, with its kitemesh approval_id, expires_at and credits_charged


@dataclass
class Progress:
    """An agent started, finished or failed, or a tool call runs, succeeded, failed or was denied (SSE shows
    it as `kitemesh.progress`; the chat page as live reasoning)."""

    status: str  # agents: started | done | failed; tool calls: running | succeeded | failed | denied
    agent: str = ""
    tool: str = ""

    def body(self) -> dict:
        return (
            {"agent": self.agent, "status": self.status} if self.agent else {"tool": self.tool, "status": self.status}
        )


@dataclass
class Run:
    """One request's run: what it sends, what it has reserved, and the steps it has taken."""

    execution: Execution
    hold: Hold | None
    group: Group
    request: ChatRequest
    request_id: str  # this request's (a resume has its own; the execution keeps the first)
    brains: list[tuple[CustomModel, ModelEndpoint]]  # the brain, then its fallbacks in order
    messages: list[dict]
    params: dict
    tools: dict[str, Tool]
    mode: str = Mode.NORMAL
    agents: dict = field(default_factory=dict)  # name → chat.engine.agents.Agent
    resumed_round: list[ToolExecution] = field(default_factory=list)  # decided calls to run first
    reserved: int = 0  # worst case of the steps taken or started, covered by `hold`
    steps: list[Step] = field(default_factory=list)  # this request's, in the order they ended
    steps_written: int = 0  # how many of them are in the database already (written while the run works)
    completion_id: str = field(default_factory=lambda: "chatcmpl_" + random_hex())
    created: int = field(default_factory=lambda: int(time.time()))
    settlement: asyncio.Future | None = field(default=None, repr=False)  # the one finish of this request

    def kitemesh(self, credits_charged: int | None = None) -> dict:
        body = {"execution_id": str(self.execution.id), "request_id": self.request_id, "mode": self.mode}
        if credits_charged is not None:
            body["credits_charged"] = credits_charged
        return body

    def body(self, message: dict, finish_reason: str) -> dict:
        """This request's answer (the final one, or a pause) as one JSON body; its credits are the
        settlement's to fill in."""
        return completion_body(
            completion_id=self.completion_id,
            created=self.created,
            model=self.request.model,
            message=message,
            finish_reason=finish_reason,
            usage=self.usage(),
            kitemesh=self.kitemesh(credits_charged=0),
        )

    def usage(self) -> dict:
        prompt = sum(s.prompt_tokens for s in self.steps)
        completion = sum(s.completion_tokens for s in self.steps)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def reserve(self, amount: int) -> None:
        """Make the hold cover the next steps too (402 mid-run when the team cannot)."""
        if self.hold is not None and self.reserved + amount <= self.hold.amount:
            self.reserved += amount
            return
        extra = self.reserved + amount - (self.hold.amount if self.hold else 0)
        if extra > 0:
            self.hold = await self.db(hold_reserve, execution=self.execution, hold=self.hold, amount=extra)
        self.reserved += amount

    async def db(self, work: Callable[..., T], /, **kwargs: Any) -> T:
        """`work(**kwargs)` in a database thread, after writing the steps that ended since the run last
        wrote: a run whose process dies then has on record every model call and tool run it completed,
        which its recovery charges (approvals.recovery)."""
        steps = self.steps[self.steps_written :]
        self.steps_written = len(self.steps)
        return await in_db_thread(_after_steps_written, steps=steps, work=work, kwargs=kwargs)

    def step_model(
        self, model: CustomModel, agent: str, usage: Usage, started: float, status: str, error: str = ""
    ) -> None:
        """Record a model call (every one ends here, whatever its outcome, so it is measured here too)."""
        elapsed = time.monotonic() - started
        upstream_call_observe(model=model.model, seconds=elapsed)
        self.steps.append(
            Step(
                execution=self.execution,
                kind=Step.Kind.MODEL_CALL,
                agent=agent,
                custom_model=model,
                model_name=model.model,
                status=status,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                usage_estimated=usage.estimated,
                cost=model_cost(model, usage.prompt_tokens, usage.completion_tokens),
                latency_ms=int(elapsed * 1000),
                error=error[:500],
            )
        )

    def step_tool(self, tool_execution: ToolExecution, tool: Tool, result: ToolResult, started: float) -> None:
        tool_run_count(tool=tool.name, sent=result.sent, ok=result.ok)
        self.steps.append(
            Step(
                execution=self.execution,
                kind=Step.Kind.TOOL_CALL,
                tool_execution=tool_execution,
                model_name=tool.name,
                status=Step.Status.SUCCEEDED if result.ok else Step.Status.FAILED,
                cost=tool.price if result.sent else Decimal(0),
                latency_ms=int((time.monotonic() - started) * 1000),
                error=result.error[:500],
            )
        )

    def step_denied(self, tool_execution: ToolExecution) -> None:
        """A denied call as a step of its own (it never ran, it costs nothing): every call is on the record."""
        self.steps.append(
            Step(
                execution=self.execution,
                kind=Step.Kind.TOOL_CALL,
                tool_execution=tool_execution,
                model_name=tool_execution.tool_name,
                status=Step.Status.DENIED,
            )
        )

    async def stopped(self, exc: BaseException) -> KiteMeshError | None:
        """Settle a run that stopped on `exc` (every way out of a run but its answer or pause comes here):
        cancelled when the client left, else failed. The error to answer with, None when there is no one
        left to answer."""
        if isinstance(exc, asyncio.CancelledError | GeneratorExit):
            await self.finish(Execution.Status.CANCELLED)
            return None
        error = exc if isinstance(exc, KiteMeshError) else InternalError()
        if error is not exc:
            logger.error("run %s failed", self.execution.id, exc_info=exc)
        try:
            await self.finish(Execution.Status.FAILED, error=error)
        except InternalError as failure:  # the outcome could not be written (its settlement still ran)
            return failure
        return error

    async def finish(self, status: str, *, response: dict | None = None, error: KiteMeshError | None = None) -> int:
        """Settle the request, once. Shielded: a client that disconnects must not cancel the settlement
        of what it used; and when it disconnects while the settlement runs, the caller's cleanup awaits
        that same settlement instead of starting another. InternalError when the outcome could not be
        written (chat.services.executions.execution_finish)."""
        if self.settlement is None:
            self.settlement = db_future(
                execution_finish,
                execution=self.execution,
                hold=self.hold,
                steps=self.steps,
                steps_written=self.steps_written,
                status=status,
                response=response,
                error=error,
            )
        return await asyncio.shield(self.settlement)


def partial_usage(messages: list[dict], produced: str) -> Usage:
    """What a call cut short has used, estimated (the upstream reports usage only at the end).
    A call that failed before producing anything is not charged; see README, Billing."""
    return Usage(tokens_estimate(prompt_length(messages)), tokens_estimate(len(produced)), estimated=True)


def _after_steps_written(*, steps: list[Step], work: Callable[..., T], kwargs: dict) -> T:
    if steps:
        steps_write(steps=steps)
    return work(**kwargs)


async def lease_renewals(execution: Execution) -> None:
    """While a run works, its process renews the lease on its execution, every third of
    KITEMESH_RUN_LEASE_SECONDS (the renderers cancel this when the run ends): a lease left to lapse tells
    the sweep and any reader that the process died (approvals.recovery)."""
    while True:
        await asyncio.sleep(settings.KITEMESH_RUN_LEASE_SECONDS / 3)
        try:
            await in_db_thread(execution_lease_renew, execution=execution)
        except Exception:  # the database is away: try again at the next turn, before the lease lapses
            logger.warning("run %s: its lease could not be renewed", execution.id, exc_info=True)
