"""Whole secure rounds in memory: the unmasked sum equals the plain sum of the contributors' vectors, exactly."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlink.secagg.errors import TooFewSurvivors
from fedlink.secagg.params import resolve_params
from fedlink.secagg.quantize import QuantSpec, decode_sum, encode_update, layout_of
from fedlink.secagg.simulate import simulate_round

if TYPE_CHECKING:
    from .conftest import StagedRound

IDS = [f"w{i:02d}" for i in range(8)]


def _vectors(ids: list[str], length: int, bits: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(len(ids) * bits)
    return {w: rng.integers(0, 1 << bits, length, dtype=np.uint64).astype(np.uint32) for w in ids}


def _plain(vectors: dict[str, np.ndarray], ids: list[str], bits: int) -> np.ndarray:
    total: np.ndarray = np.stack([vectors[w] for w in ids]).astype(np.uint64).sum(axis=0) % (1 << bits)
    return total


@pytest.mark.parametrize("bits", [32, 13])
@pytest.mark.parametrize(
    "drop",
    [
        {},
        {"advertise": {"w01"}},
        {"share_keys": {"w02"}},
        {"masked_input": {"w03"}},
        {"unmask": {"w04"}},
        {"share_keys": {"w00"}, "masked_input": {"w05"}, "unmask": {"w07"}},
    ],
)
def test_sum_of_contributors_with_dropouts_at_every_stage(bits: int, drop: dict[str, set[str]]) -> None:
    vectors = _vectors(IDS, 300, bits)
    params = resolve_params(num_selected=8, length=300, bits=bits)
    outcome = simulate_round(vectors, params=params, drop_before=drop)
    lost_before_masking = set().union(*(drop.get(s, set()) for s in ("advertise", "share_keys", "masked_input")))
    assert outcome.contributors == [w for w in IDS if w not in lost_before_masking]
    assert np.array_equal(outcome.total, _plain(vectors, outcome.contributors, bits))


def test_sparse_graph_round_with_dropouts() -> None:
    ids = [f"w{i:02d}" for i in range(60)]
    vectors = _vectors(ids, 50, 20)
    params = resolve_params(num_selected=60, length=50, bits=20, neighbours=10, threshold=6, min_survivors=40)
    drop = {"share_keys": {"w10"}, "masked_input": {"w20", "w21"}, "unmask": {"w30"}}
    outcome = simulate_round(vectors, params=params, drop_before=drop)
    assert len(outcome.contributors) == 57
    assert np.array_equal(outcome.total, _plain(vectors, outcome.contributors, 20))


def test_too_few_survivors_releases_nothing_and_names_the_dropped() -> None:
    vectors = _vectors(IDS[:5], 10, 16)
    params = resolve_params(num_selected=5, length=10, bits=16)  # k = 4, t = 3, min_survivors = 3
    drop = {"share_keys": {"w00"}, "masked_input": {"w01", "w02"}}
    with pytest.raises(TooFewSurvivors, match="lost at share_keys: w00; lost at masked_input: w01, w02") as caught:
        simulate_round(vectors, params=params, drop_before=drop)
    assert caught.value.stage == "masked_input"


def test_unmask_needs_threshold_answers() -> None:
    vectors = _vectors(IDS[:5], 10, 16)
    params = resolve_params(num_selected=5, length=10, bits=16)  # t = 3
    with pytest.raises(TooFewSurvivors, match="2 workers left after unmask, fewer than the 3 needed"):
        simulate_round(vectors, params=params, drop_before={"unmask": {"w00", "w01", "w02"}})


def test_unmask_fails_when_one_workers_holders_are_too_few(staged: Callable[..., StagedRound]) -> None:
    run = staged(60, length=8, bits=16, neighbours=10, threshold=6, min_survivors=40)
    run.advance()
    quiet = frozenset(run.requests["w00"].neighbours[:6])  # w00 keeps itself and 4 neighbours: 5 < 6
    run.advance()
    run.advance()
    for w, request in run.requests.items():
        if w not in quiet:
            run.server.receive_unmask(w, run.workers[w].unmask(request))
    with pytest.raises(TooFewSurvivors, match="only 5 of 'w00''s share holders answered"):
        run.server.finish()


def test_quantised_updates_through_a_secure_round_give_the_weighted_mean() -> None:
    state = {"weight": torch.zeros(4, 3), "bias": torch.zeros(4)}
    layout = layout_of(state, metrics=("loss",))
    spec = QuantSpec.for_workers(4, bits=32, clip_norm=5.0, weight_cap=1000)
    gen = torch.Generator().manual_seed(0)
    updates = {w: {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in state.items()} for w in IDS[:4]}
    samples = {"w00": 100, "w01": 200, "w02": 300, "w03": 400}
    vectors = {
        w: encode_update(updates[w], num_samples=samples[w], metrics={"loss": 1.0}, layout=layout, spec=spec)
        for w in IDS[:4]
    }
    params = resolve_params(num_selected=4, length=layout.length, bits=32)
    outcome = simulate_round(vectors, params=params, drop_before={"masked_input": {"w03"}})
    assert np.array_equal(outcome.total, _plain(vectors, outcome.contributors, 32))
    aggregate = decode_sum(outcome.total, layout=layout, spec=spec)
    expected = torch.stack([updates[w]["weight"] * samples[w] for w in outcome.contributors]).sum(0) / 600
    assert torch.allclose(aggregate.update["weight"], expected, atol=1e-6)
    assert aggregate.weight == pytest.approx(600, abs=1e-3)
    assert aggregate.metrics["loss"] == pytest.approx(1.0, abs=1e-4)


STAGES = ("advertise", "share_keys", "masked_input", "unmask")


@settings(max_examples=25, deadline=None)
@given(n=st.integers(3, 9), bits=st.sampled_from([8, 32]), data=st.data())
def test_any_dropout_pattern_gives_the_exact_sum_or_releases_nothing(n: int, bits: int, data: st.DataObject) -> None:
    ids = [f"w{i}" for i in range(n)]
    lost_at = {w: data.draw(st.sampled_from((None, *STAGES)), label=w) for w in ids}
    drop = {stage: {w for w, at in lost_at.items() if at == stage} for stage in STAGES}
    vectors = _vectors(ids, 20, bits)
    params = resolve_params(num_selected=n, length=20, bits=bits)
    left = [sum(1 for at in lost_at.values() if at is None or STAGES.index(at) > i) for i in range(len(STAGES))]
    feasible = all(count >= params.min_survivors for count in left[:3]) and left[3] >= params.threshold
    try:
        outcome = simulate_round(vectors, params=params, drop_before=drop)
    except TooFewSurvivors:
        assert not feasible
        return
    assert feasible
    assert outcome.contributors == [w for w in ids if lost_at[w] in (None, "unmask")]
    assert np.array_equal(outcome.total, _plain(vectors, outcome.contributors, bits))
