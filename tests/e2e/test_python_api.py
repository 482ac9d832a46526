"""The README's Python API example, run as written: LocalWorkers start real fl-worker processes, fedlink.train
trains on them, and the history comes back as typed records."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

import fedlink

from .conftest import ROOT

pytestmark = pytest.mark.timeout(240)


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 1, "the Python API section has exactly one example"
    return blocks[0]


def test_readme_example_trains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)  # the example writes under runs/ of the current folder
    namespace: dict[str, object] = {"__name__": "readme_example"}
    exec(compile(readme_example(), "README.md#python-api", "exec"), namespace)  # noqa: S102 - our own README
    history = namespace["history"]
    assert isinstance(history, list) and len(history) == 5
    assert all(isinstance(r, fedlink.RoundRecord) for r in history)
    assert [r.round for r in history] == [1, 2, 3, 4, 5] and all(r.workers == 3 for r in history)
    assert history[-1].accuracy is not None and history[-1].accuracy > 0.9
    out = capsys.readouterr().out
    assert out.count("round ") == 5 and "final accuracy" in out
    workers = namespace["workers"]
    assert isinstance(workers, fedlink.LocalWorkers) and workers.workers == [], "the with block stopped them"
    assert (tmp_path / "runs/python-api/run/metrics.jsonl").exists()
    assert any((tmp_path / "runs/python-api/run/tensorboard").iterdir())


def test_import_fedlink_is_light() -> None:
    import subprocess

    code = "import sys, fedlink; print(sorted(m for m in ('torch', 'pydantic', 'websockets') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert done.stdout.strip() == "[]", done.stdout
