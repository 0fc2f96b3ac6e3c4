from tasks import demo as demo_hub


def running_count(request):
    """How many of the user's tasks are running, for the page title and the navigation."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    from tasks.consumers import running_count as count

    return {"running_count": count(user)}


def demo(request):
    """The demo banner's facts while this process serves the demo hub (tasks/demo.py)."""
    if not demo_hub.serving():
        return {}
    return {"demo_hub": {"user": demo_hub.DEMO_USER, "password": demo_hub.DEMO_PASSWORD}}
