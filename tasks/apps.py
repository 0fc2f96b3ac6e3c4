from django.apps import AppConfig


class TasksConfig(AppConfig):
    name = "tasks"
    verbose_name = "Tasks"

    def ready(self):
        # Connect their receivers: sockets close when a sign-in ends; a logout says so on the next page.
        from tasks import accounts, sockets  # noqa: F401
