"""The credit ledger: one account per team, append-only entries, and holds that reserve a request's
worst case until it settles. Credits are integers everywhere in here."""

from django.conf import settings
from django.db import models
from django.db.models import Q

from core.models import Execution, Team


class Balance:
    """A team's credits: `balance` is what it owns, `held` what running requests have reserved of it."""

    balance: int
    held: int

    @property
    def available(self) -> int:
        return self.balance - self.held


class CreditAccount(Balance, models.Model):
    """A team's Balance. Changed only by billing.ledger, under a row lock, next to a LedgerEntry."""

    team = models.OneToOneField(Team, on_delete=models.CASCADE, primary_key=True, related_name="credit_account")
    balance = models.BigIntegerField(default=0)
    held = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        permissions = [("use_billing", "Can use the finance pages and grant or adjust credits")]
        constraints = [
            models.CheckConstraint(condition=Q(balance__gte=0), name="credit_account_balance_not_negative"),
            models.CheckConstraint(condition=Q(held__gte=0), name="credit_account_held_not_negative"),
        ]

    def __str__(self) -> str:
        return f"{self.team.name}: {self.balance} ({self.held} held)"


class LedgerEntry(models.Model):
    """`amount` is signed for the balance (grant +, charge -) and positive for holds and releases,
    which move `held` only. Entries are never edited: a correction is a new entry."""

    class Kind(models.TextChoices):
        GRANT = "grant"
        HOLD = "hold"
        RELEASE = "release"
        CHARGE = "charge"
        REFUND = "refund"
        ADJUSTMENT = "adjustment"

    # Indexed by Meta's (team, -created_at), as Execution.team is.
    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="ledger_entries", db_index=False)
    kind = models.CharField(max_length=12, choices=Kind.choices)
    amount = models.BigIntegerField()
    balance_after = models.BigIntegerField()
    held_after = models.BigIntegerField()
    execution = models.ForeignKey(
        Execution, null=True, blank=True, on_delete=models.PROTECT, related_name="ledger_entries"
    )
    reason = models.CharField(max_length=500, blank=True)
    actor = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["team", "-created_at"])]
        verbose_name_plural = "ledger entries"

    def __str__(self) -> str:
        return f"{self.kind} {self.amount} ({self.team.name})"


class Hold(models.Model):
    """Credits reserved for one execution's worst case until it settles or is released."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        SETTLED = "settled"

    team = models.ForeignKey(Team, on_delete=models.PROTECT, related_name="holds")
    execution = models.ForeignKey(Execution, on_delete=models.PROTECT, related_name="holds")
    amount = models.BigIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.ACTIVE)
    created_at = models.DateTimeField(auto_now_add=True)
    settled_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        constraints = [models.CheckConstraint(condition=Q(amount__gt=0), name="hold_amount_positive")]

    def __str__(self) -> str:
        return f"hold {self.amount} ({self.status})"
