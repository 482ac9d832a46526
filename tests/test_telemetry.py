"""Bounded label sets: the first values pass, later ones are folded or dropped."""

from __future__ import annotations

import pytest

from fedlink.telemetry import BoundedLabels


def test_bounded_labels() -> None:
    stages = BoundedLabels(2)
    assert [stages.admit(v) for v in ("train", "evaluate", "train", "unmask")] == ["train", "evaluate", "train", "other"]
    assert stages.full
    workers = BoundedLabels(1, overflow=None)
    assert workers.admit("a") == "a" and workers.admit("b") is None
    assert BoundedLabels(0, overflow=None).admit("a") is None
    with pytest.raises(ValueError, match="at least 0"):
        BoundedLabels(-1)
