import threading
import time

from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandParser
from django.db import close_old_connections
from django_tasks_db.models import DBTaskResult

from approvals.recovery import sweep_task


class Command(BaseCommand):
    help = (
        "Run the background worker: the durable task queue (webhook deliveries, the sweep) from the database "
        "(django-tasks' db_worker), and the sweep queued every KITEMESH_SWEEP_SECONDS. Run one or more beside "
        "the web processes; `make run` starts one."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--interval", type=float, default=0.5, help="Seconds between polls of an empty queue")

    def handle(self, *args, interval: float, **options) -> None:
        threading.Thread(target=_sweeps_queue, name="kitemesh-sweeps", daemon=True).start()
        call_command("db_worker", queue_name="*", interval=interval, reload=False, verbosity=options["verbosity"])


def _sweeps_queue() -> None:
    """Queue a sweep every KITEMESH_SWEEP_SECONDS unless one already waits (several workers share one
    queue; a sweep run twice changes nothing)."""
    while True:
        try:
            waiting = DBTaskResult.objects.ready().filter(task_path=sweep_task.module_path)
            if not waiting.exists():
                sweep_task.enqueue()
        except Exception:  # the database is away: the next turn tries again
            close_old_connections()
        time.sleep(settings.KITEMESH_SWEEP_SECONDS)
