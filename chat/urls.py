from django.urls import path

from chat import views

app_name = "chat"
urlpatterns = [
    path("", views.conversation_list_view, name="list"),
    path("new/", views.conversation_new_view, name="new"),
    path("send/", views.conversation_send_view, name="start"),
    path("<uuid:conversation_id>/", views.conversation_view, name="conversation"),
    path("<uuid:conversation_id>/send/", views.conversation_send_view, name="send"),
    path("<uuid:conversation_id>/continue/", views.conversation_continue_view, name="continue"),
    path("<uuid:conversation_id>/card/", views.conversation_card_view, name="card"),
    path("<uuid:conversation_id>/approvals/<uuid:approval_id>/decide/", views.conversation_decide_view, name="decide"),
    path("<uuid:conversation_id>/rename/", views.conversation_rename_view, name="rename"),
    path("<uuid:conversation_id>/delete/", views.conversation_delete_view, name="delete"),
]
