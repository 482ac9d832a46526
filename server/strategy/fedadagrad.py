"""FedAdagrad: Adagrad on the server's pseudo-gradient, ``v = v + Δ²``.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2. ``beta1`` defaults to 0 (plain Adagrad, no server momentum); the paper's algorithm allows more.
Streaming; the moments are saved by :meth:`state_dict`.
"""

from __future__ import annotations

import torch

from .serveropt import AdaptiveOptimizer

__all__ = ["FedAdagrad"]


class FedAdagrad(AdaptiveOptimizer):
    name = "fedadagrad"

    def __init__(self, *, eta: float = 0.03, beta1: float = 0.0, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, tau=tau)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        return v + delta.square()
