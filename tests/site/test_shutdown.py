"""Graceful shutdown: a worker told to stop (SIGTERM) refuses new connections but lets an open stream
finish, settles it, then exits."""

import signal
import threading
import time

import httpx

from core.models import Execution
from tests.support.server_process import ServerProcess
from tests.support.upstream import Reply


def test_sigterm_lets_an_open_stream_finish_then_the_process_exits(transactional_db, setup, upstream):
    upstream.queue(Reply(chunks=["one ", "two ", "three ", "four"], chunk_delay=0.4))
    lines: list[str] = []
    first_chunk = threading.Event()

    with ServerProcess() as server:

        def stream() -> None:
            payload = {"model": setup.model, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
            with (
                httpx.Client(base_url=server.url, timeout=30) as client,
                client.stream("POST", "/v1/chat/completions", json=payload, headers=setup.headers) as response,
            ):
                for line in filter(None, response.iter_lines()):
                    lines.append(line)
                    if '"content":"one "' in line:
                        first_chunk.set()

        reader = threading.Thread(target=stream)
        reader.start()
        assert first_chunk.wait(15)
        server.process.terminate()  # SIGTERM while the stream is open
        time.sleep(0.2)
        try:
            refused = httpx.get(f"{server.url}/healthz", timeout=2).status_code
        except httpx.HTTPError:
            refused = None
        reader.join(20)
        exit_code = server.process.wait(timeout=20)

    assert lines[-1] == "data: [DONE]" and any('"content":"four"' in line for line in lines)
    assert refused is None  # no new connection is accepted once shutdown began
    # uvicorn re-raises the signal once its graceful shutdown is done, so the status reports SIGTERM.
    assert exit_code in (0, -signal.SIGTERM)
    execution = Execution.objects.get()
    assert execution.status == Execution.Status.SUCCEEDED and execution.credits_charged > 0
