"""
The operator's buttons on /ops/: drain, undrain and probe one server, check the pool's consistency. Each is a
staff-only POST (404 for anyone else, like the page; Django's CSRF check first) doing what the server admin's
action of the same name does, through the same code. With htmx the answer swaps the fresh dashboard body and the
messages in out of band; without it, POST/redirect/GET back to /ops/ with Django messages.

They live apart from ops/views.py because the probe and the check open a one-off connection to the servers
(servers.connection.standalone), as the admin's actions do: the page views never reach the supervisor's modules.
"""

from asgiref.sync import async_to_sync
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import get_object_or_404, redirect
from django.template.loader import render_to_string
from django.views.decorators.http import require_POST

from ops.dashboard import dashboard
from servers.connection import probe_once, standalone
from servers.consistency import check
from servers.models import Server

FINDINGS_SHOWN = 10  # a check's findings listed on the page; the command lists them all


def staff_server(request, name):
    """The server named `name`, for staff only: a 404 for anyone else, as the dashboard itself answers."""
    if not request.user.is_staff:
        raise Http404
    return get_object_or_404(Server, name=name)


@require_POST
@login_required
def drain(request, name):
    server = staff_server(request, name)
    if Server.objects.filter(pk=server.pk, draining=False).drain():
        messages.success(request, f"{server.name} is draining: no new work goes to it; what it has runs to the end.")
    else:
        messages.info(request, f"{server.name} was draining already.")
    return answer(request)


@require_POST
@login_required
def undrain(request, name):
    server = staff_server(request, name)
    if Server.objects.filter(pk=server.pk, draining=True).undrain():
        messages.success(request, f"{server.name} takes new work again.")
    else:
        messages.info(request, f"{server.name} was not draining.")
    return answer(request)


@require_POST
@login_required
def probe(request, name):
    server = staff_server(request, name)
    answered, message = async_to_sync(probe_once)(server)
    messages.add_message(request, messages.SUCCESS if answered else messages.ERROR, message)
    return answer(request)


@require_POST
@login_required
def check_consistency(request):
    if not request.user.is_staff:
        raise Http404
    report = async_to_sync(check)(standalone, None, False)
    if report.findings:
        messages.warning(
            request, f"{report.summary()} Repair with manage.py check_consistency --fix or the server admin's action."
        )
    else:
        messages.success(request, report.summary())
    for finding in report.findings[:FINDINGS_SHOWN]:
        messages.warning(request, str(finding))
    if len(report.findings) > FINDINGS_SHOWN:
        more = len(report.findings) - FINDINGS_SHOWN
        messages.warning(request, f"… and {more} more: manage.py check_consistency lists them all.")
    return answer(request)


def answer(request):
    if not request.htmx:
        return redirect("ops-dashboard")
    # Both parts out of band (the buttons say hx-swap="none"): a push may have replaced the body the button was
    # in while this request ran, and an id is found in the page as it is when the answer arrives.
    context = {**dashboard(), "oob": True}
    body = render_to_string("ops/dashboard.html#ops-body", context, request)
    notes = render_to_string("ops/dashboard.html#ops-notes", {"oob": True}, request)  # consumes the messages
    return HttpResponse(body.strip() + "\n" + notes.strip())
