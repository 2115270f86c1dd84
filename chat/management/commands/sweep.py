from django.core.management.base import BaseCommand

from approvals.recovery import sweep


class Command(BaseCommand):
    help = (
        "Recover the runs whose process died (their lease lapsed) and expire the approvals past their time, "
        "once (SPEC §7). The worker (manage.py worker) does this periodically."
    )

    def handle(self, *args, **options) -> None:
        swept = sweep()
        self.stdout.write(
            f"recovered {swept.recovered} run(s); expired {swept.expired} approval(s);"
            f" requeued {swept.requeued} webhook delivery(ies); recorded {swept.alerted} credit alert(s)"
        )
