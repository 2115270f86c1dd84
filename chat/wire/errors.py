"""Every API error leaves in the SPEC's envelope: DRF's exception handler, mapping DRF's own exceptions
(authentication, method, routing) to KiteMesh's domain errors and anything unplanned to a logged 500."""

import logging

from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from core.envelope import error_body, error_headers, http_status, request_id_of
from core.errors import AuthenticationError, InternalError, KiteMeshError, MethodNotAllowed, NotFound

logger = logging.getLogger(__name__)

MISSING_TOKEN_MESSAGE = "Missing Bearer API token"


def _from_drf(exc: Exception) -> KiteMeshError | None:
    if isinstance(exc, KiteMeshError):
        return exc
    if isinstance(exc, drf_exceptions.NotAuthenticated):
        return AuthenticationError(MISSING_TOKEN_MESSAGE)
    if isinstance(exc, drf_exceptions.AuthenticationFailed):
        return AuthenticationError(str(exc.detail))
    if isinstance(exc, drf_exceptions.MethodNotAllowed):
        return MethodNotAllowed(str(exc.detail), code="method_not_allowed")
    if isinstance(exc, drf_exceptions.NotFound):
        return NotFound(str(exc.detail))
    return None


def api_exception_handler(exc: Exception, context: dict) -> Response:
    """DRF's exception handler: every error, expected or not, leaves in the SPEC's envelope."""
    request = context["request"]._request
    error = _from_drf(exc)
    if error is None:
        logger.exception("Unhandled error in %s", request.path, extra={"request_id": request_id_of(request)})
        error = InternalError()
    return Response(
        error_body(error, request_id_of(request)), status=http_status(error)[0], headers=error_headers(error) or None
    )
