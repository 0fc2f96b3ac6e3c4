"""
Django's ASGI handler with a request's whole middleware chain and view in the views' thread, reached once.

Django's own handler loads the chain in async mode: a sync-only middleware and a sync view each cost a crossing
between Daphne's event loop and the thread that runs sync code (there and back), and an async-capable middleware
run on the loop costs one for each of its sync hooks. This one loads the chain in sync mode and runs it, view
included, with one sync_to_async call. Async views (there are none) would still work: Django adapts them.
"""

from asgiref.sync import sync_to_async
from django.core.handlers.asgi import ASGIHandler


class ThreadedASGIHandler(ASGIHandler):
    def load_middleware(self, is_async=False):
        super().load_middleware(is_async=False)

    async def get_response_async(self, request):
        return await sync_to_async(self.get_response, thread_sensitive=True)(request)


def application():
    """What django.core.asgi.get_asgi_application() does, with this handler."""
    import django

    django.setup(set_prefix=False)
    return ThreadedASGIHandler()
