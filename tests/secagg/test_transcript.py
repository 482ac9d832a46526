"""What the coordinator sees: for two input sets with the same sum it cannot tell which one was used.

Everything the coordinator receives is collected from in-memory rounds over a 4-bit modulus. Public keys and
share ciphertexts are fresh randomness; the masked vectors are the part that depends on the inputs. The
coordinator also rebuilds each survivor's self-mask seed, so it sees x_u + (pairwise masks) as well. Both views
are compared between the two input sets with a chi-square test; the same test on the unmasked inputs tells them
apart at once, so the check can fail.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch
from pydantic import BaseModel
from scipy.stats import chi2_contingency

from fedlink.secagg import bitpack, prg, shamir
from fedlink.secagg.messages import UnmaskResult
from fedlink.secagg.params import resolve_params
from fedlink.secagg.quantize import QuantSpec, encode_update, layout_of
from fedlink.secagg.simulate import RoundOutcome, simulate_round

BITS, LENGTH, TRIALS = 4, 64, 100
IDS = ["a", "b", "c", "d"]
SET_A = {"a": 3, "b": 5, "c": 0, "d": 7}  # same sum of the survivors a, b, c (8) in both sets
SET_B = {"a": 8, "b": 0, "c": 0, "d": 1}
DROP = {"masked_input": {"d"}}


def _views(outcome: RoundOutcome, threshold: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The masked vectors of a and b, and the same with the self masks the coordinator rebuilds removed."""
    masked = {w: bitpack.unpack(p, BITS, LENGTH) for w, p in outcome.transcript if isinstance(p, bytes)}
    answers = [(w, p) for w, p in outcome.transcript if isinstance(p, UnmaskResult)]
    order = sorted(IDS)
    stripped = {}
    for owner in ("a", "b"):
        shares = [(order.index(w) + 1, int(p.self_mask_shares[owner], 16)) for w, p in answers]
        seed = shamir.rebuild(shares, threshold=threshold).to_bytes(32, "big")
        vector = masked[owner].copy()
        prg.add_mask(vector, seed, bits=BITS, sign=-1)
        stripped[owner] = vector
    return [masked["a"], masked["b"]], [stripped["a"], stripped["b"]]


def _cells(pairs: list[list[np.ndarray]]) -> Counter[int]:
    # the joint value of (a, b) per coordinate: 256 cells
    return Counter((pair[0] * 16 + pair[1]).tolist()[i] for pair in pairs for i in range(LENGTH))


def _p_value(first: Counter[int], second: Counter[int]) -> float:
    cells = sorted(set(first) | set(second))
    return float(chi2_contingency([[first[c] for c in cells], [second[c] for c in cells]]).pvalue)


def _collect(inputs: dict[str, int]) -> tuple[Counter[int], Counter[int], list[RoundOutcome]]:
    params = resolve_params(num_selected=4, length=LENGTH, bits=BITS)
    vectors = {w: np.full(LENGTH, v, dtype=np.uint32) for w, v in inputs.items()}
    masked, stripped, outcomes = [], [], []
    for _ in range(TRIALS):
        outcome = simulate_round(vectors, params=params, drop_before=DROP)
        assert outcome.total.tolist() == [8] * LENGTH
        first, second = _views(outcome, params.threshold)
        masked.append(first)
        stripped.append(second)
        outcomes.append(outcome)
    return _cells(masked), _cells(stripped), outcomes


def test_same_sum_inputs_are_indistinguishable_to_the_coordinator() -> None:
    masked_a, stripped_a, _ = _collect(SET_A)
    masked_b, stripped_b, _ = _collect(SET_B)
    assert _p_value(masked_a, masked_b) > 1e-4
    assert _p_value(stripped_a, stripped_b) > 1e-4
    # the control: the same statistic on the inputs themselves separates the sets completely
    plain_a = Counter({SET_A["a"] * 16 + SET_A["b"]: TRIALS * LENGTH})
    plain_b = Counter({SET_B["a"] * 16 + SET_B["b"]: TRIALS * LENGTH})
    assert _p_value(plain_a, plain_b) < 1e-12


def _field_names(payload: BaseModel) -> set[str]:
    names = set(type(payload).model_fields)
    for value in payload.__dict__.values():
        if isinstance(value, BaseModel):
            names |= _field_names(value)
    return names


def _ints(value: object) -> set[int]:
    if isinstance(value, bool):
        return set()
    if isinstance(value, int):
        return {value}
    if isinstance(value, dict):
        return set().union(*(_ints(v) for v in value.values())) if value else set()
    if isinstance(value, (list, tuple)):
        return set().union(*(_ints(v) for v in value)) if value else set()
    return set()


def test_nothing_per_worker_reaches_the_coordinator_in_the_clear() -> None:
    state = {"w": torch.zeros(6)}
    layout = layout_of(state, metrics=("loss",))
    spec = QuantSpec.for_workers(4, bits=32, clip_norm=1.0, weight_cap=1000)
    samples = {"a": 123, "b": 456, "c": 789, "d": 321}
    vectors = {
        w: encode_update({"w": torch.full((6,), 0.1)}, num_samples=n, metrics={"loss": 0.5}, layout=layout, spec=spec)
        for w, n in samples.items()
    }
    outcome = simulate_round(vectors, params=resolve_params(num_selected=4, length=layout.length), drop_before=DROP)
    plain = {w: bitpack.pack(v, 32) for w, v in vectors.items()}
    for sender, payload in outcome.transcript:
        if isinstance(payload, bytes):
            assert payload != plain[sender]
            assert not set(bitpack.unpack(payload, 32, layout.length).tolist()) & set(vectors[sender].tolist())
        else:
            names = _field_names(payload)
            assert not names & {"num_samples", "metrics", "loss", "weight", "accuracy", "update", "values"}
            assert not _ints(payload.model_dump()) & set(samples.values())


def test_a_single_masked_vector_is_uniform() -> None:
    bits = 4
    # one worker's masked vector alone: every value equally likely whatever the input
    params = resolve_params(num_selected=3, length=4096, bits=bits)
    vectors = {w: np.full(4096, 5, dtype=np.uint32) for w in ("a", "b", "c")}
    outcome = simulate_round(vectors, params=params)
    masked = next(bitpack.unpack(p, bits, 4096) for w, p in outcome.transcript if isinstance(p, bytes) and w == "a")
    counts = np.bincount(masked, minlength=16)
    assert chi2_contingency([counts, np.full(16, 256)]).pvalue > 1e-4
