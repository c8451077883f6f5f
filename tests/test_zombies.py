"""The automation that marks flow runs whose process died as Crashed: installed on a real Prefect API
(the test harness), idempotent, and shaped as Prefect's zombie-flow recipe. The end-to-end kill (a flow run
process SIGKILLed, then seen Crashed on the server) takes minutes of real heartbeat time: see docs/faults.md."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tasks.zombies import MISSED_BEATS, NAME, ensure_crash_automation

pytestmark = pytest.mark.usefixtures("prefect_harness")


def test_the_crash_automation_is_installed_once_and_crashes_silent_runs():
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.schemas.automations import Posture

    first, created = ensure_crash_automation(heartbeat_s=30)
    again, created_again = ensure_crash_automation(heartbeat_s=30)
    assert created and not created_again and again.id == first.id
    saved = Automation.read(name=NAME)
    trigger = saved.trigger
    assert trigger.posture == Posture.Proactive and trigger.after == {"prefect.flow-run.heartbeat"}
    assert {"prefect.flow-run.heartbeat", "prefect.flow-run.Completed", "prefect.flow-run.Crashed"} <= trigger.expect
    assert trigger.for_each == {"prefect.resource.id"} and trigger.within == timedelta(seconds=30 * MISSED_BEATS)
    (action,) = saved.actions
    assert action.type == "change-flow-run-state" and action.state == StateType.CRASHED
    # another heartbeat period replaces it (one automation of that name, with the new silence)
    third, created_third = ensure_crash_automation(heartbeat_s=60)
    assert created_third and Automation.read(name=NAME).trigger.within == timedelta(seconds=60 * MISSED_BEATS)
    third.delete()
