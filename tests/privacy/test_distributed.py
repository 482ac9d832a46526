from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from fedlink.privacy import PrivacyError
from fedlink.privacy.distributed import add_discrete_noise, discrete_noise_vector, noise_headroom, worker_noise_sigma
from fedlink.privacy.noise import NoiseSource


def test_worker_sigma_splits_the_target_over_min_survivors() -> None:
    assert worker_noise_sigma(noise_multiplier=1.0, clip_norm=2.0, scale=50.0, min_survivors=4) == 50.0
    with pytest.raises(PrivacyError, match="raise the quantisation scale"):
        worker_noise_sigma(noise_multiplier=1.0, clip_norm=1.0, scale=2.0, min_survivors=16)


def test_sum_over_survivors_carries_the_target_noise_when_one_worker_drops() -> None:
    """Ten workers sized for nine survivors; one drops after masking; the nine noises sum to std z * C * scale."""
    z, clip, scale, shape = 1.2, 0.5, 20.0, (40, 50)
    sigma = worker_noise_sigma(noise_multiplier=z, clip_norm=clip, scale=scale, min_survivors=9)
    update = {"fc.weight": torch.zeros(shape, dtype=torch.int64)}
    workers = [NoiseSource(bytes([i]) * 32) for i in range(10)]
    noised = [add_discrete_noise(update, noise=w, server_round=3, sigma=sigma)["fc.weight"] for w in workers]
    total = sum(noised[:9], torch.zeros(shape, dtype=torch.int64)).double().flatten()  # worker 10 dropped
    k, ss = total.numel(), float((total**2).sum())
    low, high = math.sqrt(ss / stats.chi2.ppf(0.995, k)), math.sqrt(ss / stats.chi2.ppf(0.005, k))
    assert low <= z * clip * scale <= high
    assert all(t.dtype == torch.int64 for t in noised)
    assert not torch.equal(noised[0], noised[1])  # each worker's own secret


def test_keeps_integer_dtype_and_refuses_floats() -> None:
    source = NoiseSource(b"\x01" * 32)
    out = add_discrete_noise({"w": torch.zeros(5, dtype=torch.int32)}, noise=source, server_round=1, sigma=3.0)
    assert out["w"].dtype == torch.int32
    with pytest.raises(PrivacyError, match="'w' is torch.float32"):
        add_discrete_noise({"w": torch.zeros(5)}, noise=source, server_round=1, sigma=3.0)


def test_flat_vector_noise_fits_the_headroom_and_repeats() -> None:
    source = NoiseSource(b"\x02" * 32)
    vector = discrete_noise_vector(source, server_round=1, length=50_000, sigma=40.0)
    assert vector.dtype.kind == "i" and vector.shape == (50_000,)
    assert (discrete_noise_vector(source, server_round=1, length=50_000, sigma=40.0) == vector).all()
    assert abs(vector).max() <= noise_headroom(sigma=40.0, contributors=1)
    assert noise_headroom(sigma=40.0, contributors=16, tail_sigmas=12) == 12 * 40 * 4
