"""Credits and idempotency raced through the HTTP API (SPEC §3, README "Billing"): many clients at once
against KiteMesh as two separate uvicorn processes on one PostgreSQL database (they share nothing but
the database, as deployed workers do), or the in-thread live server on either database. The upstream is
the loopback fake; nothing of KiteMesh is mocked."""

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import pairwise

import httpx
import pytest
from django.db import connection

from billing.models import CreditAccount, Hold, LedgerEntry
from core.models import Execution
from tests.conftest import Setup, make_setup
from tests.support.helpers import sse_chunks
from tests.support.server_process import ServerProcess
from tests.support.upstream import FakeUpstream, Reply

PARALLEL = 40
PER_REQUEST = 10  # max_tokens 10 at output_per_1k 1000 (input free): each request holds and costs 10
AFFORDABLE = 5
DUPLICATES = 8

postgresql_only = pytest.mark.skipif(
    connection.vendor != "postgresql",
    reason="a real race needs server processes on one database with row locks; CI runs it in its PostgreSQL pass",
)


# --- Helpers ------------------------------------------------------------------------------------


def chat_body(setup: Setup, **body) -> dict:
    return {"model": setup.model, "messages": [{"role": "user", "content": "Hi"}], **body}


def post(client: httpx.Client, setup: Setup, body: dict) -> httpx.Response:
    return client.post("/v1/chat/completions", json=body, headers=setup.headers)


def in_parallel(count: int, urls: list[str], send: Callable[[httpx.Client], httpx.Response]) -> list:
    """`send` from `count` threads released together by a barrier, thread i on urls[i % len(urls)], each
    with its own connection. Returns, per thread, (response, monotonic time it arrived) or the exception."""
    barrier, results = threading.Barrier(count), [None] * count

    def run(i: int) -> None:
        with httpx.Client(base_url=urls[i % len(urls)], timeout=60) as client:
            barrier.wait()
            try:
                response = send(client)
                results[i] = (response, time.monotonic())
            except Exception as exc:  # kept as a result: the test reports what each thread got
                results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=90)
    failed = [r for r in results if not isinstance(r, tuple)]
    assert not failed, f"some requests got no HTTP answer: {failed}"
    return results


def assert_error(response: httpx.Response, status: int, type_: str, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert (error["type"], error["code"]) == (type_, code), error
    return error


def account_of(setup: Setup) -> tuple[int, int]:
    account = CreditAccount.objects.get(team=setup.team)
    return account.balance, account.held


def charges(setup: Setup) -> int:
    return LedgerEntry.objects.filter(team=setup.team, kind=LedgerEntry.Kind.CHARGE).count()


@pytest.fixture
def two_processes(transactional_db) -> Iterator[list[ServerProcess]]:
    """Two KiteMesh server processes on this run's test database (committed data only)."""
    servers = [ServerProcess(), ServerProcess()]
    failures: list[BaseException] = []

    def start(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as exc:  # re-raised below, in the test's thread
            failures.append(exc)

    starters = [threading.Thread(target=start, args=(s,)) for s in servers]  # in parallel: each takes 1-2 s
    for starter in starters:
        starter.start()
    for starter in starters:
        starter.join()
    try:
        if failures:
            raise failures[0]
        yield servers
    finally:
        for server in servers:
            server.close()


# --- 1. Holds under a real race: exactly what the balance covers gets through ----------------------


@postgresql_only
def test_parallel_requests_on_two_processes_spend_exactly_the_balance_and_never_below_zero(
    two_processes: list[ServerProcess], upstream: FakeUpstream
):
    setup = make_setup(upstream, credits=AFFORDABLE * PER_REQUEST, input_per_1k="0", output_per_1k="1000", system="")
    # Every request that gets through is slow enough that the others arrive while its hold is open.
    upstream.queue(
        *(Reply(delay=0.3, usage={"prompt_tokens": 9, "completion_tokens": PER_REQUEST}) for _ in range(PARALLEL))
    )
    body = chat_body(setup, max_tokens=PER_REQUEST)
    urls = [server.url for server in two_processes]

    results = in_parallel(PARALLEL, urls, lambda client: post(client, setup, body))

    responses = [response for response, _ in results]
    statuses = Counter(r.status_code for r in responses)
    assert set(statuses) <= {200, 402}, [(r.status_code, r.text) for r in responses if r.status_code not in (200, 402)]
    assert statuses[200] == AFFORDABLE, statuses
    assert statuses[402] == PARALLEL - AFFORDABLE, statuses
    for refused in (r for r in responses if r.status_code == 402):
        assert_error(refused, 402, "insufficient_credits", "insufficient_credits")

    served = [r.json() for r in responses if r.status_code == 200]
    charged = [b["kitemesh"]["credits_charged"] for b in served]
    assert charged == [PER_REQUEST] * AFFORDABLE
    balance, held = account_of(setup)
    assert sum(charged) == AFFORDABLE * PER_REQUEST - balance
    assert balance >= 0
    assert (balance, held) == (0, 0)
    assert not Hold.objects.filter(team=setup.team, status=Hold.Status.ACTIVE).exists()
    assert Hold.objects.filter(team=setup.team).count() == AFFORDABLE

    # A refused request called nothing and recorded nothing; each served one called the upstream once.
    assert len(upstream.received) == statuses[200]
    executions = Execution.objects.filter(team=setup.team)
    assert sorted(str(e.id) for e in executions) == sorted(b["kitemesh"]["execution_id"] for b in served)
    assert {e.status for e in executions} == {Execution.Status.SUCCEEDED}
    assert charges(setup) == AFFORDABLE
    # The race was real: holds were open at the same time (taken in two processes, on one clock).
    holds = sorted(Hold.objects.filter(team=setup.team), key=lambda h: h.created_at)
    assert any(b.created_at < a.settled_at for a, b in pairwise(holds)), "no two holds were ever open at once"


# --- 2. The same request_id sent many times at once ---------------------------------------------


@pytest.fixture(params=["in_thread", "two_processes"])
def server_urls(request, transactional_db) -> list[str]:
    """Where the duplicates go: the in-thread live server (both databases), or alternately two server
    processes (PostgreSQL; there two inserts of one request_id really race for the unique key). Both
    read committed data only: transactional_db is named here, as pytest-django decides from the static
    fixture names."""
    if request.param == "in_thread":
        return [request.getfixturevalue("live").url]
    if connection.vendor != "postgresql":
        pytest.skip("two processes racing on one request_id need PostgreSQL; CI runs it in its PostgreSQL pass")
    return [server.url for server in request.getfixturevalue("two_processes")]


def test_a_request_id_sent_many_times_at_once_runs_once_and_the_duplicates_get_409(
    server_urls: list[str], upstream: FakeUpstream
):
    setup = make_setup(upstream)  # 1000 credits; 10 in and 20 out per 1k
    upstream.queue(Reply(content="Only once.", delay=1.0, usage={"prompt_tokens": 100, "completion_tokens": 50}))
    body = chat_body(setup, metadata={"request_id": "req_dup_race"}, messages=[{"role": "user", "content": "Once"}])

    results = in_parallel(DUPLICATES, server_urls, lambda client: post(client, setup, body))

    responses = [response for response, _ in results]
    assert Counter(r.status_code for r in responses) == {200: 1, 409: DUPLICATES - 1}, [r.text for r in responses]
    conflicts = [(r, arrived) for r, arrived in results if r.status_code == 409]
    for conflict, _ in conflicts:
        error = assert_error(conflict, 409, "conflict_error", "request_id_conflict")
        assert error["request_id"] == "req_dup_race"
    assert len(upstream.received) == 1
    # Documented: a duplicate is refused while the first is in flight; it does not wait for it.
    first_call = upstream.received[0]
    assert all(arrived < first_call.finished for _, arrived in conflicts), "a duplicate waited for the first"

    [winner] = [r.json() for r in responses if r.status_code == 200]
    cost = 2  # ceil((100 × 10 + 50 × 20) / 1000)
    assert winner["kitemesh"]["credits_charged"] == cost
    assert Execution.objects.filter(team=setup.team).count() == 1
    assert charges(setup) == 1
    assert account_of(setup) == (1000 - cost, 0)

    with httpx.Client(base_url=server_urls[-1], timeout=30) as client:
        again = post(client, setup, body)
        changed = post(client, setup, {**body, "messages": [{"role": "user", "content": "Twice"}]})

    assert again.status_code == 200, again.text
    assert again.json()["kitemesh"]["execution_id"] == winner["kitemesh"]["execution_id"]
    assert again.json()["kitemesh"]["credits_charged"] == cost
    assert again.json()["choices"] == winner["choices"]
    assert_error(changed, 409, "conflict_error", "request_id_conflict")
    assert len(upstream.received) == 1
    assert Execution.objects.filter(team=setup.team).count() == 1
    assert charges(setup) == 1
    assert account_of(setup) == (1000 - cost, 0)


# --- 3. stream is part of the body an idempotency key is bound to ----------------------------------


@pytest.mark.parametrize(("first_stream", "then_stream"), [(True, False), (False, True)])
def test_a_request_id_reused_with_the_other_stream_flag_is_a_409(
    live, upstream: FakeUpstream, first_stream: bool, then_stream: bool
):
    """The key is bound to the whole body, `stream` included: after a run has finished, the same id with
    only `stream` flipped is another body (409), not a replay in the other format."""
    setup = make_setup(upstream)
    upstream.queue(
        Reply(chunks=["Hel", "lo."], content="Hello.", usage={"prompt_tokens": 100, "completion_tokens": 50})
    )
    body = chat_body(setup, metadata={"request_id": "req_stream_flag"}, stream=first_stream)

    with httpx.Client(base_url=live.url, timeout=30) as client:
        first = post(client, setup, body)  # read whole: the run has finished when this returns
        same = post(client, setup, body)
        other = post(client, setup, {**body, "stream": then_stream})

    assert first.status_code == 200, first.text
    final = sse_chunks(first)[-1] if first_stream else first.json()
    # Control: the identical body is answered again from the first run...
    assert same.status_code == 200, same.text
    replayed = sse_chunks(same)[-1] if first_stream else same.json()
    assert replayed["kitemesh"]["execution_id"] == final["kitemesh"]["execution_id"]
    # ...while flipping only `stream` makes it another body for the same key.
    assert_error(other, 409, "conflict_error", "request_id_conflict")
    assert len(upstream.received) == 1
    assert upstream.received[0].body.get("stream", False) is first_stream
    assert Execution.objects.filter(team=setup.team).count() == 1
    assert charges(setup) == 1
    assert account_of(setup) == (1000 - final["kitemesh"]["credits_charged"], 0)
