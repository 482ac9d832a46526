"""Local differential privacy: record-level DP-SGD on one worker, with Opacus, and the worker's own budget.

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar, Zhang, "Deep Learning with Differential Privacy", CCS 2016: each
step draws a Poisson sample of the worker's examples (each with probability ``q = batch_size / n``), clips every
example's gradient to ``clip_norm``, adds Gaussian noise of std ``noise_multiplier * clip_norm`` to the sum and
divides by the expected batch size. Opacus computes the per-example gradients (``GradSampleModule``) and clips
(``DPOptimizer``); the batches and the noise come from the run's :class:`~fedlink.privacy.noise.NoiseSource`
instead of a torch generator, labelled by round, step and parameter name. The worker's :class:`LocalAccountants`
keeps one ledger per run across rounds, so the epsilon it reports covers every step it has taken for that run.

Models with layers whose statistics mix examples (BatchNorm) have no per-example gradient and are refused
(:func:`check_privatizable`). The hooks Opacus adds are removed when training ends: the model stays plain PyTorch.
The training loss and accuracy returned are computed on private data without noise; a worker that must not leak
them should not report them.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from torch import nn
from torch.nn import functional as F

from fedlink.training import make_optimizer

from .config import AccountantName
from .errors import ModelNotPrivatizable, PrivacyError
from .ledger import PrivacyLedger
from .noise import NoiseSource

__all__ = ["LocalDPResult", "check_privatizable", "dp_sgd_steps", "train_dp_sgd", "LocalAccountants"]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _sum_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, target, reduction="sum")


@dataclass(frozen=True)
class LocalDPResult:
    loss: float  # mean training loss over the examples drawn (not private)
    accuracy: float  # over the same examples (not private)
    steps: int
    sample_rate: float
    epsilon: float  # the run's total on this worker after this training, at the ledger's delta

    def as_dict(self) -> dict[str, float]:
        return {
            "loss": self.loss,
            "accuracy": self.accuracy,
            "steps": float(self.steps),
            "sample_rate": self.sample_rate,
            "epsilon": self.epsilon,
        }


def check_privatizable(model: nn.Module) -> None:
    """Raise :class:`ModelNotPrivatizable` naming each layer Opacus cannot give per-example gradients for."""
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        reasons = "; ".join(sorted({str(p).split(".")[0] for p in problems}))
        raise ModelNotPrivatizable(
            f"local DP needs per-example gradients, which this model cannot give: {reasons}. Replace BatchNorm "
            "with GroupNorm or LayerNorm (opacus.validators.ModuleValidator.fix does this) in the model factory"
        )


def dp_sgd_steps(num_examples: int, batch_size: int, epochs: int) -> tuple[float, int]:
    """``(q, steps)`` for a local run: ``q = batch_size / n`` (capped at 1), ``epochs * ceil(n / batch_size)`` steps."""
    if num_examples < 1 or batch_size < 1 or epochs < 1:
        raise PrivacyError(
            f"local DP needs examples, batch_size and epochs >= 1, got {num_examples}, {batch_size}, {epochs}"
        )
    q = min(1.0, batch_size / num_examples)
    return q, epochs * math.ceil(num_examples / batch_size)


class _KeyedDPOptimizer(DPOptimizer):  # type: ignore[misc]
    """Opacus's DP optimizer with the noise drawn from a :class:`NoiseSource` (labelled, reproducible)."""

    def __init__(
        self, optimizer: torch.optim.Optimizer, *, names: dict[int, str], noise: NoiseSource, server_round: int,
        noise_multiplier: float, max_grad_norm: float, expected_batch_size: int, first_step: int,
    ) -> None:
        super().__init__(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction="mean",
        )
        self._names = names
        self._noise = noise
        self._round = server_round
        self.step_index = first_step

    def add_noise(self) -> None:
        std = self.noise_multiplier * self.max_grad_norm
        for p in self.params:
            summed = p.summed_grad
            name = self._names[id(p)]
            noise = self._noise.gaussian(self._round, f"local/step-{self.step_index}", name, summed.shape, std, summed.dtype)
            p.grad = (summed + noise.to(summed.device)).view_as(p)
        self.step_index += 1


def train_dp_sgd(
    model: nn.Module,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    batch_size: int,
    epochs: int,
    optimizer: str = "sgd",
    lr: float = 0.05,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    clip_norm: float,
    noise_multiplier: float,
    noise: NoiseSource,
    server_round: int,
    ledger: PrivacyLedger,
    loss_fn: LossFn = _sum_cross_entropy,
    stop: Callable[[], bool] | None = None,
) -> LocalDPResult:
    """Train ``model`` in place with DP-SGD; step ``ledger`` for every step taken (also when interrupted).

    ``loss_fn`` must *sum* over the batch (per-example gradients are scaled by Opacus' ``loss_reduction``).
    ``stop`` is polled between steps; steps taken before it returned True are accounted.

    ``noise`` (the run's secret) drives both the Poisson sampling and the Gaussian noise: amplification by sampling
    holds only if nobody can predict the batches, which a seed from the training plan would allow. Draws are
    labelled by the run's step count (``ledger.rounds`` onwards), so a retried round never reuses noise or
    batches; ``noise`` and ``ledger`` must belong to the same run (:meth:`LocalAccountants.noise` / ``.ledger``).
    """
    check_privatizable(model)
    if not (clip_norm > 0 and noise_multiplier > 0):
        raise PrivacyError(f"local DP needs clip_norm and noise_multiplier > 0, got {clip_norm}, {noise_multiplier}")
    n = len(inputs)
    q, total_steps = dp_sgd_steps(n, batch_size, epochs)
    params = [p for p in model.parameters() if p.requires_grad]
    names = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    base = make_optimizer(params, name=optimizer, lr=lr, momentum=momentum, weight_decay=weight_decay)
    try:
        wrapped = GradSampleModule(model, loss_reduction="sum")
    except NotImplementedError as exc:  # a trainable layer with buffers that the validator did not know about
        raise ModelNotPrivatizable(f"local DP cannot compute per-example gradients for this model: {exc}") from exc
    dp_opt = _KeyedDPOptimizer(
        base, names=names, noise=noise, server_round=server_round, noise_multiplier=noise_multiplier,
        max_grad_norm=clip_norm, expected_batch_size=batch_size, first_step=ledger.rounds,
    )
    loss_sum, correct, seen, steps = 0.0, 0, 0, 0
    first_step = ledger.rounds
    model.train()
    try:
        for step in range(first_step, first_step + total_steps):
            if stop is not None and stop():
                break
            coins = torch.from_numpy(noise.uniforms(server_round, f"local/sample-{step}", "", n))
            index = (coins < q).nonzero().flatten().to(inputs.device)
            batch_x, batch_y = inputs[index], targets[index]
            out = wrapped(batch_x)
            loss = loss_fn(out, batch_y)
            dp_opt.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # Opacus' backward hooks fire on outputs when inputs need no gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
                loss.backward()  # type: ignore[no-untyped-call]
            dp_opt.step()
            steps += 1
            loss_sum += float(loss.detach())
            correct += int((out.detach().argmax(dim=1) == batch_y).sum())
            seen += len(index)
    finally:
        if steps:
            ledger.step(q, noise_multiplier, steps)
        wrapped.remove_hooks()
        for p in params:
            for attr in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, attr):
                    delattr(p, attr)
            p.grad = None
    return LocalDPResult(
        loss=loss_sum / seen if seen else math.nan,
        accuracy=correct / seen if seen else math.nan,
        steps=steps,
        sample_rate=q,
        epsilon=ledger.epsilon,
    )


class LocalAccountants:
    """A worker's ledger and noise source per run id, kept across rounds in its per-run store.

    Lost on restart: the worker then starts the run's epsilon from zero, which the daemon must refuse or warn
    about (a restarted worker cannot know what it spent before).
    """

    def __init__(self, *, accountant: AccountantName = "rdp") -> None:
        self._accountant: AccountantName = accountant
        self._ledgers: dict[str, PrivacyLedger] = {}
        self._noise: dict[str, NoiseSource] = {}

    def noise(self, run_id: str) -> NoiseSource:
        """This run's noise source, with a fresh secret on first use (never written anywhere)."""
        source = self._noise.get(run_id)
        if source is None:
            source = self._noise[run_id] = NoiseSource.create()
        return source

    def ledger(self, run_id: str, delta: float) -> PrivacyLedger:
        """This run's ledger, created on first use; a run keeps the delta it started with."""
        ledger = self._ledgers.get(run_id)
        if ledger is None:
            ledger = self._ledgers[run_id] = PrivacyLedger(delta=delta, accountant=self._accountant)
        elif ledger.delta != delta:
            raise PrivacyError(f"run {run_id!r} started with privacy.delta {ledger.delta:g}, this round asks {delta:g}")
        return ledger

    def epsilon(self, run_id: str) -> float:
        ledger = self._ledgers.get(run_id)
        return ledger.epsilon if ledger is not None else 0.0

    def would_exceed(self, run_id: str, max_epsilon: float, *, delta: float, q: float, z: float, steps: int) -> bool:
        """True when ``steps`` more DP-SGD steps with ``(q, z)`` would take this run above ``max_epsilon``."""
        return self.ledger(run_id, delta).epsilon_after(q, z, steps) > max_epsilon

    def drop(self, run_id: str) -> None:
        self._ledgers.pop(run_id, None)
        self._noise.pop(run_id, None)
