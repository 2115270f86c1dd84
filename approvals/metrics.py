"""Approvals by status, counted by the database at each scrape."""

from django.db.models import Count
from prometheus_client.core import GaugeMetricFamily

from core.metrics import DatabaseCollector, database_collector_register
from core.models import Approval


class ApprovalsCollector(DatabaseCollector):
    def empty(self, counts: dict[str, int] | None = None) -> GaugeMetricFamily:
        family = GaugeMetricFamily("kitemesh_approvals", "Approvals by status (from the database).", labels=["status"])
        for status in Approval.Status.values:
            family.add_metric([status], (counts or {}).get(status, 0))
        return family

    def counted(self) -> GaugeMetricFamily:
        return self.empty(dict(Approval.objects.order_by().values_list("status").annotate(n=Count("id"))))


database_collector_register(ApprovalsCollector())
