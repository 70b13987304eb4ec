"""Chaos runs drive `cfs dev` sites as the scenarios do (their fixtures, their logs)."""

from tests.scenarios.conftest import dev_site_factory  # noqa: F401  (the fixture)
