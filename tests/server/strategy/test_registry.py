"""build_strategy: config names with parameters, user strategies by dotted path, and clear ConfigErrors."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from fedlink.server.errors import ConfigError
from fedlink.server.strategy import (
    STRATEGIES,
    FedAdagrad,
    FedAdam,
    FedAvg,
    FedAvgM,
    FedBuff,
    FedNova,
    Scaffold,
    FedProx,
    FedYogi,
    Krum,
    Median,
    MultiKrum,
    TrimmedMean,
    build_strategy,
)


def test_every_strategy_is_registered_under_its_name() -> None:
    expected = {
        "fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM, "fedadagrad": FedAdagrad, "fedadam": FedAdam,
        "fedyogi": FedYogi, "scaffold": Scaffold, "fednova": FedNova, "fedbuff": FedBuff, "median": Median, "trimmed_mean": TrimmedMean, "krum": Krum, "multi_krum": MultiKrum,
    }  # fmt: skip
    assert STRATEGIES == expected
    assert all(cls.name == name for name, cls in STRATEGIES.items())


@pytest.mark.parametrize(
    ("name", "params", "attributes"),
    [
        ("fedavg", {}, {"server_lr": 1.0, "server_momentum": 0.0}),
        ("fedprox", {"mu": 0.01}, {"mu": 0.01}),
        ("fedavgm", {"momentum": 0.5}, {"momentum": 0.5, "server_lr": 1.0}),
        ("fedadagrad", {"eta": 0.1}, {"eta": 0.1, "beta1": 0.0, "tau": 1e-3}),
        ("fedadam", {"beta2": 0.999, "tau": "1e-9"}, {"eta": 0.03, "beta1": 0.9, "beta2": 0.999, "tau": 1e-9}),
        ("fedyogi", {}, {"eta": 0.03, "beta2": 0.99}),
        ("median", {"server_lr": 0.1}, {}),
        ("trimmed_mean", {"beta": 0.25}, {"beta": 0.25}),
        ("krum", {"num_byzantine": 2}, {"num_byzantine": 2, "num_selected": 1, "min_updates": 7}),
        ("multi_krum", {"num_byzantine": 1, "num_selected": 3}, {"num_selected": 3, "min_updates": 5}),
    ],
)
def test_build_by_name_with_parameters(name: str, params: dict[str, object], attributes: dict[str, object]) -> None:
    strategy = build_strategy(name, params)
    assert type(strategy) is STRATEGIES[name]
    for attribute, value in attributes.items():
        assert getattr(strategy, attribute) == value


MY_STRATEGY = '''
    from fedlink.server.strategy.base import Strategy
    from fedlink.server.strategy.updates import MeanAggregation


    class Halfway(Strategy):
        """Moves the model halfway towards the workers' mean."""

        name = "halfway"

        def __init__(self, *, fraction=0.5):
            self.fraction = fraction

        def begin_round(self, server_round, global_state):
            return MeanAggregation(global_state, self.finish)

        def finish(self, kind, global_state, mean):
            return {k: v + (mean[k] - v) * self.fraction for k, v in global_state.items()}


    class NotAStrategy:
        pass
'''


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    name = "fedlink_test_user_strategy"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(MY_STRATEGY))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    return name


def test_user_strategy_by_dotted_path(user_module: str, fold) -> None:
    import torch

    strategy = build_strategy(f"{user_module}:Halfway", {"fraction": 0.25})
    assert type(strategy).__name__ == "Halfway" and strategy.fraction == 0.25  # type: ignore[attr-defined]
    out = fold(strategy, {"w": torch.tensor([0.0])}, [(1, {"w": torch.tensor([4.0])})])
    assert out["w"].tolist() == [1.0]


def test_user_strategy_with_a_bad_parameter(user_module: str) -> None:
    message = rf"strategy '{user_module}:Halfway' with parameters {{'speed': 2}}: .*speed.*accepts fraction=0.5"
    with pytest.raises(ConfigError, match=message):
        build_strategy(f"{user_module}:Halfway", {"speed": 2})


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("{module}:NotAStrategy", "is not a subclass of fedlink.server.strategy.Strategy"),
        ("{module}:Missing", "cannot import"),
        ("no_such_module_xyz:Strategy", "cannot import 'no_such_module_xyz:Strategy'"),
        ("fedlink.server.strategy.serveropt:ServerOptimizer", "is abstract"),
        (":Strategy", "cannot import"),
    ],
)
def test_bad_dotted_paths(user_module: str, path: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_strategy(path.format(module=user_module), {})


def test_unknown_name_lists_the_known_ones() -> None:
    message = r"strategy.name = 'fedsgd': unknown strategy; expected one of fedadagrad, .*trimmed_mean"
    with pytest.raises(ConfigError, match=message):
        build_strategy("fedsgd", {})


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedprox", {}, r"strategy 'fedprox' with parameters \{\}: .*missing .*'mu'.*accepts mu \(required\)"),
        ("fedadam", {"eta_l": 0.1}, r"'fedadam' .*unexpected keyword argument 'eta_l'.*accepts eta=0.03, beta1=0.9"),
        ("fedyogi", {"beta2": 1.0}, r"strategy 'fedyogi' .*beta2 must be in \[0, 1\), got 1.0"),
        ("trimmed_mean", {"beta": 0.5}, r"strategy 'trimmed_mean' .*beta must be in \[0, 0.5\), got 0.5"),
        ("krum", {"num_byzantine": "two"}, r"strategy 'krum' .*num_byzantine must be an integer, got 'two'"),
        ("fedavg", {"server_lr": -1}, r"strategy 'fedavg' .*server_lr must be in \(0, inf\), got -1"),
    ],
)
def test_bad_parameters_name_the_strategy(name: str, params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_strategy(name, params)
