"""Prometheus metrics: what each process counts as it serves (requests, upstream calls, streams, tool runs)
and what the database knows (approvals by status, credits charged by team), read when /metrics is scraped.

Several uvicorn workers: set PROMETHEUS_MULTIPROC_DIR to a directory the workers share, empty at start-up;
each worker writes its values there and /metrics, answered by any worker, sums them all."""

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from functools import lru_cache

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.db.models import Count, Q, Sum
from django.http import HttpRequest, HttpResponse
from django.urls import Resolver404, resolve
from django.views.decorators.http import require_safe
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from billing.models import LedgerEntry
from chat.errors import AuthenticationError, PermissionDenied
from chat.wire import error_response, request_id_of
from core.models import Approval, Team

logger = logging.getLogger(__name__)

# prometheus_client reads this variable itself (at import) to choose where values live; read the same one.
MULTIPROC_DIR = os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")

# Model calls and whole requests run from milliseconds (errors, the scripted model) to minutes (long
# generations, streams), so the buckets reach past the default 10 s.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300)
FIRST_BYTE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
OTHER = "other"
# No response started: Django returns without answering when the client leaves before its body was read.
# Labelled as nginx logs it ("client closed request"), so it is not mistaken for a success or a server error.
STATUS_CLIENT_CLOSED = 499

HTTP_REQUESTS = Counter(
    "kitemesh_http_requests", "HTTP requests answered, by route pattern.", ["endpoint", "method", "status"]
)
HTTP_DURATION = Histogram(
    "kitemesh_http_request_duration_seconds",
    "Time from a request's arrival to the end of its response (a stream's last byte).",
    ["endpoint"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_DURATION = Histogram(
    "kitemesh_upstream_duration_seconds",
    "Duration of each model call (brain or agent), by upstream model name.",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
UPSTREAM_ERRORS = Counter(
    "kitemesh_upstream_errors", "Model calls that failed, by group id and error code.", ["group", "code"]
)
STREAM_FIRST_BYTE = Histogram(
    "kitemesh_stream_first_byte_seconds",
    "Time from a streamed request's arrival to its first SSE event.",
    buckets=FIRST_BYTE_BUCKETS,
)
OPEN_STREAMS = Gauge(
    "kitemesh_open_streams", "Chat SSE responses (completions, resumes) being sent now.", multiprocess_mode="livesum"
)
TOOL_RUNS = Counter(
    "kitemesh_tool_runs", "HTTP tool calls, by tool name and outcome (succeeded, failed, not_sent).", ["tool", "status"]
)

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

# When the request being served arrived (monotonic), set by the ASGI layer; the SSE first byte is timed from it.
_request_arrived: ContextVar[float | None] = ContextVar("kitemesh_request_arrived", default=None)


# --- Recording (each call is one cheap in-memory update: no query, no I/O) -----------------------------


@lru_cache(maxsize=4096)
def endpoint_of(path: str) -> str:
    """The route pattern serving `path` ("/v1/approvals/<str:approval_id>"), or "other": labels stay as few
    as the routes. Cached because the ASGI layer asks for every request."""
    try:
        route = resolve(path).route
    except Resolver404:
        return OTHER
    return "/" + route.removeprefix("^").removesuffix("$")


def _http_request_observe(scope: dict, status: int, arrived: float) -> None:
    endpoint = endpoint_of(scope["path"])
    method = scope["method"] if scope["method"] in METHODS else OTHER
    HTTP_REQUESTS.labels(endpoint, method, str(status)).inc()
    HTTP_DURATION.labels(endpoint).observe(time.monotonic() - arrived)


async def http_measure(app: ASGIApp, scope: dict, receive: Callable, send: Callable) -> None:
    """Serve one HTTP request with the ASGI `app`, then count and time it. A request ends with its last body
    message (recorded before it is sent, so a client that has the whole answer finds it counted), or when
    `app` returns without one (the client left mid-stream, or before any answer)."""
    arrived = time.monotonic()
    _request_arrived.set(arrived)
    status, observed = STATUS_CLIENT_CLOSED, False

    def observe() -> None:
        nonlocal observed
        if not observed:
            observed = True
            _http_request_observe(scope, status, arrived)

    async def measured_send(message: dict) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            observe()
        await send(message)

    try:
        await app(scope, receive, measured_send)
    finally:
        observe()


def upstream_call_observe(*, model: str, seconds: float) -> None:
    UPSTREAM_DURATION.labels(model).observe(seconds)


def upstream_error_count(*, group: str, code: str) -> None:
    UPSTREAM_ERRORS.labels(group, code).inc()


def tool_run_count(*, tool: str, sent: bool, ok: bool) -> None:
    TOOL_RUNS.labels(tool, "succeeded" if ok else ("failed" if sent else "not_sent")).inc()


@contextmanager
def stream_open() -> Iterator[None]:
    """Count an SSE response as open while its events are being sent."""
    OPEN_STREAMS.inc()
    try:
        yield
    finally:
        OPEN_STREAMS.dec()


def stream_first_byte_observe() -> None:
    arrived = _request_arrived.get()
    if arrived is not None:  # None: served without the ASGI layer (nothing to time it from)
        STREAM_FIRST_BYTE.observe(time.monotonic() - arrived)


def process_exit() -> None:
    """A worker that stops cleanly removes its live gauges (open streams), which would otherwise be summed
    forever; its counters and histograms stay, as totals must."""
    if MULTIPROC_DIR:
        mark_process_dead(os.getpid())


# --- What the database knows, read at scrape time -----------------------------------------------------


def _approvals_family(counts: dict[str, int]) -> GaugeMetricFamily:
    family = GaugeMetricFamily("kitemesh_approvals", "Approvals by status (from the database).", labels=["status"])
    for status in Approval.Status.values:
        family.add_metric([status], counts.get(status, 0))
    return family


def _credits_family(charged: Iterable[tuple[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(
        "kitemesh_credits_charged", "Credits charged by team (from the ledger).", labels=["team"]
    )
    for team, credits in charged:
        family.add_metric([team], credits)
    return family


def _approval_counts() -> dict[str, int]:
    # approvals/ and billing/ have no selector for these totals; both are one aggregate query, read here.
    return dict(Approval.objects.order_by().values_list("status").annotate(n=Count("id")))


def _credits_charged() -> list[tuple[str, int]]:
    """Every team, with 0 before its first charge, so rate() has a start; charges are negative entries."""
    charges = Sum("ledger_entries__amount", filter=Q(ledger_entries__kind=LedgerEntry.Kind.CHARGE), default=0)
    rows = Team.objects.order_by("name").annotate(charged=charges).values_list("name", "charged")
    return [(name, -charged) for name, charged in rows]


class DatabaseCollector(Collector):
    """Approvals by status and credits charged by team, counted by the database: exact across workers and
    restarts (no process has to have seen the change), for two aggregate queries per scrape."""

    def describe(self) -> list[Metric]:
        # Lets a registry learn the names without querying (registration happens at import).
        return [_approvals_family({}), _credits_family([])]

    def collect(self) -> Iterator[Metric]:
        try:
            counts, charged = _approval_counts(), _credits_charged()
        except DatabaseError as exc:  # the process metrics still matter most when the database is down
            logger.warning("metrics: the database totals are left out (%s)", type(exc).__name__)
            return
        yield _approvals_family(counts)
        yield _credits_family(charged)


DATABASE_COLLECTOR = DatabaseCollector()
REGISTRY.register(DATABASE_COLLECTOR)


def exposition() -> bytes:
    """The Prometheus text: this process's registry, or every worker's values summed from the shared
    directory. Sync: the database totals query."""
    if not MULTIPROC_DIR:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    registry.register(DATABASE_COLLECTOR)
    return generate_latest(registry)


# --- GET /metrics -----------------------------------------------------------------------------------


def _scrape_error(request: HttpRequest) -> HttpResponse | None:
    """401 in the API's error envelope unless KITEMESH_METRICS_TOKEN is sent as the Bearer token; without
    one set, open in development and 403 in production (KITEMESH_METRICS_OPEN_WITHOUT_TOKEN)."""
    expected = settings.KITEMESH_METRICS_TOKEN
    if not expected:
        if settings.KITEMESH_METRICS_OPEN_WITHOUT_TOKEN:
            return None
        response = error_response(
            PermissionDenied("Metrics are off: set KITEMESH_METRICS_TOKEN to scrape them with it."), request
        )
        response["X-Request-ID"] = request_id_of(request)
        return response
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() == "bearer" and given and hmac.compare_digest(given.encode(), expected.encode()):
        return None
    message = "Invalid metrics token." if given else "Missing Bearer metrics token."
    response = error_response(AuthenticationError(message), request)
    response["X-Request-ID"] = request_id_of(request)
    response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_safe
async def metrics_view(request: HttpRequest) -> HttpResponse:
    refused = _scrape_error(request)
    if refused is not None:
        return refused
    return HttpResponse(await sync_to_async(exposition)(), content_type=CONTENT_TYPE_LATEST)
