"""
The account page: the storage the user's files take (against their quota, when there is one), their API tokens
(create, list, revoke) and the link to change the password. Tokens are the API's own (tasks.models.ApiToken, the
same hash `create_token` stores); the secret is shown once, in the answer to the POST that made it, and never again.
"""

from django import forms
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.contrib.auth.signals import user_logged_out
from django.dispatch import receiver
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET, require_POST

from tasks.models import ApiToken, webhook_url_problem
from tasks.quota import NEAR_SHARE, human_size, storage_usage

LOGGED_OUT = "You have been logged out."


class TokenForm(forms.ModelForm):
    class Meta:
        model = ApiToken
        fields = ["name", "webhook_url"]
        labels = {"name": "Name", "webhook_url": "Webhook URL (optional)"}
        help_texts = {
            "name": "What the token is for, e.g. “render farm script”: you will recognise it by this.",
            "webhook_url": "Where the news of the tasks this token submits is posted (started, succeeded, …), "
            "signed with a secret shown once below.",
        }

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # The model allows a blank name (create_token without --name); on this page a list of unnamed tokens
        # would leave the user guessing which one to revoke.
        self.fields["name"].required = True
        self.fields["name"].widget.attrs.update(autocomplete="off", placeholder="e.g. render farm script")
        self.fields["webhook_url"].widget.attrs.update(autocomplete="off", placeholder="https://example.com/hooks")

    def clean_webhook_url(self):
        url = self.cleaned_data["webhook_url"].strip()
        problem = webhook_url_problem(url) if url else None
        if problem:
            raise forms.ValidationError(f"The webhook URL {problem}.")
        return url


def get_token_for_user(user, pk):
    """Another user's token is a 404, like one that does not exist."""
    return get_object_or_404(ApiToken.objects.filter(user=user), pk=pk)


def account_page(request, form=None, new_token=None, status=200):
    tokens = ApiToken.objects.filter(user=request.user).order_by("-created_at", "-pk")
    usage = storage_usage(request.user)
    storage = {
        "usage": usage,
        "used": human_size(usage.total),
        "quota": human_size(usage.quota) if usage.quota else None,
        "high": int(usage.quota * NEAR_SHARE),
        "parts": [(name, human_size(size)) for name, size in (
            ("results", usage.outputs), ("uploaded images", usage.uploads), ("API assets", usage.assets)
        )],
    }  # fmt: skip
    context = {"tokens": tokens, "form": form or TokenForm(), "new_token": new_token, "storage": storage}
    return render(request, "tasks/account.html", context, status=status)


@require_GET
@login_required
def account(request):
    return account_page(request)


@require_POST
@login_required
@never_cache  # the answer holds the secret: no cache, proxy or back button may keep it
def token_create(request):
    form = TokenForm(request.POST)
    if not form.is_valid():
        return account_page(request, form=form, status=400)
    token, plain = ApiToken.issue(request.user, name=form.cleaned_data["name"])
    url = form.cleaned_data["webhook_url"]
    secret = token.set_webhook_url(url) if url else None
    # Rendered, not redirected: the plain token exists only in this answer (only its hash is stored).
    return account_page(request, new_token={"token": token, "plain": plain, "webhook_secret": secret}, status=201)


@require_POST
@login_required
def token_revoke(request, pk):
    token = get_token_for_user(request.user, pk)
    label = f"{token.name or 'unnamed'} ({token.prefix}…)"
    token.delete()
    messages.success(request, f"Token {label} revoked: it no longer opens the API.")
    return redirect("account")


@receiver(user_logged_out, dispatch_uid="tasks.accounts.logged_out_message")
def say_logged_out(sender, request, user, **kwargs):
    # LOGOUT_REDIRECT_URL sends the browser to the login page, which would otherwise look as if nothing happened.
    # The message travels in the messages cookie, so it outlives the session the logout just flushed.
    if request is not None and hasattr(request, "_messages"):
        messages.info(request, LOGGED_OUT)
