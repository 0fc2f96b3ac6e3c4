"""The contract's error envelope: `{"error": {"code", "message", "details"}}` for every error under /api/v2/."""

from django.http import JsonResponse


class ApiError(Exception):
    """An error answer: raised anywhere under /api/v2/, drawn by the handler in tasks/v2/api.py."""

    def __init__(self, status, code, message, details=None, headers=None):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.details, self.headers = details, headers or {}

    def response(self):
        return envelope(self.status, self.code, self.message, self.details, self.headers)


def envelope(status, code, message, details=None, headers=None):
    response = JsonResponse({"error": {"code": code, "message": message, "details": details}}, status=status)
    for name, value in (headers or {}).items():
        response[name] = value
    return response
