"""Built-in reference models that every worker can build without trusting any code but fedlink's own.

A coordinator names a model by factory path (``"fedlink.models:mnist_cnn"``) and keyword arguments; each worker
builds it locally through :func:`fedlink.factory.build_model`. The default allow-list admits exactly this module,
so the models here are the ones a fresh ``fl-worker`` accepts with no extra flags. Every factory is a plain
function returning a ``torch.nn.Module`` whose forward pass maps a batch to class logits of shape
``(batch, num_classes)``; nothing here trains, hooks or patches anything.

The reference shapes follow the tutorials fedlink reproduces: the MNIST CNN of the PyTorch examples, and the
one-layer GRU of the SMS spam tutorial (embedding 50, hidden 10, dropout 0.2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = ["GRUClassifier", "gru_classifier", "mlp", "mnist_cnn", "sized_mlp"]

_FLOAT32_BYTES = 4
_MEGABYTE = 2**20  # the unit torch and most memory tools report as "MB"


def _require_positive(**values: int | float) -> None:
    # Factories receive their kwargs from a coordinator's config; a zero or negative size otherwise surfaces as an
    # opaque torch error deep inside a layer constructor.
    for name, value in values.items():
        if isinstance(value, bool) or not value > 0:
            raise ValueError(f"{name} must be positive, got {value!r}")


def mlp(in_features: int = 64, hidden: int = 64, num_classes: int = 10, depth: int = 1) -> nn.Module:
    """A fully connected classifier with ``depth`` hidden ReLU layers of width ``hidden``.

    The input is flattened first, so the same factory serves flat feature vectors (scikit-learn's 8x8 digits as
    64 values) and images (``in_features=784`` for MNIST's ``(1, 28, 28)``). ``depth=0`` gives a linear model.
    """
    _require_positive(in_features=in_features, hidden=hidden, num_classes=num_classes)
    if isinstance(depth, bool) or depth < 0:
        raise ValueError(f"depth must be zero or more, got {depth!r}")
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def mnist_cnn(num_classes: int = 10) -> nn.Module:
    """The small CNN of the PyTorch MNIST tutorials, for ``(B, 1, 28, 28)`` inputs (225,034 parameters).

    Its fixed parameter count is what benchmarks and the wire tests rely on: changing a layer changes every
    message size they pin.
    """
    _require_positive(num_classes=num_classes)
    return nn.Sequential(
        nn.Conv2d(1, 32, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, kernel_size=3),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(64 * 5 * 5, 128),
        nn.ReLU(),
        nn.Linear(128, num_classes),
    )


class GRUClassifier(nn.Module):
    """A one-layer GRU over right-padded token ids, classifying each sequence from its last real token's state.

    Sequences arrive padded to a common length with ``padding_idx``. Reading the GRU output at the last
    non-padding position gives exactly the state an unpadded run would end in (the GRU is unidirectional, so
    later padding cannot influence earlier outputs), without ``pack_padded_sequence``'s sorted CPU lengths.
    A sequence with no real token at all is read at position 0, which sees only the zero padding embedding.
    """

    def __init__(
        self,
        vocab_size: int,
        embedding_dim: int,
        hidden_size: int,
        num_classes: int,
        dropout: float,
        padding_idx: int,
    ) -> None:
        super().__init__()
        self.padding_idx = padding_idx
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=padding_idx)
        self.gru = nn.GRU(embedding_dim, hidden_size, num_layers=1, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Map int64 token ids ``(B, T)`` to logits ``(B, num_classes)``."""
        if tokens.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, seq_len), got {tuple(tokens.shape)}")
        outputs, _ = self.gru(self.embedding(tokens))  # (B, T, hidden)
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        real = tokens != self.padding_idx
        last = torch.where(real, positions, torch.zeros_like(positions)).amax(dim=1)  # (B,)
        index = last.view(-1, 1, 1).expand(-1, 1, outputs.shape[2])
        final = outputs.gather(1, index).squeeze(1)  # (B, hidden)
        logits: torch.Tensor = self.fc(self.dropout(final))
        return logits


def gru_classifier(
    vocab_size: int = 20000,
    embedding_dim: int = 50,
    hidden_size: int = 10,
    num_classes: int = 2,
    dropout: float = 0.2,
    padding_idx: int = 0,
) -> nn.Module:
    """The SMS spam tutorial's text classifier; pair it with :func:`fedlink.datasets.load_sms_spam`.

    ``vocab_size`` must match the hashing tokenizer's, since token ids are hashed into ``[1, vocab_size)``
    independently on each worker rather than looked up in a shared vocabulary.
    """
    _require_positive(
        vocab_size=vocab_size, embedding_dim=embedding_dim, hidden_size=hidden_size, num_classes=num_classes
    )
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
    if not 0 <= padding_idx < vocab_size:
        raise ValueError(f"padding_idx must be in [0, vocab_size={vocab_size}), got {padding_idx!r}")
    return GRUClassifier(vocab_size, embedding_dim, hidden_size, num_classes, dropout, padding_idx)


def sized_mlp(
    megabytes: float = 50.0, in_features: int = 64, num_classes: int = 10, frozen_backbone: bool = False
) -> nn.Module:
    """An MLP whose float32 parameters take about ``megabytes`` MB (2**20 bytes), for transfer benchmarks.

    Three hidden layers of one width ``h`` are solved for from the size, so the weight lies in a few large
    matrices, as in real models, rather than in many small tensors whose per-tensor overhead would dominate.
    ``frozen_backbone`` freezes all but the output layer (``requires_grad=False``): fine-tuning a head.
    """
    _require_positive(megabytes=megabytes, in_features=in_features, num_classes=num_classes)
    target = megabytes * _MEGABYTE / _FLOAT32_BYTES
    # Parameters: in*h + h  +  2*(h*h + h)  +  h*c + c  =  2h^2 + (in + c + 3)h + c.
    a, b, c = 2.0, float(in_features + num_classes + 3), float(num_classes) - target
    hidden = max(1, round((-b + math.sqrt(b * b - 4 * a * c)) / (2 * a)))
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_features, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
    if frozen_backbone:
        for layer in list(model)[:-1]:
            layer.requires_grad_(False)
    return model
