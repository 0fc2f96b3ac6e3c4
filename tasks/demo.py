"""
Whether this process serves the demo hub (`manage.py serve --demo`: simulated GPUs, the demo user). Its pages then
carry a banner saying so, with the demo login and where the staff pages are. A flag of the process rather than a
setting: the demo is always the embedded hub, the one process that starts the simulators and serves the pages.
"""

DEMO_USER, DEMO_PASSWORD = "demo", "demo-password"

_serving = False


def start():
    global _serving
    _serving = True


def serving():
    return _serving
