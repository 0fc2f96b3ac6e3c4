"""The site's URLs plus views that fail, for the error page tests (the handlers are the site's own)."""

from django.urls import path

from comfyhub.urls import handler404, handler500
from comfyhub.urls import urlpatterns as site_urlpatterns


def broken(request):
    raise RuntimeError("a bug in a view")


urlpatterns = [
    path("broken/", broken),
    path("api/v1/broken", broken),
    *site_urlpatterns,
]

__all__ = ["handler404", "handler500", "urlpatterns"]
