from django.apps import AppConfig


class ServersConfig(AppConfig):
    name = "servers"
    verbose_name = "ComfyUI servers"

    def ready(self):
        from django.db.models.signals import post_delete, post_save

        from servers import snapshot
        from servers.models import Server

        post_save.connect(snapshot.forget, sender=Server, dispatch_uid="servers.snapshot.saved")
        post_delete.connect(snapshot.forget, sender=Server, dispatch_uid="servers.snapshot.deleted")
