"""Bearer auth for the v2 API: `Authorization: Bearer <comfyhub token>`, the token an SDK takes as its API key."""

from ninja.security import HttpBearer

from tasks.models import ApiToken


class TokenAuth(HttpBearer):
    def authenticate(self, request, token):
        user = ApiToken.authenticate(token)
        if user is not None:
            request.user = user  # what ownership checks and the rest of Django read
        return user
