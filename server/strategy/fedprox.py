"""FedProx: FedAvg's aggregation, with each worker's local objective given a proximal term.

Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks", MLSys 2020.
Workers minimise ``loss(w) + mu/2 * ||w - w_global||^2`` (the worker's ``proximal`` training hook,
:class:`fedlink.hooks.ProximalHook`), which keeps heterogeneous workers from drifting far from the global model;
the server averages exactly as FedAvg does. Streaming.
"""

from __future__ import annotations

from fedlink.protocol.messages import HookSpec, TrainingPlan

from ..errors import ConfigError
from .base import check_float
from .fedavg import FedAvg

__all__ = ["FedProx"]


class FedProx(FedAvg):
    name = "fedprox"

    def __init__(self, *, mu: float, server_lr: float = 1.0, server_momentum: float = 0.0) -> None:
        super().__init__(server_lr=server_lr, server_momentum=server_momentum)
        self.mu = check_float("mu", mu, low=0)

    def configure_train(self, server_round: int, plan: TrainingPlan) -> TrainingPlan:
        if plan.update == "gradients":
            raise ConfigError(
                "strategy fedprox needs training.update 'weights' or 'delta': with 'gradients' (FedSGD) the "
                "workers take no local steps, so the proximal term mu has no effect"
            )
        if self.mu == 0:
            return plan
        return plan.with_hook(HookSpec(name="proximal", params={"mu": self.mu}))
