"""Which Volumes the operator's scheduler handler takes (issue 9, item 12, and a chaos finding)."""
from __future__ import annotations

from typing import Any

import kopf

from opensds_operator.handlers.operator import _not_placed

SCHEDULED = {"conditions": [{"type": "Scheduled", "status": "True", "reason": "Scheduled"}]}


def takes(spec: dict[str, Any], status: dict[str, Any]) -> bool:
    body = kopf.Body({"spec": spec, "status": status})
    return _not_placed(spec=body.spec, status=body.status)


def test_a_new_volume_is_scheduled() -> None:
    assert takes({"size": "1Gi"}, {})


def test_a_pinned_volume_is_still_checked_by_the_scheduler() -> None:
    assert takes({"size": "1Gi", "backend": "b", "pool": "p"}, {})


def test_a_volume_whose_spec_write_was_lost_after_scheduled_true_is_scheduled_again() -> None:
    """The apiserver restarted between the status write and the spec write (chaos run)."""
    assert takes({"size": "1Gi"}, SCHEDULED)


def test_a_placed_and_scheduled_volume_is_left_alone() -> None:
    assert not takes({"size": "1Gi", "backend": "b", "pool": "p"}, SCHEDULED)
