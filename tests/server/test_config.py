"""The job configuration: the documented example validates, mistakes are named precisely."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from fedlink.server.config import load_config, parse_config
from fedlink.server.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]

MINIMAL = {
    "name": "t",
    "model": {"factory": "fedlink.models:mlp"},
    "workers": ["ws://127.0.0.1:8777"],
    "rounds": 2,
}


def test_example_config_from_the_issue_validates() -> None:
    config = load_config(ROOT / "examples" / "mnist-iid" / "config.yaml")
    assert config.name == "mnist-iid"
    assert [w.url for w in config.workers] == ["ws://127.0.0.1:8777", "ws://127.0.0.1:8778", "ws://127.0.0.1:8779"]
    assert config.training.optimizer.lr == 0.05 and config.training.optimizer.momentum == 0.9
    assert config.sampling.min_workers == 2 and config.strategy.name == "fedavg"
    assert config.evaluation.data == ROOT / "examples" / "mnist-iid" / "data" / "test.npy"


def test_relative_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "job"
    folder.mkdir()
    (folder / "c.yaml").write_text(yaml.safe_dump({**MINIMAL, "output": "out", "evaluation": {"data": "t.npy"}}))
    config = load_config(folder / "c.yaml")
    assert config.output == folder / "out"
    assert config.evaluation.data == folder / "t.npy"


def test_worker_entries_accept_urls_and_mappings() -> None:
    config = parse_config({**MINIMAL, "workers": ["ws://a:1", {"url": "wss://b:2"}]})
    assert [w.url for w in config.workers] == ["ws://a:1", "wss://b:2"]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"rounds": 0}, "rounds = 0"),
        ({"workers": ["http://x:1"]}, "workers.0.url = 'http://x:1'"),
        ({"training": {"optimizer": {"lr": -1}}}, "training.optimizer.lr = -1"),
        ({"training": {"update": "weight"}}, "training.update = 'weight'"),
        ({"training": {"epoch": 2}}, "training.epoch = 2: unknown key"),
        ({"sampling": {"min_workers": 3}}, "min_workers is 3 but only 1 workers"),
        ({"workers": ["ws://a:1", "ws://a:1"]}, "ws://a:1 more than once"),
    ],
)
def test_errors_name_key_value_and_expectation(change: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config({**MINIMAL, **change}, source="job.yaml")
    assert expected in str(error.value)
    assert str(error.value).startswith("job.yaml")


def test_missing_key_and_bad_yaml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="model: missing"):
        parse_config({k: v for k, v in MINIMAL.items() if k != "model"})
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "absent.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(tmp_path / "list.yaml")


@pytest.mark.parametrize("example", sorted((ROOT / "examples").glob("*/config.yaml")), ids=lambda p: p.parent.name)
def test_every_example_config_validates(example: Path) -> None:
    config = load_config(example)
    assert config.evaluation.data is not None and config.evaluation.data.parent == example.parent / "data"
