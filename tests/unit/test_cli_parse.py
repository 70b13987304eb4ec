"""Times and durations on the command line: a number that names no moment (inf, nan,
past the year 9999) is a usage error, not a crash (found by test_cli_fuzz.py:
`cfs admin replay-journal --to 1E310` raised OverflowError)."""

from __future__ import annotations

import pytest

from cfs.cli.backup import parse_duration, parse_timestamp
from cfs.cli.errors import CliError, ExitCode


@pytest.mark.parametrize("text", ["1E310", "-inf", "nan", "1e20", "-1e12", "yesterday"])
def test_a_timestamp_that_names_no_moment_is_a_usage_error(text: str) -> None:
    with pytest.raises(CliError) as caught:
        parse_timestamp(text, "--to")
    assert caught.value.code == ExitCode.USAGE
    assert "--to" in str(caught.value)


def test_timestamps_in_range_parse_as_wall_ms() -> None:
    assert parse_timestamp("1700000000.5", "--to") == 1_700_000_000_500
    assert parse_timestamp("2026-12-03T01:20:00Z", "--to") == 1_796_260_800_000


@pytest.mark.parametrize("text", ["1e310s", "inf", "nan", "0", "-1", "30x"])
def test_a_duration_that_is_not_finite_and_positive_is_a_usage_error(text: str) -> None:
    with pytest.raises(CliError) as caught:
        parse_duration(text, "--max-age")
    assert caught.value.code == ExitCode.USAGE


def test_durations_parse_as_seconds() -> None:
    assert parse_duration("30d", "--max-age") == 30 * 86400
    assert parse_duration("90", "--max-age") == 90
