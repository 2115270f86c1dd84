from django.urls import path

from approvals import views

app_name = "approvals"
urlpatterns = [
    path("", views.approval_queue_view, name="queue"),
    path("rows/", views.approval_queue_rows_view, name="queue_rows"),
    path("history/", views.approval_history_view, name="history"),
    path("<uuid:approval_id>/", views.approval_detail_view, name="detail"),
    path("<uuid:approval_id>/decide/", views.approval_decide_view, name="decide"),
]
