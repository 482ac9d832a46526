"""FedAdam: Adam on the server's pseudo-gradient, ``v = beta2 * v + (1 - beta2) * Δ²``.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2 (no bias correction). Streaming; the moments are saved by :meth:`state_dict`.
"""

from __future__ import annotations

import torch

from .serveropt import AdaptiveOptimizer

__all__ = ["FedAdam"]


class FedAdam(AdaptiveOptimizer):
    name = "fedadam"

    def __init__(self, *, eta: float = 0.03, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        assert self.beta2 is not None
        return v * self.beta2 + delta.square() * (1 - self.beta2)
