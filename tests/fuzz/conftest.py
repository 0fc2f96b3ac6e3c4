import os

from hypothesis import settings

# The test suite must give the same answer on every run (CI decides whether work lands): the default profile
# draws the same examples each time. HYPOTHESIS_PROFILE=explore draws new ones, to hunt for bugs by hand.
settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", derandomize=False, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "repeatable"))
