"""API tokens: a token's use is noted at most once a minute, not written on every request."""

from datetime import timedelta

import pytest
from django.utils import timezone

from tasks.models import ApiToken

pytestmark = pytest.mark.django_db


def test_a_token_in_use_is_written_once_a_minute_not_on_every_request(alice, django_assert_num_queries):
    token, plain = ApiToken.issue(alice)
    assert ApiToken.authenticate(plain) == alice
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    assert first is not None
    with django_assert_num_queries(1):  # the lookup only
        assert ApiToken.authenticate(plain) == alice
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first
    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    ApiToken.authenticate(plain)
    assert ApiToken.objects.get(pk=token.pk).last_used_at > first


def test_a_wrong_or_inactive_token_is_refused_and_not_noted(alice):
    token, plain = ApiToken.issue(alice)
    assert ApiToken.authenticate(plain + "x") is None
    alice.is_active = False
    alice.save()
    assert ApiToken.authenticate(plain) is None
    assert ApiToken.objects.get(pk=token.pk).last_used_at is None
