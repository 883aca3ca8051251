"""Suite-wide fixtures. Broker and database fixtures live in their own plugin modules."""

import os

from hypothesis import settings

pytest_plugins = ["broker_fixtures", "db_fixtures", "fleet_fixtures"]

# HYPOTHESIS_PROFILE=ci (set by .ci/run): the same generated examples on every run, so that CI's verdict
# is repeatable; local runs draw new examples each time and keep failures in .hypothesis/ to replay.
settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
