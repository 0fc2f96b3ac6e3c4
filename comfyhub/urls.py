from django.contrib import admin
from django.urls import include, path

from tasks.v2.assets_api import api as v2_assets_api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("accounts/", include("django.contrib.auth.urls")),
    path("account/", include("tasks.account_urls")),
    path("api/v1/", include("tasks.api_urls")),
    path("api/v2/", v2_assets_api.urls),
    path("", include("ops.urls")),
    path("", include("tasks.urls")),
]

handler404 = "tasks.api.page_not_found"
handler500 = "tasks.api.server_error"
