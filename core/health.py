"""Liveness and readiness for load balancers and orchestrators."""

from asgiref.sync import sync_to_async
from django.db import connection
from django.http import HttpRequest, JsonResponse


async def healthz_view(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def _database_ping() -> None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")


async def readyz_view(request: HttpRequest) -> JsonResponse:
    try:
        await sync_to_async(_database_ping)()
    except Exception as exc:  # any failure means not ready; say which kind, not the DSN
        return JsonResponse({"status": "unavailable", "database": type(exc).__name__}, status=503)
    return JsonResponse({"status": "ok", "database": "ok"})
