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


@register.filter
def when(value):
    """A moment as a list reads it: the time today, with the date on other days (and the year in other years)."""
    if value is None:
        return ""
    from django.utils import timezone
    from django.utils.dateformat import format as date_format

    local, today = timezone.localtime(value), timezone.localdate()
    if local.date() == today:
        return date_format(local, "H:i")
    if local.year == today.year:
        return date_format(local, "j M H:i")
    return date_format(local, "j M Y H:i")


@register.filter
def summary(task):
    """What a row says of a task's inputs: its prompt (or first text) and a few other settings, as text."""
    from tasks.rows import summarize

    return summarize(task)


@register.simple_tag
def where(task, position=None):
    """Where a task stands, in words: "waiting in gpu-1's queue, 2nd"."""
    from tasks.rows import where as words

    return words(task, position)


@register.filter
def batch_field(form):
    """The bound "how many" field of a WorkflowForm."""
    return form[form.batch_name]
