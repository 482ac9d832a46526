from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

import pytest
import torch
from scipy import stats

from fedlink.privacy import AdaptiveClippingConfig, PrivacyError
from fedlink.privacy.central import CentralDP, clip_update, effective_noise_multiplier
from fedlink.privacy.noise import NoiseSource

SECRET = b"\x07" * 32


@dataclass(frozen=True)
class Update:
    state: dict[str, torch.Tensor]
    kind: str = "delta"
    metrics: dict[str, float] = field(default_factory=dict)


def tiny_global() -> dict[str, torch.Tensor]:
    return {"fc.weight": torch.zeros(4, 3), "fc.bias": torch.zeros(3), "bn.num_batches_tracked": torch.tensor(7)}


def delta_with_norm(norm: float, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(4, 3, generator=g), torch.randn(3, generator=g)
    scale = norm / math.sqrt(float((w**2).sum() + (b**2).sum()))
    return {"fc.weight": w * scale, "fc.bias": b * scale, "bn.num_batches_tracked": torch.tensor(99)}


def test_clip_scales_all_float_tensors_jointly() -> None:
    clipped, norm = clip_update({"a": torch.tensor([3.0, 0.0]), "b": torch.tensor([4.0]), "n": torch.tensor(5)}, 1.0)
    assert norm == 5.0
    assert torch.allclose(clipped["a"], torch.tensor([0.6, 0.0])) and torch.allclose(clipped["b"], torch.tensor([0.8]))
    assert "n" not in clipped
    small, _ = clip_update({"a": torch.tensor([0.3, 0.4])}, 1.0)
    assert torch.equal(small["a"], torch.tensor([0.3, 0.4]))


def test_effective_noise_multiplier_follows_andrew_et_al() -> None:
    assert effective_noise_multiplier(1.0, 1.0) == pytest.approx((1 - 0.25) ** -0.5)
    with pytest.raises(PrivacyError, match="count_noise 0.4 is too small"):
        effective_noise_multiplier(1.0, 0.4)


@pytest.mark.parametrize("adaptive", [False, True])
def test_released_noise_std_is_z_clip_over_fixed_denominator(adaptive: bool) -> None:
    """Four updates (all clipped) out of an expected five: the noise on the mean is z * C / 5, not / 4."""
    z, clip, cohort, rounds = 1.3, 0.5, 5.0, 400
    config = AdaptiveClippingConfig(count_noise=2.0, learning_rate=1e-9) if adaptive else None
    dp = CentralDP(clip_norm=clip, noise_multiplier=z, expected_cohort=cohort, adaptive=config, noise=NoiseSource(SECRET))
    updates = [Update(delta_with_norm(10.0 + i, seed=i)) for i in range(4)]
    true_mean = {n: sum(clip_update(u.state, clip)[0][n] for u in updates) / cohort for n in ("fc.weight", "fc.bias")}
    residuals = []
    for server_round in range(1, rounds + 1):
        aggregation = dp.begin_round(server_round, tiny_global())
        for update in updates:
            aggregation.add(update)
        released = aggregation.finish_delta()
        residuals += [(released[n].double() - true_mean[n].double()).flatten() for n in true_mean]
    noise = torch.cat(residuals)
    k = noise.numel()
    ss = float((noise**2).sum())
    low, high = math.sqrt(ss / stats.chi2.ppf(0.995, k)), math.sqrt(ss / stats.chi2.ppf(0.005, k))
    expected_z = effective_noise_multiplier(z, 2.0) if adaptive else z
    assert low <= expected_z * clip / cohort <= high
    assert abs(float(noise.mean())) < 4 * high / math.sqrt(k)


def test_finish_adds_the_release_to_the_global_model_and_keeps_integer_buffers() -> None:
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_cohort=2, noise=NoiseSource(SECRET))
    global_state = {"fc.weight": torch.ones(4, 3), "fc.bias": torch.ones(3), "bn.num_batches_tracked": torch.tensor(7)}
    aggregation = dp.begin_round(1, global_state)
    weights = {n: t + delta_with_norm(3.0, 0)[n] if t.is_floating_point() else torch.tensor(99)
               for n, t in global_state.items()}
    aggregation.add(Update(weights, kind="weights"))  # trained weights become a delta against the global model
    aggregation.add(Update(delta_with_norm(0.1, 1)))
    new = aggregation.finish()
    assert new["bn.num_batches_tracked"].item() == 7
    again = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_cohort=2, noise=NoiseSource(SECRET)).begin_round(1, global_state)
    again.add(Update(delta_with_norm(3.0, 0)))
    again.add(Update(delta_with_norm(0.1, 1)))
    delta = again.finish_delta()
    assert torch.allclose(new["fc.weight"], global_state["fc.weight"] + delta["fc.weight"])
    assert aggregation.release is not None and aggregation.release.updates == 2


def test_gradients_and_empty_rounds_are_refused() -> None:
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_cohort=2, noise=NoiseSource(SECRET))
    aggregation = dp.begin_round(1, tiny_global())
    with pytest.raises(PrivacyError, match="training.update to delta"):
        aggregation.add(Update(delta_with_norm(1.0, 0), kind="gradients"))
    with pytest.raises(PrivacyError, match="no updates"):
        aggregation.finish()


def test_a_round_number_releases_once() -> None:
    dp = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_cohort=2, noise=NoiseSource(SECRET))
    for attempt in range(2):
        aggregation = dp.begin_round(3, tiny_global())
        aggregation.add(Update(delta_with_norm(1.0, attempt)))
        if attempt == 0:
            aggregation.finish()
        else:
            with pytest.raises(PrivacyError, match="round 3 cannot release"):
                aggregation.finish()
    restored = CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_cohort=2, noise=NoiseSource(SECRET))
    restored.load_state_dict(dp.state_dict())
    again = restored.begin_round(2, tiny_global())
    again.add(Update(delta_with_norm(1.0, 0)))
    with pytest.raises(PrivacyError, match="round 2 cannot release"):
        again.finish_delta()


def test_adaptive_clip_tracks_the_target_quantile() -> None:
    norms = [float(i) for i in range(1, 11)]  # median between 5 and 6
    config = AdaptiveClippingConfig(target_quantile=0.5, learning_rate=0.2, count_noise=0.5)
    dp = CentralDP(clip_norm=0.1, noise_multiplier=0.5, expected_cohort=10, adaptive=config, noise=NoiseSource(SECRET))
    updates = [Update(delta_with_norm(n, seed=i)) for i, n in enumerate(norms)]
    clips = []
    for server_round in range(1, 121):
        aggregation = dp.begin_round(server_round, tiny_global())
        for update in updates:
            aggregation.add(update)
        aggregation.finish_delta()
        assert aggregation.release is not None
        clips.append(aggregation.release.next_clip_norm)
    late = clips[-40:]
    assert 3.5 < sum(late) / len(late) < 7.5
    assert dp.clip_norm == clips[-1]


def test_resumed_state_repeats_the_next_round_bit_for_bit() -> None:
    config = AdaptiveClippingConfig(count_noise=1.0)
    secret = NoiseSource.create().state_dict()  # what the coordinator checkpoints for the run

    def make(source: NoiseSource) -> CentralDP:
        return CentralDP(clip_norm=1.0, noise_multiplier=1.0, expected_cohort=3, adaptive=config, noise=source)

    updates = [Update(delta_with_norm(0.5 + i, i)) for i in range(3)]

    def run(dp: CentralDP, server_round: int) -> dict[str, torch.Tensor]:
        aggregation = dp.begin_round(server_round, tiny_global())
        for update in updates:
            aggregation.add(update)
        return aggregation.finish()

    first = make(NoiseSource.from_state_dict(secret))
    run(first, 1)
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved["clip_norm"] != 1.0  # the adaptive clip moved and is part of the state
    expected = run(first, 2)
    resumed = make(NoiseSource.from_state_dict(json.loads(json.dumps(secret))))
    resumed.load_state_dict(saved)
    got = run(resumed, 2)
    assert all(torch.equal(got[n], expected[n]) for n in expected)
    fresh = run(make(NoiseSource.create()), 2)
    assert not torch.equal(fresh["fc.weight"], expected["fc.weight"])  # another run's secret: other noise
