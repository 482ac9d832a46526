"""The coordinator's exporter: events become the documented series, labels stay bounded and secret-free."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from fedlink.server.prometheus import DROP_REASONS, CoordinatorMetrics, drop_category, refusal_category

from ..metrics_text import read_registry, scrape


def _record(r: int, **extra: object) -> dict[str, object]:
    return {"round": r, "rounds": 5, "accuracy": 0.8, "loss": 0.5, "workers": 2, "selected": 3, "samples": 100,
            "train_loss": 0.7, "seconds": 1.5, "round_seconds": 1.2, "wall_seconds": 1.4, "dropped": {}, **extra}


def value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.mark.parametrize(("reason", "category"), [
    ("missed the round deadline (timeouts.round)", "deadline"),
    ("timeout from ws://x: no reply in 30s", "deadline"),
    ("busy from ws://127.0.0.1:8777: worker 'a' is busy with another job", "refused"),
    ("model_not_allowed from ws://h:1: factory x:y is not allowed", "refused"),
    ("session with ws://h:1 closed: peer said goodbye", "disconnected"),
    ("NaN or infinite values in fc.weight", "invalid_update"),
    ("reports 900 samples but its shard holds 100", "invalid_update"),
    ("state_mismatch: fc.weight has shape [3] where [4] was expected", "invalid_update"),
    ("something nobody foresaw", "error"),
])
def test_drop_reasons_fall_into_few_categories(reason: str, category: str) -> None:
    assert drop_category(reason) == category
    assert category in DROP_REASONS


def test_refusal_categories() -> None:
    assert refusal_category("model_not_allowed: x:y") == "model_not_allowed"
    assert refusal_category("the site policy forbids gradients") == "policy"
    assert refusal_category("???") == "other"


def test_a_run_as_series() -> None:
    metrics = CoordinatorMetrics(process=False)
    before = read_registry(metrics.registry)
    assert math.isnan(value(before, "fedlink_accuracy")), "no evaluation yet is not an accuracy of 0"
    assert value(before, "fedlink_workers_dropped_total", reason="deadline") == 0, "categories exist from the start"

    metrics.run_started("job", 5, ["ws://a", "ws://b", "ws://c"])
    for worker in ("a", "b", "c"):
        metrics.worker_connected(worker)
    metrics.worker_status(1, "a", "done", "loss 0.5")
    metrics.worker_status(1, "b", "done", "loss 0.6")
    metrics.worker_status(1, "c", "dropped", "missed the round deadline (timeouts.round)")
    metrics.stage_finished(1, "train", 1.1, [])
    metrics.stage_finished(1, "aggregate", 0.02, [])
    metrics.round_finished(_record(1, epsilon=0.7))
    metrics.worker_disconnected("c", "session with ws://c closed: lost")
    metrics.worker_connected("c")
    metrics.policy_refused("b", "model_not_allowed: evil:model")
    metrics.connection_refused("127.0.0.1:5555", "wrong token proof", auth=True)
    metrics.connection_refused("127.0.0.1:5556", "hello timed out")
    metrics.round_finished(_record(2, accuracy=0.9, epsilon=1.1, aggregation_seconds=0.05))

    s = read_registry(metrics.registry)
    assert value(s, "fedlink_rounds_completed_total") == 2
    assert value(s, "fedlink_round") == 2 and value(s, "fedlink_rounds_planned") == 5
    assert value(s, "fedlink_round_seconds_count") == 2 and value(s, "fedlink_round_seconds_sum") == pytest.approx(2.4)
    assert value(s, "fedlink_stage_seconds_count", stage="train") == 1
    assert value(s, "fedlink_aggregation_seconds_count") == 2  # the aggregate stage, and a record's own figure
    assert value(s, "fedlink_workers_connected") == 3
    assert value(s, "fedlink_worker_reconnects_total") == 1
    assert value(s, "fedlink_worker_disconnects_total", reason="closed") == 1
    assert value(s, "fedlink_workers_selected") == 3 and value(s, "fedlink_workers_contributed") == 2
    assert value(s, "fedlink_worker_contributions_total") == 4 and value(s, "fedlink_worker_selections_total") == 6
    assert value(s, "fedlink_workers_dropped_total", reason="deadline") == 1
    assert value(s, "fedlink_policy_refusals_total", reason="model_not_allowed") == 1
    assert value(s, "fedlink_auth_failures_total") == 1 and value(s, "fedlink_handshake_failures_total") == 2
    assert value(s, "fedlink_privacy_epsilon") == 1.1 and value(s, "fedlink_accuracy") == 0.9
    assert value(s, "fedlink_peer_contributions_total", worker="a") == 1
    assert value(s, "fedlink_peer_drops_total", worker="c") == 1 and value(s, "fedlink_peer_up", worker="c") == 1
    assert value(s, "fedlink_run_info", run="job") == 1
    labels = {pair for _, pairs in s for pair in pairs}
    assert not any("deadline (timeouts" in v or "evil" in v or "lost" in v for _, v in labels), "free text in a label"


def test_per_worker_series_are_capped_and_optional() -> None:
    capped = CoordinatorMetrics(max_labelled_workers=2, process=False)
    for worker in ("w1", "w2", "w3", "w4"):
        capped.worker_status(1, worker, "dropped", "missed the round deadline (timeouts.round)")
    s = read_registry(capped.registry)
    assert {dict(pairs)["worker"] for name, pairs in s if name == "fedlink_peer_drops_total"} == {"w1", "w2"}
    assert value(s, "fedlink_workers_dropped_total", reason="deadline") == 4, "the totals still count everyone"

    off = CoordinatorMetrics(per_worker=False, process=False)
    off.worker_connected("w1")
    off.worker_status(1, "w1", "done")
    assert not any(name.startswith("fedlink_peer_") for name, _ in read_registry(off.registry))


@dataclass
class _Counters:
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: int = 0
    malformed: int = 0


@dataclass
class _Session:
    counters: _Counters = field(default_factory=_Counters)
    closed: bool = False


def test_bytes_come_from_the_sessions_and_never_go_down() -> None:
    metrics = CoordinatorMetrics(process=False)
    first = _Session(_Counters(bytes_in=1000, bytes_out=50, frames_in=3))
    current = [first]
    metrics.watch_sessions(lambda: list(current))
    assert value(read_registry(metrics.registry), "fedlink_bytes_received_total") == 1000
    first.counters.bytes_in, first.closed = 1500, True  # the worker's link drops; it reconnects
    second = _Session(_Counters(bytes_in=10, malformed=2))
    current[:] = [second]
    s = read_registry(metrics.registry)
    assert value(s, "fedlink_bytes_received_total") == 1510, "the closed session's final count is kept"
    assert value(s, "fedlink_malformed_frames_total") == 2 and value(s, "fedlink_bytes_sent_total") == 50
    assert value(read_registry(metrics.registry), "fedlink_bytes_received_total") == 1510, "counted once"


def test_served_over_http_and_stopped() -> None:
    metrics = CoordinatorMetrics()
    with metrics:
        url = metrics.serve(host="127.0.0.1", port=0)
        metrics.round_finished(_record(1))
        samples = scrape(url)
        assert value(samples, "fedlink_rounds_completed_total") == 1
        assert value(samples, "process_resident_memory_bytes") > 10e6
    assert metrics.url is None
    with pytest.raises(OSError):
        scrape(url, timeout=2)
