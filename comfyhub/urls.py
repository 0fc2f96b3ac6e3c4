from django.contrib import admin
from django.urls import include, path

from tasks.v2 import api as api_v2

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("account/", include("tasks.account_urls")),
    path("api/v1/", include("tasks.api_urls")),
    path("api/v2/", api_v2.urls()),
    path("", include("ops.urls")),
    path("", include("tasks.urls")),
]

handler404 = "tasks.api_base.page_not_found"
handler500 = "tasks.api_base.server_error"
