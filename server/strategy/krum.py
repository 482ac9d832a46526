"""Krum: the one update closest to its neighbours.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017. With at most ``f = num_byzantine`` Byzantine workers among ``n > 2f + 2``, each update is
scored by the sum of its squared distances to its ``n - f - 2`` nearest other updates (over the floating-point
tensors) and the lowest score wins, ties to the earlier worker in the configured order. The chosen worker's
update is used as it is, buffers included. Holds every update in memory (see :mod:`.robust`).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from fedlink.protocol.tensors import State

from ..aggregate import krum_scores, lowest, weighted_mean
from .base import check_int
from .robust import RobustStrategy

__all__ = ["Krum"]


class Krum(RobustStrategy):
    name = "krum"

    def __init__(self, *, num_byzantine: int, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__(server_lr=server_lr, server_momentum=server_momentum)
        self.num_byzantine = check_int("num_byzantine", num_byzantine, low=0)

    @property
    def num_selected(self) -> int:
        return 1

    @property
    def min_updates(self) -> int:
        return max(2 * self.num_byzantine + 3, self.num_selected)

    @property
    def requirement(self) -> str:
        return f"n > 2f + 2 with num_byzantine f = {self.num_byzantine}"

    def combine(self, states: list[Mapping[str, torch.Tensor]], num_samples: list[int]) -> State:
        chosen = lowest(krum_scores(states, self.num_byzantine), self.num_selected)
        if len(chosen) == 1:
            return dict(states[chosen[0]])
        return weighted_mean([states[i] for i in chosen], [float(num_samples[i]) for i in chosen])
