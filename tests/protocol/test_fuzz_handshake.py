"""Fuzzing the handshake and the decoding of its messages: only fedlink's protocol errors escape.

The targets and strategies are those of ``bench/fuzz.py`` (see its docstring for what each checks); CI runs about
650 inputs, ``-m slow`` the full campaign of 105,000. The generic decoder fuzzing of every message type is in
``test_frames.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("fedlink_bench_fuzz", ROOT / "bench" / "fuzz.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = _load()

CI = {"decode": 150, "preauth": 150, "scripted": 200, "tampered": 150}
FULL = 105_000


@pytest.mark.parametrize("target", sorted(CI))
def test_fuzz_short(target: str) -> None:
    before = fuzz.TALLY.inputs[target]
    fuzz.build(target, CI[target])()
    assert fuzz.TALLY.inputs[target] - before >= CI[target] // 2, "hypothesis ran the target"


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_fuzz_full_campaign(capsys: pytest.CaptureFixture[str]) -> None:
    before = sum(fuzz.TALLY.inputs.values())
    assert fuzz.main(["--examples", str(FULL)]) == 0
    assert sum(fuzz.TALLY.inputs.values()) - before >= 100_000
    print(capsys.readouterr().out)


def test_the_targets_see_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness is not vacuous: outcomes are as expected, and a broken check or decoder is caught."""
    assert fuzz.decode_target(b"\x07") == "MalformedFrame"
    assert fuzz.preauth_target(b"\x01" + b"\x00" * 9000) == "LimitExceeded"
    assert fuzz.preauth_target(b"\x01\xdc\x00\x41" + b"\x90" * 65) == "MalformedFrame", "65 arrays: over the bound"
    assert fuzz.scripted_target([b"\x01\xc1"], "worker", "token", False) == "HandshakeFailed"
    assert fuzz.tampered_target("token", "token", True, True, 0, []) == "ok / ok"
    assert fuzz.tampered_target("token", "other", True, True, 0, []) == "AuthenticationFailed / AuthenticationFailed"
    # A handshake that accepted any proof would let different tokens through: the tampered target says so.
    monkeypatch.setattr("fedlink.protocol.session.check_proof", lambda *args: True)
    with pytest.raises(AssertionError):
        fuzz.tampered_target("token", "other", True, True, 0, [])
    monkeypatch.undo()

    def broken(data: object, limits: object) -> object:
        raise KeyError("a bug in the decoder")

    monkeypatch.setattr(fuzz, "decode_frame", broken)
    with pytest.raises(KeyError):
        fuzz.decode_target(b"\x01")
