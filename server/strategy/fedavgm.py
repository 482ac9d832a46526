"""FedAvgM: FedAvg with heavy-ball momentum on the server.

Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual Classification",
arXiv:1909.06335, 2019. Each round ``v = momentum * v + Δ`` and ``x += server_lr * v``, ``Δ`` being the
pseudo-gradient (mean weights minus global, the mean delta, or minus the mean gradient); with ``momentum`` 0 and
``server_lr`` 1 it is FedAvg. Streaming; the velocity is saved by :meth:`state_dict`.
"""

from __future__ import annotations

import torch

from .base import check_float
from .serveropt import ServerOptimizer

__all__ = ["FedAvgM"]


class FedAvgM(ServerOptimizer):
    name = "fedavgm"
    moments = ("velocity",)

    def __init__(self, *, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        super().__init__()
        self.server_lr = check_float("server_lr", server_lr, low=0, low_open=True)
        self.momentum = check_float("momentum", momentum, low=0, high=1)

    def step(self, name: str, delta: torch.Tensor) -> torch.Tensor:
        velocity = self.moment("velocity", name, delta, 0.0) * self.momentum + delta
        self.set_moment("velocity", name, velocity)
        return velocity * self.server_lr
