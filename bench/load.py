"""The benchmark's Python load generator, run as its own process (pinned apart from the gateway under test).
It speaks HTTP/1.1 over raw asyncio streams, so the client costs little and timestamps each SSE chunk as it
arrives. Subcommands: `sse` (TTFB and inter-chunk gaps), `streams` (many concurrent open streams),
`approvals` (pause + resume round trips), `nonstream` (the fallback driver when wrk is missing).
Each prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import statistics
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

ERROR_SAMPLES = 5


# --- A minimal HTTP/1.1 client --------------------------------------------------------------------


class HttpError(Exception):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


class Connection:
    """One keep-alive connection; requests on it run one at a time."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def send(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        """Write the request and read the status line and headers; the body is read separately."""
        await self.open()
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise HttpError(f"bad status line {status_line!r}")
        response_headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            response_headers[name.strip().lower()] = value.strip()
        return Response(int(parts[1]), response_headers)

    async def body_pieces(self, response: Response) -> AsyncIterator[bytes]:
        """The body as it arrives (chunked, Content-Length, or until close)."""
        assert self.reader is not None
        headers = response.headers
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")  # no trailers are expected
                    break
                data = await self.reader.readexactly(size + 2)
                yield data[:-2]
        elif "content-length" in headers:
            length = int(headers["content-length"])
            if length:
                yield await self.reader.readexactly(length)
        else:
            while data := await self.reader.read(65536):
                yield data
            self.close()
            return
        if headers.get("connection", "").lower() == "close":
            self.close()

    async def request(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> Response:
        response = await self.send(method, path, body, headers)
        response.body = b"".join([piece async for piece in self.body_pieces(response)])
        return response


@dataclass
class Target:
    """Where to send and as whom: a gateway or the direct upstream."""

    host: str
    port: int
    path: str
    token: str
    model: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Target:
        url = urlsplit(args.url)
        return cls(url.hostname or "127.0.0.1", url.port or 80, url.path, args.token, args.model)

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}

    def body(self, **fields: Any) -> bytes:
        payload = {"model": self.model, "messages": [{"role": "user", "content": PROMPT}], **fields}
        return json.dumps(payload).encode()


PROMPT = "Write a short paragraph about benchmarking HTTP gateways."


# --- Results --------------------------------------------------------------------------------------


@dataclass
class Errors:
    """Counts by kind (`status 502`, `ReadError`, `no [DONE]`), with a few samples of what came back."""

    counts: Counter = field(default_factory=Counter)
    samples: list[str] = field(default_factory=list)

    def add(self, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if len(self.samples) < ERROR_SAMPLES:
            self.samples.append(f"{kind}: {detail[:500]}" if detail else kind)

    def as_dict(self) -> dict:
        return {"total": sum(self.counts.values()), "by_kind": dict(self.counts), "samples": self.samples}


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summary_ms(values: list[float]) -> dict:
    """p50, p99, mean and max of durations given in seconds, in milliseconds."""
    if not values:
        return {"count": 0, "p50": None, "p99": None, "mean": None, "max": None}
    to_ms = 1000.0
    return {
        "count": len(values),
        "p50": percentile(values, 50) * to_ms,
        "p99": percentile(values, 99) * to_ms,
        "mean": statistics.fmean(values) * to_ms,
        "max": max(values) * to_ms,
    }


# --- SSE reading ----------------------------------------------------------------------------------


@dataclass
class StreamResult:
    status: int = 0
    first_event: float | None = None  # seconds from sending to the first data event
    first_content: float | None = None  # seconds from sending to the first event carrying text
    content_times: list[float] = field(default_factory=list)
    events: int = 0
    done: bool = False
    error_event: str | None = None
    body_head: str = ""  # the start of a non-200 body, for the report


async def stream_once(conn: Connection, target: Target, *, parse: bool) -> StreamResult:
    """One streamed completion. With `parse`, every event is decoded to time the text-carrying ones;
    without it only [DONE] and error events are looked for (cheap enough for 1,000 streams)."""
    result = StreamResult()
    body = target.body(stream=True, stream_options={"include_usage": True})
    started = time.perf_counter()
    response = await conn.send("POST", target.path, body, target.headers)
    result.status = response.status
    pending = b""
    async for piece in conn.body_pieces(response):
        if response.status != 200:
            result.body_head += piece.decode("utf-8", "replace")
            continue
        now = time.perf_counter() - started
        pending += piece
        *events, pending = pending.split(b"\n\n")
        for event in events:
            _event_record(result, event.strip(), now, parse)
    return result


def _event_record(result: StreamResult, event: bytes, now: float, parse: bool) -> None:
    if not event.startswith(b"data:"):
        return  # comments and keep-alive pings carry no data
    data = event[5:].strip()
    result.events += 1
    if result.first_event is None:
        result.first_event = now
    if data == b"[DONE]":
        result.done = True
        return
    if b'"error"' in data and result.error_event is None:
        result.error_event = data.decode("utf-8", "replace")
    if not parse:
        return
    chunk = json.loads(data)
    choices = chunk.get("choices") or []
    if choices and (choices[0].get("delta") or {}).get("content"):
        if result.first_content is None:
            result.first_content = now
        result.content_times.append(now)


def stream_problem(result: StreamResult) -> tuple[str, str] | None:
    if result.status != 200:
        return f"status {result.status}", result.body_head
    if result.error_event is not None:
        return "error event", result.error_event
    if not result.done:
        return "no [DONE]", f"{result.events} events"
    return None


# --- Scenarios ------------------------------------------------------------------------------------


async def run_workers(concurrency: int, work: Callable[[int], Awaitable[None]]) -> None:
    await asyncio.gather(*(work(i) for i in range(concurrency)))


async def scenario_sse(target: Target, concurrency: int, streams: int) -> dict:
    """TTFB (to the first text chunk) and the gaps between text chunks, `streams` in all."""
    ttfb, gaps, errors = [], [], Errors()
    remaining = streams

    async def worker(_: int) -> None:
        nonlocal remaining
        conn = Connection(target.host, target.port)
        while remaining > 0:
            remaining -= 1
            try:
                result = await stream_once(conn, target, parse=True)
            except (OSError, asyncio.IncompleteReadError, HttpError, ValueError) as exc:
                errors.add(type(exc).__name__, str(exc))
                conn.close()
                continue
            problem = stream_problem(result)
            if problem is not None:
                errors.add(*problem)
                continue
            if result.first_content is not None:
                ttfb.append(result.first_content)
            gaps.extend(b - a for a, b in zip(result.content_times, result.content_times[1:], strict=False))
        conn.close()

    await run_workers(concurrency, worker)
    return {"ttfb_ms": summary_ms(ttfb), "gap_ms": summary_ms(gaps), "errors": errors.as_dict()}


async def scenario_streams(target: Target, count: int, timeout: float) -> dict:
    """`count` streams opened at once, each on its own connection: how many fail, and how many were
    streaming at the same moment at the peak (to show they overlapped)."""
    errors = Errors()
    durations: list[float] = []
    streaming: list[tuple[float, float]] = []  # (first event, end) of each good stream

    async def one(_: int) -> None:
        conn = Connection(target.host, target.port)
        started = time.perf_counter()
        try:
            result = await asyncio.wait_for(stream_once(conn, target, parse=False), timeout)
        except (OSError, asyncio.IncompleteReadError, HttpError, TimeoutError) as exc:
            errors.add(type(exc).__name__, str(exc))
            return
        finally:
            conn.close()
        problem = stream_problem(result)
        if problem is not None:
            errors.add(*problem)
            return
        ended = time.perf_counter()
        durations.append(ended - started)
        streaming.append((started + (result.first_event or 0.0), ended))

    started = time.perf_counter()
    await run_workers(count, one)
    return {
        "streams": count,
        "completed": len(durations),
        "peak_streaming": peak_overlap(streaming),
        "duration_ms": summary_ms(durations),
        "wall_s": time.perf_counter() - started,
        "errors": errors.as_dict(),
    }


def peak_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals covering one instant (a sweep over starts and ends)."""
    edges = sorted([(start, 1) for start, _ in intervals] + [(end, -1) for _, end in intervals])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


async def approval_round_trip(conn: Connection, target: Target) -> tuple[str, str] | None:
    """Pause on a tool call needing approval, approve every call, expect the final answer.
    Returns what went wrong, or None."""
    paused = await conn.request("POST", target.path, target.body(), target.headers)
    if paused.status != 200:
        return f"pause: status {paused.status}", paused.body.decode("utf-8", "replace")
    answer = paused.json()
    calls = answer["choices"][0]["message"].get("tool_calls") or []
    approval_id = (answer.get("kitemesh") or {}).get("approval_id")
    if not calls or not approval_id:
        return "pause: no tool_calls/approval_id", paused.body.decode("utf-8", "replace")
    resume_body = {
        "model": target.model,
        "approval_id": approval_id,
        "approved_tool_execution_ids": [call["id"] for call in calls],
    }
    resume_path = target.path.replace("/chat/completions", "/chat/resume")
    resumed = await conn.request("POST", resume_path, json.dumps(resume_body).encode(), target.headers)
    if resumed.status != 200:
        return f"resume: status {resumed.status}", resumed.body.decode("utf-8", "replace")
    final = resumed.json()["choices"][0]
    if final.get("finish_reason") != "stop" or not final["message"].get("content"):
        return "resume: not a final answer", resumed.body.decode("utf-8", "replace")
    return None


async def scenario_approvals(target: Target, concurrency: int, duration: float) -> dict:
    """Completed pause + resume round trips per second at a fixed concurrency."""
    round_trips, errors = [], Errors()
    deadline = time.perf_counter() + duration

    async def worker(_: int) -> None:
        conn = Connection(target.host, target.port)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                problem = await approval_round_trip(conn, target)
            except (OSError, asyncio.IncompleteReadError, HttpError, ValueError, KeyError, IndexError) as exc:
                errors.add(type(exc).__name__, str(exc))
                conn.close()
                continue
            if problem is not None:
                errors.add(*problem)
            else:
                round_trips.append(time.perf_counter() - started)
        conn.close()

    started = time.perf_counter()
    await run_workers(concurrency, worker)
    elapsed = time.perf_counter() - started
    return {
        "round_trips": len(round_trips),
        "per_second": len(round_trips) / elapsed,
        "round_trip_ms": summary_ms(round_trips),
        "errors": errors.as_dict(),
    }


async def scenario_nonstream(target: Target, concurrency: int, duration: float) -> dict:
    """The fallback for wrk: closed-loop non-stream requests on `concurrency` keep-alive connections."""
    latencies, errors = [], Errors()
    deadline = time.perf_counter() + duration
    body = target.body()

    async def worker(_: int) -> None:
        conn = Connection(target.host, target.port)
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                response = await conn.request("POST", target.path, body, target.headers)
            except (OSError, asyncio.IncompleteReadError, HttpError) as exc:
                errors.add(type(exc).__name__, str(exc))
                conn.close()
                continue
            if response.status != 200:
                errors.add(f"status {response.status}", response.body.decode("utf-8", "replace"))
            latencies.append(time.perf_counter() - started)
        conn.close()

    started = time.perf_counter()
    await run_workers(concurrency, worker)
    elapsed = time.perf_counter() - started
    return {"requests_per_s": len(latencies) / elapsed, "latency_ms": summary_ms(latencies), "errors": errors.as_dict()}


# --- Entry point ----------------------------------------------------------------------------------


def raise_open_files_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="scenario", required=True)
    for name in ("sse", "streams", "approvals", "nonstream"):
        command = sub.add_parser(name)
        command.add_argument("--url", required=True, help="the chat completions URL")
        command.add_argument("--token", default="bench")
        command.add_argument("--model", required=True)
        command.add_argument("--concurrency", type=int, default=1)
        command.add_argument("--count", type=int, default=10, help="streams in all (sse, streams)")
        command.add_argument("--duration", type=float, default=10.0, help="seconds (approvals, nonstream)")
        command.add_argument("--timeout", type=float, default=120.0, help="per stream (streams)")
    return parser.parse_args()


async def main(args: argparse.Namespace) -> dict:
    target = Target.from_args(args)
    if args.scenario == "sse":
        return await scenario_sse(target, args.concurrency, args.count)
    if args.scenario == "streams":
        return await scenario_streams(target, args.count, args.timeout)
    if args.scenario == "approvals":
        return await scenario_approvals(target, args.concurrency, args.duration)
    return await scenario_nonstream(target, args.concurrency, args.duration)


def run() -> None:
    args = parse_args()
    raise_open_files_limit()
    try:
        import uvloop
    except ImportError:
        result = asyncio.run(main(args))
    else:
        result = uvloop.run(main(args))
    print(json.dumps(result))


if __name__ == "__main__":
    run()
