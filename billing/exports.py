"""CSV exports of the ledger and of usage, streamed: rows come from `.iterator()` querysets in batches
(one link query per batch, never per row) and are written as they are read, so a year of data never
sits in memory."""

import csv
from collections.abc import AsyncIterator, Iterator
from datetime import datetime

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIRequest
from django.db.models import QuerySet
from django.http import HttpRequest, StreamingHttpResponse

from billing.models import LedgerEntry
from billing.selectors import batched, execution_approval_ids, ledger_charge_links
from core.models import Execution

BATCH = 1000
LEDGER_HEADER = [
    "entry_id",
    "created_at",
    "team",
    "kind",
    "amount",
    "balance_after",
    "held_after",
    "execution_id",
    "request_id",
    "tool_execution_ids",
    "approval_ids",
    "actor",
    "reason",
]
USAGE_HEADER = [
    "execution_id",
    "request_id",
    "created_at",
    "finished_at",
    "team",
    "group_id",
    "group",
    "token",
    "mode",
    "status",
    "prompt_tokens",
    "completion_tokens",
    "credits_charged",
    "approval_ids",
]


class _Echo:
    """A file-like object whose write returns the line, so csv.writer produces strings to stream."""

    def write(self, value: str) -> str:
        return value


def _text(value: object) -> str:
    """A cell that a spreadsheet will not run as a formula (reasons and names are typed by people)."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _iso(value: datetime | None) -> str:
    return value.isoformat() if value else ""


def _ids(values: list) -> str:
    return " ".join(str(v) for v in values)


def ledger_csv_rows(entries: QuerySet[LedgerEntry]) -> Iterator[list]:
    for batch in batched(entries.order_by("id").iterator(chunk_size=BATCH), BATCH):
        links = ledger_charge_links(entries=batch)
        for entry in batch:
            link = links.get(entry.id)
            yield [
                entry.id,
                _iso(entry.created_at),
                _text(entry.team.name),
                entry.kind,
                entry.amount,
                entry.balance_after,
                entry.held_after,
                entry.execution_id or "",
                _text(entry.execution.request_id) if entry.execution else "",
                _ids(link.tool_execution_ids) if link else "",
                _ids(link.approval_ids) if link else "",
                _text(entry.actor.get_username()) if entry.actor else "",
                _text(entry.reason),
            ]


def usage_csv_rows(executions: QuerySet[Execution]) -> Iterator[list]:
    for batch in batched(executions.iterator(chunk_size=BATCH), BATCH):
        approvals = execution_approval_ids(execution_ids=[e.id for e in batch])
        for execution in batch:
            yield [
                execution.id,
                _text(execution.request_id),
                _iso(execution.created_at),
                _iso(execution.finished_at),
                _text(execution.team.name),
                execution.group_id or "",
                _text(execution.group.name) if execution.group else "",
                _text(execution.token.name) if execution.token else "",
                execution.mode,
                execution.status,
                execution.prompt_tokens,
                execution.completion_tokens,
                execution.credits_charged,
                _ids(approvals.get(execution.id, [])),
            ]


def _csv_lines(header: list[str], rows: Iterator[list]) -> Iterator[str]:
    writer = csv.writer(_Echo())
    yield writer.writerow(header)
    for row in rows:
        yield writer.writerow(row)


def _take(lines: Iterator[str], count: int) -> str:
    return "".join(line for _, line in zip(range(count), lines, strict=False))


async def _async_chunks(lines: Iterator[str]) -> AsyncIterator[str]:
    """Under ASGI Django would buffer a sync iterator whole before sending it; pull it a few hundred
    lines at a time in the request's own sync thread instead (where its database cursor lives)."""
    pull = sync_to_async(_take, thread_sensitive=True)
    while chunk := await pull(lines, 500):
        yield chunk


def csv_response(
    request: HttpRequest, *, filename: str, header: list[str], rows: Iterator[list]
) -> StreamingHttpResponse:
    lines = _csv_lines(header, rows)
    content = _async_chunks(lines) if isinstance(request, ASGIRequest) else lines
    response = StreamingHttpResponse(content, content_type="text/csv; charset=utf-8")
    response["Content-Disposition"] = f'attachment; filename="{filename}"'
    return response
