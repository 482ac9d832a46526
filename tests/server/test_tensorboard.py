"""TensorBoard events, read back with tensorboard's own EventAccumulator: converted runs and the live writer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedlink.server.cli import main as coordinator_cli
from fedlink.server.config import parse_config
from fedlink.server.observers import run_observers
from fedlink.server.progress import Progress
from fedlink.server.tensorboard import convert_run, record_scalars

from .runfolders import write_run


def _read(folder: Path) -> EventAccumulator:
    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    return events


def test_converted_run_has_one_accuracy_per_round(tmp_path: Path) -> None:
    run = write_run(tmp_path / "run-a", rounds=6)
    assert convert_run(run, tmp_path / "tb") == 6
    events = _read(tmp_path / "tb")
    expected = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    accuracy = events.Scalars("accuracy")
    assert [e.step for e in accuracy] == [1, 2, 3, 4, 5, 6]
    assert [e.value for e in accuracy] == pytest.approx([r["accuracy"] for r in expected])
    tags = set(events.Tags()["scalars"])
    assert {"loss", "train_loss", "epsilon", "time/round_seconds", "workers/contributed", "workers/dropped"} <= tags
    assert [e.value for e in events.Scalars("workers/dropped")] == [0, 0, 1, 0, 0, 0]
    assert [e.value for e in events.Scalars("worker/site-a/samples")] == [200] * 6
    hostile = [t for t in tags if t.startswith("worker/") and "site-" not in t]
    assert hostile and all("<" not in t and '"' not in t for t in hostile), "tags are sanitised worker ids"
    assert "config/text_summary" in events.Tags()["tensors"]


def test_record_scalars_skip_what_is_not_a_number() -> None:
    scalars = dict(record_scalars({"round": 2, "rounds": 5, "accuracy": 0.9, "loss": None, "dropped": {"a": "x"},
                                   "flag": True, "note": "text", "seconds": float("nan")}))
    assert scalars == {"accuracy": 0.9, "workers/dropped": 1.0}


def test_live_writer_from_the_config(tmp_path: Path) -> None:
    config = parse_config({
        "name": "live", "model": {"factory": "fedlink.models:mlp"}, "workers": ["ws://127.0.0.1:1"], "rounds": 3,
        "output": {"dir": str(tmp_path / "out"), "tensorboard": True},
    })
    with run_observers(config, Progress()) as observers:
        observers.run_started("live", 3, ["ws://127.0.0.1:1"])
        for r in (1, 2, 3):
            observers.worker_status(r, "worker-0", "done", "loss 0.5")
            observers.round_finished({"round": r, "rounds": 3, "accuracy": 0.5 + r / 10, "workers": 1, "selected": 1,
                                      "samples": 10, "seconds": 0.1, "dropped": {}})
        events = _read(tmp_path / "out" / "tensorboard")  # flushed after each round, before the writer closes
        assert [e.step for e in events.Scalars("accuracy")] == [1, 2, 3]
    assert [e.value for e in _read(tmp_path / "out" / "tensorboard").Scalars("worker/worker-0/contributed")] == [1, 1, 1]
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["output_options"] == {"tensorboard": True} and saved["name"] == "live"


def test_cli_converts_each_run_into_its_own_folder(tmp_path: Path) -> None:
    runs = [write_run(tmp_path / "a", rounds=3), write_run(tmp_path / "b", rounds=4)]
    result = CliRunner().invoke(coordinator_cli, ["report", *map(str, runs), "--tensorboard", str(tmp_path / "tb")])
    assert result.exit_code == 0, result.output
    assert len(_read(tmp_path / "tb" / "a").Scalars("accuracy")) == 3
    assert len(_read(tmp_path / "tb" / "b").Scalars("accuracy")) == 4
