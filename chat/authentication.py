"""Bearer `km_…` tokens for DRF: the authenticated principal is the ApiToken itself."""

from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from chat.services.tokens import INVALID_TOKEN_MESSAGE, token_authenticate
from core.models import ApiToken


def bearer_secret(request: Request) -> str:
    """The secret of an `Authorization: Bearer …` header; "" when there is none."""
    scheme, _, raw = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
    return raw.strip() if scheme.lower() == "bearer" else ""


class ApiTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[ApiToken, ApiToken] | None:
        raw = bearer_secret(request)
        if not raw:
            return None  # DRF answers NotAuthenticated: "Missing Bearer API token"
        caller = token_authenticate(raw)
        if caller is None:
            raise AuthenticationFailed(INVALID_TOKEN_MESSAGE)
        request._request.caller = caller  # as chat.api.ApiView.async_initial sets it on the async views
        return caller.token, caller.token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="kitemesh"'
