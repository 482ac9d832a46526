"""Simulation: many virtual workers, run by a few long-lived host processes or Ray actors, under the real
round engine (``fl-coordinator simulate``). See :mod:`.run` for the design and :mod:`.config` for the keys."""

from __future__ import annotations

__all__: list[str] = []
