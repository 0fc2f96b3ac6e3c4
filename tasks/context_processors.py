def running_count(request):
    """How many of the user's tasks are running, for the page title and the navigation."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    from tasks.consumers import running_count as count

    return {"running_count": count(user)}
