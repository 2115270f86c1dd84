"""The background worker for tests: django-tasks' database worker (what `manage.py worker` runs), in a
thread of the test process or run in place until a condition holds."""

import threading
import time
from collections.abc import Callable
from typing import Any

from django.db import connection
from django_tasks_db.management.commands.db_worker import Worker
from django_tasks_db.models import DBTaskResult


def _worker(*, batch: bool, interval: float = 0.02) -> Worker:
    return Worker(
        queue_names=["*"],
        interval=interval,
        batch=batch,
        backend_name="default",
        startup_delay=False,
        max_tasks=None,
        worker_id="test-worker",
        excluded_queue_names=[],
    )


def tasks_run_until(done: Callable[[], Any], timeout: float = 10) -> Any:
    """Run the queued tasks that are due, one by one as the worker does, here and now (in the test's
    transaction, whose connection the worker's own loop would close), until `done()` is truthy: tasks may
    queue others for later, as a delivery's retry does."""
    worker = _worker(batch=True)
    deadline = time.monotonic() + timeout
    while not (value := done()):
        if time.monotonic() > deadline:
            raise AssertionError(f"the queued tasks did not get there in {timeout}s")
        task = DBTaskResult.objects.ready().first()
        if task is None:
            time.sleep(0.01)
            continue
        task.claim(worker.worker_id)
        worker.run_task(task)
    return value


class WorkerThread:
    """The worker polling the queue in a thread, for tests whose data is committed (a live server's)."""

    def __init__(self) -> None:
        self.worker = _worker(batch=False)
        self.thread = threading.Thread(target=self._run, name="test-worker", daemon=True)

    def _run(self) -> None:
        try:
            self.worker.run()
        finally:
            connection.close()

    def __enter__(self) -> "WorkerThread":
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.worker.running = False
        self.thread.join(timeout=10)
