"""The pure aggregation functions of fedlink.server.aggregate, on tiny hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from fedlink.server.aggregate import (
    coordinate_median,
    krum_scores,
    lowest,
    min_trimmed_count,
    pairwise_sq_distances,
    trim_count,
    trimmed_mean,
    weighted_mean,
)

# Five 2-d points for Krum; e is the outlier. Squared distances:
#   ab=1 ac=4 ad=2 ae=200 | bc=5 bd=1 be=181 | cd=2 ce=164 | de=162
# With f=1, each score sums the n-f-2 = 2 smallest distances to the others:
#   a: 1+2=3   b: 1+1=2   c: 2+4=6   d: 1+2=3   e: 162+164=326
POINTS = [[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [1.0, 1.0], [10.0, 10.0]]


def _points(with_counter: bool = False) -> list[dict[str, torch.Tensor]]:
    states = [{"w": torch.tensor(p, dtype=torch.float64)} for p in POINTS]
    if with_counter:  # wildly different integer buffers must not move the distances
        for i, state in enumerate(states):
            state["count"] = torch.tensor(1000 * i)
    return states


def test_weighted_mean_by_hand() -> None:
    states = [
        {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(2)},
        {"w": torch.tensor([3.0, 6.0]), "steps": torch.tensor(5)},
    ]
    out = weighted_mean(states, [1.0, 3.0])
    # w: (1*1 + 3*3)/4 = 2.5, (1*2 + 3*6)/4 = 5; steps: (2 + 15)/4 = 4.25 -> 4, still int64
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert out["steps"].dtype == torch.int64 and int(out["steps"]) == 4


def test_weighted_mean_needs_one_weight_per_state() -> None:
    with pytest.raises(ValueError, match="2 states but 1 weights"):
        weighted_mean([{"w": torch.zeros(2)}, {"w": torch.zeros(2)}], [1.0])


def test_median_odd_count() -> None:
    values = [torch.tensor([1.0, 5.0, 3.0]), torch.tensor([2.0, 0.0, 9.0]), torch.tensor([7.0, 4.0, 4.0])]
    # per coordinate: {1,2,7} -> 2, {5,0,4} -> 4, {3,9,4} -> 4
    assert torch.equal(coordinate_median(values), torch.tensor([2.0, 4.0, 4.0]))


def test_median_even_count_averages_the_middle_two() -> None:
    values = [torch.tensor([1.0]), torch.tensor([10.0]), torch.tensor([2.0]), torch.tensor([4.0])]
    # sorted 1, 2, 4, 10 -> (2 + 4) / 2 = 3
    assert torch.equal(coordinate_median(values), torch.tensor([3.0]))
    half = coordinate_median([torch.tensor([1.0], dtype=torch.float16), torch.tensor([2.0], dtype=torch.float16)])
    assert half.dtype == torch.float16 and float(half) == 1.5


def test_median_of_integers_is_the_lower_middle_value() -> None:
    values = [torch.tensor(3), torch.tensor(8), torch.tensor(5), torch.tensor(1)]
    # sorted 1, 3, 5, 8 -> lower median 3 (a value some worker sent), dtype kept
    out = coordinate_median(values)
    assert out.dtype == torch.int64 and int(out) == 3


def test_median_of_bools_is_the_majority_ties_true() -> None:
    t, f = True, False
    out = coordinate_median([torch.tensor([t, f, t]), torch.tensor([t, f, f]), torch.tensor([f, t, f])])
    assert torch.equal(out, torch.tensor([t, f, f]))
    assert bool(coordinate_median([torch.tensor(t), torch.tensor(f)]))  # 1 of 2: tie -> True, as WeightedSum


def test_median_errors() -> None:
    with pytest.raises(ValueError, match="no values"):
        coordinate_median([])
    with pytest.raises(ValueError, match="differ in shape"):
        coordinate_median([torch.zeros(2), torch.zeros(3)])


def test_trim_count_and_minimum() -> None:
    assert trim_count(10, 0.1) == 1  # floor(1.0)
    assert trim_count(5, 0.2) == 1
    assert trim_count(9, 0.3) == 2  # floor(2.7)
    assert trim_count(3, 0.0) == 0  # beta 0 is the plain mean, on purpose
    assert [min_trimmed_count(b) for b in (0.1, 0.2, 0.3, 1 / 3, 0.49)] == [10, 5, 4, 3, 3]


def test_trim_count_errors_name_the_numbers() -> None:
    with pytest.raises(ValueError, match=r"beta=0.1 trims floor\(0.1 \* 9\) = 0 of 9 .* at least 10"):
        trim_count(9, 0.1)
    with pytest.raises(ValueError, match=r"beta must be in \[0, 0.5\), got 0.5"):
        trim_count(10, 0.5)
    with pytest.raises(ValueError, match="beta must be"):
        trim_count(10, -0.1)


def test_trimmed_mean_by_hand() -> None:
    columns = [[1.0, -50.0], [100.0, 0.0], [3.0, 2.0], [2.0, 0.0], [4.0, 1.0]]
    values = [torch.tensor(c, dtype=torch.float64) for c in columns]
    # beta 0.2 of 5 trims 1 at each end: {1,2,3,4,100} -> (2+3+4)/3 = 3; {-50,0,0,1,2} -> (0+0+1)/3 = 1/3
    torch.testing.assert_close(trimmed_mean(values, 0.2), torch.tensor([3.0, 1 / 3], dtype=torch.float64))


def test_trimmed_mean_of_integers_takes_the_median() -> None:
    values = [torch.tensor(v) for v in (4, 100, 6, 5, 0)]
    assert int(trimmed_mean(values, 0.2)) == 5


def test_pairwise_distances_ignore_integer_buffers() -> None:
    d = pairwise_sq_distances(_points(with_counter=True))
    assert d.dtype == torch.float64
    assert d[0].tolist() == [0.0, 1.0, 4.0, 2.0, 200.0]
    assert d[2, 4] == d[4, 2] == 164.0
    assert torch.equal(d, d.T)


def test_krum_scores_by_hand() -> None:
    assert krum_scores(_points(), 1).tolist() == [3.0, 2.0, 6.0, 3.0, 326.0]
    # f=0 keeps n-2 = 3 neighbours: a: 1+2+4=7
    assert float(krum_scores(_points(), 0)[0]) == 7.0


def test_krum_scores_need_more_than_2f_plus_2_updates() -> None:
    with pytest.raises(ValueError, match=r"f=1 needs n > 2f \+ 2 = 4 updates, got n=4"):
        krum_scores(_points()[:4], 1)
    with pytest.raises(ValueError, match="num_byzantine must be >= 0"):
        krum_scores(_points(), -1)


def test_lowest_breaks_ties_by_index() -> None:
    scores = torch.tensor([3.0, 2.0, 6.0, 3.0, 326.0])
    assert lowest(scores, 1) == [1]
    assert lowest(scores, 3) == [0, 1, 3]  # a and d tie at 3; both fit
    assert lowest(torch.tensor([1.0, 1.0, 1.0]), 2) == [0, 1]
    with pytest.raises(ValueError, match="cannot select 6 of 5"):
        lowest(scores, 6)
    with pytest.raises(ValueError, match="cannot select 0 of 5"):
        lowest(scores, 0)
