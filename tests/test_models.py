from __future__ import annotations

import pytest
import torch
from torch import nn

from fedlink import models


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(0)


def test_mlp_flattens_and_returns_logits() -> None:
    model = models.mlp(in_features=784, hidden=32, num_classes=10, depth=2)
    out = model(torch.rand(5, 1, 28, 28))
    assert out.shape == (5, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 32), (32, 32), (32, 10)]


def test_mlp_defaults_fit_sklearn_digits() -> None:
    assert models.mlp()(torch.rand(3, 64)).shape == (3, 10)


def test_mlp_depth_zero_is_linear() -> None:
    model = models.mlp(in_features=4, num_classes=3, depth=0)
    assert _count(model) == 4 * 3 + 3


@pytest.mark.parametrize("kwargs", [{"hidden": 0}, {"in_features": -1}, {"depth": -1}, {"num_classes": 0}])
def test_mlp_rejects_nonsense_sizes(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        models.mlp(**kwargs)


def test_mnist_cnn_parameter_count_and_shape() -> None:
    model = models.mnist_cnn()
    assert _count(model) == 225_034
    assert model(torch.rand(4, 1, 28, 28)).shape == (4, 10)
    assert models.mnist_cnn(num_classes=3)(torch.rand(1, 1, 28, 28)).shape == (1, 3)


def test_gru_shapes_and_batch_of_one() -> None:
    model = models.gru_classifier(vocab_size=100)
    tokens = torch.randint(1, 100, (3, 12))
    assert model(tokens).shape == (3, 2)
    assert model(tokens[:1]).shape == (1, 2)
    assert models.gru_classifier(vocab_size=100, num_classes=5)(tokens).shape == (3, 5)


def test_gru_padding_does_not_change_the_result() -> None:
    model = models.gru_classifier(vocab_size=50, embedding_dim=8, hidden_size=6).eval()
    short = torch.tensor([[5, 7, 9]])
    padded = torch.tensor([[5, 7, 9, 0, 0, 0, 0], [3, 0, 0, 0, 0, 0, 0], [4, 4, 4, 4, 4, 4, 4]])
    with torch.no_grad():
        alone = model(short)
        batched = model(padded)
        one_token = model(torch.tensor([[3]]))
        full = model(padded[2:])
        naive_last = model.fc(model.gru(model.embedding(padded[:1]))[0][:, -1])
    torch.testing.assert_close(batched[0:1], alone)
    torch.testing.assert_close(batched[1:2], one_token)
    torch.testing.assert_close(batched[2:3], full)
    # Reading the state after the padding would give something else: the test can tell the two apart.
    assert not torch.allclose(naive_last, alone)


def test_gru_all_padding_row_is_finite() -> None:
    model = models.gru_classifier(vocab_size=20).eval()
    out = model(torch.zeros(2, 5, dtype=torch.int64))
    assert out.shape == (2, 2)
    assert torch.isfinite(out).all()


def test_gru_trains_on_a_padded_batch() -> None:
    model = models.gru_classifier(vocab_size=30)
    tokens = torch.tensor([[1, 2, 3, 0], [4, 5, 0, 0]])
    loss = nn.functional.cross_entropy(model(tokens), torch.tensor([0, 1]))
    loss.backward()
    assert model.embedding.weight.grad is not None
    assert torch.count_nonzero(model.embedding.weight.grad[0]) == 0  # padding embedding never learns


@pytest.mark.parametrize("megabytes", [0.5, 2.0, 7.3])
def test_sized_mlp_is_about_the_requested_size(megabytes: float) -> None:
    model = models.sized_mlp(megabytes, in_features=20, num_classes=4)
    size = _count(model) * 4 / 2**20
    assert size == pytest.approx(megabytes, rel=0.02)
    assert model(torch.rand(2, 20)).shape == (2, 4)
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) == 4


def test_sized_mlp_tiny_request_still_builds() -> None:
    assert models.sized_mlp(1e-6)(torch.rand(1, 64)).shape == (1, 10)
