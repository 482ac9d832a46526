"""FedAvg (McMahan et al. 2017): weighted mean for weights and deltas, a server SGD step for gradients."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.strategy import ClientUpdate, FedAvg



def test_weights_are_averaged_by_samples(fold, f64) -> None:
    global_state = {"w": f64(0, 0), "steps": torch.tensor(0), "on": torch.tensor(False)}
    updates = [
        (1, {"w": f64(1, 2), "steps": torch.tensor(2), "on": torch.tensor(True)}),
        (3, {"w": f64(5, 6), "steps": torch.tensor(6), "on": torch.tensor(False)}),
    ]
    out = fold(FedAvg(), global_state, updates)
    # w: (1*1 + 3*5)/4 = 4, (1*2 + 3*6)/4 = 5; steps: (2 + 18)/4 = 5; on: weight 1/4 < 1/2 -> False
    assert torch.equal(out["w"], f64(4, 5))
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 5
    assert out["on"].dtype == torch.bool and not bool(out["on"])


def test_mean_delta_is_added_and_buffers_travel_as_values(fold, f64) -> None:
    global_state = {"w": f64(1, 1), "steps": torch.tensor(5)}
    updates = [(1, {"w": f64(4, 0), "steps": torch.tensor(7)}), (1, {"w": f64(0, -2), "steps": torch.tensor(9)})]
    out = fold(FedAvg(), global_state, updates, kind="delta")
    # mean delta (2, -1) -> (3, 0); steps: mean of the values 7 and 9 -> 8
    assert torch.equal(out["w"], f64(3, 0))
    assert int(out["steps"]) == 8


def test_gradients_take_a_momentum_step_and_keep_buffers(fold, f64) -> None:
    strategy = FedAvg(server_lr=0.5, server_momentum=0.5)
    state = {"w": f64(0, 0), "steps": torch.tensor(3)}
    # round 1: g = (2, -4), v = g, w = (0, 0) - 0.5 * (2, -4) = (-1, 2)
    state = fold(strategy, state, [(1, {"w": f64(2, -4)}), (3, {"w": f64(2, -4)})], kind="gradients")
    assert torch.equal(state["w"], f64(-1, 2)) and int(state["steps"]) == 3
    # round 2: g = (2, 2), v = 0.5 * (2, -4) + (2, 2) = (3, 0), w = (-1, 2) - 0.5 * (3, 0) = (-2.5, 2)
    state = fold(strategy, state, [(2, {"w": f64(2, 2)})], kind="gradients", server_round=2)
    assert torch.equal(state["w"], f64(-2.5, 2))
    assert torch.equal(strategy.state_dict()["velocity"]["w"], f64(3, 0))


def test_plain_fedavg_keeps_no_state(fold, f64) -> None:
    strategy = FedAvg()
    fold(strategy, {"w": f64(0)}, [(1, {"w": f64(1)})], kind="gradients")
    assert strategy.state_dict() == {}


def test_mixed_update_kinds_are_refused(f64) -> None:
    aggregation = FedAvg().begin_round(1, {"w": f64(0)})
    aggregation.add(ClientUpdate(worker="a", kind="weights", num_samples=1, state={"w": f64(1)}))
    with pytest.raises(ValueError, match="mixed update kinds in one round: weights and delta"):
        aggregation.add(ClientUpdate(worker="b", kind="delta", num_samples=1, state={"w": f64(1)}))


def test_an_empty_round_cannot_finish(f64) -> None:
    with pytest.raises(ValueError, match="no updates"):
        FedAvg().begin_round(1, {"w": f64(0)}).finish()


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"server_lr": 0}, r"server_lr must be in \(0, inf\), got 0"),
        ({"server_lr": float("nan")}, "server_lr must be in"),
        ({"server_momentum": 1.0}, r"server_momentum must be in \[0, 1\), got 1.0"),
    ],
)
def test_bad_parameters(params: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        FedAvg(**params)


def test_load_state_dict_refuses_unknown_keys(f64) -> None:
    with pytest.raises(ValueError, match=r"unexpected state keys \['moments'\]"):
        FedAvg().load_state_dict({"moments": {"w": f64(1)}})
