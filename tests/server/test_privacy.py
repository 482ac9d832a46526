"""Central differential privacy through the coordinator's real round path, over in-memory workers.

The noise test checks the released aggregate statistically (its spread is ``z * clip_norm / n``); the budget test
checks that ``privacy.max_epsilon`` ends the run cleanly before the round that would pass it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from scipy.stats import chi2

from fedlink.privacy import compute_epsilon
from fedlink.protocol.messages import Hello
from fedlink.server.config import parse_config
from fedlink.server.coordinator import Coordinator, initial_state
from fedlink.server.errors import ConfigError
from fedlink.server.privacy import SECRET_FILE

from .inmemory_jobs import run_in_memory

HELLO = Hello(role="coordinator", peer_id="test")
# 64 -> 64 -> 10: 4,810 parameters, each an independent draw of the released noise.
MLP = {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 64, "num_classes": 10}}


def _variance_ratio_bounds(count: int) -> tuple[float, float]:
    """Bounds on (sample variance / true variance) over ``count`` draws that a correct release leaves only once in
    a million runs per side: the noise comes from a fresh secret each run, so a 1% band failed CI by chance. At
    4,810 draws the band is about +-10%, still far inside the factor-of-sqrt(n) or n mistakes it exists to catch."""
    return chi2.ppf(1e-6, count) / count, chi2.isf(1e-6, count) / count


async def _run(shards: list[Path], out: Path, config: dict[str, Any]) -> Coordinator:
    return await run_in_memory(shards, {"name": "privacy", "seed": 5, "model": MLP, "rounds": 1, "output": str(out), **config})


def _records(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


async def test_released_noise_has_std_z_clip_over_n(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    """Workers barely move (lr 1e-9), so the released change of each parameter is the noise: N(0, (zC/n)^2)."""
    z, clip, n = 1.3, 0.5, 3
    config = {
        "training": {"update": "delta", "optimizer": {"lr": 1e-9}},
        "privacy": {"mode": "central", "clip_norm": clip, "noise_multiplier": z},
    }
    coordinator = await _run(digit_shards[0], tmp_path / "run", config)
    before, _ = initial_state(coordinator.config)
    diffs = torch.cat([
        (coordinator.state[k].double() - before[k].double()).flatten() for k in before if before[k].is_floating_point()
    ])
    count = diffs.numel()
    assert count == 4810
    variance = float((diffs**2).mean())  # the mean is known (zero): count degrees of freedom
    expected = (z * clip / n) ** 2
    low, high = _variance_ratio_bounds(count)
    assert low < variance / expected < high, (variance, expected)
    record = _records(tmp_path / "run")[0]
    assert record["epsilon"] == pytest.approx(compute_epsilon([(z, 1.0, 1)], 1e-5), rel=1e-9)
    assert record["delta"] == 1e-5 and record["dp_updates"] == 3 and record["dp_clip_norm"] == clip


async def test_noise_secret_stays_out_of_outputs(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    config = {"training": {"update": "delta"}, "privacy": {"mode": "central", "noise_multiplier": 1.0}}
    coordinator = await _run(digit_shards[0], tmp_path / "run", config)
    assert coordinator.privacy is not None and coordinator.privacy.noise is not None
    secret = coordinator.privacy.noise.state_dict()["secret"]
    out = tmp_path / "run"
    saved = json.loads((out / "checkpoint" / SECRET_FILE).read_text())
    assert saved["secret"] == secret and ((out / "checkpoint" / SECRET_FILE).stat().st_mode & 0o777) == 0o600
    for path in (out / "metrics.jsonl", out / "workers.jsonl", out / "model.safetensors"):
        assert secret.encode() not in path.read_bytes() and bytes.fromhex(secret) not in path.read_bytes()


async def test_max_epsilon_stops_before_the_round_that_would_pass_it(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    z = 2.0
    after = [compute_epsilon([(z, 1.0, r)], 1e-5) for r in (1, 2, 3)]
    budget = (after[1] + after[2]) / 2  # rounds 1 and 2 fit, round 3 would not
    config = {
        "rounds": 5, "training": {"update": "delta", "optimizer": {"lr": 0.1}},
        "privacy": {"mode": "central", "noise_multiplier": z, "max_epsilon": budget},
    }
    coordinator = await _run(digit_shards[0], tmp_path / "run", config)
    records = _records(tmp_path / "run")
    assert [r["round"] for r in records] == [1, 2]
    assert [r["epsilon"] for r in records] == pytest.approx(after[:2], rel=1e-9)
    assert coordinator.stopped is not None
    assert "round 3 would raise epsilon" in coordinator.stopped and f"{after[2]:.4g}" in coordinator.stopped
    assert (tmp_path / "run" / "model.safetensors").exists(), "a budget stop ends cleanly with the model saved"


async def test_poisson_cohorts_are_drawn_per_round(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    config = {
        "rounds": 6, "sampling": {"mode": "poisson", "rate": 0.5}, "timeouts": {"round_retries": 20},
        "training": {"update": "delta"}, "privacy": {"mode": "central", "noise_multiplier": 1.0},
    }
    await _run(digit_shards[0], tmp_path / "run", config)
    records = _records(tmp_path / "run")
    assert len(records) == 6
    # The ledger accounts q = 0.5 each round; the denominator is the expected cohort q * N = 1.5.
    assert [r["epsilon"] for r in records] == pytest.approx(
        [compute_epsilon([(1.0, 0.5, r)], 1e-5) for r in range(1, 7)], rel=1e-9
    )
    assert all(1 <= r["selected"] <= 3 for r in records)
    assert len({r["selected"] for r in records}) > 1 or any(r["selected"] < 3 for r in records)


def test_central_dp_refuses_strategies_without_a_mean(tmp_path: Path) -> None:
    config = parse_config({
        "name": "x", "model": MLP, "rounds": 1, "workers": ["ws://a:1", "ws://b:1", "ws://c:1", "ws://d:1"],
        "output": str(tmp_path), "strategy": {"name": "median"}, "training": {"update": "delta"},
        "privacy": {"mode": "central"},
    })
    with pytest.raises(ConfigError, match="median"):
        Coordinator(config)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"training": {"update": "gradients"}, "privacy": {"mode": "central"}}, "training.update delta or weights"),
        ({"privacy": {"mode": "distributed"}}, "set secure_aggregation"),
        ({"training": {"grad_clip": 1.0}, "privacy": {"mode": "local"}}, "remove training.grad_clip"),
        ({"sampling": {"mode": "poisson"}}, "needs sampling.rate"),
        ({"sampling": {"rate": 0.2}}, "add mode: poisson"),
    ],
)
def test_config_refuses_inconsistent_privacy(tmp_path: Path, extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config({"name": "x", "model": MLP, "rounds": 1, "workers": ["ws://a:1"], "output": str(tmp_path), **extra})


def test_privacy_changes_the_fingerprint_only_when_set(tmp_path: Path) -> None:
    base = {"name": "x", "model": MLP, "rounds": 1, "workers": ["ws://a:1"], "output": str(tmp_path)}
    plain = parse_config(base).fingerprint()
    assert parse_config({**base, "sampling": {"mode": "fixed"}}).fingerprint() == plain
    dp = parse_config({**base, "privacy": {"mode": "central", "max_epsilon": 3}})
    assert dp.fingerprint() != plain
    assert parse_config({**base, "privacy": {"mode": "central", "max_epsilon": 9}}).fingerprint() == dp.fingerprint()
    assert not math.isnan(dp.privacy.delta if dp.privacy else math.nan)


async def test_distributed_dp_noise_in_the_secure_sum_has_the_target_std(
    digit_shards: tuple[list[Path], Path], tmp_path: Path
) -> None:
    """Each of 3 workers adds discrete Gaussian noise sized for min_survivors = 2 under secure aggregation; the
    released change of each parameter is then N(0, (3/2) (z C / 3)^2): all 3 survive, the denominator is 3."""
    z, clip, n, least = 1.3, 0.5, 3, 2
    config = {
        "training": {"update": "delta", "optimizer": {"lr": 1e-9}},
        "secure_aggregation": {"clip_norm": clip, "min_survivors": least},
        "privacy": {"mode": "distributed", "clip_norm": clip, "noise_multiplier": z},
    }
    coordinator = await _run(digit_shards[0], tmp_path / "run", config)
    before, _ = initial_state(coordinator.config)
    diffs = torch.cat([
        (coordinator.state[k].double() - before[k].double()).flatten() for k in before if before[k].is_floating_point()
    ])
    count = diffs.numel()
    variance = float((diffs**2).mean())
    expected = n / least * (z * clip / n) ** 2
    low, high = _variance_ratio_bounds(count)
    assert low < variance / expected < high, (variance, expected)
    record = _records(tmp_path / "run")[0]
    assert record["epsilon"] == pytest.approx(compute_epsilon([(z, 1.0, 1)], 1e-5), rel=1e-9)
    assert record["secure_contributors"] == 3


def test_the_live_table_shows_epsilon_only_for_private_runs() -> None:
    import io

    from rich.console import Console

    from fedlink.server.progress import LiveProgress

    def shown(record: dict[str, Any]) -> str:
        out = io.StringIO()
        with LiveProgress(Console(file=out, force_terminal=True, width=200)) as progress:
            progress.run_started("job", 2, ["w1"])
            progress.round_finished(record)
        return out.getvalue()

    plain = {"round": 1, "workers": 1, "accuracy": 0.5, "loss": 1.0, "seconds": 1.0}
    assert "epsilon" not in shown(plain)
    private = shown({**plain, "epsilon": 2.4567, "delta": 1e-5})
    assert "epsilon" in private and "2.457" in private
