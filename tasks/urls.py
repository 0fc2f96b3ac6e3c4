from django.urls import path

from tasks import downloads, gallery, views, workspace

urlpatterns = [
    path("", views.home, name="home"),
    path("workflows/<slug:slug>/", workspace.submit, name="submit"),
    path("tasks/", views.task_list, name="task-list"),
    path("tasks/cancel", views.task_cancel_many, name="task-cancel-many"),
    path("tasks/<uuid:pk>/", views.task_detail, name="task-detail"),
    path("tasks/<uuid:pk>/row", views.task_row, name="task-row"),
    path("tasks/<uuid:pk>/cancel", views.task_cancel, name="task-cancel"),
    path("tasks/<uuid:pk>/rerun", views.task_rerun, name="task-rerun"),
    path("gallery/", gallery.gallery, name="gallery"),
    path("outputs/<uuid:pk>/", downloads.output_file, name="output"),
    path("outputs/<uuid:pk>/thumb", downloads.output_thumb, name="output-thumb"),
    path("uploads/<uuid:pk>/", downloads.upload_file, name="upload"),
    path("staff/outputs/<uuid:pk>/", downloads.staff_output_file, name="admin-output"),
]
