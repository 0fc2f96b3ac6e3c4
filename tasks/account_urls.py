from django.urls import path

from tasks import accounts

urlpatterns = [
    path("", accounts.account, name="account"),
    path("tokens/", accounts.token_create, name="token-create"),
    path("tokens/<int:pk>/revoke", accounts.token_revoke, name="token-revoke"),
]
