import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "comfyhub.settings")

from comfyhub.handler import application as django_application  # noqa: E402

django_asgi_app = django_application()

from comfyhub import process as process_of_hub  # noqa: E402
from comfyhub.daphne_bodies import leave_bodies_to_django  # noqa: E402

leave_bodies_to_django()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from ops.routing import websocket_urlpatterns as ops_websocket_urlpatterns  # noqa: E402
from tasks.routing import websocket_urlpatterns as tasks_websocket_urlpatterns  # noqa: E402

application = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": AllowedHostsOriginValidator(
            AuthMiddlewareStack(URLRouter([*tasks_websocket_urlpatterns, *ops_websocket_urlpatterns]))
        ),
    }
)

if process_of_hub.run_by_daphne():
    # Plain `daphne comfyhub.asgi:application` (production) has no command of ours to start with: it imports this
    # module once its reactor's loop exists, before it runs it. `manage.py serve` does the same when ready.
    from daphne.server import twisted_loop  # noqa: E402

    process_of_hub.started(twisted_loop)
