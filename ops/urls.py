from django.urls import path

from ops import actions, views

urlpatterns = [
    path("ops/", views.ops_dashboard, name="ops-dashboard"),
    path("ops/servers/<slug:name>/drain/", actions.drain, name="ops-server-drain"),
    path("ops/servers/<slug:name>/undrain/", actions.undrain, name="ops-server-undrain"),
    path("ops/servers/<slug:name>/probe/", actions.probe, name="ops-server-probe"),
    path("ops/check-consistency/", actions.check_consistency, name="ops-check-consistency"),
    path("metrics", views.metrics, name="metrics"),
    path("healthz", views.healthz, name="healthz"),
    path("readyz", views.readyz, name="readyz"),
]
