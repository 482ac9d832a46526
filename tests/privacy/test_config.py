from __future__ import annotations

import pytest
from pydantic import ValidationError

from fedlink.privacy import PrivacyConfig


def test_defaults_are_central_rdp_with_unit_multiplier() -> None:
    config = PrivacyConfig()
    assert (config.mode, config.accountant, config.delta) == ("central", "rdp", 1e-5)
    assert config.fixed_noise_multiplier == 1.0


def test_target_epsilon_leaves_multiplier_to_solve() -> None:
    config = PrivacyConfig.model_validate({"target_epsilon": 8, "max_epsilon": 10})
    assert config.fixed_noise_multiplier is None


@pytest.mark.parametrize(
    ("data", "names"),
    [
        ({"noise_multiplier": 1.0, "target_epsilon": 8}, ["privacy.noise_multiplier", "privacy.target_epsilon"]),
        ({"target_epsilon": 8, "max_epsilon": 4}, ["privacy.target_epsilon", "privacy.max_epsilon"]),
        ({"mode": "local", "adaptive_clipping": {}}, ["privacy.adaptive_clipping"]),
    ],
)
def test_inconsistent_settings_name_their_keys(data: dict[str, object], names: list[str]) -> None:
    with pytest.raises(ValidationError) as caught:
        PrivacyConfig.model_validate(data)
    for name in names:
        assert name in str(caught.value)


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"mode": "federated"}, "mode"),
        ({"clip_norm": 0}, "clip_norm"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
        ({"adaptive_clipping": {"target_quantile": 1.5}}, "target_quantile"),
        ({"noise": 1.0}, "noise"),
    ],
)
def test_bad_values_are_refused_at_their_key(data: dict[str, object], key: str) -> None:
    with pytest.raises(ValidationError) as caught:
        PrivacyConfig.model_validate(data)
    assert key in {str(part) for error in caught.value.errors() for part in error["loc"]}
