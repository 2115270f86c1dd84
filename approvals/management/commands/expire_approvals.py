from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from approvals.models import Approval
from approvals.services import approval_expire
from billing.services.ledger import holds_release_stale

# Longer than any request can run (the upstream read timeout bounds each model call).
STALE_HOLD_SECONDS = 3600


class Command(BaseCommand):
    help = (
        "Expire pending approvals past their time and release their holds; also release the holds of runs "
        "that died without settling (safe to run periodically, e.g. every minute)."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--stale-after", type=int, default=STALE_HOLD_SECONDS, help="Seconds after which a running run is dead"
        )

    def handle(self, *args, stale_after: int, **options) -> None:
        due = Approval.objects.filter(status=Approval.Status.PENDING, expires_at__lte=timezone.now())
        expired = sum(approval_expire(approval=approval) for approval in due.iterator())
        released = holds_release_stale(older_than_seconds=stale_after)
        self.stdout.write(f"expired {expired} approval(s); released {released} stale hold(s)")
