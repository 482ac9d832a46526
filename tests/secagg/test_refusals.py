"""Every request a worker must refuse, and the coordinator-side checks; a refusal reveals nothing more."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

from fedlink.secagg.errors import ProtocolViolation, ReconstructionFailed, ShareDecryptionFailed
from fedlink.secagg.messages import PublicKeys, ShareKeysResult, UnmaskResult

if TYPE_CHECKING:
    from .conftest import StagedRound

Make = Callable[..., "StagedRound"]


def _at(staged: Make, stage: str, **kwargs: Any) -> StagedRound:
    run = staged(**kwargs)
    while run.stage != stage:
        run.advance()
    return run


def _refused_after(run: StagedRound, worker: str) -> None:
    # a worker that refused once stays refused for the round: a second, honest-looking request gets nothing
    with pytest.raises(ProtocolViolation, match="refused an earlier request"):
        run.workers[worker].unmask(run.requests[worker])


def test_unmask_listing_a_peer_as_alive_and_dropped(staged: Make) -> None:
    run = _at(staged, "unmask")
    request = run.requests["w00"]
    lying = request.model_copy(update={"dropped": ["w01"]})
    with pytest.raises(ProtocolViolation, match="both alive and dropped.*stage unmask, peer 'w01'"):
        run.workers["w00"].unmask(lying)
    _refused_after(run, "w00")


def test_a_peer_first_alive_then_dropped_gets_no_second_kind_of_share(staged: Make) -> None:
    run = _at(staged, "unmask")
    request = run.requests["w00"]
    first = run.workers["w00"].unmask(request)
    assert "w01" in first.self_mask_shares and not first.key_shares
    assert run.workers["w00"].unmask(request) == first  # the same question gets the same answer
    moved = request.model_copy(update={"alive": [w for w in request.alive if w != "w01"], "dropped": ["w01"]})
    with pytest.raises(ProtocolViolation, match="was reported alive earlier.*peer 'w01'"):
        run.workers["w00"].unmask(moved)


def test_a_changed_session_id_is_refused(staged: Make) -> None:
    run = _at(staged, "masked_input")
    other = "ab" * 32
    with pytest.raises(ProtocolViolation, match="the session id changed.*stage masked_input"):
        run.workers["w00"].masked_input(run.requests["w00"].model_copy(update={"session": other}), run.vectors["w00"])
    run = _at(staged, "unmask")
    with pytest.raises(ProtocolViolation, match="the session id changed.*stage unmask"):
        run.workers["w01"].unmask(run.requests["w01"].model_copy(update={"session": other}))
    run = _at(staged, "share_keys")
    with pytest.raises(ProtocolViolation, match="session id differs.*stage share_keys"):
        run.workers["w02"].share_keys(run.requests["w02"].model_copy(update={"session": other}))


def test_fewer_survivors_than_the_threshold_are_refused(staged: Make) -> None:
    run = _at(staged, "unmask", n=7)  # k = 6, t = 4, min_survivors = 4
    request = run.requests["w00"]
    # a coordinator that calls almost everyone dropped would get key shares to strip w00's neighbours' masks
    lying = request.model_copy(update={"alive": ["w00", "w01", "w02"], "dropped": ["w03", "w04", "w05", "w06"]})
    with pytest.raises(ProtocolViolation, match="3 survivors .* fewer than min_survivors 4 or threshold 4"):
        run.workers["w00"].unmask(lying)


def test_a_neighbour_graph_that_does_not_follow_from_the_session_id(staged: Make) -> None:
    run = _at(staged, "share_keys", n=60, neighbours=10, threshold=6, min_survivors=40, length=4)
    request = run.requests["w00"]
    others = [w for w in run.workers if w != "w00" and w not in request.neighbours]
    chosen = request.model_copy(update={"neighbours": [*request.neighbours[:-1], others[0]]})
    with pytest.raises(ProtocolViolation, match="neighbour list does not follow from the session id"):
        run.workers["w00"].share_keys(chosen)


def test_altered_keys_or_parameters_are_refused(staged: Make) -> None:
    run = _at(staged, "share_keys")
    request = run.requests["w00"]
    keys = dict(request.keys)
    keys["w00"] = PublicKeys(c=keys["w01"].c, s=keys["w00"].s)
    with pytest.raises(ProtocolViolation, match="own public keys are missing or altered"):
        run.workers["w00"].share_keys(request.model_copy(update={"keys": keys}))
    keys = dict(request.keys)
    keys["w02"] = keys["w01"]
    with pytest.raises(ProtocolViolation, match="also advertised by"):
        run.workers["w01"].share_keys(request.model_copy(update={"keys": keys}))
    changed = request.params.model_copy(update={"threshold": 2})
    with pytest.raises(ProtocolViolation, match="parameters changed"):
        run.workers["w03"].share_keys(request.model_copy(update={"params": changed}))


def test_tampered_or_readdressed_shares_are_refused(staged: Make) -> None:
    run = _at(staged, "masked_input")
    request = run.requests["w00"]
    shares = dict(request.shares)
    shares["w01"] = shares["w01"][:-2] + ("00" if shares["w01"][-2:] != "00" else "01")
    with pytest.raises(ShareDecryptionFailed, match="peer 'w01'"):
        run.workers["w00"].masked_input(request.model_copy(update={"shares": shares}), run.vectors["w00"])
    readdressed = dict(run.requests["w02"].shares)
    readdressed["w01"] = request.shares["w01"]  # w01's bundle for w00, handed to w02
    with pytest.raises(ShareDecryptionFailed):
        run.workers["w02"].masked_input(run.requests["w02"].model_copy(update={"shares": readdressed}), run.vectors["w02"])
    missing = {k: v for k, v in run.requests["w03"].shares.items() if k != "w04"}
    with pytest.raises(ProtocolViolation, match="do not match the neighbours.*peer 'w04'"):
        run.workers["w03"].masked_input(run.requests["w03"].model_copy(update={"shares": missing}), run.vectors["w03"])


def test_out_of_order_and_repeated_masking_are_refused(staged: Make) -> None:
    run = _at(staged, "share_keys")
    earlier = run.requests["w00"]
    run.advance()
    with pytest.raises(ProtocolViolation, match="out of order: the worker is at 'shared'.*stage share_keys"):
        run.workers["w00"].share_keys(earlier)
    run.workers["w01"].masked_input(run.requests["w01"], run.vectors["w01"])
    with pytest.raises(ProtocolViolation, match="out of order"):
        run.workers["w01"].masked_input(run.requests["w01"], np.zeros_like(run.vectors["w01"]))


def test_an_input_vector_off_the_parameters_is_refused(staged: Make) -> None:
    run = _at(staged, "masked_input", bits=12)
    with pytest.raises(ProtocolViolation, match="more than 12 bits"):
        run.workers["w00"].masked_input(run.requests["w00"], np.full(16, 1 << 12, dtype=np.uint32))
    with pytest.raises(ProtocolViolation, match="refused an earlier request"):
        run.workers["w00"].masked_input(run.requests["w00"], np.zeros(16, dtype=np.uint32))
    with pytest.raises(ProtocolViolation, match="16 uint32 values"):
        run.workers["w01"].masked_input(run.requests["w01"], np.zeros(15, dtype=np.uint32))


def test_the_coordinator_refuses_results_off_the_protocol(staged: Make) -> None:
    run = _at(staged, "masked_input")
    server, request = run.server, run.requests["w00"]
    header, packed = run.workers["w00"].masked_input(request, run.vectors["w00"])
    with pytest.raises(ProtocolViolation, match="take 32 bytes, got 31.*peer 'w00'"):
        server.receive_masked("w00", header, packed[:-1])
    server.receive_masked("w00", header, packed)
    with pytest.raises(ProtocolViolation, match="a second masked input.*peer 'w00'"):
        server.receive_masked("w00", header, packed)
    with pytest.raises(ProtocolViolation, match="another session"):
        server.receive_masked("w01", header.model_copy(update={"session": "cd" * 32}), packed)
    with pytest.raises(ProtocolViolation, match="not expected in round"):
        server.receive_masked("mallory", header, packed)
    with pytest.raises(ProtocolViolation, match="result arrived while the round is at 'masked_input'"):
        server.receive_shares("w00", ShareKeysResult(round=3, session=header.session, shares={}))


def test_a_wrong_share_is_caught_when_rebuilding(staged: Make) -> None:
    run = _at(staged, "unmask", n=6)
    for w, request in run.requests.items():
        answer = run.workers[w].unmask(request)
        if w == "w01":
            bad = dict(answer.self_mask_shares)
            bad["w00"] = (int(bad["w00"], 16) ^ 1).to_bytes(33, "big").hex()
            answer = UnmaskResult.model_validate(answer.model_dump() | {"self_mask_shares": bad})
        run.server.receive_unmask(w, answer)
    with pytest.raises(ReconstructionFailed, match="inconsistent self shares.*peer 'w00'"):
        run.server.finish()
