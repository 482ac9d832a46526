"""The local training and evaluation steps: plain PyTorch on in-memory tensors, no I/O, no network.

The worker daemon runs these in a thread; the coordinator uses :func:`evaluate` for its held-out set; a simulation
can call them directly. ``stop`` is checked between batches so a daemon can end a job promptly on SIGTERM.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .errors import FedlinkError
from .hooks import TrainingHook

__all__ = [
    "TrainingCancelled",
    "TrainingFailed",
    "Metrics",
    "make_optimizer",
    "train_local",
    "average_gradients",
    "evaluate",
    "batches",
    "state_on_cpu",
]


class TrainingFailed(FedlinkError):
    """Local training produced no usable model (e.g. the loss became NaN)."""

    code = "training_failed"


class TrainingCancelled(FedlinkError):
    """The job was stopped (the daemon is shutting down)."""

    code = "cancelled"


@dataclass(frozen=True)
class Metrics:
    loss: float
    accuracy: float
    num_samples: int
    steps: int = 0
    roc_auc: float | None = None  # binary tasks only: area under the ROC curve of the positive class's score

    def as_dict(self) -> dict[str, float]:
        out = {"loss": self.loss, "accuracy": self.accuracy, "steps": float(self.steps)}
        if self.roc_auc is not None:
            out["roc_auc"] = self.roc_auc
        return out


def make_optimizer(
    params: list[nn.Parameter], *, name: str, lr: float, momentum: float = 0.0, weight_decay: float = 0.0,
    nesterov: bool = False,
) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd, adam or adamw")


def batches(
    n: int, batch_size: int, *, generator: torch.Generator | None = None
) -> Iterator[torch.Tensor]:
    """Index batches over ``range(n)``, shuffled by ``generator`` when given (deterministic for a seed)."""
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start : start + batch_size]


def _check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise TrainingCancelled("training stopped: the worker is shutting down")


def train_local(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    seed: int,
    hooks: Sequence[TrainingHook] = (),
    max_steps: int | None = None,
    device: torch.device | str = "cpu",
    stop: threading.Event | None = None,
) -> Metrics:
    """Train ``model`` in place with cross-entropy; returns loss and accuracy over the last epoch.

    ``hooks`` (see :mod:`.hooks`) shape the objective, act before each optimizer step and see the model at the
    end, in order. Shuffling comes from a generator seeded with ``seed``; layers that draw from torch's global
    generator (dropout) get it seeded with ``seed`` inside a fork of the RNG state, so the caller's global state is
    untouched and several virtual workers in one process each repeat exactly.
    """
    device = torch.device(device)
    forked = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=forked, device_type=device.type if forked else "cuda"):
        torch.manual_seed(seed)
        generator = torch.Generator().manual_seed(seed)
        for hook in hooks:
            hook.setup(model)
        metrics = _train_epochs(
            model, x, y, epochs=epochs, batch_size=batch_size, optimizer=optimizer, generator=generator,
            hooks=hooks, max_steps=max_steps, device=device, stop=stop,
        )
        for hook in hooks:
            hook.finish(model)
    return metrics


def _train_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    hooks: Sequence[TrainingHook],
    max_steps: int | None,
    device: torch.device,
    stop: threading.Event | None,
) -> Metrics:
    model.train()
    steps = 0
    loss_sum, correct, seen = 0.0, 0, 0
    for _ in range(epochs):
        loss_sum, correct, seen = 0.0, 0, 0
        for index in batches(len(x), batch_size, generator=generator):
            _check_stop(stop)
            xb, yb = x[index].to(device, non_blocking=True), y[index].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            objective = loss
            for hook in hooks:
                objective = hook.objective(model, objective)
            objective.backward()  # type: ignore[no-untyped-call]
            for hook in hooks:
                hook.before_step(model)
            optimizer.step()
            value = loss.item()
            if not math.isfinite(value):
                raise TrainingFailed(f"loss became {value} at step {steps}; lower the learning rate")
            loss_sum += value * len(index)
            correct += int((logits.argmax(dim=1) == yb).sum())
            seen += len(index)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return Metrics(loss_sum / seen, correct / seen, seen, steps)
    return Metrics(loss_sum / max(seen, 1), correct / max(seen, 1), seen, steps)


def average_gradients(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int,
    device: torch.device | str = "cpu",
    stop: threading.Event | None = None,
) -> tuple[dict[str, torch.Tensor], Metrics]:
    """The gradient of the mean loss over all of ``x`` at the model's current weights (FedSGD's update)."""
    device = torch.device(device)
    model.train()
    model.zero_grad(set_to_none=True)
    n = len(x)
    loss_sum, correct = 0.0, 0
    for index in batches(n, batch_size):
        _check_stop(stop)
        xb, yb = x[index].to(device), y[index].to(device)
        logits = model(xb)
        loss = F.cross_entropy(logits, yb, reduction="sum")
        (loss / n).backward()  # type: ignore[no-untyped-call]
        loss_sum += loss.item()
        correct += int((logits.argmax(dim=1) == yb).sum())
    grads = {
        name: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().to("cpu")
        for name, p in model.named_parameters()
    }
    return grads, Metrics(loss_sum / max(n, 1), correct / max(n, 1), n, 1)


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    stop: threading.Event | None = None,
) -> Metrics:
    """Loss and accuracy over all of ``x``; for two-class models also the ROC AUC of class 1's probability."""
    device = torch.device(device)
    model.eval()
    loss_sum, correct = 0.0, 0
    scores: list[torch.Tensor] = []
    for index in batches(len(x), batch_size):
        _check_stop(stop)
        xb, yb = x[index].to(device), y[index].to(device)
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += int((logits.argmax(dim=1) == yb).sum())
        if logits.shape[1] == 2:
            scores.append(logits.softmax(dim=1)[:, 1].to("cpu"))
    n = len(x)
    return Metrics(loss_sum / max(n, 1), correct / max(n, 1), n, roc_auc=_roc_auc(y, scores))


def _roc_auc(y: torch.Tensor, scores: list[torch.Tensor]) -> float | None:
    if not scores or len(torch.unique(y)) < 2:
        return None
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.to("cpu").numpy(), torch.cat(scores).numpy()))


def state_on_cpu(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu") for k, v in state.items()}
