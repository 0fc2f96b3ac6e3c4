from django.contrib import admin
from django.urls import include, path

from comfyhub.ratelimit import LoginView

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/login/", LoginView.as_view(), name="login"),  # before auth.urls: it limits failed logins
    path("accounts/", include("django.contrib.auth.urls")),
    path("api/v1/", include("tasks.api_urls")),
    path("", include("ops.urls")),
    path("", include("tasks.urls")),
]

handler404 = "tasks.api.page_not_found"
