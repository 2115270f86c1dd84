"""GET /metrics (SPEC §2 "Other endpoints"): Prometheus text, protected by KITEMESH_METRICS_TOKEN when set;
what the requests, streams, upstream calls and tool runs served by the live server add to it; the database
totals (approvals, credits); several server processes sharing PROMETHEUS_MULTIPROC_DIR; /healthz and /readyz.

The live server's counters live as long as the test process, so in-process tests compare before and after."""

import json
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from django.db.models import Sum
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from billing.models import LedgerEntry
from core.models import Approval
from tests.conftest import Setup, make_setup
from tests.support.server_process import ServerProcess
from tests.support.tool_server import ToolResponse, ToolServer
from tests.support.upstream import FakeUpstream, Reply

COMPLETIONS = "/v1/chat/completions"
METRIC_FAMILIES = {
    "kitemesh_http_requests",
    "kitemesh_http_request_duration_seconds",
    "kitemesh_upstream_duration_seconds",
    "kitemesh_upstream_errors",
    "kitemesh_stream_first_byte_seconds",
    "kitemesh_open_streams",
    "kitemesh_tool_runs",
    "kitemesh_approvals",
    "kitemesh_credits_charged",
}
ORDER_SCHEMA = {"type": "object", "properties": {"order_id": {"type": "string"}}, "required": ["order_id"]}


@dataclass
class Scrape:
    """One /metrics answer, parsed."""

    families: set[str]
    samples: list[Sample]
    text: str

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels` (0 when there are none)."""
        return sum(s.value for s in self.samples if s.name == name and labels.items() <= s.labels.items())


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    response = httpx.get(f"{url}/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    families = list(text_string_to_metric_families(response.text))
    return Scrape({f.name for f in families}, [s for f in families for s in f.samples], response.text)


def moved(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.value(name, **labels) - before.value(name, **labels)


def chat(http: httpx.Client, setup: Setup, content: str = "Hi", **body) -> httpx.Response:
    payload = {"model": setup.model, "messages": [{"role": "user", "content": content}], **body}
    return http.post(COMPLETIONS, json=payload, headers=setup.headers)


def tool_call(name: str, arguments: dict, call_id: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def tools_reply(*calls: dict) -> Reply:
    return Reply(content=None, chunks=[], tool_calls=list(calls), finish_reason="tool_calls")


# --- The endpoint -----------------------------------------------------------------------------------


def test_metrics_answers_prometheus_text_naming_every_kitemesh_metric(live, http):
    response = http.get("/metrics")

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    assert scrape(live.url).families >= METRIC_FAMILIES
    assert "# TYPE kitemesh_open_streams gauge" in response.text


def test_with_a_metrics_token_set_a_scrape_without_it_or_with_another_is_401(live, http, settings):
    settings.KITEMESH_METRICS_TOKEN = "scrape-secret-7f3a"

    for headers in ({}, {"Authorization": "Bearer wrong-secret"}, {"Authorization": "Basic scrape-secret-7f3a"}):
        response = http.get("/metrics", headers=headers)
        assert response.status_code == 401, headers
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("authentication_error", "authentication_error")
        assert error["request_id"] == response.headers["X-Request-ID"]
        assert "kitemesh_" not in response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_with_a_metrics_token_set_a_scrape_with_it_gets_the_metrics(live, settings):
    settings.KITEMESH_METRICS_TOKEN = "scrape-secret-7f3a"

    assert scrape(live.url, {"Authorization": "Bearer scrape-secret-7f3a"}).families >= METRIC_FAMILIES


def test_healthz_and_readyz_answer_200_json(live, http):
    healthz, readyz = http.get("/healthz"), http.get("/readyz")

    assert (healthz.status_code, healthz.json()) == (200, {"status": "ok"})
    assert (readyz.status_code, readyz.json()) == (200, {"status": "ok", "database": "ok"})


# --- Requests and upstream calls ------------------------------------------------------------------------


def test_a_chat_request_is_counted_and_timed_with_its_upstream_call(live, http, setup: Setup, upstream):
    before = scrape(live.url)

    assert chat(http, setup).status_code == 200

    after = scrape(live.url)
    assert moved(before, after, "kitemesh_http_requests_total", endpoint=COMPLETIONS, method="POST", status="200") == 1
    assert moved(before, after, "kitemesh_http_request_duration_seconds_count", endpoint=COMPLETIONS) == 1
    assert moved(before, after, "kitemesh_http_request_duration_seconds_sum", endpoint=COMPLETIONS) > 0
    assert moved(before, after, "kitemesh_upstream_duration_seconds_count", model="up-model") == 1
    assert moved(before, after, "kitemesh_upstream_duration_seconds_sum", model="up-model") > 0
    assert moved(before, after, "kitemesh_stream_first_byte_seconds_count") == 0


def test_requests_are_labelled_by_route_pattern_and_unknown_paths_as_other(live, http, setup: Setup, settings):
    settings.KITEMESH_MAX_BODY_BYTES = 1024
    execution_id = str(uuid.uuid4())
    before = scrape(live.url)

    assert http.get(f"/v1/executions/{execution_id}", headers=setup.headers).status_code == 404
    assert http.get(f"/no/such/page/{execution_id}").status_code == 404
    assert http.post(COMPLETIONS, content=b"x" * 2048, headers=setup.headers).status_code == 413
    assert http.request("PROPFIND", "/metrics").status_code == 403  # CSRF refuses it

    after = scrape(live.url)
    route = "/v1/executions/<str:execution_id>"
    assert moved(before, after, "kitemesh_http_requests_total", endpoint=route, method="GET", status="404") == 1
    assert moved(before, after, "kitemesh_http_requests_total", endpoint="other", method="GET", status="404") == 1
    assert moved(before, after, "kitemesh_http_requests_total", endpoint=COMPLETIONS, status="413") == 1
    assert moved(before, after, "kitemesh_http_requests_total", endpoint="/metrics", method="other", status="403") == 1
    assert execution_id not in after.text


def test_an_upstream_failure_is_counted_by_group_and_code(live, http, setup: Setup, upstream):
    upstream.queue(Reply(status=500))
    before = scrape(live.url)

    assert chat(http, setup).status_code == 502

    after = scrape(live.url)
    group = str(setup.group.id)
    assert moved(before, after, "kitemesh_upstream_errors_total", group=group, code="upstream_error") == 1
    assert moved(before, after, "kitemesh_http_requests_total", endpoint=COMPLETIONS, status="502") == 1
    assert moved(before, after, "kitemesh_upstream_duration_seconds_count", model="up-model") == 1


def test_a_stream_is_open_while_it_runs_and_its_first_byte_is_timed(live, http, setup: Setup, upstream):
    upstream.queue(Reply(chunks=["One ", "two ", "three."], chunk_delay=0.3))
    before = scrape(live.url)
    body = {"model": setup.model, "messages": [{"role": "user", "content": "Count"}], "stream": True}

    with http.stream("POST", COMPLETIONS, json=body, headers=setup.headers) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")
        during = scrape(live.url)
        rest = list(lines)

    assert [line for line in rest if line][-1] == "data: [DONE]"
    after = scrape(live.url)
    assert moved(before, during, "kitemesh_open_streams") == 1
    assert moved(before, after, "kitemesh_open_streams") == 0
    assert moved(before, after, "kitemesh_stream_first_byte_seconds_count") == 1
    assert moved(before, after, "kitemesh_http_requests_total", endpoint=COMPLETIONS, status="200") == 1
    # The first byte left with the first chunk; the request lasted until the last, 3 × 0.3 s later.
    first_byte = moved(before, after, "kitemesh_stream_first_byte_seconds_sum")
    duration = moved(before, after, "kitemesh_http_request_duration_seconds_sum", endpoint=COMPLETIONS)
    assert 0 < first_byte < duration - 0.6


def test_tool_runs_are_counted_by_tool_and_outcome(
    live, http, setup: Setup, upstream, tool_server: ToolServer, group_tool
):
    group_tool("lookup_order", method="GET", parameters=ORDER_SCHEMA, path="/orders")
    group_tool("create_ticket", path="/tickets")
    tool_server.queue(ToolResponse(status=200), ToolResponse(status=500, body='{"error": "down"}'))
    upstream.queue(
        # Round 1: one call that runs, one with invalid arguments (not sent); round 2: a call the tool fails.
        tools_reply(tool_call("lookup_order", {"order_id": "A1"}, "c1"), tool_call("lookup_order", {}, "c2")),
        tools_reply(tool_call("create_ticket", {}, "c3")),
        Reply(content="Done."),
    )
    before = scrape(live.url)

    assert chat(http, setup).status_code == 200

    after = scrape(live.url)
    assert moved(before, after, "kitemesh_tool_runs_total", tool="lookup_order", status="succeeded") == 1
    assert moved(before, after, "kitemesh_tool_runs_total", tool="lookup_order", status="not_sent") == 1
    assert moved(before, after, "kitemesh_tool_runs_total", tool="create_ticket", status="failed") == 1
    assert moved(before, after, "kitemesh_upstream_duration_seconds_count", model="up-model") == 3


# --- Database totals --------------------------------------------------------------------------------------


def test_approvals_by_status_and_credits_by_team_are_read_from_the_database(
    live, http, setup: Setup, upstream, group_tool
):
    make_setup(upstream, team_name="globex", credits=0)
    group_tool("delete_account", requires_approval=True)
    upstream.queue(tools_reply(tool_call("delete_account", {}, "c1")))
    assert chat(http, setup, "Delete it").json()["choices"][0]["finish_reason"] == "tool_calls"
    upstream.queue(tools_reply(tool_call("delete_account", {}, "c1")))
    assert chat(http, setup, "Delete that one too").status_code == 200
    # Changed behind every process's back: the scrape must still see it.
    Approval.objects.filter(pk=Approval.objects.order_by("created_at").first().pk).update(status="expired")

    metrics = scrape(live.url)

    assert [metrics.value("kitemesh_approvals", status=s) for s in ("pending", "resumed", "expired")] == [1, 0, 1]
    charged = -LedgerEntry.objects.filter(team=setup.team, kind="charge").aggregate(total=Sum("amount"))["total"]
    assert charged > 0
    assert metrics.value("kitemesh_credits_charged_total", team="acme") == charged
    assert metrics.value("kitemesh_credits_charged_total", team="globex") == 0
    assert 'kitemesh_credits_charged_total{team="globex"}' in metrics.text


# --- Several processes --------------------------------------------------------------------------------------


@pytest.fixture
def two_workers(tmp_path: Path, live) -> Iterator[tuple[ServerProcess, ServerProcess, Path]]:
    """Two KiteMesh server processes sharing one PROMETHEUS_MULTIPROC_DIR, as uvicorn's workers would."""
    directory = tmp_path / "prometheus"
    directory.mkdir()
    servers = [ServerProcess(env={"PROMETHEUS_MULTIPROC_DIR": str(directory)}) for _ in range(2)]
    try:
        for server in servers:
            server.start()
        yield servers[0], servers[1], directory
    finally:
        for server in servers:
            server.close()


def test_workers_sharing_a_multiproc_dir_each_answer_the_sum_of_all(two_workers, setup: Setup, upstream: FakeUpstream):
    first, second, _ = two_workers
    body = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}]}

    for server in (first, second, second):
        response = httpx.post(f"{server.url}{COMPLETIONS}", json=body, headers=setup.headers, timeout=30)
        assert response.status_code == 200, response.text

    charged = -LedgerEntry.objects.filter(kind="charge").aggregate(total=Sum("amount"))["total"]
    for server in (first, second):
        metrics = scrape(server.url)
        assert METRIC_FAMILIES - {"kitemesh_upstream_errors", "kitemesh_tool_runs"} <= metrics.families
        assert metrics.value("kitemesh_http_requests_total", endpoint=COMPLETIONS, status="200") == 3
        assert metrics.value("kitemesh_upstream_duration_seconds_count", model="up-model") == 3
        assert metrics.value("kitemesh_credits_charged_total", team="acme") == charged


def test_open_streams_of_every_worker_are_summed_and_a_stopped_worker_leaves_none(
    two_workers, setup: Setup, upstream: FakeUpstream
):
    first, second, directory = two_workers
    upstream.queue(Reply(chunks=["slow ", "stream ", "here."], chunk_delay=0.5))
    body = {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], "stream": True}

    with httpx.stream("POST", f"{second.url}{COMPLETIONS}", json=body, headers=setup.headers, timeout=30) as stream:
        lines = stream.iter_lines()  # kept: dropping the iterator would close the connection
        assert next(lines).startswith("data: ")
        assert scrape(first.url).value("kitemesh_open_streams") == 1
    # The client left mid-stream; the worker closes the stream, and stopping it removes its live gauge file.
    second.stop()

    assert not list(directory.glob(f"gauge_livesum_{second.pid}.db"))
    assert scrape(first.url).value("kitemesh_open_streams") == 0
    assert scrape(first.url).value("kitemesh_http_requests_total", endpoint=COMPLETIONS, status="200") == 1
