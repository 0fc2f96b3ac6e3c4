from django.urls import path

from tasks import api, openapi

urlpatterns = [
    path("tasks", api.tasks_collection, name="api-tasks"),
    path("tasks/<uuid:pk>", api.task_detail, name="api-task"),
    path("tasks/<uuid:pk>/cancel", api.task_cancel, name="api-task-cancel"),
    path("workflows", api.workflows_collection, name="api-workflows"),
    path("workflows/<slug:slug>", api.workflow_detail, name="api-workflow"),
    path("outputs/<uuid:pk>", api.output_file, name="api-output"),
    path("uploads", api.uploads_collection, name="api-uploads"),
    path("openapi.json", openapi.openapi_json, name="api-openapi"),
]
