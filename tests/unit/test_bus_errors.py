"""The bus boundary's error mapping (`cfs.bus.connection._translate`): what a retry
loop may ask again and what it must not."""

from __future__ import annotations

import nats.js.errors

from cfs.bus import BusError
from cfs.bus.connection import _translate
from cfs.bus.errors import SequenceConflict


def _api(code: int, description: str) -> nats.js.errors.APIError:
    return nats.js.errors.APIError(code=503 if code == 10158 else 400, err_code=code,
                                   description=description, stream="TIER")  # fmt: skip


def test_a_resend_while_the_first_copy_is_being_stored_is_asked_again() -> None:
    err = _translate(_api(10158, "duplicate message id is in process"), "cfs.x", None)
    assert isinstance(err, BusError) and err.temporary


def test_refusals_stay_refusals() -> None:
    assert isinstance(_translate(_api(10071, "wrong last sequence"), "cfs.x", 3), SequenceConflict)
    refused = _translate(_api(10999, "something else"), "cfs.x", None)
    assert not refused.temporary and "code 10999" in str(refused)
