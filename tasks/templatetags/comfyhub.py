from django import template

register = template.Library()


@register.filter
def duration(value):
    """A timedelta as people read it: 4s, 2m 05s, 1h 02m."""
    if value is None:
        return ""
    return seconds(value.total_seconds())


@register.filter
def seconds(value):
    """A number of seconds as people read it, like `duration`."""
    if value is None:
        return ""
    seconds = max(int(value), 0)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes:02d}m"
    if minutes:
        return f"{minutes}m {seconds:02d}s"
    return f"{seconds}s"


@register.filter
def live(task):
    """The live part of a task row (progress bar and step line) as the database has it."""
    from tasks.live import stored_live

    return stored_live(task)
