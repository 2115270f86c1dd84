from django.urls import path

from billing import views

app_name = "billing"
urlpatterns = [
    path("", views.credit_overview_view, name="overview"),
    path("ledger/", views.ledger_list_view, name="ledger"),
    path("ledger.csv", views.ledger_export_view, name="ledger_csv"),
    path("usage.csv", views.usage_export_view, name="usage_csv"),
    path("executions/<uuid:execution_id>/", views.execution_detail_view, name="execution"),
    path("grants/", views.credit_grant_view, name="grant"),
]
