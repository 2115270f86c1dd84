"""Prometheus metrics: the HTTP requests every process serves, the exposition at /metrics, and the
collectors of what the database knows, read at each scrape. Each app defines and registers its own
metrics (chat.metrics, approvals.metrics, billing.metrics).

Several uvicorn workers: set PROMETHEUS_MULTIPROC_DIR to a directory the workers share, empty at start-up;
each worker writes its values there and /metrics, answered by any worker, sums them all."""

import hmac
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from functools import lru_cache

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponse
from django.urls import Resolver404, resolve
from django.views.decorators.http import require_safe
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from core.envelope import error_response
from core.errors import AuthenticationError, PermissionDenied

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
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]

# When the request being served arrived (monotonic), set by the ASGI layer; a stream's first byte is timed from it.
request_arrived: ContextVar[float | None] = ContextVar("kitemesh_request_arrived", default=None)


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
    request_arrived.set(arrived)
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


def process_exit() -> None:
    """A worker that stops cleanly removes its live gauges (open streams), which would otherwise be summed
    forever; its counters and histograms stay, as totals must."""
    if MULTIPROC_DIR:
        mark_process_dead(os.getpid())


# --- What the database knows, read at scrape time -----------------------------------------------------


class DatabaseCollector(Collector):
    """A family of totals counted by the database at each scrape: exact across workers and restarts (no
    process has to have seen the change). `empty()` describes it without querying; `counted()` queries."""

    def empty(self) -> Metric:
        raise NotImplementedError

    def counted(self) -> Metric:
        raise NotImplementedError

    def describe(self) -> list[Metric]:
        return [self.empty()]  # lets a registry learn the name without querying (registration is at import)

    def collect(self) -> Iterator[Metric]:
        try:
            yield self.counted()
        except DatabaseError as exc:  # the process metrics still matter most when the database is down
            logger.warning("metrics: %s is left out (%s)", self.empty().name, type(exc).__name__)


_database_collectors: list[DatabaseCollector] = []


def database_collector_register(collector: DatabaseCollector) -> None:
    """Apps register their database totals here (at import); every scrape reads them."""
    _database_collectors.append(collector)
    REGISTRY.register(collector)


def exposition() -> bytes:
    """The Prometheus text: this process's registry, or every worker's values summed from the shared
    directory. Sync: the database totals query."""
    if not MULTIPROC_DIR:
        return generate_latest(REGISTRY)
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    for collector in _database_collectors:
        registry.register(collector)
    return generate_latest(registry)


# --- GET /metrics -----------------------------------------------------------------------------------


def _scrape_error(request: HttpRequest) -> HttpResponse | None:
    """401 in the API's error envelope unless KITEMESH_METRICS_TOKEN is sent as the Bearer token; without
    one set, open in development and 403 in production (KITEMESH_METRICS_OPEN_WITHOUT_TOKEN)."""
    expected = settings.KITEMESH_METRICS_TOKEN
    if not expected:
        if settings.KITEMESH_METRICS_OPEN_WITHOUT_TOKEN:
            return None
        return error_response(
            PermissionDenied("Metrics are off: set KITEMESH_METRICS_TOKEN to scrape them with it."), request
        )
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    given = given.strip()
    if scheme.lower() == "bearer" and given and hmac.compare_digest(given.encode(), expected.encode()):
        return None
    message = "Invalid metrics token." if given else "Missing Bearer metrics token."
    response = error_response(AuthenticationError(message), request)
    response["WWW-Authenticate"] = 'Bearer realm="metrics"'
    return response


@require_safe
async def metrics_view(request: HttpRequest) -> HttpResponse:
    refused = _scrape_error(request)
    if refused is not None:
        return refused
    return HttpResponse(await sync_to_async(exposition)(), content_type=CONTENT_TYPE_LATEST)
