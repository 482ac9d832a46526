from __future__ import annotations

import secrets
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chi2_contingency, chisquare

from fedlink.secagg import shamir
from fedlink.secagg.errors import ShareError


@settings(max_examples=60, deadline=None)
@given(
    secret=st.integers(min_value=0, max_value=(1 << 256) - 1),
    holders=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_any_threshold_shares_rebuild(secret: int, holders: int, data: st.DataObject) -> None:
    threshold = data.draw(st.integers(min_value=1, max_value=holders))
    indices = data.draw(st.lists(st.integers(1, 10_000), min_size=holders, max_size=holders, unique=True))
    shares = shamir.split(secret, threshold=threshold, indices=indices)
    subset = data.draw(st.permutations(shares))[: data.draw(st.integers(threshold, holders))]
    assert shamir.rebuild(subset, threshold=threshold) == secret


def test_fewer_than_threshold_shares_miss_the_secret() -> None:
    secret = (1 << 256) - 1
    shares = shamir.split(secret, threshold=4, indices=range(1, 8))
    with pytest.raises(ShareError, match="3 shares cannot rebuild"):
        shamir.rebuild(shares[:3], threshold=4)
    # and interpolating them as if the threshold were 3 gives some other field element
    assert shamir.rebuild(shares[:3], threshold=3) != secret


def _joint(secret: int, trials: int, prime: int) -> Counter[tuple[int, int]]:
    counts: Counter[tuple[int, int]] = Counter()
    for _ in range(trials):
        shares = shamir.split(secret, threshold=3, indices=[1, 2, 3, 4, 5], prime=prime)
        counts[(shares[1][1], shares[3][1])] += 1  # two shares: t - 1
    return counts


def test_threshold_minus_one_shares_are_uniform_whatever_the_secret() -> None:
    prime, trials = 7, 4000
    cells = [(a, b) for a in range(prime) for b in range(prime)]
    zero, six = _joint(0, trials, prime), _joint(6, trials, prime)
    assert chisquare([zero[c] for c in cells]).pvalue > 1e-4
    assert chi2_contingency([[zero[c] for c in cells], [six[c] for c in cells]]).pvalue > 1e-4


def test_the_uniformity_check_sees_a_leak() -> None:
    # the same statistic rejects t shares (threshold 1: each share is the secret), so the test above can fail
    prime = 7
    leaked = Counter(shamir.split(3, threshold=1, indices=[1], prime=prime)[0][1] for _ in range(700))
    assert chisquare([leaked[v] for v in range(prime)]).pvalue < 1e-6


@pytest.mark.parametrize(
    ("indices", "message"),
    [([1, 2, 2], "appears twice"), ([0, 1, 2], "must lie in"), ([1, shamir.PRIME], "must lie in")],
)
def test_bad_indices_are_refused(indices: list[int], message: str) -> None:
    with pytest.raises(ShareError, match=message):
        shamir.split(5, threshold=2, indices=indices)
    with pytest.raises(ShareError, match=message):
        shamir.rebuild([(i, 1) for i in indices], threshold=2)


def test_out_of_range_inputs_are_refused() -> None:
    with pytest.raises(ShareError, match="threshold must be between 1 and the 3 holders"):
        shamir.split(5, threshold=4, indices=[1, 2, 3])
    with pytest.raises(ShareError, match="field element"):
        shamir.split(shamir.PRIME, threshold=2, indices=[1, 2, 3])
    with pytest.raises(ShareError, match="33 bytes"):
        shamir.share_from_bytes(1, bytes(32))
    with pytest.raises(ShareError, match="outside the field"):
        shamir.share_from_bytes(1, b"\xff" * 33)


def test_share_bytes_round_trip_at_k_51() -> None:
    secret = secrets.randbits(256)
    shares = shamir.split(secret, threshold=26, indices=range(1, 52))
    parsed = [shamir.share_from_bytes(i, shamir.share_to_bytes(s)) for i, s in zip(range(1, 52), shares)]
    assert parsed == shares
    assert shamir.rebuild(parsed[25:], threshold=26) == secret
