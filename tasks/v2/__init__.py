"""The Comfy API v2 (Comfy-Org's job contract) over the whole pool: one job per task, per user, bearer tokens."""
