from __future__ import annotations

import pytest

from fedlink.secagg.errors import SecAggConfigError
from fedlink.secagg.graph import neighbour_graph, permutation
from fedlink.secagg.params import resolve_params, secure_threshold

IDS = [f"w{i:03d}" for i in range(101)]


def test_defaults_up_to_fifty_workers_are_the_complete_graph() -> None:
    p = resolve_params(num_selected=10, length=5)
    assert (p.neighbours, p.threshold, p.min_survivors, p.bits) == (9, 6, 6, 32)
    p = resolve_params(num_selected=50, length=5, colluding=6)
    assert (p.neighbours, p.threshold, p.min_survivors) == (49, 29, 29)
    # secrecy: a lying coordinator needs 2 (t - c) - 1 <= k - c honest shares; t is the first value that denies it
    assert 2 * (p.threshold - 6) - 1 > 49 - 6 and not 2 * (p.threshold - 1 - 6) - 1 > 49 - 6


def test_defaults_above_fifty_workers_are_a_sparse_even_degree() -> None:
    small, large = resolve_params(num_selected=51, length=5), resolve_params(num_selected=10_000, length=5)
    for p in (small, large):
        assert p.neighbours % 2 == 0 and p.neighbours < p.num_selected - 1
        assert p.threshold == secure_threshold(p.neighbours, 0)
    assert large.neighbours < 400  # grows like log n, not like n
    assert large.min_survivors == 6667


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"neighbours": 10}, "neighbours must be at most n - 1 = 9"),
        ({"num_selected": 60, "neighbours": 7}, "must be even"),
        ({"threshold": 5}, r"threshold must lie in \[6, 9\]"),
        ({"colluding": 2, "threshold": 6}, r"threshold must lie in \[7, 9\]"),
        ({"min_survivors": 5}, r"min_survivors must lie in \[6, 10\]"),
        ({"colluding": 9}, "colluding must leave at least two honest workers"),
        ({"num_selected": 2}, "at least 3 selected workers"),
        ({"bits": 40}, "bits"),
    ],
)
def test_unsafe_settings_are_refused(overrides: dict[str, int], message: str) -> None:
    settings = {"num_selected": 10, "length": 5} | overrides
    with pytest.raises(SecAggConfigError, match=message):
        resolve_params(**settings)


def test_graph_is_regular_symmetric_and_follows_the_session() -> None:
    graph = neighbour_graph(IDS, degree=8, session=bytes(32))
    assert graph == neighbour_graph(list(reversed(IDS)), degree=8, session=bytes(32))
    assert all(len(neighbours) == 8 and w not in neighbours for w, neighbours in graph.items())
    assert all(w in graph[v] for w, neighbours in graph.items() for v in neighbours)
    assert graph != neighbour_graph(IDS, degree=8, session=b"\x01" * 32)
    assert sorted(permutation(IDS, session=bytes(32))) == IDS


def test_complete_graph_and_bad_degrees() -> None:
    assert neighbour_graph(["a", "b", "c"], degree=2, session=bytes(32)) == {
        "a": ("b", "c"), "b": ("a", "c"), "c": ("a", "b"),
    }  # fmt: skip
    with pytest.raises(SecAggConfigError, match="even degree"):
        neighbour_graph(IDS, degree=5, session=bytes(32))
    with pytest.raises(SecAggConfigError, match="distinct"):
        neighbour_graph(["a", "a", "b"], degree=2, session=bytes(32))
