"""Read queries for the API: groups a token may use, and what a model call needs."""

import uuid

from django.db.models import Exists, OuterRef, QuerySet

from chat.engine.providers import ModelEndpoint
from chat.errors import NotFound, PermissionDenied
from chat.models import ApiToken, CustomModel, Group
from chat.services.vault import vault_decrypt

_TokenGroups = ApiToken.groups.through
_TokenExcludedGroups = ApiToken.excluded_groups.through


def _groups_with_scope(token: ApiToken) -> QuerySet[Group]:
    """The team's groups, each annotated with whether the token's scope covers it (one query)."""
    selected = _TokenGroups.objects.filter(apitoken_id=token.pk)
    return Group.objects.filter(team_id=token.team_id).annotate(
        scope_selects_some=Exists(selected),
        scope_selects=Exists(selected.filter(group_id=OuterRef("pk"))),
        scope_excludes=Exists(_TokenExcludedGroups.objects.filter(apitoken_id=token.pk, group_id=OuterRef("pk"))),
    )


def _in_scope(group: Group) -> bool:
    return (group.scope_selects or not group.scope_selects_some) and not group.scope_excludes


def group_for_token_get(*, token: ApiToken, group_id: uuid.UUID) -> Group:
    """The group a request names, with its brain; 404 when the team has no such group, 403 when the
    token's scope leaves it out."""
    group = (
        _groups_with_scope(token).select_related("brain", "brain__api_key_secret", "team").filter(pk=group_id).first()
    )
    if group is None:
        raise NotFound(f"The model 'group:{group_id}' does not exist.", param="model", code="model_not_found")
    if not _in_scope(group):
        raise PermissionDenied(f"This API token may not use 'group:{group_id}'.", param="model")
    return group


def group_list_for_token(*, token: ApiToken) -> list[Group]:
    return [g for g in _groups_with_scope(token).order_by("name") if _in_scope(g)]


def model_endpoint_get(model: CustomModel) -> ModelEndpoint:
    """Expects `api_key_secret` already loaded (select_related) so this makes no query."""
    return ModelEndpoint(
        name=model.name,
        provider=model.provider,
        base_url=model.base_url,
        model=model.model,
        api_key=vault_decrypt(model.api_key_secret) if model.api_key_secret else None,
        timeout_seconds=model.timeout_seconds,
    )
