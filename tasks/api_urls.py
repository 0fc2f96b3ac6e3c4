from tasks import api  # noqa: F401  (registers the routes on the NinjaAPI)
from tasks.api_base import urls

urlpatterns = urls()
