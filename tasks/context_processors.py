def running_count(request):
    """How many of the user's tasks are active (the navigation's badge) and running (the page title)."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    from tasks.consumers import task_counts

    return task_counts(user)
