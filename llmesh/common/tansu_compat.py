"""aiokafka patch for the embedded Tansu broker.

Tansu numbers a group's first generation 0, and aiokafka only sends LeaveGroup when the generation is
above 0. Without this, a cleanly stopped first member never leaves, and the next start of the same
group waits out the session timeout (about 18 s with defaults). Harmless against Apache Kafka, whose
generations start at 1.
"""

from __future__ import annotations

import logging

from aiokafka.consumer import group_coordinator
from aiokafka.protocol.group import LeaveGroupRequest

log = logging.getLogger(__name__)


async def _maybe_leave_group(self: group_coordinator.GroupCoordinator) -> None:
    if self.generation >= 0 and self.member_id and self._group_instance_id is None:
        try:
            await self._send_req(LeaveGroupRequest(self.group_id, self.member_id))
        except Exception as err:  # best effort, as upstream
            log.warning("LeaveGroup failed: %s", err)
    self.reset_generation()


def apply() -> None:
    group_coordinator.GroupCoordinator._maybe_leave_group = _maybe_leave_group
