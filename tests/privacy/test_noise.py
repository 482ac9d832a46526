from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from scipy import stats

from fedlink.privacy import PrivacyError
from fedlink.privacy.noise import NoiseSource

SECRET = bytes(range(32))


def test_same_secret_and_label_repeat_bit_for_bit() -> None:
    a = NoiseSource(SECRET).gaussian(3, "central/update", "fc.weight", (7, 5), 0.3)
    b = NoiseSource.from_state_dict(NoiseSource(SECRET).state_dict()).gaussian(3, "central/update", "fc.weight", (7, 5), 0.3)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "other", [(4, "central/update", "fc.weight"), (3, "central/count", "fc.weight"), (3, "central/update", "fc.bias")]
)
def test_every_part_of_the_label_changes_the_draw(other: tuple[int, str, str]) -> None:
    source = NoiseSource(SECRET)
    base = source.gaussian(3, "central/update", "fc.weight", (64,), 1.0)
    assert not torch.equal(base, source.gaussian(*other, (64,), 1.0))


def test_label_fields_cannot_be_confused_by_concatenation() -> None:
    source = NoiseSource(SECRET)
    assert not torch.equal(source.gaussian(1, "ab", "c", (16,), 1.0), source.gaussian(1, "a", "bc", (16,), 1.0))


def test_another_secret_gives_other_noise() -> None:
    assert not torch.equal(
        NoiseSource(SECRET).gaussian(1, "p", "w", (64,), 1.0), NoiseSource.create().gaussian(1, "p", "w", (64,), 1.0)
    )


def test_uniforms_are_chacha20_keystream_words_under_the_hmac_derived_key() -> None:
    """Known-answer check against an independent computation of the documented construction."""
    mac = hmac.HMAC(SECRET, hashes.SHA256())
    for part in (b"fedlink/privacy/noise/v1", (9).to_bytes(8, "little"), (1).to_bytes(4, "little") + b"p",
                 (1).to_bytes(4, "little") + b"w"):
        mac.update(part)
    stream = Cipher(algorithms.ChaCha20(mac.finalize(), bytes(16)), mode=None).encryptor().update(bytes(8 * 5))
    words = [int.from_bytes(stream[8 * i : 8 * i + 8], "little") for i in range(5)]
    expected = [((w >> 11) + 0.5) * 2.0**-53 for w in words]
    assert NoiseSource(SECRET).uniforms(9, "p", "w", 5).tolist() == expected


def test_gaussian_is_standard_normal_scaled() -> None:
    draw = NoiseSource(SECRET).gaussian(1, "p", "w", (200_000,), 2.0, torch.float64).numpy()
    assert stats.kstest(draw / 2.0, "norm").pvalue > 1e-3
    # halves come from cos and sin of the same pairs: they must still be uncorrelated
    assert abs(np.corrcoef(draw[:100_000], draw[100_000:])[0, 1]) < 0.02


def test_gaussian_spans_chunks_and_keeps_dtype() -> None:
    source = NoiseSource(SECRET)
    big = source.gaussian(1, "p", "w", (3, (1 << 20) + 5), 1.0)
    assert big.dtype == torch.float32 and big.shape == (3, (1 << 20) + 5)
    flat = big.flatten()
    blocks = [flat[start : start + 256] for start in range(0, flat.numel() - 256, 1 << 20)]
    assert all(not torch.equal(a, b) for i, a in enumerate(blocks) for b in blocks[i + 1 :])  # no chunk repeats
    assert float(flat.double().std()) == pytest.approx(1.0, abs=0.01)
    assert source.gaussian(1, "p", "w", (4,), 1.0, torch.bfloat16).dtype == torch.bfloat16
    assert torch.count_nonzero(source.gaussian(1, "p", "w", (4,), 0.0)) == 0


def _discrete_gaussian_pmf(sigma: float, support: np.ndarray) -> np.ndarray:
    weights = np.exp(-(support.astype(np.float64) ** 2) / (2 * sigma**2))
    pmf: np.ndarray = weights / weights.sum()
    return pmf


@pytest.mark.parametrize("sigma", [0.6, 2.0, 7.5])
def test_discrete_gaussian_matches_its_mass_function(sigma: float) -> None:
    draw = NoiseSource(SECRET).discrete_gaussian(2, "distributed/update", "w", (200_000,), sigma).numpy()
    bound = math.ceil(5 * sigma)
    support = np.arange(-bound, bound + 1)
    pmf = _discrete_gaussian_pmf(sigma, np.arange(-20 * bound, 20 * bound + 1))
    expected = pmf[19 * bound : 21 * bound + 1] * draw.size
    observed = np.array([(draw == k).sum() for k in support])
    tail = draw.size - observed.sum()
    result = stats.chisquare(np.append(observed, tail), np.append(expected, draw.size - expected.sum()))
    assert result.pvalue > 1e-4


def test_discrete_gaussian_repeats_and_differs_by_label() -> None:
    source = NoiseSource(SECRET)
    a = source.discrete_gaussian(1, "d", "w", (1000,), 3.0)
    assert a.dtype == torch.int64
    assert torch.equal(a, source.discrete_gaussian(1, "d", "w", (1000,), 3.0))
    assert not torch.equal(a, source.discrete_gaussian(2, "d", "w", (1000,), 3.0))


def test_secret_is_never_shown() -> None:
    source = NoiseSource(SECRET)
    assert SECRET.hex() not in repr(source) and SECRET.hex() not in str(source)
    with pytest.raises(PrivacyError):
        NoiseSource(b"short")
    with pytest.raises(PrivacyError, match="not hex"):
        NoiseSource.from_state_dict({"secret": "zz"})
