"""FedYogi: Yogi on the server's pseudo-gradient, ``v = v - (1 - beta2) * Δ² * sign(v - Δ²)``.

Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar, McMahan, "Adaptive Federated Optimization", ICLR 2021,
Algorithm 2; Yogi itself is Zaheer et al., "Adaptive Methods for Nonconvex Optimization", NeurIPS 2018. Adam's
``v`` moves by ``(1 - beta2) * (Δ² - v)``; Yogi's moves by ``(1 - beta2) * Δ²`` towards ``Δ²``, whatever the size
of ``v``, so the effective step grows more gently when updates become small. Streaming; the moments are saved by
:meth:`state_dict`.
"""

from __future__ import annotations

import torch

from .serveropt import AdaptiveOptimizer

__all__ = ["FedYogi"]


class FedYogi(AdaptiveOptimizer):
    name = "fedyogi"

    def __init__(self, *, eta: float = 0.03, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau)

    def second_moment(self, v: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        assert self.beta2 is not None
        squared = delta.square()
        return v - squared * (1 - self.beta2) * torch.sign(v - squared)
