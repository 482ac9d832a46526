from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlink.privacy import ModelNotPrivatizable, PrivacyError
from fedlink.privacy.ledger import compute_epsilon
from fedlink.privacy.local import LocalAccountants, LocalDPResult, dp_sgd_steps, train_dp_sgd
from fedlink.privacy.noise import NoiseSource

SECRET = b"\x42" * 32


def data(n: int = 400, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(1)
    return x * scale, y


def mlp(seed: int = 1) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def train(
    model: nn.Module,
    accountants: LocalAccountants,
    *,
    secret: bytes = SECRET,
    server_round: int = 1,
    examples: tuple[torch.Tensor, torch.Tensor] | None = None,
    **overrides: object,
) -> LocalDPResult:
    x, y = examples if examples is not None else data()
    options: dict[str, object] = {
        "batch_size": 40, "epochs": 3, "lr": 0.5, "clip_norm": 1.0, "noise_multiplier": 1.0,
        "noise": NoiseSource(secret),
        "server_round": server_round, "ledger": accountants.ledger("run-1", 1e-5),
    }
    options.update(overrides)
    return train_dp_sgd(model, x, y, **options)  # type: ignore[arg-type]  # options are typed per key above


def test_learns_and_reports_the_epsilon_of_its_steps() -> None:
    model, accountants = mlp(), LocalAccountants()
    x, y = data()
    before = float((model(x).argmax(1) == y).float().mean())
    result = train(model, accountants)
    q, steps = dp_sgd_steps(400, 40, 3)
    assert (result.steps, result.sample_rate) == (steps, q) == (30, 0.1)
    assert result.epsilon == pytest.approx(compute_epsilon([(1.0, 0.1, 30)], 1e-5), abs=1e-9)
    after = float((model(x).argmax(1) == y).float().mean())
    assert after > max(before, 0.6)


def test_same_secret_and_seed_repeat_and_the_model_stays_plain() -> None:
    a, b, c = mlp(), mlp(), mlp()
    train(a, LocalAccountants())
    train(b, LocalAccountants())
    train(c, LocalAccountants(), secret=b"\x43" * 32)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), c.parameters()))
    for module in a.modules():
        assert not module._forward_hooks and not module._backward_hooks and not module._forward_pre_hooks
    for p in a.parameters():
        assert not hasattr(p, "grad_sample") and not hasattr(p, "summed_grad") and p.grad is None


@pytest.mark.filterwarnings("ignore:Optimal order is the smallest alpha")
def test_each_example_gradient_is_clipped() -> None:
    """Huge inputs give huge gradients; one step still moves the weights by at most lr * C * |batch| / B."""
    model = mlp()
    start = [p.detach().clone() for p in model.parameters()]
    x, y = data(100, scale=1e4)
    result = train(model, LocalAccountants(), examples=(x, y), batch_size=100, epochs=1, lr=1.0, clip_norm=0.5,
                   noise_multiplier=1e-9)
    assert result.steps == 1
    moved = torch.sqrt(torch.stack([((p.detach() - s) ** 2).sum() for p, s in zip(model.parameters(), start)]).sum())
    drawn = 100  # q = 1: every example is in the batch
    assert 0 < float(moved) <= 1.0 * 0.5 * drawn / 100 + 1e-6


def test_batchnorm_is_refused_with_the_reason_before_training() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))
    start = [p.detach().clone() for p in model.parameters()]
    accountants = LocalAccountants()
    with pytest.raises(ModelNotPrivatizable, match="BatchNorm.*GroupNorm"):
        train(model, accountants)
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), start))
    assert accountants.epsilon("run-1") == 0.0


def test_interrupted_training_accounts_the_steps_taken() -> None:
    accountants, calls = LocalAccountants(), []

    def stop() -> bool:
        calls.append(1)
        return len(calls) > 4

    result = train(mlp(), accountants, stop=stop)
    assert result.steps == 4
    assert accountants.epsilon("run-1") == pytest.approx(compute_epsilon([(1.0, 0.1, 4)], 1e-5))


def test_worker_budget_spans_rounds_of_one_run() -> None:
    accountants = LocalAccountants()
    q, steps = dp_sgd_steps(400, 40, 3)
    one_round = compute_epsilon([(1.0, q, steps)], 1e-5)
    budget = compute_epsilon([(1.0, q, 2 * steps)], 1e-5) + 1e-9
    rounds = 0
    for server_round in range(1, 5):
        if accountants.would_exceed("run-1", budget, delta=1e-5, q=q, z=1.0, steps=steps):
            break
        train(mlp(), accountants, server_round=server_round)
        rounds += 1
    assert rounds == 2
    assert one_round < accountants.epsilon("run-1") <= budget
    assert accountants.epsilon("run-2") == 0.0
    with pytest.raises(PrivacyError, match="delta"):
        accountants.ledger("run-1", 1e-6)


def test_a_retried_round_draws_new_noise_and_runs_have_their_own_secrets() -> None:
    accountants = LocalAccountants()
    first, retry = mlp(), mlp()
    train(first, accountants, server_round=2)
    train(retry, accountants, server_round=2)  # same round, same secret, same start: later steps of the run draw other batches and noise
    assert not torch.equal(first[0].weight, retry[0].weight)
    assert accountants.noise("run-1") is accountants.noise("run-1")
    assert accountants.noise("run-1").state_dict() != accountants.noise("run-2").state_dict()
