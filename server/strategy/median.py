"""Coordinate-wise median of the workers' updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018. Each coordinate takes the median over workers (the mean of the two middle values for an even count),
unweighted; integer buffers take the lower median, bool buffers the majority. Holds every update in memory (see
:mod:`.robust`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlink.protocol.tensors import State

from ..aggregate import coordinate_median
from .robust import RobustStrategy

__all__ = ["Median"]


class Median(RobustStrategy):
    name = "median"

    def combine(self, states: list[Mapping[str, torch.Tensor]], num_samples: list[int]) -> State:
        return {name: coordinate_median([s[name] for s in states]) for name in states[0]}
