from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Tasks"

    def ready(self):
        from tasks import sockets  # noqa: F401  (connects the receivers that close sockets when a sign-in ends)
