from django.contrib import admin
from django.http import HttpRequest

from billing.models import CreditAccount, Hold, LedgerEntry


class ReadOnlyAdmin(admin.ModelAdmin):
    """Credits change only through billing.ledger, never by editing rows."""

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(CreditAccount)
class CreditAccountAdmin(ReadOnlyAdmin):
    list_display = ["team", "balance", "held", "updated_at"]


@admin.register(LedgerEntry)
class LedgerEntryAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "team", "kind", "amount", "balance_after", "held_after", "execution", "reason"]
    list_filter = ["team", "kind"]


@admin.register(Hold)
class HoldAdmin(ReadOnlyAdmin):
    list_display = ["created_at", "team", "execution", "amount", "status"]
    list_filter = ["team", "status"]
