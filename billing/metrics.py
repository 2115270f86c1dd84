"""Credits charged by team, counted by the ledger at each scrape."""

from django.db.models import Q, Sum
from prometheus_client.core import CounterMetricFamily

from billing.models import LedgerEntry
from core.metrics import DatabaseCollector, database_collector_register
from core.models import Team


class CreditsChargedCollector(DatabaseCollector):
    def empty(self, charged: list[tuple[str, int]] = ()) -> CounterMetricFamily:
        family = CounterMetricFamily(
            "kitemesh_credits_charged", "Credits charged by team (from the ledger).", labels=["team"]
        )
        for team, credits in charged:
            family.add_metric([team], credits)
        return family

    def counted(self) -> CounterMetricFamily:
        """Every team, with 0 before its first charge, so rate() has a start; charges are negative entries."""
        charges = Sum("ledger_entries__amount", filter=Q(ledger_entries__kind=LedgerEntry.Kind.CHARGE), default=0)
        rows = Team.objects.order_by("name").annotate(charged=charges).values_list("name", "charged")
        return self.empty([(name, -charged) for name, charged in rows])


database_collector_register(CreditsChargedCollector())
