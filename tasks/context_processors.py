from tasks import demo as demo_hub


def running_count(request):
    """How many of the user's tasks are active (the navigation's badge) and running (the page title)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    from tasks.consumers import task_counts

    return task_counts(user)


def demo(request):
    """The demo banner's facts while this process serves the demo hub (tasks/demo.py)."""
    if not demo_hub.serving():
        return {}
    return {"demo_hub": {"user": demo_hub.DEMO_USER, "password": demo_hub.DEMO_PASSWORD}}
