"""Flow runs whose process died are marked Crashed on the server, with Prefect's own mechanism.

Prefect 3's flow engine emits a ``prefect.flow-run.heartbeat`` event every ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``
seconds (180 by default, at least 30) while a flow run is alive. A process killed by SIGKILL, the OOM killer
or a lost machine emits nothing more, not even a final state, so the run would stay "Running" for ever. The
automation made here is a proactive trigger (Prefect's documented zombie-flow recipe): for each flow run, a
heartbeat not followed within ``MISSED_BEATS`` heartbeat periods by another heartbeat or a final state moves
the run to Crashed. ``make serve`` (tasks.local_server) installs it; ``ensure_crash_automation`` is idempotent.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

NAME = "dumo: crash flow runs whose process died"
MISSED_BEATS = 3  # heartbeat periods of silence before a run counts as dead (a busy machine can be slow)


def heartbeat_seconds() -> int:
    """The heartbeat period flow runs use (Prefect's setting, floored at its 30 s minimum)."""
    from prefect.settings import get_current_settings

    return max(30, int(get_current_settings().flows.heartbeat_frequency or 180))


def crash_automation(heartbeat_s: int | None = None) -> Any:
    """The automation (not yet saved): after a heartbeat, expect another heartbeat or a final state
    within MISSED_BEATS periods, else change the flow run's state to Crashed."""
    from prefect.automations import Automation
    from prefect.client.schemas.objects import StateType
    from prefect.events.actions import ChangeFlowRunState
    from prefect.events.schemas.automations import EventTrigger, Posture
    from prefect.events.schemas.events import ResourceSpecification

    period = heartbeat_s or heartbeat_seconds()
    silence = period * MISSED_BEATS
    final = {f"prefect.flow-run.{s}" for s in ("Completed", "Failed", "Cancelled", "Crashed")}
    return Automation(
        name=NAME,
        description=f"A flow run silent for {silence} s ({MISSED_BEATS} heartbeats of {period} s) has died",
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *final},
            match=ResourceSpecification({"prefect.resource.id": ["prefect.flow-run.*"]}),
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=silence),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {silence} s: the flow run's process died (killed, out of memory, lost"
                " machine); run it again to resume from what it committed",
            )
        ],
    )


def ensure_crash_automation(heartbeat_s: int | None = None) -> tuple[Any, bool]:
    """(the automation on the current API, whether it was created now). An existing one of that name is
    replaced when its settings differ, so a changed heartbeat period takes effect."""
    from prefect.automations import Automation

    wanted = crash_automation(heartbeat_s)
    try:
        existing = Automation.read(name=NAME)
    except ValueError:  # none of that name
        existing = None
    if existing is not None:
        if existing.trigger == wanted.trigger and existing.actions == wanted.actions:
            return existing, False
        existing.delete()
    return wanted.create(), True


def install_crash_automation(api_url: str) -> str:
    """``ensure_crash_automation`` on the server at ``api_url``; a line for the person starting it."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}):
        automation, created = ensure_crash_automation()
    within = int(automation.trigger.within.total_seconds())
    return f"automation {NAME!r} {'created' if created else 'already there'} (Crashed after {within} s silent)"
