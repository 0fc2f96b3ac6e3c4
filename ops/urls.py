from django.urls import path

from ops import views

urlpatterns = [
    path("ops/", views.ops_dashboard, name="ops-dashboard"),
    path("metrics", views.metrics, name="metrics"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
]
