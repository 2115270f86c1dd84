from django.contrib import admin
from django.urls import include, path, re_path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerSplitView

from approvals.views import approval_events_view
from chat.api import (
    ApprovalDetailApi,
    ChatCompletionCreateApi,
    ChatResumeApi,
    CreditBalanceApi,
    ExecutionDetailApi,
    ModelListApi,
    api_not_found_view,
)
from core.health import healthz_view, readyz_view
from core.metrics import metrics_view

urlpatterns = [
    path("v1/chat/completions", ChatCompletionCreateApi.as_view()),
    path("v1/chat/resume", ChatResumeApi.as_view()),
    path("v1/approvals/<str:approval_id>", ApprovalDetailApi.as_view()),
    path("v1/executions/<str:execution_id>", ExecutionDetailApi.as_view()),
    path("v1/models", ModelListApi.as_view()),
    path("v1/credits", CreditBalanceApi.as_view()),
    path("api/schema/", SpectacularAPIView.as_view(), name="openapi-schema"),
    # The split view serves its script from ?script, so the page runs under the pages' CSP.
    path("api/docs/", SpectacularSwaggerSplitView.as_view(url_name="openapi-schema"), name="openapi-docs"),
    path("healthz", healthz_view),
    path("readyz", readyz_view),
    path("metrics", metrics_view),
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("approvals/", include("approvals.urls")),
    path("events/", approval_events_view, name="events"),  # the live approval queue (SSE)
    path("billing/", include("billing.urls")),
    path("chat/", include("chat.urls")),
    path("", RedirectView.as_view(url="/approvals/", permanent=False)),
    re_path(r"^v1/", api_not_found_view),
]
