"""Logs never hold secrets or tensor contents: a real job (``fl-coordinator train`` and ``fl-worker`` processes,
every logger at DEBUG) with a known token, then a search of every log line for the token, its derived key, the
tensors' bytes and their printed values."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fedlink.protocol.auth import derive_key
from fedlink.server.localworkers import LocalWorker, start_workers

from .conftest import coordinator_command

pytestmark = pytest.mark.timeout(240)

TOKEN = "KNOWN-token-for-the-log-test-7f3a9c1e5b"


def _fingerprints(state: dict[str, torch.Tensor]) -> list[str]:
    """How a tensor's bytes or values would look in a log: hex with and without spaces, and printed values."""
    out: list[str] = []
    for tensor in state.values():
        flat = tensor.detach().reshape(-1)
        if flat.numel() < 4 or not flat.is_floating_point():
            continue
        raw = flat[:4].contiguous().view(torch.uint8).numpy().tobytes()
        out += [raw.hex(), raw.hex(" "), f"{float(flat[0]):.6f}", repr(flat[:4])[:30]]
    return out


def test_logs_hold_no_token_and_no_tensor_contents(digit_shards: tuple[list[Path], Path], tmp_path: Path) -> None:
    shards, test = digit_shards
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    workers = start_workers(shards, extra_args=["--threads", "1", "--log-level", "debug", "--token-file", str(token_file)])
    try:
        config = {
            "name": "log-secrets",
            "seed": 0,
            "model": {"factory": "fedlink.models:mlp", "kwargs": {"in_features": 64, "hidden": 32, "num_classes": 10}},
            "workers": [w.url for w in workers],
            "rounds": 2,
            "sampling": {"min_workers": 3},
            "training": {"epochs": 1},
            "auth": {"token_file": str(token_file)},
            "evaluation": {"data": str(test)},
            "output": str(tmp_path / "run"),
        }
        (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
        run = subprocess.run([*coordinator_command(), "train", str(tmp_path / "config.yaml"), "--log-level", "debug"],
                             capture_output=True, text=True, timeout=180)
    finally:
        _stop(workers)
    assert run.returncode == 0, run.stderr[-3000:]
    logs = {w.log_path.name: w.log_path.read_text() for w in workers}
    logs["coordinator"] = run.stderr + run.stdout
    assert all("DEBUG" in text for name, text in logs.items() if name != "coordinator"), "debug logging was on"
    assert "round 2" in logs["coordinator"]

    model = load_file(tmp_path / "run" / "model.safetensors")
    torch.manual_seed(0)
    from fedlink.models import mlp

    initial = dict(mlp(in_features=64, hidden=32, num_classes=10).state_dict())
    forbidden = [TOKEN, derive_key(TOKEN.encode()).hex(), TOKEN.encode().hex(), *_fingerprints(model), *_fingerprints(initial)]
    for name, text in logs.items():
        for secret in forbidden:
            assert secret not in text, f"{name} holds {secret[:12]}..."
        dumps = re.findall(r"(?:\b[0-9a-f]{2} ){12}", text)
        assert not dumps, f"{name} holds a hex dump: {dumps[:2]}"
        assert "tensor([" not in text, f"{name} prints tensor values"


def _stop(workers: list[LocalWorker]) -> None:
    for worker in workers:
        assert worker.stop() == 0, worker.log_tail()
