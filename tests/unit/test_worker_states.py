"""The worker lifecycle table: allowed transitions pass, impossible ones name state and event."""

from __future__ import annotations

from typing import Any

import pytest

from procdispatch._pool import Slot, WState
from procdispatch.errors import InternalError

ALLOWED = {
    WState.STARTING: {WState.IDLE, WState.STOPPING, WState.DEAD},
    WState.IDLE: {WState.BUSY, WState.STOPPING, WState.DEAD},
    WState.BUSY: {WState.IDLE, WState.STOPPING, WState.DEAD},
    WState.STOPPING: {WState.DEAD},
    WState.DEAD: set(),
}


@pytest.mark.parametrize("frm", list(WState))
@pytest.mark.parametrize("to", list(WState))
def test_transitions(frm: WState, to: WState) -> None:
    handle: Any = None
    slot = Slot(7, handle)
    slot.state = frm
    if to in ALLOWED[frm]:
        slot.move(to)
        assert slot.state is to
    else:
        with pytest.raises(
            InternalError, match=f"worker 7: no transition {frm.value} -> {to.value}"
        ):
            slot.move(to)
        assert slot.state is frm
