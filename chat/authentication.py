"""Bearer `km_…` tokens for DRF: the authenticated principal is the ApiToken itself."""

from rest_framework.authentication import BaseAuthentication
from rest_framework.exceptions import AuthenticationFailed
from rest_framework.request import Request

from chat.models import ApiToken
from chat.services.tokens import token_authenticate


class ApiTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[ApiToken, ApiToken] | None:
        scheme, _, raw = request.META.get("HTTP_AUTHORIZATION", "").partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw:
            return None  # DRF answers NotAuthenticated: "Missing Bearer API token"
        token = token_authenticate(raw)
        if token is None:
            raise AuthenticationFailed("Invalid, expired or revoked API token.")
        return token, token

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="kitemesh"'
