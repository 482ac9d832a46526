"""Coordinate-wise trimmed mean of the workers' updates.

Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates",
ICML 2018. Each coordinate drops the ``floor(beta * n)`` smallest and largest values over the ``n`` workers and
averages the rest, unweighted; integer buffers take the lower median, bool buffers the majority. A round must
trim at least one value at each end (``n >= 1/beta``, see :attr:`TrimmedMean.min_updates`). Holds every update
in memory (see :mod:`.robust`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlink.protocol.tensors import State

from ..aggregate import min_trimmed_count, trim_count, trimmed_mean
from .base import check_float
from .robust import RobustStrategy

__all__ = ["TrimmedMean"]


class TrimmedMean(RobustStrategy):
    name = "trimmed_mean"

    def __init__(self, *, beta: float = 0.1, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__(server_lr=server_lr, server_momentum=server_momentum)
        self.beta = check_float("beta", beta, low=0, high=0.5)

    @property
    def min_updates(self) -> int:
        return min_trimmed_count(self.beta) if self.beta > 0 else 1

    @property
    def requirement(self) -> str:
        return f"floor(beta * n) >= 1 with beta = {self.beta}"

    def combine(self, states: list[Mapping[str, torch.Tensor]], num_samples: list[int]) -> State:
        trim_count(len(states), self.beta)  # checks once, before any tensor is stacked
        return {name: trimmed_mean([s[name] for s in states], self.beta) for name in states[0]}
