"""Multi-Krum: the sample-weighted mean of the ``m`` updates with the lowest Krum scores.

Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning with Adversaries: Byzantine Tolerant Gradient
Descent", NeurIPS 2017, section 5. Scores as in :mod:`.krum` (``n > 2f + 2``), computed once; the
``m = num_selected`` best updates are averaged, weighted by their sample counts, in the configured worker order.
``m = 1`` is Krum; ``m = n`` is FedAvg. Holds every update in memory (see :mod:`.robust`).
"""

from __future__ import annotations

from .base import check_int
from .krum import Krum

__all__ = ["MultiKrum"]


class MultiKrum(Krum):
    name = "multi_krum"

    def __init__(
        self, *, num_byzantine: int, num_selected: int, server_lr: float = 1.0, server_momentum: float = 0.0
    ) -> None:
        super().__init__(num_byzantine=num_byzantine, server_lr=server_lr, server_momentum=server_momentum)
        self._num_selected = check_int("num_selected", num_selected, low=1)

    @property
    def num_selected(self) -> int:
        return self._num_selected

    @property
    def requirement(self) -> str:
        return f"{super().requirement}, and n >= num_selected = {self.num_selected}"
