"""What the engine counts as it serves: model calls, their failures, streams, tool runs."""

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import Counter, Gauge, Histogram

from core.metrics import FIRST_BYTE_BUCKETS, LATENCY_BUCKETS, request_arrived

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
    arrived = request_arrived.get()
    if arrived is not None:  # None: served without the ASGI layer (nothing to time it from)
        STREAM_FIRST_BYTE.observe(time.monotonic() - arrived)
