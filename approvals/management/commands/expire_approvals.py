from django.core.management.base import BaseCommand
from django.utils import timezone

from approvals.models import Approval
from approvals.services import approval_expire


class Command(BaseCommand):
    help = "Expire pending approvals past their time and release their holds (safe to run periodically)."

    def handle(self, *args, **options) -> None:
        due = Approval.objects.filter(status=Approval.Status.PENDING, expires_at__lte=timezone.now())
        expired = sum(approval_expire(approval=approval) for approval in due.iterator())
        self.stdout.write(f"expired {expired} approval(s)")
