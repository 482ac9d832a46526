"""Fanning a run's events out: order, isolation of a failing observer, callbacks, what the config turns on."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest

from fedlink.server.config import parse_config
from fedlink.server.errors import ConfigError
from fedlink.server.observers import CallbackProgress, ProgressEvent, ProgressGroup, run_observers
from fedlink.server.progress import Progress
from fedlink.server.prometheus import CoordinatorMetrics

from ..metrics_text import scrape


class _Recorder(Progress):
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def __enter__(self) -> "_Recorder":
        self.log.append(f"{self.name} enter")
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.append(f"{self.name} exit")

    def round_finished(self, record: dict[str, Any]) -> None:
        self.log.append(f"{self.name} round {record['round']}")


class _Broken(Progress):
    def round_finished(self, record: dict[str, Any]) -> None:
        raise OSError("disk full")


def test_group_passes_events_in_order_and_survives_a_failing_observer(caplog: pytest.LogCaptureFixture) -> None:
    log: list[str] = []
    with caplog.at_level(logging.ERROR, logger="fedlink.server"):
        with ProgressGroup([_Recorder(log, "a"), _Broken(), _Recorder(log, "b")]) as group:
            group.round_finished({"round": 1})
            group.round_finished({"round": 2})
            group.worker_connected("w")  # a method none of them overrides
    assert log == ["a enter", "b enter", "a round 1", "b round 1", "a round 2", "b round 2", "b exit", "a exit"]
    assert sum("_Broken failed on round_finished" in r.getMessage() for r in caplog.records) == 1, "logged once"


def test_callback_sees_every_event_kind() -> None:
    events: list[ProgressEvent] = []
    progress = CallbackProgress(events.append)
    progress.run_started("job", 2, ["ws://a"])
    progress.worker_status(1, "a", "training")
    progress.stage_finished(1, "train", 0.5, [])
    progress.worker_connected("a")
    progress.worker_disconnected("a", "lost")
    progress.policy_refused("a", "busy")
    progress.connection_refused("peer", "bad proof", auth=True)
    progress.round_finished({"round": 1, "accuracy": 0.5})
    assert [e.kind for e in events] == [
        "run_started", "worker_status", "stage_finished", "worker_connected", "worker_disconnected",
        "policy_refused", "connection_refused", "round_finished",
    ]
    assert events[-1].round == 1 and events[-1].data["accuracy"] == 0.5
    assert events[1].round == 1 and events[0].round is None


def _config(tmp_path: Path, **extra: Any) -> Any:
    return parse_config({"name": "job", "model": {"factory": "fedlink.models:mlp"}, "workers": ["ws://127.0.0.1:1"],
                         "rounds": 2, "output": str(tmp_path / "out"), **extra})


def test_config_turns_on_the_exporter_and_announces_it(tmp_path: Path) -> None:
    lines: list[str] = []
    display = Progress()
    group = run_observers(_config(tmp_path, metrics={"port": 0}), display, announce=lines.append)
    with group:
        exporter = group.find(CoordinatorMetrics)
        assert isinstance(exporter, CoordinatorMetrics) and exporter.url is not None
        assert lines == [f"metrics: {exporter.url}"]
        assert group.observers[-1] is display, "exporters first, so a display sees events already counted"
        group.round_finished({"round": 1, "workers": 1, "selected": 1, "samples": 5, "seconds": 0.1})
        assert scrape(exporter.url)[("fedlink_rounds_completed_total", ())] == 1
    assert exporter.url is None, "leaving the group stops the server"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["metrics"]["port"] == 0


def test_no_extras_by_default(tmp_path: Path) -> None:
    group = run_observers(_config(tmp_path), Progress())
    assert len(group.observers) == 1


def test_a_taken_port_is_a_config_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"metrics: cannot serve on 127.0.0.1:{port}"):
            run_observers(_config(tmp_path, metrics={"port": port}), Progress())


def test_output_accepts_a_path_or_a_mapping(tmp_path: Path) -> None:
    plain = _config(tmp_path)
    assert plain.output == tmp_path / "out" and not plain.output_options.tensorboard
    mapped = parse_config({"name": "job", "model": {"factory": "fedlink.models:mlp"}, "workers": ["ws://h:1"],
                           "rounds": 1, "output": {"dir": "runs/x", "tensorboard": True}}, base=tmp_path)
    assert mapped.output == tmp_path / "runs/x" and mapped.output_options.tensorboard
    with pytest.raises(ConfigError, match="output.tensorboard = 'maybe'"):
        parse_config({"name": "job", "model": {"factory": "fedlink.models:mlp"}, "workers": ["ws://h:1"],
                      "rounds": 1, "output": {"dir": "x", "tensorboard": "maybe"}})
    with pytest.raises(ConfigError, match="unknown key.*tensorbord"):
        parse_config({"name": "job", "model": {"factory": "fedlink.models:mlp"}, "workers": ["ws://h:1"],
                      "rounds": 1, "output": {"dir": "x", "tensorbord": True}})
